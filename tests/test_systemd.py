"""The systemd unit is valid, hardened, and the node speaks sd_notify."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import default_config, free_port

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "dicom-node.service"


def installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's dicom-node."""
    binary = shutil.which("dicom-node")
    assert binary, "dicom-node is not installed on PATH (pip install -e .)"
    unit = tmp_path / "dicom-node.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/dicom-node", binary))
    return unit


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (.ci/run does)")
    return tool


def test_unit_verifies(tmp_path) -> None:
    result = subprocess.run(
        [analyze(), "verify", str(installed_unit(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_unit_exposure_is_low(tmp_path) -> None:
    result = subprocess.run(
        [analyze(), "security", "--offline=yes", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for dicom-node.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_node_notifies_ready_and_stopping(nodes, tmp_path, monkeypatch) -> None:
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(30)
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))  # inherited by the node process
    node = nodes.start(default_config(root, port), root=root, port=port)
    ready = listener.recv(4096).decode()
    assert "READY=1" in ready and "STATUS=" in ready
    node.stop()
    messages = []
    listener.settimeout(2)
    try:
        while True:
            messages.append(listener.recv(4096).decode())
    except TimeoutError:
        pass
    assert any("STOPPING=1" in m for m in messages), messages
    listener.close()
