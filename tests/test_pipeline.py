"""The pipeline with real worker processes, one of whose inputs kills them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import weakref
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from node.config import Config, load_config
from node.pipeline import MAX_CRASHES, WORKER_MAIN, Pipeline, WorkerStartError
from node.spool import Arrival, Spool
from node.workers import DONE, FREE, LARGE_INSTANCE_BYTES, Outcome, Prepared, Task, _Writer
from tests import images
from tests.conftest import default_config, free_port
from tests.crash_task import POISON, crash_on_poison, crash_on_poison_write_slowly


def _accept(spool: Spool, seed: int, patient_id: str) -> str:
    ds = images.make_ct(rows=64, cols=64, seed=seed)
    ds.PatientID = patient_id
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    arrival = Arrival(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae_title="TEST",
        called_ae_title="TEST-NODE",
        peer_address="127.0.0.1",
        peer_port=1,
    )
    spool.accept(arrival, [fp.getvalue()])
    return str(ds.SOPInstanceUID)


def _config_and_spool(tmp_path, workers: int) -> tuple[Config, Spool]:
    config_file = tmp_path / "node.yaml"
    config_file.write_text(default_config(tmp_path, free_port(), workers=workers))
    config = load_config(str(config_file))
    spool = Spool(config.node.spool)
    spool.create()
    return config, spool


def _route_all(config: Config, spool: Spool, task: Task) -> list[Outcome]:
    """Start a pipeline on what is in incoming/, wait until it is done; the outcomes."""
    routed: list[Outcome] = []
    pipeline = Pipeline(config, spool, on_outcome=routed.append, task=task)
    try:
        pipeline.start()
        assert pipeline.wait_idle(timeout=120)
    finally:
        pipeline.stop()
    return routed


def _assert_only_the_poison_is_quarantined(spool: Spool) -> None:
    quarantined = list(spool.quarantine.glob("*.dcm"))
    assert len(quarantined) == 1
    assert POISON in quarantined[0].read_bytes()
    reason = quarantined[0].with_suffix(".txt").read_text()
    assert f"died {MAX_CRASHES} times on it (exit code 70)" in reason


def _archived_uids(tmp_path: Path) -> set[str]:
    return {pydicom.dcmread(f).SOPInstanceUID for f in (tmp_path / "archive").rglob("*.dcm")}


def test_only_the_instance_that_kills_workers_is_quarantined(tmp_path) -> None:
    config, spool = _config_and_spool(tmp_path, workers=2)
    # The poison first: it kills its worker at once, while a good one is in the other
    # worker, and again each time it is retried.
    poison = _accept(spool, 99, POISON.decode())
    good = [_accept(spool, seed, f"GOOD{seed}") for seed in range(3)]
    routed = _route_all(config, spool, crash_on_poison)
    # A worker compresses one instance at a time, so a death counts against that one.
    _assert_only_the_poison_is_quarantined(spool)
    # Every good one is archived (so the workers that died were replaced).
    archived = _archived_uids(tmp_path)
    assert archived == set(good)
    assert poison not in archived
    assert not list(spool.incoming.glob("*.dcm"))
    assert sorted(o.status for o in routed) == ["delivered"] * len(good)


def test_a_worker_that_dies_while_writing_one_instance_blames_the_one_it_compressed(
    tmp_path, caplog
) -> None:
    config, spool = _config_and_spool(tmp_path, workers=1)
    # One worker: the good instance goes to its writer thread, the poison follows and
    # kills the worker while the good one is being written; three times over.
    good = _accept(spool, 1, "GOOD")
    poison = _accept(spool, 99, POISON.decode())
    routed = _route_all(config, spool, crash_on_poison_write_slowly)
    _assert_only_the_poison_is_quarantined(spool)
    # The good one was in the writer at each death: done again, never blamed.
    assert caplog.text.count("is handled again: its worker died while writing it") == MAX_CRASHES
    archived = _archived_uids(tmp_path)
    assert archived == {good}
    assert poison not in archived
    assert [o.status for o in routed] == ["delivered"]
    assert not list(spool.incoming.glob("*.dcm"))


def _worker_pids() -> list[int]:
    """This process's worker processes, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
            if ppid == os.getpid() and WORKER_MAIN.encode() in cmdline:
                pids.append(int(stat.parent.name))
    return pids


def test_a_worker_that_dies_idle_is_replaced_and_blames_nobody(tmp_path, caplog) -> None:
    config, spool = _config_and_spool(tmp_path, workers=1)
    routed = []
    pipeline = Pipeline(config, spool, on_outcome=routed.append)
    try:
        pipeline.start()
        [pid] = _worker_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "died while idle" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "a worker died while idle (killed by signal 9); starting another" in caplog.text
        assert [p for p in _worker_pids() if p != pid]
        # The next instance goes to the new worker, and is nobody's crash.
        good = _accept(spool, 5, "AFTER")
        pipeline.submit(spool.list_incoming()[0])
        assert pipeline.wait_idle(timeout=60)
    finally:
        pipeline.stop()
    assert [o.status for o in routed] == ["delivered"]
    assert [o.sop_instance_uid for o in routed] == [good]
    assert "a worker died on" not in caplog.text


def test_a_worker_that_cannot_start_is_a_clear_startup_error(tmp_path) -> None:
    config, spool = _config_and_spool(tmp_path, workers=1)

    def not_importable_by_a_worker(config, path):  # a local function has no module path
        raise AssertionError("never runs")

    pipeline = Pipeline(config, spool, task=not_importable_by_a_worker)
    with pytest.raises(WorkerStartError, match=r"died while starting \(exit code 1\)"):
        pipeline.start()
    pipeline.stop()


class _Buffers:
    """Stands for an instance's data set and pixel data."""


def test_a_written_instance_is_let_go_before_the_next_is_compressed() -> None:
    sent: list[object] = []
    writer = _Writer(sent.append)
    held = []
    sizes = (LARGE_INSTANCE_BYTES, 1000, 1000, LARGE_INSTANCE_BYTES)
    for number, size in enumerate(sizes):
        buffers = _Buffers()
        held.append(weakref.ref(buffers))
        outcome = Outcome(incoming=f"{number}.dcm", status="delivered", bytes_in=size)
        writer.take(outcome.incoming, Prepared(outcome, lambda b=buffers: None, 0.0))
        del buffers
        if size == LARGE_INSTANCE_BYTES:
            # Written alone, and let go of, before the worker takes the next instance
            # (the small ones before it are written first).
            assert all(ref() is None for ref in held)
    writer.close()
    # Each small one is announced free before it is written; a large one only done.
    messages = [(m[0], m[1]) for m in sent]
    assert messages[0] == (DONE, "0.dcm")
    assert messages[-1] == (DONE, "3.dcm")
    for small in ("1.dcm", "2.dcm"):
        assert messages.index((FREE, small)) < messages.index((DONE, small))
    assert len(messages) == 6
