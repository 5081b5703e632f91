"""A long run: is the node's rate flat, and its memory, over 20,000 CT images?

One DCMTK storescu after another sends the same cached set of CT images (200 by
default, so 100 associations for 20,000) to a node that compresses them; the archive
keeps one file per UID, so the disk holds one set however long the run. Every few
seconds the script reads the node's Prometheus counters (instances received and
routed), its spool backlog and the RSS of all its processes, then prints the
rate and memory for each tenth of the run and the ratio of the last tenth to the
first.

    python3 benchmarks/sustained.py                 # 20,000 CT, JPEG-LS lossless
    python3 benchmarks/sustained.py --count 2000 --syntax htj2k-lossless
    python3 benchmarks/sustained.py --pace 80       # a sender the compression keeps up with

Unpaced, the routed rate rises once the senders are done (receiving no longer takes
a core from compression); paced below the compression rate, a flat routed rate shows
that nothing slows down over the run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import MODALITIES, ensure_images, ensure_warmup  # noqa: E402
from procstat import rss_bytes, tree  # noqa: E402
from receivers import DCMTK, NodeReceiver, free_port  # noqa: E402


class MeteredNode(NodeReceiver):
    """The benchmark node with its Prometheus endpoint on."""

    def __init__(self, workdir: Path, transfer_syntax: str | None) -> None:
        super().__init__(workdir, transfer_syntax)
        self.metrics_port = free_port()

    def prepare(self) -> None:
        super().prepare()
        text = self.config.read_text()
        metrics = f"  metrics: {{ host: 127.0.0.1, port: {self.metrics_port} }}\n"
        self.config.write_text(text.replace("destinations:", metrics + "destinations:", 1))

    def counters(self) -> tuple[float, float]:
        """(instances received, instances routed) so far."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return _sum(text, "dicom_node_instances_received_total"), _sum(
            text, "dicom_node_instances_routed_total"
        )


def _sum(text: str, name: str) -> float:
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


@dataclass
class Sample:
    t: float
    received: float
    routed: float
    rss: int
    backlog: int


def send_all(
    port: int, files: list[Path], rounds: int, errors: list[str], pace: float | None = None
) -> None:
    """``rounds`` associations of ``files``; with ``pace``, at most that many img/s on average."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    command = [str(DCMTK / "storescu"), "-aec", NodeReceiver.ae_title, "127.0.0.1", str(port)]
    started = time.monotonic()
    for k in range(rounds):
        if pace:
            time.sleep(max(0.0, started + k * len(files) / pace - time.monotonic()))
        result = subprocess.run(
            [*command, *map(str, files)], env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            errors.append(result.stderr.strip()[-300:])
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="images in all (default 20000)")
    parser.add_argument("--set", default="ct-u", choices=sorted(MODALITIES), help="image set")
    parser.add_argument("--per-association", type=int, default=200, help="images per storescu")
    parser.add_argument("--syntax", default="jpeg-ls-lossless", help="rule's transfer syntax")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument(
        "--pace",
        type=float,
        default=None,
        help="send at most this many img/s on average (default: as fast as the node takes them)",
    )
    args = parser.parse_args()

    mod = MODALITIES[args.set]
    files = ensure_images(mod, args.per_association)
    rounds = max(1, args.count // len(files))
    total = rounds * len(files)
    with tempfile.TemporaryDirectory(prefix="dicom-node-sustained-") as tmp:
        node = MeteredNode(Path(tmp), args.syntax)
        node.start()
        try:
            errors: list[str] = []
            send_all(node.port, ensure_warmup(mod), 1, errors)
            while node.counters()[1] < len(ensure_warmup(mod)):
                time.sleep(0.1)
            base_received, base_routed = node.counters()
            sender = threading.Thread(
                target=send_all, args=(node.port, files, rounds, errors, args.pace), daemon=True
            )
            samples: list[Sample] = []
            start = time.monotonic()
            sender.start()
            while True:
                received, routed = node.counters()
                samples.append(
                    Sample(
                        time.monotonic() - start,
                        received - base_received,
                        routed - base_routed,
                        sum(rss_bytes(p) for p in tree(node.pid)),
                        len(os.listdir(node.workdir / "spool" / "incoming")),
                    )
                )
                if samples[-1].routed >= total or errors or node.proc.poll() is not None:
                    break
                time.sleep(args.interval)
            if errors:
                print("storescu failed:", errors[0])
                return 1
        finally:
            node.stop()
    report(samples, total, mod.description, args.syntax)
    return 0


def report(samples: list[Sample], total: int, what: str, syntax: str) -> None:
    print(f"\n{total} images ({what}) -> {syntax}, {samples[-1].t:.0f} s\n")
    print("| tenth | routed img/s | received img/s | spool backlog at end | RSS all processes MB |")
    print("|---|---|---|---|---|")
    rates = []
    for k in range(10):
        lo, hi = total * k / 10, total * (k + 1) / 10
        a = next(s for s in samples if s.routed >= lo)
        b = next((s for s in samples if s.routed >= hi), samples[-1])
        window = [s for s in samples if a.t <= s.t <= b.t]
        rate = (b.routed - a.routed) / max(b.t - a.t, 1e-9)
        received = (b.received - a.received) / max(b.t - a.t, 1e-9)
        rates.append(rate)
        peak = max(s.rss for s in window) / 2**20
        print(f"| {k + 1} | {rate:.0f} | {received:.0f} | {b.backlog} | {peak:.0f} |")
    print(f"\nlast tenth / first tenth routed rate: {rates[-1] / rates[0]:.2f}")
    rss = [s.rss for s in samples]
    first = max(rss[: max(1, len(rss) // 10)]) / 2**20
    last = max(rss[-max(1, len(rss) // 10) :]) / 2**20
    print(f"peak RSS first tenth of samples {first:.0f} MB, last tenth {last:.0f} MB")


if __name__ == "__main__":
    raise SystemExit(main())
