"""Forwarding throughput of the node's senders (CT 512x512, 16-bit): C-STORE
(node.destinations.dicom.DicomRunner) and STOW-RS (node.destinations.dicomweb.DicomwebRunner).

Usage: python3 benchmarks/forward.py [N]   (from the repository root)
Pre-fills a destination's pending/ folder with N CT images (uncompressed, then
JPEG-LS lossless via node.codecs), starts a runner and times until pending/ is
empty. Peers: Orthanc 1.10.1 with its DICOMweb plugin (a fresh one per run, so that no
run finds the images already stored), by C-STORE and by STOW-RS, 1 and 2 parallel
associations/requests; DCMTK storescp --ignore (receives and discards: the SCU side
alone). Prints the STOW-RS/C-STORE ratios at the end.
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
from node.destinations.dicomweb import DicomwebRunner  # noqa: E402
from node.destinations.dicomweb_config import DicomwebDestination  # noqa: E402
from node.spool import Spool  # noqa: E402
from tests import images  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402
from tests.orthanc import start_orthanc  # noqa: E402

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
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
rates: dict[tuple[str, str, int], float] = {}


def run(name: str, kind: str, parallel: int, make_runner) -> float:  # type: ignore[no-untyped-def]
    spool = Spool(tmp / f"spool-{name}-{kind}-{parallel}".replace(" ", "_"))
    spool.create()
    pending = spool.pending_dir("pacs")
    shutil.copytree(src[kind], pending)
    runner = make_runner(spool)
    started = time.perf_counter()
    runner.start()
    while any(pending.glob("*.dcm")):
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    runner.stop()
    failed = len(list(spool.failed_dir("pacs").glob("*.dcm")))
    print(
        f"{name:28s} {kind:12s} ({sizes[kind]:5.0f} KiB/image) parallel={parallel}: "
        f"{N / seconds:6.1f} images/s  ({seconds:.2f} s, failed {failed})",
        flush=True,
    )
    return N / seconds


def fresh_orthanc(label: str):  # type: ignore[no-untyped-def]
    return start_orthanc(
        tmp / f"orthanc-{label}",
        extra={
            "SyncStorageArea": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        },
    )


for kind in src:
    for parallel in (1, 2):
        for protocol in ("C-STORE", "STOW-RS"):
            if protocol == "STOW-RS" and kind != "jpeg-ls":
                continue
            orthanc = fresh_orthanc(f"{protocol}-{kind}-{parallel}")
            try:
                if protocol == "C-STORE":
                    dest = DicomDestination(
                        name="pacs",
                        host="127.0.0.1",
                        port=orthanc.dicom_port,
                        ae_title="ORTHANC",
                        calling_ae_title="BENCH",
                        max_associations=parallel,
                    )
                    make = lambda spool, d=dest: DicomRunner(d, spool)  # noqa: E731
                else:
                    web = DicomwebDestination(
                        name="pacs",
                        url=f"{orthanc.url}/dicom-web",
                        max_parallel_requests=parallel,
                    )
                    make = lambda spool, d=web: DicomwebRunner(d, spool)  # noqa: E731
                name = f"orthanc {protocol}"
                rates[(protocol, kind, parallel)] = run(name, kind, parallel, make)
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
        dest = DicomDestination(
            name="pacs",
            host="127.0.0.1",
            port=port,
            ae_title="STORESCP",
            calling_ae_title="BENCH",
        )
        run("storescp --ignore", kind, 1, lambda spool, d=dest: DicomRunner(d, spool))
finally:
    scp.terminate()

for parallel in (1, 2):
    stow = rates[("STOW-RS", "jpeg-ls", parallel)]
    cstore = rates[("C-STORE", "jpeg-ls", parallel)]
    print(f"JPEG-LS to Orthanc, parallel={parallel}: STOW-RS / C-STORE = {stow / cstore:.2f}")
shutil.rmtree(tmp, ignore_errors=True)
