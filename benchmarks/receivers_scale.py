"""Receive-only intake with 1, 2 and 4 concurrent senders: ``receivers: 1`` against
``receivers: N`` against DCMTK ``storescp --fork`` (a process per association too, but
no fsync), side by side in one run (issue 16).

    python3 benchmarks/receivers_scale.py [--count 400] [--rounds 2] [--receivers 2]

Each sender is a DCMTK ``storescu`` (TCP_NODELAY=1) with its share of ``count`` CT
images (512x512, 16-bit); the rate is images over the time until every sender has
exited (the node answers only after fsync, so an answered image is on disk).
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
from tests import images  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def node(work: Path, receivers: int) -> tuple[subprocess.Popen[bytes], int]:
    root = Path(tempfile.mkdtemp(dir=work))
    port = free_port()
    (root / "node.yaml").write_text(
        textwrap.dedent(f"""\
        node:
          ae_title: BENCH
          host: 127.0.0.1
          port: {port}
          spool: {root / "spool"}
          workers: auto
          receivers: {receivers}
          log_level: WARNING
        destinations:
          archive: {{type: folder, path: {root / "archive"}}}
        rules:
          - name: all
            send_to: [archive]
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "run", "--config", str(root / "node.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    wait_for_port(port, proc=proc)
    time.sleep(2.0 + receivers)  # every receiver bound
    return proc, port


def storescp(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    out = Path(tempfile.mkdtemp(dir=work))
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "--fork", "+xa", "-aet", "BENCH", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    wait_for_port(port, proc=proc)
    return proc, port


def send(port: int, files: list[Path], senders: int) -> float:
    shares = [files[i::senders] for i in range(senders)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aec", "BENCH", "127.0.0.1", str(port), *map(str, share)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for share in shares
    ]
    codes = [p.wait() for p in procs]
    assert codes == [0] * senders, codes
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--receivers", type=int, default=2)
    args = parser.parse_args()
    work = Path(__file__).resolve().parent / ".work" / "receivers-scale"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ct").mkdir(parents=True)
    files = []
    for i in range(args.count):
        files.append(work / "ct" / f"{i:06d}.dcm")
        images.make_ct(seed=i).save_as(files[-1], enforce_file_format=True)
    systems = {
        "node receivers: 1": lambda: node(work, 1),
        f"node receivers: {args.receivers}": lambda: node(work, args.receivers),
        "storescp --fork": lambda: storescp(work),
    }
    rates: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for senders in (1, 2, 4):
            for name, launch in systems.items():
                proc, port = launch()
                try:
                    rate = send(port, files, senders)
                finally:
                    proc.terminate()
                    proc.wait(60)
                rates.setdefault((name, senders), []).append(rate)
                print(
                    f"round {r + 1} {senders} sender(s) {name:20s} {rate:7.1f} images/s", flush=True
                )
    print(f"\n{args.count} CT, receive-only, medians of {args.rounds} rounds (images/s):")
    print("| senders | " + " | ".join(systems) + " | N/1 | N/storescp |")
    print("|---" * (len(systems) + 3) + "|")
    for senders in (1, 2, 4):
        med = [statistics.median(rates[(name, senders)]) for name in systems]
        print(
            f"| {senders} | "
            + " | ".join(f"{m:.0f}" for m in med)
            + f" | {med[1] / med[0]:.2f} | {med[1] / med[2]:.2f} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
