"""Store-and-forward to real peers on loopback: Orthanc as the PACS, DCMTK's storescp
(uncompressed only, refusing, or down for a while) and an in-process pynetdicom SCP
that answers chosen C-STORE statuses."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import MRImageStorage

from node.config import DicomDestination, RetryPolicy
from node.destinations.dicom import DicomRunner, associate, judge, new_ae
from node.outbox import Failure, ItemState, Outbox, backoff
from node.spool import Spool
from tests import images
from tests.conftest import ROOT, dcmtk, free_port, storescu, wait_for_port
from tests.orthanc import Orthanc, start_orthanc

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
UNCOMPRESSED = {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}
FAST_RETRY = "retry: {initial: 0.2s, max: 1s}"
JPEG_LS_RULE = """
  - name: everything
    compress: { transfer_syntax: jpeg-ls-lossless }
    send_to: [%s]
"""


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), extra={"SyncStorageArea": False})
    yield server
    server.stop()


@dataclass
class StoreSCP:
    proc: subprocess.Popen
    port: int
    folder: Path

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if not p.name.startswith("."))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def storescps() -> Iterator[list[StoreSCP]]:
    started: list[StoreSCP] = []
    yield started
    for scp in started:
        scp.stop()


def start_storescp(started: list[StoreSCP], folder: Path, port: int, *options: str) -> StoreSCP:
    """DCMTK's storescp: by default it accepts uncompressed transfer syntaxes only."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(folder), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},  # Nagle off, as a tuned PACS would
    )
    scp = StoreSCP(proc, port, folder)
    started.append(scp)
    wait_for_port(port, proc=proc)
    return scp


def dicom_destination(name: str, port: int, ae_title: str, extra: str = "") -> str:
    return f"""
{name}:
  type: dicom
  host: 127.0.0.1
  port: {port}
  ae_title: {ae_title}
  {FAST_RETRY}
  {extra}
"""


def write_all(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stored_values(ds: Dataset) -> np.ndarray:
    """Stored pixel values, bits above Bits Stored ignored and the sign applied."""
    arr = ds.pixel_array.astype(np.int64)
    bits = int(ds.BitsStored)
    if bits < int(ds.BitsAllocated):
        arr &= (1 << bits) - 1
        if int(ds.PixelRepresentation) == 1:
            arr = np.where(arr >= 1 << (bits - 1), arr - (1 << bits), arr)
    return arr


def outbox_files(spool: Path, name: str, folder: str = "pending") -> list[Path]:
    path = spool / "destinations" / name / folder
    return sorted(path.glob("*.dcm")) if path.exists() else []


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


# ----------------------------------------------------------------------------- outbox


def test_outbox_fail_retry_and_crash_leftovers(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.create()
    outbox = Outbox(spool, "pacs")
    outbox.create()
    ds = images.make_mr(seed=1)
    item = spool.new_id()
    ds.save_as(outbox.pending_path(item), enforce_file_format=True)
    outbox.save_state(item, ItemState(attempts=2, first_attempt=1.0, next_attempt=5.0))
    assert outbox.read_state(item).attempts == 2

    outbox.fail(item, Failure("rejected", status=0xA900, error_comment="bad"), ItemState(3))
    assert outbox.pending_ids() == [] and outbox.failed_ids() == [item]
    [failed] = outbox.list_failed()
    assert failed.info["status"] == "0xA900" and failed.info["error_comment"] == "bad"
    assert failed.info["attempts"] == 3 and failed.sop_instance_uid == ds.SOPInstanceUID
    assert not (outbox.pending / f"{item}.json").exists()

    assert outbox.retry(outbox.failed_ids_for([str(ds.SOPInstanceUID)])) == [item]
    assert outbox.pending_ids() == [item] and outbox.read_state(item) == ItemState()

    # What a crash can leave: a temp file and a sidecar whose instance moved on.
    (outbox.pending / ".x.dcm.1.partial").write_bytes(b"half")
    (outbox.failed / "orphan.json").write_text("{}")
    outbox.create()
    assert not list(outbox.pending.glob(".*")) and not (outbox.failed / "orphan.json").exists()


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy(initial=1.0, max=8.0, multiplier=2.0)
    assert [backoff(policy, n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 8]
    assert backoff(policy, 3, rng=lambda: 0.0) == 2.0  # half fixed, half random


def test_statuses_follow_ps3_4_annex_b() -> None:
    def status(code: int) -> Dataset:
        ds = Dataset()
        ds.Status = code
        return ds

    assert judge(status(0x0000)).verdict == "delivered"
    for warning in (0xB000, 0xB006, 0xB007):
        assert judge(status(warning)).verdict == "delivered"
    for transient in (0xA700, 0xA7FF):
        assert judge(status(transient)).verdict == "transient"
    for permanent in (0xA900, 0xC000, 0xC123, 0x0122):
        assert judge(status(permanent)).verdict == "permanent"
    assert judge(Dataset()).broken  # no response at all: association gone


def test_runner_settles_each_status_from_a_pynetdicom_peer(tmp_path: Path) -> None:
    """A7xx is retried until Success; A9xx and Cxxx go to failed/; B000 counts as delivered."""
    answers = {"busy": [0xA700, 0xA700, 0x0000], "bad": [0xA900], "odd": [0xC001], "ok": [0xB000]}
    calls: dict[str, int] = {}

    def handle(event: evt.Event) -> int:
        kind = str(event.request.AffectedSOPInstanceUID).rsplit(".", 1)[-1]
        kind = {"1": "busy", "2": "bad", "3": "odd", "4": "ok"}[kind]
        n = calls[kind] = calls.get(kind, 0) + 1
        return answers[kind][min(n, len(answers[kind])) - 1]

    scp = AE(ae_title="PEER")
    scp.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    spool = Spool(tmp_path / "spool")
    spool.create()
    outbox = Outbox(spool, "peer")
    outbox.create()
    for n in (1, 2, 3, 4):
        ds = images.make_mr(rows=8, cols=8, seed=n)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.4.{n}"
        ds.save_as(outbox.pending_path(spool.new_id()), enforce_file_format=True)
    dest = DicomDestination(
        name="peer", host="127.0.0.1", port=port, ae_title="PEER", calling_ae_title="NODE",
        retry=RetryPolicy(initial=0.05, max=0.2),
    )  # fmt: skip
    runner = DicomRunner(dest, spool)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while outbox.pending_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
        server.shutdown()
    assert outbox.pending_ids() == []
    assert calls == {"busy": 3, "bad": 1, "odd": 1, "ok": 1}
    reasons = {item.sop_instance_uid: item.info for item in outbox.list_failed()}
    assert set(reasons) == {"1.2.3.4.2", "1.2.3.4.3"}
    assert reasons["1.2.3.4.2"]["status"] == "0xA900"
    assert reasons["1.2.3.4.3"]["reason"] == "permanent failure"


# ----------------------------------------------------------------------------- real peers


def test_fan_out_to_orthanc_and_folder_bit_exact(nodes, orthanc: Orthanc, tmp_path: Path) -> None:
    node = nodes.start(
        rules=JPEG_LS_RULE % "archive, pacs",
        extra_destinations=dicom_destination("pacs", orthanc.dicom_port, orthanc.aet),
    )
    sources = [images.make_ct(rows=256, cols=256, seed=i) for i in range(4)]
    sources.append(images.make_mr(seed=9))
    storescu(node.port, write_all(sources, tmp_path / "send"))
    node.wait_archived(len(sources))
    uids = {str(s.SOPInstanceUID) for s in sources}
    node.wait_until(lambda: uids <= set(orthanc.sop_instance_uids()), 30, "all in Orthanc")
    assert not outbox_files(node.spool, "pacs")
    stored = orthanc.sop_instance_uids()
    archived = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in node.archived()}
    for source in sources:
        uid = str(source.SOPInstanceUID)
        assert uid in stored and uid in archived  # both destinations hold the same instance
        assert orthanc.transfer_syntax(stored[uid]) == JPEG_LS_LOSSLESS
        received = orthanc.dataset(stored[uid], tmp_path)
        np.testing.assert_array_equal(stored_values(received), stored_values(source))
    shown = cli("queue", "--config", str(node.config))
    assert shown.returncode == 0, shown.stderr
    assert "pacs (dicom" in shown.stdout and "0 pending, 0 retrying, 0 failed" in shown.stdout
    echoed = cli("echo", "pacs", "--config", str(node.config))
    assert echoed.returncode == 0 and "JPEG-LS Lossless" in echoed.stdout, echoed.stderr


def test_a_response_the_reactor_takes_goes_back_to_the_waiting_sender(
    storescps: list[StoreSCP], tmp_path: Path
) -> None:
    """pynetdicom's reactor can take a C-STORE response meant for send_c_store (a race
    seen in the benchmarks: a 60 s stall, then an abort); the node's associations put
    it back. The race is forced here: the reactor stalls just after passing its pause
    checkpoint, the sender is slow to wake up for its response."""
    scp = start_storescp(storescps, tmp_path / "scp", free_port())
    dest = DicomDestination(
        name="pacs", host="127.0.0.1", port=scp.port, ae_title="STORESCP",
        calling_ae_title="NODE", timeout=5.0,
    )  # fmt: skip
    ds = images.make_ct(rows=16, cols=16, seed=91)
    context = build_context(ds.SOPClassUID, ["1.2.840.10008.1.2.1"])
    assoc = associate(new_ae(dest), dest, [context])
    taken_by_reactor: list[int] = []

    class StallingCheckpoint(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            passed_while_set = self.is_set()
            result = super().wait(timeout)
            if passed_while_set and threading.current_thread() is assoc:
                time.sleep(0.1)  # descheduled before it marks itself unpaused
            return result

    class SlowWakingQueue(queue.Queue):
        def get(self, block: bool = True, timeout: float | None = None):  # type: ignore[override]
            if block and threading.current_thread() is not assoc:
                time.sleep(0.3)  # the sender: its response arrives meanwhile
            return super().get(block, timeout)

        def put(self, item, block: bool = True, timeout: float | None = None) -> None:  # type: ignore[override]
            if threading.current_thread() is assoc:
                taken_by_reactor.append(1)
            super().put(item, block, timeout)

    checkpoint = StallingCheckpoint()
    checkpoint.set()
    assoc.dimse.msg_queue = SlowWakingQueue()
    assoc._reactor_checkpoint = checkpoint
    try:
        statuses = []
        for _ in range(3):
            time.sleep(0.005)  # the reactor passes its checkpoint between requests
            statuses.append(getattr(assoc.send_c_store(ds), "Status", None))
    finally:
        if assoc.is_established:
            assoc.release()
    assert statuses == [0x0000] * 3
    assert taken_by_reactor, "the race was not forced: the reactor never took a response"
    scp_files = scp.files()
    assert len(scp_files) == 1 and pydicom.dcmread(scp_files[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_uncompressed_only_peer_gets_decompressed_or_failed(
    nodes, storescps: list[StoreSCP], tmp_path: Path
) -> None:
    """storescp takes only uncompressed: `fallback: uncompressed` decompresses (same UID,
    same pixels); `fallback: fail` puts the instance in failed/ with the reason."""
    scp = start_storescp(storescps, tmp_path / "scp", free_port())
    node = nodes.start(
        rules=JPEG_LS_RULE % "plain, strict",
        extra_destinations=dicom_destination("plain", scp.port, "STORESCP")
        + dicom_destination("strict", scp.port, "STORESCP", "fallback: fail"),
    )
    sources = [images.make_ct(rows=128, cols=128, seed=i) for i in range(3)]
    storescu(node.port, write_all(sources, tmp_path / "send"))
    node.wait_until(lambda: len(outbox_files(node.spool, "strict", "failed")) == 3, 30, "3 failed")
    node.wait_until(lambda: not outbox_files(node.spool, "plain"), 30, "empty plain outbox")
    received = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, scp.files())}
    assert set(received) == {str(s.SOPInstanceUID) for s in sources}
    for source in sources:
        ds = received[str(source.SOPInstanceUID)]
        assert ds.file_meta.TransferSyntaxUID in UNCOMPRESSED
        np.testing.assert_array_equal(stored_values(ds), stored_values(source))
    assert node.log_text().count("only uncompressed") == 1  # once per peer and SOP class
    sidecar = json.loads(
        outbox_files(node.spool, "strict", "failed")[0].with_suffix(".json").read_text()
    )
    assert sidecar["reason"] == "permanent failure" and "fallback: fail" in sidecar["error"]


def test_peer_down_then_up_is_delivered_after_retries(
    nodes, storescps: list[StoreSCP], tmp_path: Path
) -> None:
    port = free_port()
    node = nodes.start(
        rules="""
          - name: as-received
            send_to: [pacs]
        """,
        extra_destinations=dicom_destination("pacs", port, "STORESCP"),
    )
    sources = [images.make_mr(seed=i) for i in range(3)]
    storescu(node.port, write_all(sources, tmp_path / "send"))
    peer_file = node.spool / "destinations" / "pacs" / "peer.json"
    node.wait_until(lambda: len(outbox_files(node.spool, "pacs")) == 3, 20, "3 queued")
    node.wait_until(lambda: peer_file.exists(), 20, "a failed connection")
    node.wait_until(
        lambda: json.loads(peer_file.read_text())["failures"] >= 3, 20, "three failed connections"
    )
    shown = cli("queue", "--config", str(node.config))
    assert "3 pending" in shown.stdout and "peer unreachable since" in shown.stdout, shown.stdout
    scp = start_storescp(storescps, tmp_path / "scp", port)
    node.wait_until(lambda: not outbox_files(node.spool, "pacs"), 20, "empty outbox")
    assert len(scp.files()) == 3 and not peer_file.exists()
    assert "peer reachable again" in node.log_text()


def test_permanent_rejection_goes_to_failed_and_retry_delivers(
    nodes, orthanc: Orthanc, storescps: list[StoreSCP], tmp_path: Path
) -> None:
    """storescp --refuse and Orthanc asked for the wrong AE title reject permanently;
    `dicom-node queue retry` sends the instance again once the peer accepts."""
    port = free_port()
    refusing = start_storescp(storescps, tmp_path / "refusing", port, "--refuse")
    node = nodes.start(
        rules=JPEG_LS_RULE % "refusing, wrong_ae",
        extra_destinations=dicom_destination("refusing", port, "STORESCP")
        + dicom_destination("wrong_ae", orthanc.dicom_port, "NOT-ORTHANC"),
    )
    source = images.make_ct(rows=64, cols=64, seed=5)
    uid = str(source.SOPInstanceUID)
    storescu(node.port, write_all([source], tmp_path / "send"))
    for name in ("refusing", "wrong_ae"):
        node.wait_until(lambda n=name: outbox_files(node.spool, n, "failed"), 20, f"{name} failed")
        sidecar = json.loads(
            outbox_files(node.spool, name, "failed")[0].with_suffix(".json").read_text()
        )
        assert "rejected the association permanently" in sidecar["error"]
        assert sidecar["sop_instance_uid"] == uid and sidecar["attempts"] == 0
    assert "Called AE" in json.dumps(sidecar)  # Orthanc says why
    shown = cli("queue", "--config", str(node.config))
    assert "1 failed" in shown.stdout and uid in shown.stdout

    refusing.stop()
    scp = start_storescp(storescps, tmp_path / "accepting", port)
    retried = cli("queue", "retry", "refusing", uid, "--config", str(node.config))
    assert retried.returncode == 0, retried.stderr
    node.wait_until(lambda: scp.files(), 20, "delivery after retry")
    assert str(pydicom.dcmread(scp.files()[0]).SOPInstanceUID) == uid
    missing = cli("queue", "retry", "refusing", "1.2.3", "--config", str(node.config))
    assert missing.returncode == 5 and missing.stderr.count("\n") == 1
    assert "no failed instance" in missing.stderr


def test_kill_9_while_forwarding_then_restart_delivers_everything(
    nodes, orthanc: Orthanc, tmp_path: Path
) -> None:
    extra = dicom_destination("pacs", orthanc.dicom_port, orthanc.aet)
    node = nodes.start(rules=JPEG_LS_RULE % "pacs", extra_destinations=extra)
    sources = [images.make_ct(seed=i) for i in range(30)]
    uids = {str(s.SOPInstanceUID) for s in sources}
    before = set(orthanc.instances())
    storescu(node.port, write_all(sources, tmp_path))  # all acknowledged
    node.wait_until(lambda: len(set(orthanc.instances()) - before) >= 3, 30, "first deliveries")
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()
    assert len(set(orthanc.instances()) - before) < len(sources), "too late to test a crash"

    again = nodes.start(root=node.root, port=node.port, config_text=node.config.read_text())
    again.wait_until(lambda: uids <= set(orthanc.sop_instance_uids()), 60, "all in Orthanc")
    again.wait_until(lambda: not outbox_files(again.spool, "pacs"), 10, "empty outbox")
    again.wait_spool_empty()
    assert not outbox_files(again.spool, "pacs", "failed")
