"""One ``dicom-node compress`` run: walk, skip what the journal has, compress on every core.

The main process walks the trees, feeds file paths to worker processes (forked
once, so each starts with the codecs loaded), asks the kernel to read the next
files ahead (``posix_fadvise``) while the workers compress, records each result in
the journal and shows progress. Workers read, compress and write; see
:mod:`node.batch.work`.

Stopping: on a full disk, Ctrl-C or SIGTERM no new file is started, the files in
hand are finished (or left as they were), the journal and the DICOMDIRs are brought
up to date and the report says why the run stopped.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkProcess
from pathlib import Path
from types import FrameType
from typing import Any

from node.batch import dicomdir
from node.batch.journal import Journal, Row
from node.batch.options import BatchOptions, Mode, StartError, WorkSettings
from node.batch.progress import Progress
from node.batch.report import GB, Tally, as_json, format_table, write_json
from node.batch.walk import (
    TEMP_SUFFIX,
    Candidate,
    DicomDir,
    Skipped,
    Unlistable,
    WalkCounts,
    WalkFilter,
    remove_stale_temp_files,
    walk,
)
from node.batch.work import FileResult, Job, Status, worker_main

POLL_SECONDS = 0.5


def run(opts: BatchOptions) -> int:
    for name in opts.ignored_rules:
        print(
            f"dicom-node compress: rule {name!r} tests calling_ae_title, called_ae_title or "
            "peer_address and never matches in batch mode",
            file=sys.stderr,
        )
    tree = _walk(opts)
    if opts.layout and tree.dicomdirs:
        raise StartError(
            f"{tree.dicomdirs[0].path}: a DICOMDIR names its files by path, which --layout "
            "would change; compress this tree with --output but without --layout, or in place"
        )
    for entry in tree.dicomdirs:
        dicomdir.check_readable(entry.path)
    if opts.dry_run:
        return _dry_run(opts, tree)
    journal = Journal(opts.journal, opts.fingerprint())
    try:
        return _compress(opts, tree, journal)
    finally:
        journal.close()


@dataclass
class Tree:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unlistable: list[Unlistable] = field(default_factory=list)
    dicomdirs: list[DicomDir] = field(default_factory=list)
    counts: WalkCounts = field(default_factory=WalkCounts)


def _walk(opts: BatchOptions) -> Tree:
    journal = opts.journal
    leave_out = [journal, *(journal.with_name(journal.name + s) for s in ("-wal", "-shm"))]
    if opts.output is not None:
        leave_out.append(opts.output)
    flt = WalkFilter(
        include=opts.include,
        exclude=opts.exclude,
        min_age=opts.min_age,
        leave_out=tuple(leave_out),
        remove_stale=not opts.dry_run,
    )
    tree = Tree()
    for entry in walk(opts.roots, flt, tree.counts):
        if isinstance(entry, Candidate):
            tree.candidates.append(entry)
        elif isinstance(entry, Skipped):
            tree.skipped.append(entry)
        elif isinstance(entry, Unlistable):
            tree.unlistable.append(entry)
        else:
            tree.dicomdirs.append(entry)
    return tree


def _output_path(opts: BatchOptions, c: Candidate | DicomDir) -> str | None:
    if opts.output is None:
        return None
    # One tree: DIR mirrors it; several: each below DIR/<its folder's name>.
    relative = c.relative if len(opts.roots) == 1 else f"{c.root.name}/{c.relative}"
    return str(opts.output / relative)


# --------------------------------------------------------------------------- the run


def _compress(opts: BatchOptions, tree: Tree, journal: Journal) -> int:
    tally = Tally()
    for s in tree.skipped:
        tally.add(FileResult(-1, str(s.path), Status.SKIPPED, s.reason))
    for u in tree.unlistable:
        tally.add(FileResult(-1, str(u.path), Status.FAILED, u.reason))
    jobs: list[Job] = []
    for c in tree.candidates:
        row = journal.settled(c.path, c.size, c.mtime_ns)
        if row is not None:
            tally.add(_from_row(row), earlier=True)
        else:
            jobs.append(Job(len(jobs), str(c.path), _output_path(opts, c), c.size, c.mtime_ns))
    if opts.output is not None:
        opts.output.mkdir(parents=True, exist_ok=True)
        tree.counts.stale_temp_removed += remove_stale_temp_files(opts.output)
    stop = _StopFlag()
    started = time.monotonic()
    with _Pool(opts.work_settings(), min(opts.workers, max(len(jobs), 1))) as pool:
        progress = Progress(len(jobs), sum(j.size for j in jobs), opts.progress_seconds)
        processed = 0
        for result in pool.run(jobs, stop, progress, tally):
            processed += 1
            try:
                journal.record(_to_row(result), result.seconds)
            except sqlite3.Error as exc:  # its disk is full: the file is redone next time
                stop.set(f"the journal cannot be written ({exc})")
            tally.add(result)
            if result.disk_full:
                stop.set("the disk is full")
        progress.close(tally)
    seconds = time.monotonic() - started
    updates = [_update_dicomdir(opts, d) for d in tree.dicomdirs]
    for update in updates:
        if update.error:
            tally.failures.append((str(update.path), f"DICOMDIR not updated: {update.error}"))
    print(format_table(tally, f"dicom-node compress: {len(jobs)} files in {seconds:.1f} s"))
    for update in updates:
        if not update.error:
            print(f"DICOMDIR {update.path}: {update.changed} of {update.records} records updated")
    if tree.counts.stale_temp_removed:
        print(f"removed {tree.counts.stale_temp_removed} temp file(s) left by an interrupted run")
    if stop.reason:
        print(
            f"dicom-node compress: stopped early: {stop.reason}; {len(jobs) - processed} file(s) "
            "not started. Run the same command again to continue.",
            file=sys.stderr,
        )
    if opts.report is not None:
        write_json(
            opts.report,
            as_json(
                tally,
                {
                    "dry_run": False,
                    "seconds": round(seconds, 3),
                    "files_this_run": len(jobs),
                    "stopped_early": stop.reason,
                    "stale_temp_files_removed": tree.counts.stale_temp_removed,
                    "dicomdirs": [
                        {
                            "path": str(u.path),
                            "records": u.records,
                            "updated": u.changed,
                            "error": u.error,
                        }
                        for u in updates
                    ],
                    "journal": str(opts.journal),
                },
            ),
        )
    return 1 if tally.failures or stop.reason else 0


def _update_dicomdir(opts: BatchOptions, d: DicomDir) -> dicomdir.DicomDirUpdate:
    target = Path(_output_path(opts, d) or d.path)
    if opts.mode is Mode.OUTPUT:
        target.parent.mkdir(parents=True, exist_ok=True)
    return dicomdir.update(d.path, target)


def _from_row(row: Row) -> FileResult:
    return FileResult(
        -1,
        row.path,
        Status(row.status),
        row.reason,
        row.modality,
        row.syntax_before,
        row.syntax_after,
        row.bytes_before,
        row.bytes_after,
        row.size,
        row.mtime_ns,
    )


def _to_row(r: FileResult) -> Row:
    return Row(
        r.path,
        r.status.value,
        r.reason,
        r.size,
        r.mtime_ns,
        r.modality,
        r.syntax_before,
        r.syntax_after,
        r.bytes_before,
        r.bytes_after,
    )


class _StopFlag:
    """Set by a full disk or a signal: no new file is started."""

    def __init__(self) -> None:
        self.reason: str | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.set(f"{signal.Signals(signum).name} received")


# --------------------------------------------------------------------------- workers


class _Pool:
    """Worker processes, each with its own connection: jobs out, ("start"|"done", ...) back.

    Each worker has at most one job waiting in its connection besides the ones it has
    started, so a stop takes effect at once and the files a dead worker held are known.
    """

    def __init__(self, settings: WorkSettings, count: int) -> None:
        # fork: a worker starts with the codecs this process has already imported.
        self._ctx = mp.get_context("fork")
        self._settings = settings
        self._workers: dict[Connection, _Worker] = {}
        for _ in range(count):
            self._start_worker()

    def _start_worker(self) -> None:
        mine, theirs = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=worker_main, args=(self._settings, theirs), daemon=True)
        proc.start()
        theirs.close()
        self._workers[mine] = _Worker(proc, mine)

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self._workers.values():
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self._workers.values():
            worker.proc.join(timeout=60)
            if worker.proc.is_alive():
                worker.proc.kill()
            worker.conn.close()

    def run(
        self, jobs: list[Job], stop: _StopFlag, progress: Progress, tally: Tally
    ) -> Iterator[FileResult]:
        """Hand out ``jobs`` and yield each result as it comes."""
        waiting = iter(jobs)
        exhausted = False
        while True:
            if stop.reason is None and not exhausted:
                exhausted = self._hand_out(waiting)
            busy = [c for c, w in self._workers.items() if w.held]
            if not busy:
                return
            ready = wait(busy, timeout=POLL_SECONDS)
            if not ready:
                progress.tick(tally)
            for conn in ready:
                assert isinstance(conn, Connection)
                worker = self._workers[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    yield from self._replace(worker)
                    continue
                if message[0] == "start":
                    worker.queued -= 1
                    continue
                result: FileResult = message[1]
                worker.held.pop(result.index, None)
                progress.advance(1, result.bytes_before, tally)
                yield result

    def _hand_out(self, waiting: Iterator[Job]) -> bool:
        """Give each worker one job beyond those it has started; True once all are out."""
        for worker in list(self._workers.values()):
            while worker.queued < 1:
                job = next(waiting, None)
                if job is None:
                    return True
                _read_ahead(job.path)
                worker.conn.send(job)
                worker.held[job.index] = job
                worker.queued += 1
        return False

    def _replace(self, worker: _Worker) -> Iterator[FileResult]:
        """A worker that died (a codec crash) fails the files it held; another replaces it."""
        worker.proc.join(timeout=10)
        del self._workers[worker.conn]
        worker.conn.close()
        pid = worker.proc.pid
        for job in worker.held.values():
            path = Path(job.output or job.path)
            path.with_name(f".{path.name}.{pid}{TEMP_SUFFIX}").unlink(missing_ok=True)
            yield FileResult(
                job.index,
                job.path,
                Status.FAILED,
                f"the worker process died (exit code {worker.proc.exitcode}) on it or "
                "beside it; original kept",
                bytes_before=job.size,
            )
        self._start_worker()


@dataclass
class _Worker:
    proc: ForkProcess
    conn: Connection
    held: dict[int, Job] = field(default_factory=dict)  # sent and not done
    queued: int = 0  # sent and not started


def _read_ahead(path: str) -> None:
    """Ask the kernel to read the file now, so that a worker finds it in memory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the worker will say why
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- dry run


def _dry_run(opts: BatchOptions, tree: Tree) -> int:
    candidates = tree.candidates
    sample = spread(candidates, opts.sample)
    jobs = [Job(i, str(c.path), None, c.size, c.mtime_ns) for i, c in enumerate(sample)]
    tally = Tally()
    stop = _StopFlag()
    with _Pool(opts.work_settings(), min(opts.workers, max(len(jobs), 1))) as pool:
        progress = Progress(len(jobs), sum(j.size for j in jobs), opts.progress_seconds)
        started = time.monotonic()
        for result in pool.run(jobs, stop, progress, tally):
            tally.add(result)
        seconds = time.monotonic() - started
        progress.close(tally)
    total_bytes = sum(c.size for c in candidates)
    projection = project(tally, total_bytes, len(candidates), seconds)
    print(format_table(tally, f"dicom-node compress --dry-run: a sample of {len(jobs)} files"))
    print(format_projection(projection))
    if opts.report is not None:
        write_json(opts.report, as_json(tally, {"dry_run": True, "projection": projection}))
    return 0


def spread(items: list[Candidate], count: int) -> list[Candidate]:
    """``count`` items evenly spread over ``items`` (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def project(tally: Tally, total_bytes: int, total_files: int, seconds: float) -> dict[str, Any]:
    sample_bytes = tally.total.bytes_before
    share = total_bytes / sample_bytes if sample_bytes else 0.0
    groups = [
        {
            "modality": m,
            "transfer_syntax": s,
            "sample_files": g.files,
            "ratio": round(g.ratio, 4),
            "projected_bytes_saved": round((g.bytes_before - g.bytes_after) * share),
        }
        for (m, s), g in sorted(tally.groups.items())
    ]
    rate = sample_bytes / seconds if seconds > 0 else 0.0
    return {
        "files": total_files,
        "bytes": total_bytes,
        "sample_files": tally.total.files,
        "sample_bytes": sample_bytes,
        "projected_bytes_after": round(tally.total.bytes_after * share),
        "projected_bytes_saved": round(tally.saved * share),
        "projected_seconds": round(total_bytes / rate, 1) if rate else None,
        "measured_bytes_per_second": round(rate),
        "groups": groups,
    }


def format_projection(p: dict[str, Any]) -> str:
    lines = [
        f"projection for all {p['files']} files ({p['bytes'] / GB:.3f} GB):",
    ]
    for g in p["groups"]:
        lines.append(
            f"  {g['modality']:<9} {g['transfer_syntax']:<34} ratio {g['ratio']:>5.2f}, "
            f"{g['projected_bytes_saved'] / GB:.3f} GB saved"
        )
    saved = p["projected_bytes_saved"]
    share = 100.0 * saved / p["bytes"] if p["bytes"] else 0.0
    lines.append(f"  projected saving: {saved / GB:.3f} GB ({share:.1f} %)")
    if p["projected_seconds"] is not None:
        lines.append(
            f"  projected time: {p['projected_seconds']:.0f} s at the sample's "
            f"{p['measured_bytes_per_second'] / 1e6:.1f} MB/s (compression only: the dry run "
            "writes nothing, so fsyncs are not included)"
        )
    return "\n".join(lines)
