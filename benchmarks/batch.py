"""`dicom-node compress` against DCMTK and GDCM run per file, on one archive, in one run.

    python3 benchmarks/batch.py                  # 1,000 CT + 20 CR + 6 MG, JPEG-LS lossless
    python3 benchmarks/batch.py --ct 100 --cr 2 --mg 1   # a quick look

Each tool gets its own fresh copy of the same archive (in ``benchmarks/.work/batch``,
on the repo's disk) and compresses it in place to JPEG-LS lossless:

- ``dicom-node compress --in-place --transfer-syntax jpeg-ls-lossless`` (workers: one
  per CPU; every file fsync'ed before it replaces its original);
- DCMTK's ``dcmcjpls`` run once per file by ``xargs -P <cpus>``, each output written
  to a temp name and moved over the original;
- GDCM's ``gdcmconv -L`` the same way.

The clock runs from the start of the command to the end of a ``sync`` after it (DCMTK
and GDCM do not fsync; the sync puts their writes on disk too). Before the node's
real run, ``--dry-run`` estimates the saving on the same copy; the table compares
that estimate with the real saving. Results go to stdout and
``benchmarks/results-batch.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import images
import pydicom
from pydicom.uid import JPEGLSLossless

REPO = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / ".work" / "batch"
RESULTS = Path(__file__).resolve().parent / "results-batch.md"
DCMCJPLS = "/usr/bin/dcmcjpls"
GDCMCONV = "/usr/bin/gdcmconv"


@dataclass
class Outcome:
    name: str
    seconds: float
    files: int
    compressed: int
    bytes_before: int
    bytes_after: int
    returncode: int

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.bytes_before / 1e6 / self.seconds


def build_source(ct: int, cr: int, mg: int) -> list[Path]:
    files: list[Path] = []
    for key, count in (("ct", ct), ("cr", cr), ("mg", mg)):
        if count:
            files += images.ensure_images(images.MODALITIES[key], count)
    return files


def fresh_copy(files: list[Path], name: str) -> Path:
    tree = WORK / name / "archive"
    if tree.parent.exists():
        shutil.rmtree(tree.parent)
    for f in files:
        dst = tree / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    subprocess.run(["sync"], check=True)  # the copy's writes are not timed
    return tree


def per_file_command(tool: str, tree: Path, parallel: int) -> str:
    encode = {
        "dcmcjpls": f'{DCMCJPLS} "$0" "$0.part"',
        "gdcmconv": f'{GDCMCONV} -L "$0" "$0.part"',
    }[tool]
    script = f'{encode} && mv "$0.part" "$0"'
    return (
        f"find {shlex.quote(str(tree))} -type f -name '*.dcm' -print0 | "
        f"xargs -0 -n 1 -P {parallel} sh -c {shlex.quote(script)}"
    )


def timed(cmd: list[str] | str, **kwargs: object) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    subprocess.run(["sync"], check=True)
    return time.monotonic() - started, done


def survey(tree: Path) -> tuple[int, int, int]:
    """(files, files in JPEG-LS lossless, bytes) of a tree."""
    files = compressed = size = 0
    for path in tree.rglob("*.dcm"):
        files += 1
        size += path.stat().st_size
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        compressed += meta.TransferSyntaxUID == JPEGLSLossless
    return files, compressed, size


def run_node(files: list[Path], workers: int | None) -> tuple[Outcome, dict]:
    tree = fresh_copy(files, "node")
    base = [sys.executable, "-m", "node.cli", "compress", str(tree)]
    base += ["--transfer-syntax", "jpeg-ls-lossless"]
    if workers:
        base += ["--workers", str(workers)]
    dry_report = tree.parent / "dry-run.json"
    dry = subprocess.run(
        [*base, "--dry-run", "--report", str(dry_report)], cwd=REPO, capture_output=True, text=True
    )
    if dry.returncode != 0:
        sys.exit(f"dry run failed:\n{dry.stdout}\n{dry.stderr}")
    projection = json.loads(dry_report.read_text())["projection"]
    n, _, before = survey(tree)
    cmd = [*base, "--in-place", "--journal", str(tree.parent / "journal.sqlite")]
    seconds, done = timed(cmd, cwd=REPO)
    n, compressed, after = survey(tree)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
    return Outcome("dicom-node compress", seconds, n, compressed, before, after, done.returncode), {
        "projected_bytes_saved": projection["projected_bytes_saved"],
        "sample_files": projection["sample_files"],
        "projected_seconds": projection["projected_seconds"],
    }


def run_per_file(files: list[Path], tool: str, parallel: int) -> Outcome:
    tree = fresh_copy(files, tool)
    n, _, before = survey(tree)
    seconds, done = timed(per_file_command(tool, tree, parallel), shell=True)
    n, compressed, after = survey(tree)
    label = f"{tool} per file, xargs -P {parallel}"
    return Outcome(label, seconds, n, compressed, before, after, done.returncode)


def table(outcomes: list[Outcome], dry: dict) -> str:
    node = outcomes[0]
    fastest_other = max(outcomes[1:], key=lambda o: o.files_per_second)
    lines = [
        "| tool | files | now JPEG-LS | files/s | MB/s | node's files/s / this tool's | "
        "size after / before | exit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.name} | {o.files} | {o.compressed} | {o.files_per_second:.1f} | "
            f"{o.mb_per_second:.1f} | {node.files_per_second / o.files_per_second:.2f} | "
            f"{o.bytes_after / o.bytes_before:.3f} | {o.returncode} |"
        )
    real = node.bytes_before - node.bytes_after
    projected = dry["projected_bytes_saved"]
    lines += [
        "",
        f"- node vs the faster per-file tool ({fastest_other.name}): "
        f"**{node.files_per_second / fastest_other.files_per_second:.2f}x** files/s",
        f"- dry run (sample of {dry['sample_files']} files) projected "
        f"{projected / 1e6:.1f} MB saved; the real run saved {real / 1e6:.1f} MB: "
        f"**{100 * (projected - real) / real:+.1f} %**; projected time "
        f"{dry['projected_seconds']} s (compression only) vs {node.seconds:.1f} s real",
    ]
    return "\n".join(lines)


def machine(args: argparse.Namespace) -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def first(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"

    git = first(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {os.cpu_count()} x {cpu}; kernel {platform.release()}",
        f"- Python {platform.python_version()}, pydicom {pydicom.__version__}",
        f"- DCMTK: {first([DCMCJPLS, '--version'])}; GDCM: {first([GDCMCONV, '--version'])}",
        f"- repo: {git}",
        f"- command: `{' '.join(['python3 benchmarks/batch.py', *sys.argv[1:]])}`",
        f"- load average (1 min) before / after the run: {args.load_before:.1f} / "
        f"{os.getloadavg()[0]:.1f} (a shared machine: compare the ratios, not the rates)",
        f"- archive: {args.ct} CT 512x512 + {args.cr} CR 2000x2500 + {args.mg} MG 3328x4096 "
        "(benchmarks/images.py), Explicit VR Little Endian, on the repo's disk",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=1000)
    parser.add_argument("--cr", type=int, default=20)
    parser.add_argument("--mg", type=int, default=6)
    parser.add_argument(
        "--parallel",
        type=int,
        default=os.cpu_count() or 2,
        help="xargs -P for the per-file tools (default: CPUs)",
    )
    parser.add_argument("--workers", type=int, help="dicom-node workers (default: CPUs)")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    files = build_source(args.ct, args.cr, args.mg)
    node, dry = run_node(files, args.workers)
    outcomes = [node]
    for tool in ("dcmcjpls", "gdcmconv"):
        outcomes.append(run_per_file(files, tool, args.parallel))
    shutil.rmtree(WORK, ignore_errors=True)
    text = table(outcomes, dry)
    print(text)
    RESULTS.write_text(
        "# `dicom-node compress` vs DCMTK and GDCM per file (benchmarks/batch.py)\n\n"
        + "\n".join(machine(args))
        + "\n\n"
        + text
        + "\n"
    )


if __name__ == "__main__":
    main()
