"""A throw-away Orthanc on loopback, as the PACS that the node forwards to.

Started from a temp JSON config (free DICOM and HTTP ports, temp storage, no
plugins, no remote access); checked through its REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from tests.conftest import free_port

ORTHANC = Path("/usr/sbin/Orthanc")


@dataclass
class Orthanc:
    proc: subprocess.Popen
    root: Path
    dicom_port: int
    http_port: int
    aet: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as rsp:
            body = rsp.read()
        try:
            return json.loads(body)
        except ValueError:
            return body

    def instances(self) -> list[str]:
        return self.get("/instances")

    def sop_instance_uids(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc id of every stored instance."""
        return {
            self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]: i
            for i in self.instances()
        }

    def transfer_syntax(self, orthanc_id: str) -> str:
        return self.get(f"/instances/{orthanc_id}/metadata/TransferSyntax").decode().strip()

    def dataset(self, orthanc_id: str, tmp: Path) -> pydicom.Dataset:
        path = tmp / f"{orthanc_id}.dcm"
        path.write_bytes(self.get(f"/instances/{orthanc_id}/file"))
        return pydicom.dcmread(path)

    def wait_instances(self, count: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.instances()
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(
            f"Orthanc holds {len(self.instances())} of {count} instances after {timeout}s; "
            f"log:\n{self.log.read_text(errors='replace')[-3000:]}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_orthanc(root: Path, aet: str = "ORTHANC", extra: dict[str, Any] | None = None) -> Orthanc:
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "dicom-node-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "Plugins": [],
        "DicomCheckCalledAet": True,
        "StorageCompression": False,
        # A re-sent duplicate (at-least-once delivery) is answered Success and ignored.
        "OverwriteInstances": False,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        **(extra or {}),
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1))
    log = root / "orthanc.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(ORTHANC), "--logdir=" + str(root), str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            # DCMTK (inside Orthanc) leaves Nagle on unless told: ~40 ms per C-STORE.
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    orthanc = Orthanc(proc, root, dicom_port, http_port, aet, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            orthanc.get("/system")
            return orthanc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    orthanc.stop()
    raise TimeoutError("Orthanc did not answer on HTTP within 30 s")
