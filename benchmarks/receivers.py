"""The receivers under test: dicom-node, DCMTK storescp (+ dcmcjpls) and Orthanc.

Each receiver runs in its own fresh folder on a free 127.0.0.1 port. ``start()`` returns
once the port listens; ``done()`` counts the instances that are finished in the receiver's
own sense (archived, compressed or stored); ``stop()`` ends the process tree it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DCMTK = Path("/usr/bin")  # not PATH: pynetdicom installs Python apps named storescu/storescp
ORTHANC = Path("/usr/sbin/Orthanc")
PR_SET_CHILD_SUBREAPER = 36
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """True if a socket listens on ``port`` (read from /proc: no connection is made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def count_files(folder: Path, suffix: str = "") -> int:
    """Files below ``folder`` whose name ends with ``suffix``; dotfiles (temp names) ignored."""
    total = 0
    for _, _, names in os.walk(folder):
        total += sum(1 for n in names if not n.startswith(".") and n.endswith(suffix))
    return total


def first_file(folder: Path, suffix: str = "") -> Path | None:
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if not name.startswith(".") and name.endswith(suffix):
                return Path(root) / name
    return None


def tree_bytes(folder: Path, suffix: str = "") -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if not name.startswith(".") and name.endswith(suffix):
                total += (Path(root) / name).stat().st_size
    return total


class Receiver(ABC):
    """A receiver process in ``workdir``; subclasses say how to launch and count it."""

    ae_title = "RECEIVER"
    # True: an instance is finished when its C-STORE is answered (the clock stops when the
    # sender exits). False: work continues after the answer (the clock stops at done()).
    synchronous = True

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "receiver.log"

    # -- to implement
    @abstractmethod
    def command(self) -> list[str]: ...

    @abstractmethod
    def done(self) -> int: ...

    @abstractmethod
    def output_bytes(self) -> int: ...

    @abstractmethod
    def sample_output(self) -> Path | None: ...

    def prepare(self) -> None:
        """Write configs and create folders before launch (subclasses extend this)."""
        self.workdir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def is_ready(self) -> bool:
        return listening(self.port)

    # -- common
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> None:
        self.prepare()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                env=self.env(), start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.describe()} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.describe()} not ready after {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process (it owns its session), then SIGKILL its whole group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # leftovers in its own process group
            os.killpg(self.proc.pid, signal.SIGKILL)

    def describe(self) -> str:
        return f"{type(self).__name__} on port {self.port} (log {self.log})"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


# ------------------------------------------------------------------ dicom-node


class NodeReceiver(Receiver):
    """``python -m node.cli run`` with one rule and a folder destination."""

    ae_title = "BENCH-NODE"
    synchronous = False

    def __init__(self, workdir: Path, transfer_syntax: str | None, workers: str = "auto") -> None:
        super().__init__(workdir)
        self.transfer_syntax = transfer_syntax  # None: store as received
        self.workers = workers
        self.config = workdir / "node.yaml"
        self.archive = workdir / "archive"

    def prepare(self) -> None:
        super().prepare()
        compress = (
            f"compress: {{ transfer_syntax: {self.transfer_syntax} }}"
            if self.transfer_syntax
            else ""
        )
        self.config.write_text(
            textwrap.dedent(f"""\
            node:
              ae_title: {self.ae_title}
              host: 127.0.0.1
              port: {self.port}
              spool: {self.workdir / "spool"}
              workers: {self.workers}
              log_level: INFO
            destinations:
              archive:
                type: folder
                path: {self.archive}
            rules:
              - name: bench
                {compress}
                send_to: [archive]
            """)
        )

    def command(self) -> list[str]:
        return [sys.executable, "-m", "node.cli", "run", "--config", str(self.config)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def start(self, timeout: float = 180.0) -> None:
        super().start(timeout)
        deadline = time.monotonic() + timeout  # the node logs "ready:" once it accepts
        while "ready:" not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.describe()} never logged 'ready:'")
            time.sleep(0.05)

    def done(self) -> int:
        return count_files(self.archive)

    def output_bytes(self) -> int:
        return tree_bytes(self.archive)

    def sample_output(self) -> Path | None:
        return first_file(self.archive)


# ------------------------------------------------------------------ DCMTK


class DcmtkReceiver(Receiver):
    """DCMTK storescp with ``--fork`` (one process per association, as a sysadmin serving
    several modalities runs it); optionally ``dcmcjpls`` on every received file.

    With compression, ``--exec-on-reception`` runs (asynchronously, through /bin/sh)
    dcmcjpls into a dot-named temp file, renames it to ``<name>.jls`` and deletes the
    uncompressed file, so a ``.jls`` name means a complete output. storescp is launched
    as a child subreaper so that these commands stay in its process tree (CPU, memory).
    """

    ae_title = "STORESCP"

    def __init__(self, workdir: Path, compress: bool) -> None:
        super().__init__(workdir)
        self.compress = compress
        self.synchronous = not compress
        self.out = workdir / "out"

    def prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)

    def exec_command(self) -> str:
        return f"{DCMTK / 'dcmcjpls'} #p/#f #p/.#f.part && mv #p/.#f.part #p/#f.jls && rm -f #p/#f"

    def command(self) -> list[str]:
        storescp = [str(DCMTK / "storescp"), "--fork", "-aet", self.ae_title, "-od", str(self.out)]
        if self.compress:
            storescp += ["--exec-on-reception", self.exec_command()]
        storescp.append(str(self.port))
        return [sys.executable, "-c", _SUBREAPER_EXEC, *storescp]

    def env(self) -> dict[str, str]:
        return {**os.environ, "TCP_NODELAY": "1"}

    def done(self) -> int:
        return count_files(self.out, ".jls" if self.compress else "")

    def output_bytes(self) -> int:
        return tree_bytes(self.out, ".jls" if self.compress else "")

    def sample_output(self) -> Path | None:
        return first_file(self.out, ".jls" if self.compress else "")


_SUBREAPER_EXEC = (
    "import ctypes, os, sys; "
    f"ctypes.CDLL(None, use_errno=True).prctl({PR_SET_CHILD_SUBREAPER}, 1, 0, 0, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


# ------------------------------------------------------------------ Orthanc


class OrthancReceiver(Receiver):
    """Orthanc with a temporary config; optional ingest transcoding to JPEG-LS lossless.

    Orthanc answers a C-STORE after storing (and transcoding) the instance, so the clock
    stops when the sender exits; ``done()`` asks REST /statistics to confirm the count.
    """

    ae_title = "ORTHANC"

    def __init__(self, workdir: Path, transcode_to: str | None) -> None:
        super().__init__(workdir)
        self.transcode_to = transcode_to
        self.http_port = free_port()
        self.storage = workdir / "storage"
        self.config = workdir / "orthanc.json"

    def prepare(self) -> None:
        super().prepare()
        config: dict[str, object] = {
            "Name": "bench",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.port,
            "DicomAet": self.ae_title,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "StorageCompression": False,
            "SaveJobs": False,
            "Plugins": [],
        }
        if self.transcode_to:
            config["IngestTranscoding"] = self.transcode_to
        self.config.write_text(json.dumps(config, indent=2))

    def command(self) -> list[str]:
        return [str(ORTHANC), str(self.config)]

    def env(self) -> dict[str, str]:
        # Orthanc's DICOM server is DCMTK's, which reads TCP_NODELAY from the environment;
        # without it this loopback pair runs at about 20 CT images/s (Nagle + delayed ACK).
        return {**os.environ, "TCP_NODELAY": "1"}

    def is_ready(self) -> bool:
        return listening(self.port) and listening(self.http_port)

    def done(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(json.load(response)["CountInstances"])

    def output_bytes(self) -> int:
        return tree_bytes(self.storage)

    def sample_output(self) -> Path | None:
        return first_file(self.storage)
