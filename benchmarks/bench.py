"""Throughput, latency and memory of dicom-node next to DCMTK and Orthanc, on 127.0.0.1.

    python3 benchmarks/bench.py [--count 200] [--rounds 3] [--only ct] [--quick]

Prints one markdown table and writes it, with the machine description, to
benchmarks/results.md. See benchmarks/README.md for what each row and column means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import images
import procstat
from pydicom import dcmread
from receivers import (
    DCMTK,
    JPEG_LS_LOSSLESS,
    ORTHANC,
    REPO,
    DcmtkReceiver,
    NodeReceiver,
    OrthancReceiver,
    Receiver,
)

HERE = Path(__file__).resolve().parent
WORK_DIR = HERE / ".work"  # on the repo's disk: /tmp may be tmpfs, where fsync is free
RESULTS = HERE / "results.md"
POLL_INTERVAL = 0.02
# Signed CT (as the issue asks) and the same anatomy stored unsigned: Orthanc 1.10.1's
# JPEG-LS ingest aborts on signed pixels, so only "ct-u" has an Orthanc JPEG-LS peer.
DEFAULT_SETS = "ct,ct-u"
CT_BYTES = 525_000  # --count is the CT count; other modalities get about the same bytes


# ------------------------------------------------------------------ variants


@dataclass(frozen=True)
class Variant:
    label: str
    system: str  # "node", "dcmtk" or "orthanc"
    compression: str  # "jpeg-ls", "htj2k" or "none"
    senders: int
    sender: str  # "storescu" (DCMTK) or "latency" (pynetdicom, per-C-STORE timing)
    make: Callable[[Path], Receiver]

    @property
    def peer_key(self) -> tuple[str, int, str]:
        """Rows with the same key are compared; HTJ2K is compared with JPEG-LS peers."""
        kind = "none" if self.compression == "none" else "jpeg-ls"
        return kind, self.senders, self.sender


def node_has(syntax: str) -> bool:
    """Whether node.codecs knows ``syntax`` (asked in a child, as an operator would)."""
    code = f"from node.codecs.syntaxes import lookup_syntax; print(lookup_syntax({syntax!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    return result.returncode == 0 and result.stdout.strip() not in ("", "None")


def variants() -> list[Variant]:
    def node(ts: str | None) -> Callable[[Path], Receiver]:
        return lambda d: NodeReceiver(d, ts)

    def dcmtk(compress: bool) -> Callable[[Path], Receiver]:
        return lambda d: DcmtkReceiver(d, compress)

    def orthanc(ts: str | None) -> Callable[[Path], Receiver]:
        return lambda d: OrthancReceiver(d, ts)

    rows = [
        Variant("node, JPEG-LS", "node", "jpeg-ls", 1, "storescu", node("jpeg-ls-lossless")),
        Variant("node, JPEG-LS", "node", "jpeg-ls", 2, "storescu", node("jpeg-ls-lossless")),
    ]
    if node_has("htj2k-lossless"):
        rows.append(Variant("node, HTJ2K", "node", "htj2k", 1, "storescu", node("htj2k-lossless")))
    rows += [
        Variant("storescp + dcmcjpls", "dcmtk", "jpeg-ls", 1, "storescu", dcmtk(True)),
        Variant("storescp + dcmcjpls", "dcmtk", "jpeg-ls", 2, "storescu", dcmtk(True)),
        Variant("Orthanc, JPEG-LS ingest", "orthanc", "jpeg-ls", 1, "storescu",
                orthanc(JPEG_LS_LOSSLESS)),
        Variant("Orthanc, JPEG-LS ingest", "orthanc", "jpeg-ls", 2, "storescu",
                orthanc(JPEG_LS_LOSSLESS)),
        Variant("node, no compression", "node", "none", 1, "storescu", node(None)),
        Variant("storescp", "dcmtk", "none", 1, "storescu", dcmtk(False)),
        Variant("storescp", "dcmtk", "none", 2, "storescu", dcmtk(False)),
        Variant("Orthanc", "orthanc", "none", 1, "storescu", orthanc(None)),
        Variant("node, no compression", "node", "none", 1, "latency", node(None)),
        Variant("storescp", "dcmtk", "none", 1, "latency", dcmtk(False)),
        Variant("node, JPEG-LS", "node", "jpeg-ls", 1, "latency", node("jpeg-ls-lossless")),
        Variant("storescp + dcmcjpls", "dcmtk", "jpeg-ls", 1, "latency", dcmtk(True)),
        Variant("Orthanc, JPEG-LS ingest", "orthanc", "jpeg-ls", 1, "latency",
                orthanc(JPEG_LS_LOSSLESS)),
    ]  # fmt: skip
    return rows


# ------------------------------------------------------------------ one measurement


@dataclass
class Measurement:
    elapsed: float = 0.0
    images: int = 0
    bytes_in: int = 0
    bytes_warmup: int = 0
    bytes_out: int = 0  # everything the receiver kept, warm-up images included
    peak_rss: int = 0
    cpu_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    out_syntax: str = ""
    error: str = ""  # one line, shown in the table
    detail: str = ""  # the receiver's log tail, shown on the console

    @property
    def ok(self) -> bool:
        return not self.error


def sender_commands(
    v: Variant, rx: Receiver, files: list[Path], senders: int | None = None
) -> list[list[str]]:
    """One command per sender; with 2 senders each gets every other file."""
    n = senders or v.senders
    chunks = [files[i::n] for i in range(n)]
    if v.sender == "latency":
        script = str(HERE / "latency_scu.py")
        return [
            [sys.executable, script, "--port", str(rx.port), "--aec", rx.ae_title, *map(str, c)]
            for c in chunks
        ]
    return [
        [str(DCMTK / "storescu"), "-aet", "BENCH-SCU", "-aec", rx.ae_title, "127.0.0.1",
         str(rx.port), *map(str, c)]
        for c in chunks
    ]  # fmt: skip


class RunFailed(Exception):
    """A run that produced no valid measurement (the reason is shown in the table)."""

    sender_log = ""  # the senders' last stderr lines, when they ran


class Senders:
    """Sender processes, each with a thread that records when it exited.

    Output goes to files in ``workdir``, not pipes, so a chatty sender never blocks.
    """

    def __init__(self, commands: list[list[str]], workdir: Path, tag: str) -> None:
        env = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK leaves Nagle on otherwise
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outputs: list[tuple[Path, Path]] = []
        for i, cmd in enumerate(commands):
            out, err = workdir / f"{tag}-{i}.out", workdir / f"{tag}-{i}.err"
            with open(out, "wb") as fo, open(err, "wb") as fe:
                self.procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env))
            self.outputs.append((out, err))
        self.exit_times: list[float | None] = [None] * len(self.procs)
        for i in range(len(self.procs)):
            threading.Thread(target=self._wait, args=(i,), daemon=True).start()

    def _wait(self, i: int) -> None:
        self.procs[i].wait()
        self.exit_times[i] = time.perf_counter()

    def running(self) -> bool:
        return any(t is None for t in self.exit_times)

    def finished_at(self) -> float:
        return max(t for t in self.exit_times if t is not None)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def check(self) -> None:
        for p, (_, err) in zip(self.procs, self.outputs, strict=True):
            if p.returncode:
                tail = err.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise RunFailed(f"sender exited with {p.returncode}: {tail[0][:200]}")

    def stdout(self) -> list[str]:
        return [out.read_text(errors="replace") for out, _ in self.outputs]

    def stderr_tail(self, lines: int = 5) -> str:
        """The last lines each sender wrote to stderr, for a failed run's report."""
        tails = []
        for i, (_, err) in enumerate(self.outputs):
            text = err.read_text(errors="replace").strip().splitlines()[-lines:]
            tails += [f"sender {i}: {line}" for line in text]
        return "\n".join(tails)


def exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def wait_run(rx: Receiver, senders: Senders, target: int, deadline: float) -> float:
    """Wait until the run is complete; the time it completed.

    Synchronous receivers are complete when the last sender exits (then ``done()`` must
    confirm ``target`` within 10 s); the others when ``done()`` reaches ``target``.
    """
    assert rx.proc is not None
    while True:
        if rx.proc.poll() is not None:
            senders.kill()
            raise RunFailed(f"receiver died ({exit_text(rx.proc.returncode)})")
        if time.perf_counter() > deadline:
            senders.kill()
            raise RunFailed(f"timed out: {rx.done()} of {target} done")
        if rx.synchronous and not senders.running():
            senders.check()
            end = senders.finished_at()
            confirm_count(rx, target)
            return end
        if not rx.synchronous and rx.done() >= target:
            reached = time.perf_counter()
            while senders.running() and time.perf_counter() < deadline:
                time.sleep(POLL_INTERVAL)
            senders.check()
            return reached
        time.sleep(POLL_INTERVAL)


def confirm_count(rx: Receiver, target: int, timeout: float = 10.0) -> None:
    deadline = time.perf_counter() + timeout
    while (done := rx.done()) < target:
        if time.perf_counter() > deadline:
            raise RunFailed(f"only {done} of {target} stored after the sender exited")
        time.sleep(POLL_INTERVAL)


def warm_up(v: Variant, rx: Receiver, warmup: list[Path]) -> int:
    """Send the warm-up images (starts worker processes, fills caches); the done() count."""
    senders = Senders(sender_commands(v, rx, warmup, senders=1), rx.workdir, "warmup")
    wait_run(rx, senders, len(warmup), time.perf_counter() + 120)
    return rx.done()


def timed_send(v: Variant, rx: Receiver, files: list[Path], baseline: int, m: Measurement) -> None:
    timeout = 120 + m.bytes_in / 1e6  # generous: a failure, not a slow run, should hit it
    cpu_before = procstat.tree_cpu([rx.pid])
    with procstat.PeakMemory([rx.pid]) as mem:
        t0 = time.perf_counter()
        senders = Senders(sender_commands(v, rx, files), rx.workdir, "sender")
        try:
            t_end = wait_run(rx, senders, baseline + len(files), t0 + timeout)
        except RunFailed as exc:
            exc.sender_log = senders.stderr_tail()
            raise
        m.cpu_s = procstat.tree_cpu([rx.pid]) - cpu_before
    m.peak_rss = mem.peak
    m.elapsed = t_end - t0
    if v.sender == "latency":
        for out in senders.stdout():
            m.latencies_ms += _parse_latencies(out)


def _parse_latencies(out: str) -> list[float]:
    try:
        return [float(x) for x in json.loads(out)["latencies_ms"]]
    except (ValueError, KeyError):
        return []


def measure(v: Variant, workdir: Path, files: list[Path], warmup: list[Path]) -> Measurement:
    m = Measurement(
        images=len(files),
        bytes_in=sum(f.stat().st_size for f in files),
        bytes_warmup=sum(f.stat().st_size for f in warmup),
    )
    rx = v.make(workdir)
    sender_log = ""
    try:
        rx.start()
        baseline = warm_up(v, rx, warmup)
        timed_send(v, rx, files, baseline, m)
        m.bytes_out = rx.output_bytes()
        m.out_syntax = output_syntax(rx.sample_output())
    except RunFailed as exc:
        m.error = str(exc)
        sender_log = exc.sender_log
    except Exception as exc:  # one broken variant must not end the whole run
        m.error = f"{type(exc).__name__}: {exc}"
    finally:
        rx.stop()
        if m.error:
            m.detail = "\n".join(filter(None, [rx.log_tail(), sender_log]))
    return m


def output_syntax(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:
        return "?"


# ------------------------------------------------------------------ statistics and table


def median_range(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "—"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def throughput(m: Measurement) -> float:
    return m.images / m.elapsed if m.ok and m.elapsed > 0 else 0.0


def ratios(v: Variant, peer: Variant | None, runs: dict[Variant, list[Measurement]]) -> str:
    """Per-round ratio of img/s to ``peer`` (same round, interleaved), median and range."""
    if peer is None or peer is v:
        return "—"
    values = [
        throughput(a) / throughput(b)
        for a, b in zip(runs[v], runs[peer], strict=False)
        if throughput(a) and throughput(b)
    ]
    return median_range(values, "{:.2f}")


def find_peer(v: Variant, system: str, table: list[Variant]) -> Variant | None:
    return next((p for p in table if p.system == system and p.peer_key == v.peer_key), None)


def table_rows(mod: images.Modality, table: list[Variant], runs: dict[Variant, list[Measurement]]):
    for v in table:
        ok = [m for m in runs[v] if m.ok]
        errors = [m.error for m in runs[v] if not m.ok]
        lat = [m.latencies_ms for m in ok if m.latencies_ms]
        yield [
            mod.key.upper(),
            v.label,
            "pynetdicom (timed)" if v.sender == "latency" else f"{v.senders} storescu",
            median_range([throughput(m) for m in ok]) if ok else "FAILED: " + errors[0],
            median_range([m.bytes_in / m.elapsed / 1e6 for m in ok]),
            ratios(v, find_peer(v, "dcmtk", table), runs),
            ratios(v, find_peer(v, "orthanc", table), runs),
            median_range([percentile(x, 0.5) for x in lat], "{:.1f}"),
            median_range([percentile(x, 0.99) for x in lat], "{:.1f}"),
            median_range([m.peak_rss / 1e6 for m in ok]),
            median_range([m.cpu_s * 1000 / m.images for m in ok], "{:.1f}"),
            median_range([m.bytes_out / (m.bytes_in + m.bytes_warmup) for m in ok], "{:.2f}"),
            ", ".join(sorted({short_syntax(m.out_syntax) for m in ok})),
        ]


HEADER = [
    "images", "receiver", "sender", "img/s", "MB/s", "× DCMTK", "× Orthanc",
    "C-STORE p50 ms", "p99 ms", "peak RSS MB", "rx CPU ms/img", "size out/in", "stored as",
]  # fmt: skip


def short_syntax(uid: str) -> str:
    names = {
        "1.2.840.10008.1.2.1": "Explicit LE",
        "1.2.840.10008.1.2": "Implicit LE",
        JPEG_LS_LOSSLESS: "JPEG-LS",
        "1.2.840.10008.1.2.4.201": "HTJ2K lossless",
        "1.2.840.10008.1.2.4.90": "J2K lossless",
    }
    return names.get(uid, uid or "?")


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ machine description


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def machine() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    git = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {os.cpu_count()} x {cpu}; kernel {platform.release()}",
        f"- Python {platform.python_version()}, pydicom {version('pydicom')}, "
        f"pynetdicom {version('pynetdicom')}, numpy {version('numpy')}",
        f"- DCMTK: {first_line([str(DCMTK / 'storescu'), '--version'])}",
        f"- Orthanc: {first_line([str(ORTHANC), '--version'])}",
        f"- psutil: {'yes' if procstat.psutil else 'no (RSS and CPU read from /proc)'}",
        f"- repo: {git}",
    ]


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="CT images per run (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated image sets, or 'all' ({', '.join(images.MODALITIES)}); "
        f"default {DEFAULT_SETS}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="50 images, 1 round, set ct unless --only"
    )
    parser.add_argument(
        "--variants",
        default="",
        help="only rows whose label contains one of these, separated by | (labels contain commas)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the receivers' folders")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.rounds = 50, 1
    args.only = args.only or ("ct" if args.quick else DEFAULT_SETS)
    return args


def image_count(mod: images.Modality, ct_count: int, sample: Path) -> int:
    """``ct_count`` for CT; same total bytes for the others, at least 4, at most ct_count."""
    if mod.modality == "CT":
        return ct_count
    return max(4, min(ct_count, ct_count * CT_BYTES // sample.stat().st_size))


def failure_notes(
    mod: images.Modality, table: list[Variant], runs: dict[Variant, list[Measurement]]
) -> list[str]:
    """One note per distinct failure: which rows, how often, the receiver's last log line."""
    notes: dict[tuple[str, str], list[str]] = {}
    for v in table:
        for m in runs[v]:
            if not m.ok:
                last = (m.detail.strip().splitlines() or [""])[-1][:300]
                who = f"{mod.key.upper()} {v.label} ({v.senders} {v.sender})"
                notes.setdefault((m.error, last), []).append(who)
    return [
        f"- {error} in {len(whos)} run(s): {', '.join(sorted(set(whos)))}."
        + (f" Receiver's last log line: `{last}`" if last else "")
        for (error, last), whos in notes.items()
    ]


def run_modality(
    mod: images.Modality, args: argparse.Namespace, table: list[Variant]
) -> tuple[list[list[str]], list[str]]:
    first = images.ensure_images(mod, 1)[0]
    count = image_count(mod, args.count, first)
    print(f"[{mod.key}] preparing {count} images ({mod.description}) ...", flush=True)
    files = images.ensure_images(mod, count)
    warmup = images.ensure_warmup(mod)
    runs: dict[Variant, list[Measurement]] = {v: [] for v in table}
    for r in range(args.rounds):
        order = table[r % len(table) :] + table[: r % len(table)]  # rotate the start
        for v in order:
            workdir = WORK_DIR / f"{mod.key}-r{r}-{slug(v)}"
            shutil.rmtree(workdir, ignore_errors=True)
            m = measure(v, workdir, files, warmup)
            runs[v].append(m)
            report(mod, r, v, m)
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            os.sync()  # storescp does not fsync: flush its dirty pages before the next run
    return list(table_rows(mod, table, runs)), failure_notes(mod, table, runs)


def slug(v: Variant) -> str:
    text = f"{v.label}-{v.senders}-{v.sender}".lower()
    return "".join(c if c.isalnum() else "-" for c in text)


def report(mod: images.Modality, r: int, v: Variant, m: Measurement) -> None:
    """One console line per run; a failure's log tail only the first time."""
    who = f"{v.label} / {v.senders} {v.sender}"
    if m.ok:
        print(f"  round {r + 1} {mod.key}: {who}: {throughput(m):.0f} img/s", flush=True)
        return
    print(f"  round {r + 1} {mod.key}: {who}: FAILED {m.error}", flush=True)
    if m.error not in _reported:
        _reported.add(m.error)
        print(textwrap.indent(m.detail, "      | "), flush=True)


_reported: set[str] = set()


def selected_modalities(only: str) -> list[images.Modality]:
    keys = list(images.MODALITIES) if only == "all" else [k.strip() for k in only.split(",")]
    unknown = [k for k in keys if k not in images.MODALITIES]
    if unknown:
        raise SystemExit(f"unknown image set(s) {unknown}; known: {list(images.MODALITIES)}")
    return [images.MODALITIES[k] for k in keys]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mods = selected_modalities(args.only)
    wanted = [w.strip().lower() for w in args.variants.split("|")]
    table = [v for v in variants() if any(w in v.label.lower() for w in wanted)]
    started = time.monotonic()
    rows: list[list[str]] = []
    notes: list[str] = []
    for mod in mods:
        mod_rows, mod_notes = run_modality(mod, args, table)
        rows += mod_rows
        notes += mod_notes
    command = shlex.join(["python3", "benchmarks/bench.py", *(argv or sys.argv[1:])])
    text = "\n".join(
        [
            "# dicom-node benchmark results",
            "",
            *machine(),
            f"- command: `{command}` ({args.rounds} round(s), {time.monotonic() - started:.0f} s)",
            "",
            "Median over rounds, min-max in brackets. Ratios are per round (variants run",
            "interleaved), so they are steadier than the absolute numbers on a noisy machine.",
            "Columns are explained in benchmarks/README.md.",
            "",
            markdown(rows),
            "",
            *(["Failures:", "", *notes, ""] if notes else []),
        ]
    )
    print()
    print(markdown(rows))
    print("\n".join(notes))
    RESULTS.write_text(text)
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
