"""The sending side alone, side by side in one run (issue 15, target 1).

Usage: python3 benchmarks/send_path.py [N] [ROUNDS]   (from the repository root)

N JPEG-LS CT images (512x512, 16-bit) in a destination's pending/ folder, sent to
DCMTK ``storescp --fork --ignore`` (receives and discards, so the SCU side is measured) by:
the node's DicomRunner with its streamed path (node/destinations/dicom_wire.py) with
1 and 2 associations; the same runner on pynetdicom's own C-STORE path; DCMTK
``storescu`` (proposing JPEG-LS) with the same files, 1 and 2 processes. Rounds
alternate the rows; the medians and the ratios to DCMTK are printed at the end.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pydicom.uid import JPEGLSLossless  # noqa: E402

from node.codecs import compress_dataset  # noqa: E402
from node.codecs.base import CompressSpec  # noqa: E402
from node.destinations.dicom import DicomDestination  # noqa: E402
from node.destinations.dicom_sender import DicomRunner  # noqa: E402
from node.spool import Spool  # noqa: E402
from tests import images  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
tmp = Path(tempfile.mkdtemp())
source = tmp / "jls"
source.mkdir()
for i in range(N):
    ds = compress_dataset(images.make_ct(seed=i), CompressSpec(transfer_syntax=JPEGLSLossless))
    ds.dataset.save_as(source / f"{i:020d}-0-{i:06d}.dcm", enforce_file_format=True)


class PynetdicomPath(DicomRunner):
    """The runner with its streamed path switched off: pynetdicom's send_c_store."""

    def _take_over(self, assoc):  # type: ignore[no-untyped-def]
        return None


def runner_row(port: int, parallel: int, kind: type[DicomRunner]) -> Callable[[int], float]:
    def run(n: int) -> float:
        spool = Spool(tmp / f"spool-{kind.__name__}-{parallel}-{n}")
        spool.create()
        pending = spool.pending_dir("pacs")
        shutil.copytree(source, pending)
        dest = DicomDestination(
            name="pacs",
            host="127.0.0.1",
            port=port,
            ae_title="STORESCP",
            calling_ae_title="BENCH",
            max_associations=parallel,
            instances_per_association=N,
        )
        runner = kind(dest, spool)
        started = time.perf_counter()
        runner.start()
        while any(pending.glob("*.dcm")):
            time.sleep(0.002)
        seconds = time.perf_counter() - started
        runner.stop()
        failed = len(list(spool.failed_dir("pacs").glob("*.dcm")))
        assert failed == 0, f"{failed} failed"
        return N / seconds

    return run


def storescu_row(port: int, processes: int) -> Callable[[int], float]:
    files = sorted(map(str, source.iterdir()))
    shares = [files[i::processes] for i in range(processes)]
    env = {**os.environ, "TCP_NODELAY": "1"}

    def run(n: int) -> float:
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                ["/usr/bin/storescu", "-xt", "-aec", "STORESCP", "127.0.0.1", str(port), *share],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for share in shares
        ]
        codes = [p.wait() for p in procs]
        seconds = time.perf_counter() - started
        assert codes == [0] * processes, codes
        return N / seconds

    return run


def main() -> None:
    port = free_port()
    scp = subprocess.Popen(
        # --fork: a process per association, so that parallel associations run in
        # parallel (a single storescp serves one association at a time).
        ["/usr/bin/storescp", "--fork", "--ignore", "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    wait_for_port(port)
    rows: dict[str, Callable[[int], float]] = {
        "node streamed, 1 association": runner_row(port, 1, DicomRunner),
        "node streamed, 2 associations": runner_row(port, 2, DicomRunner),
        "node via pynetdicom, 1 association": runner_row(port, 1, PynetdicomPath),
        "DCMTK storescu, 1 process": storescu_row(port, 1),
        "DCMTK storescu, 2 processes": storescu_row(port, 2),
    }
    rates: dict[str, list[float]] = {name: [] for name in rows}
    try:
        for n in range(ROUNDS):
            for name, run in rows.items():
                rates[name].append(run(n))
                print(f"round {n + 1} {name:38s} {rates[name][-1]:7.1f} images/s", flush=True)
    finally:
        scp.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"\n{N} JPEG-LS CT, medians of {ROUNDS} rounds:")
    for name, rate in median.items():
        print(f"  {name:38s} {rate:7.1f} images/s")
    one, two = median["DCMTK storescu, 1 process"], median["DCMTK storescu, 2 processes"]
    print(
        f"  streamed 1 assoc / storescu 1 process:  {median['node streamed, 1 association'] / one:.2f}"
    )
    print(
        f"  streamed 2 assoc / storescu 2 processes: {median['node streamed, 2 associations'] / two:.2f}"
    )
    print(
        "  streamed / pynetdicom path (1 assoc):   "
        f"{median['node streamed, 1 association'] / median['node via pynetdicom, 1 association']:.2f}"
    )


if __name__ == "__main__":
    main()
