"""The newcomer's commands: README, .ci/run and scripts/install-deps agree and work."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-deps"
TEST_PACKAGES = [
    "dcmtk",
    "orthanc",
    "orthanc-dicomweb",
    "haproxy",
    "libgdcm-tools",
    "systemd",
    "openssl",
]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if "install-deps" in line]


def test_the_readme_and_ci_install_the_same_way_and_run_the_same_tests() -> None:
    run, test = readme_commands()[:2]
    assert run.startswith("scripts/install-deps && ") and run.endswith("dicom-node run")
    assert test.startswith("scripts/install-deps --test && ")
    assert test.endswith("&& python3 -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "scripts/install-deps --test" in ci and "python3 -m pytest -q" in ci


def fake_system(tmp_path: Path, *, uid: int, sudo: bool) -> dict[str, str]:
    """A PATH where dpkg finds nothing installed and apt-get, sudo, systemctl only log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    tools = {
        "id": f"echo {uid}",
        "dpkg": "exit 1",
        "apt-get": f'echo "apt-get $*" >> {log}',
        "systemctl": f'echo "systemctl $*" >> {log}',
    }
    if sudo:
        tools["sudo"] = f'echo "sudo $1" >> {log}; exec "$@"'
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    # Only the shell's basics besides the fakes: no real sudo, dpkg or apt-get.
    basics = tmp_path / "basics"
    basics.mkdir()
    for name in ("sh", "env", "cat"):
        real = next(Path(d) / name for d in ("/usr/bin", "/bin") if (Path(d) / name).exists())
        (basics / name).symlink_to(real)
    return {**os.environ, "PATH": f"{bin_dir}:{basics}"}


def log_of(tmp_path: Path) -> list[str]:
    log = tmp_path / "log"
    return log.read_text().splitlines() if log.exists() else []


def test_as_root_it_updates_then_installs_what_is_missing(tmp_path: Path) -> None:
    env = fake_system(tmp_path, uid=0, sudo=False)
    subprocess.run([str(SCRIPT), "--test"], env=env, check=True, capture_output=True)
    update, install, *stops = log_of(tmp_path)
    assert update == "apt-get update -qq"
    assert install == "apt-get install -y -qq python3-venv " + " ".join(TEST_PACKAGES)
    assert stops == ["systemctl stop orthanc", "systemctl stop haproxy"]


def test_a_user_goes_through_sudo_and_without_sudo_is_told_why_not(tmp_path: Path) -> None:
    env = fake_system(tmp_path, uid=1000, sudo=True)
    subprocess.run([str(SCRIPT)], env=env, check=True, capture_output=True)
    assert log_of(tmp_path) == [
        "sudo apt-get",
        "apt-get update -qq",
        "sudo env",
        "apt-get install -y -qq python3-venv",
    ]
    (tmp_path / "bin" / "sudo").unlink()
    refused = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "run this as root, or install sudo" in refused.stderr
