"""End to end: a modality sends CT to the node, the node compresses to JPEG-LS and
delivers to a folder or forwards to a PACS; the same run, side by side (issue 15,
targets 2-4).

    python3 benchmarks/forward_e2e.py [--count 200] [--rounds 3]

Rows, alternating per round: the node with a folder destination, the node with a
DICOM destination (DCMTK ``storescp --fork --ignore`` as a PACS that is never the
limit), as received (no compression) to either. For each: acknowledged rate (DCMTK
``storescu`` with TCP_NODELAY, from start to exit), delivered rate (until the spool's
incoming/ and outboxes are empty and, for a folder, every file is archived) and the
receiving process's CPU per instance (user + system of the node's main process only,
from /proc). Then Orthanc as the PACS: the node's sender against DCMTK ``storescu``
sending the same JPEG-LS files to the same Orthanc (target 4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
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
from tests.orthanc import start_orthanc  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def node_config(root: Path, port: int, destination: str, compress: bool, pacs_port: int) -> Path:
    rule_compress = "compress: {transfer_syntax: jpeg-ls-lossless}" if compress else ""
    text = textwrap.dedent(f"""\
        node:
          ae_title: BENCH-NODE
          host: 127.0.0.1
          port: {port}
          spool: {root / "spool"}
          workers: auto
          log_level: WARNING
        destinations:
          archive:
            type: folder
            path: {root / "archive"}
          pacs:
            type: dicom
            host: 127.0.0.1
            port: {pacs_port}
            ae_title: PACS
        rules:
          - name: bench
            {rule_compress}
            send_to: [{destination}]
        """)
    config = root / "node.yaml"
    config.write_text(text)
    return config


def spool_empty(root: Path) -> bool:
    spool = root / "spool"
    if any((spool / "incoming").glob("*.dcm")):
        return False
    return not any((spool / "destinations").glob("*/pending/*.dcm"))


def archived(root: Path) -> int:
    return sum(1 for p in (root / "archive").rglob("*.dcm") if not p.name.startswith("."))


def one_run(files: list[Path], work: Path, destination: str, compress: bool, pacs: int) -> dict:
    root = Path(tempfile.mkdtemp(dir=work))
    port = free_port()
    config = node_config(root, port, destination, compress, pacs)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    node = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for_port(port, proc=node)
        time.sleep(2.0)  # workers and the sending process up
        cpu0 = cpu_seconds(node.pid)
        started = time.perf_counter()
        subprocess.run(
            [STORESCU, "-aec", "BENCH-NODE", "127.0.0.1", str(port), *map(str, files)],
            check=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        acknowledged = time.perf_counter() - started
        while not spool_empty(root) or (destination == "archive" and archived(root) < len(files)):
            time.sleep(0.01)
        delivered = time.perf_counter() - started
        cpu = cpu_seconds(node.pid) - cpu0
    finally:
        node.terminate()
        node.wait(60)
        shutil.rmtree(root, ignore_errors=True)
    n = len(files)
    return {"ack": n / acknowledged, "delivered": n / delivered, "cpu_ms": 1000 * cpu / n}


def orthanc_rows(jls: list[Path], work: Path, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"node sender -> Orthanc": [], "DCMTK storescu -> Orthanc": []}
    for r in range(rounds):
        for label in rates:
            orthanc = start_orthanc(
                work / f"orthanc-{r}-{label[:4]}", extra={"SyncStorageArea": True}
            )
            try:
                started = time.perf_counter()
                if label.startswith("DCMTK"):
                    subprocess.run(
                        [STORESCU, "-xt", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port)]
                        + list(map(str, jls)),
                        check=True,
                        env={**os.environ, "TCP_NODELAY": "1"},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                else:
                    spool = Spool(work / f"spool-o-{r}")
                    spool.create()
                    shutil.copytree(jls[0].parent, spool.pending_dir("pacs"))
                    dest = DicomDestination(
                        name="pacs",
                        host="127.0.0.1",
                        port=orthanc.dicom_port,
                        ae_title="ORTHANC",
                        calling_ae_title="BENCH",
                        instances_per_association=len(jls),
                    )
                    runner = DicomRunner(dest, spool)
                    runner.start()
                    while any(spool.pending_dir("pacs").glob("*.dcm")):
                        time.sleep(0.005)
                    runner.stop()
                rates[label].append(len(jls) / (time.perf_counter() - started))
                print(f"round {r + 1} {label:30s} {rates[label][-1]:7.1f} images/s", flush=True)
            finally:
                orthanc.stop()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(__file__).resolve().parent / ".work" / "forward-e2e"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ct").mkdir(parents=True)
    (work / "jls").mkdir()
    files, jls = [], []
    for i in range(args.count):
        ds = images.make_ct(seed=i)
        files.append(work / "ct" / f"{i:06d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
        out = compress_dataset(ds, CompressSpec(transfer_syntax=JPEGLSLossless)).dataset
        jls.append(work / "jls" / f"{i:020d}-0-{i:06d}.dcm")
        out.save_as(jls[-1], enforce_file_format=True)
    pacs_port = free_port()
    pacs = subprocess.Popen(
        [STORESCP, "--fork", "--ignore", "+xa", "-aet", "PACS", str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    wait_for_port(pacs_port)
    rows = {
        "JPEG-LS -> folder": ("archive", True),
        "JPEG-LS -> DICOM (storescp)": ("pacs", True),
        "as received -> folder": ("archive", False),
        "as received -> DICOM (storescp)": ("pacs", False),
    }
    results: dict[str, list[dict]] = {name: [] for name in rows}
    try:
        for r in range(args.rounds):
            for name, (destination, compress) in rows.items():
                m = one_run(files, work, destination, compress, pacs_port)
                results[name].append(m)
                print(
                    f"round {r + 1} {name:32s} acknowledged {m['ack']:6.1f}/s, delivered "
                    f"{m['delivered']:6.1f}/s, receiving process {m['cpu_ms']:.2f} ms CPU/image",
                    flush=True,
                )
    finally:
        pacs.terminate()
    med = {
        name: {k: statistics.median(m[k] for m in ms) for k in ("ack", "delivered", "cpu_ms")}
        for name, ms in results.items()
    }
    print(f"\n{args.count} CT, medians of {args.rounds} rounds:")
    print("| row | acknowledged/s | delivered/s | receiving process CPU ms/image |")
    print("|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['ack']:.0f} | {m['delivered']:.0f} | {m['cpu_ms']:.2f} |")
    for kind in ("JPEG-LS", "as received"):
        f, d = med[f"{kind} -> folder"], med[f"{kind} -> DICOM (storescp)"]
        print(
            f"{kind}: delivered DICOM/folder {d['delivered'] / f['delivered']:.2f} (target >= 0.9); "
            f"acknowledged DICOM/folder {d['ack'] / f['ack']:.2f}; receiving CPU DICOM/folder "
            f"{d['cpu_ms'] / f['cpu_ms']:.2f} (target <= 1.1)"
        )
    orthanc = orthanc_rows(jls, work, args.rounds)
    node_rate = statistics.median(orthanc["node sender -> Orthanc"])
    dcmtk_rate = statistics.median(orthanc["DCMTK storescu -> Orthanc"])
    print(f"to Orthanc: node sender / DCMTK storescu = {node_rate / dcmtk_rate:.2f} (target >= 1)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
