"""What the balancer costs: two nodes through HAProxy against the same two nodes
addressed directly, on 127.0.0.1.

    python3 benchmarks/cluster.py [--count 400] [--senders 4] [--rounds 2] [--syntax jpeg-ls]

Each round runs both ways, alternating, on fresh spools: "direct" sends every other
DCMTK storescu to each node's own port; "haproxy" sends them all to one HAProxy
(built from deploy/haproxy/haproxy.cfg: leastconn, send-proxy-v2, /healthz checks)
in front of the same two nodes, which then read a PROXY header on every connection.
The clock runs from the first sender's start until both archives hold every image.
Receive-only by default (the case where the balancer's share of the CPU shows most);
``--syntax jpeg-ls`` compresses. On a machine shared with other jobs, compare the
ratio of one run, not absolute rates.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import images
from bench import DCMTK, Senders
from receivers import JPEG_LS_LOSSLESS, REPO, NodeReceiver, free_port, listening

HAPROXY = Path("/usr/sbin/haproxy")
TEMPLATE = REPO / "deploy" / "haproxy" / "haproxy.cfg"
WORK_DIR = Path(__file__).resolve().parent / ".work"  # a real disk: fsync costs as it does


class ClusterNode(NodeReceiver):
    """A benchmark node with /healthz, one worker and, behind HAProxy, PROXY protocol."""

    def __init__(self, workdir: Path, syntax: str | None, proxied: bool) -> None:
        super().__init__(workdir, syntax, workers="1")
        self.metrics_port = free_port()
        self.proxied = proxied

    def prepare(self) -> None:
        super().prepare()
        extra = f"  metrics: {{host: 127.0.0.1, port: {self.metrics_port}}}\n"
        extra += "  drain_seconds: 0\n"
        if self.proxied:
            extra += "  proxy_protocol: {trusted: [127.0.0.1]}\n"
        text = self.config.read_text().replace("  log_level: INFO\n", "  log_level: INFO\n" + extra)
        self.config.write_text(text)


def haproxy_config(port: int, nodes: list[ClusterNode], stats: Path) -> str:
    template = TEMPLATE.read_text()
    body = template[template.index("\ndefaults") : template.index("# DICOM TLS")]
    body = body.replace("bind :11112", f"bind 127.0.0.1:{port}")
    body = re.sub(r"^ *server node\d+ .*\n", "", body, flags=re.M)
    for i, node in enumerate(nodes, start=1):
        body += f"    server node{i} 127.0.0.1:{node.port} port {node.metrics_port}\n"
    return f"global\n    maxconn 2000\n    stats socket {stats} mode 600 level admin\n" + body


def servers_up(stats: Path, count: int) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(stats))
        s.sendall(b"show stat\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    rows = [line.split(",") for line in out.decode().splitlines()[1:] if line]
    servers = [r for r in rows if r[0] == "dicom_nodes" and r[1] != "BACKEND"]
    return sum(1 for r in servers if r[17].startswith("UP")) == count


def start_haproxy(workdir: Path, nodes: list[ClusterNode]) -> tuple[subprocess.Popen, int]:
    port, stats, config = free_port(), workdir / "haproxy.sock", workdir / "haproxy.cfg"
    config.write_text(haproxy_config(port, nodes, stats))
    log = open(workdir / "haproxy.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([str(HAPROXY), "-db", "-f", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while not (listening(port) and stats.exists() and servers_up(stats, len(nodes))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.close()
            text = (workdir / "haproxy.log").read_text(errors="replace")
            raise RuntimeError(f"HAProxy did not start or its servers are not up:\n{text}")
        time.sleep(0.1)
    return proc, port


def storescu(port: int, files: list[Path]) -> list[str]:
    return [str(DCMTK / "storescu"), "-aet", "BENCH-SCU", "-aec", ClusterNode.ae_title,
            "127.0.0.1", str(port), *map(str, files)]  # fmt: skip


def run_once(
    mode: str,
    workdir: Path,
    files: list[Path],
    warmup: list[Path],
    senders: int,
    syntax: str | None,
) -> tuple[float, list[int]]:
    """Images per second, and how many each node archived."""
    nodes = [ClusterNode(workdir / f"node{i}", syntax, proxied=mode == "haproxy") for i in (1, 2)]
    balancer: subprocess.Popen | None = None
    try:
        for node in nodes:
            node.start()
        if mode == "haproxy":
            balancer, port = start_haproxy(workdir, nodes)
            ports = [port] * senders
        else:
            ports = [nodes[i % 2].port for i in range(senders)]
        # One image per node (the two warm-up images) before the clock starts.
        for i, image in enumerate(warmup[:2]):
            port = nodes[i].port if mode == "direct" else ports[0]
            subprocess.run(storescu(port, [image]), check=True, capture_output=True,
                           env={"TCP_NODELAY": "1"})  # fmt: skip
        while sum(n.done() for n in nodes) < 2:  # archived, not only acknowledged
            time.sleep(0.01)
        target = 2 + len(files)
        commands = [storescu(ports[i], files[i::senders]) for i in range(senders)]
        start = time.perf_counter()
        running = Senders(commands, workdir, mode)
        while sum(n.done() for n in nodes) < target:
            if time.perf_counter() - start > 600:
                raise RuntimeError(f"{mode}: timed out with {sum(n.done() for n in nodes)}")
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        while running.running():
            time.sleep(0.01)
        running.check()
        return len(files) / elapsed, [n.done() for n in nodes]
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait()
        for node in nodes:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400, help="CT images per run")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu")
    parser.add_argument("--rounds", type=int, default=2, help="direct/haproxy pairs")
    parser.add_argument("--syntax", choices=["none", "jpeg-ls"], default="none")
    args = parser.parse_args(argv)
    if not HAPROXY.exists():
        print(f"HAProxy is not installed at {HAPROXY}", file=sys.stderr)
        return 2
    syntax = JPEG_LS_LOSSLESS if args.syntax == "jpeg-ls" else None
    ct = images.MODALITIES["ct"]
    files = images.ensure_images(ct, args.count)
    warmup = images.ensure_warmup(ct)
    WORK_DIR.mkdir(exist_ok=True)
    rates: dict[str, list[float]] = {"direct": [], "haproxy": []}
    for r in range(args.rounds):
        order = ("direct", "haproxy") if r % 2 == 0 else ("haproxy", "direct")
        for mode in order:
            with tempfile.TemporaryDirectory(dir=WORK_DIR, prefix=f"cluster-{mode}-") as tmp:
                rate, split = run_once(mode, Path(tmp), files, warmup, args.senders, syntax)
            rates[mode].append(rate)
            print(f"round {r + 1} {mode:8s} {rate:7.1f} img/s  (per node: {split})", flush=True)
    pairs = [h / d for h, d in zip(rates["haproxy"], rates["direct"], strict=True)]
    print(
        f"\nHAProxy / direct, {args.count} CT images, {args.senders} senders, "
        f"{args.syntax}: per round {', '.join(f'{p:.2f}' for p in pairs)}; "
        f"median {statistics.median(pairs):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
