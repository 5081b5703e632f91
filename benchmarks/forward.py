"""Forwarding throughput of node.destinations.dicom.DicomRunner (CT 512x512, 16-bit).

Usage: python3 benchmarks/forward.py [N]   (from the repository root)
Pre-fills a destination's pending/ folder with N CT images (uncompressed, then
JPEG-LS lossless via node.codecs), starts a DicomRunner and times until pending/ is
empty. Peers: Orthanc 1.10.1 (SyncStorageArea off and on) and DCMTK storescp --ignore
(receives and discards: the SCU side alone).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pydicom.uid import JPEGLSLossless  # noqa: E402

from node.codecs import compress_dataset  # noqa: E402
from node.codecs.base import CompressSpec  # noqa: E402
from node.config import DicomDestination  # noqa: E402
from node.destinations.dicom import DicomRunner  # noqa: E402
from node.spool import Spool  # noqa: E402
from tests import images  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402
from tests.orthanc import start_orthanc  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
tmp = Path(tempfile.mkdtemp())
src = {"uncompressed": tmp / "raw", "jpeg-ls": tmp / "jls"}
for folder in src.values():
    folder.mkdir()
for i in range(N):
    ds = images.make_ct(seed=i)
    ds.save_as(src["uncompressed"] / f"{i:020d}-0-{i:06d}.dcm", enforce_file_format=True)
    out = compress_dataset(ds, CompressSpec(transfer_syntax=JPEGLSLossless)).dataset
    out.save_as(src["jpeg-ls"] / f"{i:020d}-0-{i:06d}.dcm", enforce_file_format=True)
sizes = {k: sum(p.stat().st_size for p in v.iterdir()) / N / 1024 for k, v in src.items()}


def run(name: str, port: int, aet: str, kind: str, assocs: int) -> None:
    spool = Spool(tmp / f"spool-{name}-{kind}-{assocs}")
    spool.create()
    pending = spool.pending_dir("pacs")
    shutil.copytree(src[kind], pending)
    dest = DicomDestination(
        name="pacs",
        host="127.0.0.1",
        port=port,
        ae_title=aet,
        calling_ae_title="BENCH",
        max_associations=assocs,
    )
    runner = DicomRunner(dest, spool)
    started = time.perf_counter()
    runner.start()
    while any(pending.glob("*.dcm")):
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    runner.stop()
    failed = len(list(spool.failed_dir("pacs").glob("*.dcm")))
    print(
        f"{name:28s} {kind:12s} ({sizes[kind]:5.0f} KiB/image) assocs={assocs}: "
        f"{N / seconds:6.1f} images/s  ({seconds:.2f} s, failed {failed})"
    )


for sync in (False,):
    orthanc = start_orthanc(tmp / f"orthanc-{sync}", extra={"SyncStorageArea": sync})
    try:
        for kind in src:
            for assocs in (1, 2):
                run(f"orthanc SyncStorageArea={sync}", orthanc.dicom_port, "ORTHANC", kind, assocs)
    finally:
        orthanc.stop()

port = free_port()
scp = subprocess.Popen(
    ["/usr/bin/storescp", "--ignore", "+xa", "-pdu", "131072", str(port)],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env={**os.environ, "TCP_NODELAY": "1"},
)
wait_for_port(port)
try:
    for kind in src:
        run("storescp --ignore", port, "STORESCP", kind, 1)
finally:
    scp.terminate()
shutil.rmtree(tmp, ignore_errors=True)
