"""Shared fixtures: a real node process on a free loopback port, and DCMTK's tools.

DCMTK is called by its Debian path: a virtual environment's bin holds pynetdicom's
Python apps of the same names (storescu, storescp, echoscu) with other options.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DCMTK_BIN = Path("/usr/bin")
ROOT = Path(__file__).resolve().parent.parent


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        pytest.fail(
            f"DCMTK's {tool} is not installed at {path}: run .ci/run or apt-get install dcmtk"
        )
    return str(path)


def guarded(assoc: Any) -> Any:
    """A test's own pynetdicom association, guarded like the node's (see
    ``keep_responses_from_the_reactor``): pynetdicom's reactor can take a C-STORE
    response from a waiting ``send_*``, which then waits out its DIMSE timeout."""
    from node.pynetdicom_private import keep_responses_from_the_reactor

    if assoc.is_established:
        keep_responses_from_the_reactor(assoc)
    return assoc


def node_environment() -> dict[str, str]:
    """The environment for a node process: this checkout's ``node`` package first, not
    whichever one is installed (the process runs in a temp folder)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), path]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class RunningNode:
    """A ``dicom-node run`` process and the folders of its config."""

    proc: subprocess.Popen
    port: int
    root: Path
    config: Path
    log: Path

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def archived(self) -> list[Path]:
        return sorted(p for p in self.archive.rglob("*.dcm") if not p.name.startswith("."))

    def wait_until(self, condition, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}):\n{self.log_text()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; node log:\n{self.log_text()}")

    def wait_archived(self, count: int, timeout: float = 60.0) -> list[Path]:
        self.wait_until(lambda: len(self.archived()) >= count, timeout, f"{count} archived files")
        return self.archived()

    def wait_spool_empty(self, timeout: float = 60.0) -> None:
        incoming = self.spool / "incoming"
        self.wait_until(lambda: not any(incoming.glob("*.dcm")), timeout, "empty incoming/")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def default_config(
    root: Path,
    port: int,
    rules: str | None = None,
    extra_destinations: str = "",
    workers: int = 2,
    node_extra: str = "",
    log_level: str = "DEBUG",
) -> str:
    """A node config for tests: folder destination ``archive`` below ``root``.

    ``node_extra`` and ``extra_destinations`` are YAML lines added to those sections.
    """
    rules = (
        rules
        or """
      - name: everything
        compress: { transfer_syntax: jpeg-ls-lossless }
        send_to: [archive]
    """
    )
    return (
        textwrap.dedent(f"""
    node:
      ae_title: TEST-NODE
      host: 127.0.0.1
      port: {port}
      spool: {root / "spool"}
      workers: {workers}
      log_level: {log_level}
    """)
        + textwrap.indent(textwrap.dedent(node_extra), "  ")
        + textwrap.dedent(f"""
    destinations:
      archive:
        type: folder
        path: {root / "archive"}
    """)
        + textwrap.indent(textwrap.dedent(extra_destinations), "  ")
        + "rules:\n"
        + textwrap.indent(textwrap.dedent(rules).strip("\n"), "  ")
        + "\n"
    )


class NodeFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.nodes: list[RunningNode] = []

    def start(
        self,
        config_text: str | None = None,
        *,
        rules: str | None = None,
        root: Path | None = None,
        port: int | None = None,
        extra_destinations: str = "",
        workers: int = 2,
    ) -> RunningNode:
        root = root or self.tmp_path / f"node{len(self.nodes)}"
        root.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        text = config_text or default_config(root, port, rules, extra_destinations, workers)
        config = root / "node.yaml"
        config.write_text(text)
        log = root / f"node-{len(self.nodes)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=node_environment(),
            )
        node = RunningNode(proc=proc, port=port, root=root, config=config, log=log)
        self.nodes.append(node)
        try:
            wait_for_port(port, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"node did not start: {exc}\n{node.log_text()}") from exc
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL if node.proc.poll() is None else signal.SIGTERM, timeout=10)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(tmp_path)
    yield factory
    factory.close()


def storescu(
    port: int,
    files: list[Path],
    *,
    calling: str = "STORESCU",
    called: str = "TEST-NODE",
    extra: list[str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Send files with DCMTK's storescu (Nagle off, as a tuned modality would)."""
    cmd = [
        dcmtk("storescu"),
        "-aet",
        calling,
        "-aec",
        called,
        *(extra or []),
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    env = {**os.environ, "TCP_NODELAY": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(
            f"storescu failed ({result.returncode}): {result.stderr}{result.stdout}"
        )
    return result
