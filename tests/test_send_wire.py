"""The node's own C-STORE data phase on the socket (node/destinations/dicom_wire.py).

Against pynetdicom (whose received bytes are compared with what its own sender
sends), DCMTK's storescp with a 4 KiB maximum PDU, a peer that aborts mid-instance
and a peer that stops reading.
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from node.destinations.dicom import DicomDestination
from node.destinations.dicom_sender import DicomRunner
from node.destinations.dicom_wire import dataset_offset
from node.outbox import Outbox
from node.schema import RetryPolicy
from node.spool import Spool
from tests import images
from tests.conftest import dcmtk, free_port, wait_for_port

SYNTAXES = [ExplicitVRLittleEndian, JPEGLSLossless]


class PynetdicomSender(DicomRunner):
    """The runner on pynetdicom's own C-STORE path, for comparison."""

    def _take_over(self, assoc):  # type: ignore[no-untyped-def]
        return None


def outbox_with(tmp_path: Path, name: str, datasets: list) -> tuple[Spool, Outbox]:
    spool = Spool(tmp_path / f"spool-{name}")
    spool.create()
    outbox = Outbox(spool, "peer")
    outbox.create()
    for ds in datasets:
        ds.save_as(outbox.pending_path(spool.new_id()), enforce_file_format=True)
    return spool, outbox


def run_until_empty(runner: DicomRunner, outbox: Outbox, seconds: float = 30) -> None:
    runner.start()
    try:
        deadline = time.monotonic() + seconds
        while outbox.pending_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()


def destination(port: int, **extra: object) -> DicomDestination:
    return DicomDestination(
        name="peer",
        host="127.0.0.1",
        port=port,
        ae_title="PEER",
        calling_ae_title="NODE",
        retry=RetryPolicy(initial=0.1, max=0.5),
        **extra,  # type: ignore[arg-type]
    )


def messages(stream: bytes) -> list[tuple[bytes, bytes]]:
    """The (command set, data set) pairs in a byte stream of P-DATA-TF PDUs."""
    out: list[tuple[bytes, bytes]] = []
    command, data, offset = b"", b"", 0
    while offset + 6 <= len(stream):
        kind, _, length = struct.unpack_from(">BBL", stream, offset)
        body = stream[offset + 6 : offset + 6 + length]
        offset += 6 + length
        if kind != 0x04:
            continue
        at = 0
        while at + 6 <= len(body):
            (item,) = struct.unpack_from(">L", body, at)
            control, value = body[at + 5], body[at + 6 : at + 4 + item]
            at += 4 + item
            if control & 0x01:
                command += value
            else:
                data += value
                if control & 0x02:
                    out.append((command, data))
                    command, data = b"", b""
    return out


class RecordingSCP:
    """A pynetdicom Storage SCP that records the raw bytes each association sent."""

    def __init__(self, on_data: Callable[[evt.Event], None] | None = None) -> None:
        self.streams: dict[int, bytearray] = {}
        self.stored: list[pydicom.Dataset] = []
        self.port = free_port()
        ae = AE(ae_title="PEER")
        ae.maximum_pdu_size = 16384
        for syntax in SYNTAXES:
            ae.add_supported_context(CTImageStorage, [syntax])
        ae.add_supported_context(CTImageStorage, SYNTAXES)
        handlers = [
            (evt.EVT_DATA_RECV, self._recv),
            (evt.EVT_C_STORE, self._store),
        ]
        self._on_data = on_data
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _recv(self, event: evt.Event) -> None:
        self.streams.setdefault(id(event.assoc), bytearray()).extend(event.data)
        if self._on_data is not None:
            self._on_data(event)

    def _store(self, event: evt.Event) -> int:
        self.stored.append(event.dataset)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_the_streamed_requests_carry_the_bytes_pynetdicom_would_send(tmp_path: Path) -> None:
    sent = [images.make_ct(rows=128, cols=128, seed=s) for s in range(2)]
    sent[1].file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    captured = {}
    for kind in (DicomRunner, PynetdicomSender):
        scp = RecordingSCP()
        spool, outbox = outbox_with(tmp_path, kind.__name__, sent)
        try:
            run_until_empty(kind(destination(scp.port, instances_per_association=1), spool), outbox)
        finally:
            scp.stop()
        assert outbox.pending_ids() == [] and outbox.failed_ids() == []
        captured[kind] = sorted(m for s in scp.streams.values() for m in messages(bytes(s)))
    ours, theirs = captured[DicomRunner], captured[PynetdicomSender]
    assert len(ours) == len(theirs) == 2
    assert ours == theirs  # command sets and data sets, byte for byte
    # And the data sets are the files' own bytes, from after the file meta.
    for ds in sent:
        path = tmp_path / "source.dcm"
        ds.save_as(path, enforce_file_format=True)
        body = path.read_bytes()[dataset_offset(path) :]
        assert any(data == body for _command, data in ours)


def test_a_peer_with_a_4096_byte_pdu_gets_every_instance_whole(tmp_path: Path) -> None:
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        [dcmtk("storescp"), "-pdu", "4096", "+xa", "-od", str(folder), "-aet", "PEER", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        wait_for_port(port, proc=scp)
        sent = [images.make_ct(rows=96, cols=96, seed=s) for s in range(3)]
        spool, outbox = outbox_with(tmp_path, "pdu", sent)
        run_until_empty(DicomRunner(destination(port), spool), outbox)
    finally:
        scp.terminate()
        scp.wait()
    assert outbox.pending_ids() == [] and outbox.failed_ids() == []
    received = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sorted(folder.iterdir()))}
    for ds in sent:
        assert received[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


def test_a_peer_that_aborts_mid_instance_gets_it_again(tmp_path: Path, caplog) -> None:
    aborted = threading.Event()

    def abort_once(event: evt.Event) -> None:
        # After the command and some data of the first instance: abort.
        if not aborted.is_set() and event.data[:1] == b"\x04" and len(event.data) > 1000:
            aborted.set()
            threading.Thread(target=event.assoc.abort, daemon=True).start()

    scp = RecordingSCP(abort_once)
    sent = [images.make_ct(rows=256, cols=256, seed=s) for s in range(3)]
    spool, outbox = outbox_with(tmp_path, "abort", sent)
    try:
        run_until_empty(DicomRunner(destination(scp.port), spool), outbox)
    finally:
        scp.stop()
    assert aborted.is_set()
    assert "association lost" in caplog.text
    assert outbox.pending_ids() == [] and outbox.failed_ids() == []
    assert {str(ds.SOPInstanceUID) for ds in sent} <= {str(d.SOPInstanceUID) for d in scp.stored}


def test_a_peer_that_stops_reading_times_out_and_nothing_is_lost(tmp_path: Path, caplog) -> None:
    stalled = threading.Event()

    def stall_once(event: evt.Event) -> None:
        # Once the data set is flowing, the DUL thread stops reading: the socket's
        # buffers fill and the sender blocks in sendall.
        if not stalled.is_set() and event.data[:1] == b"\x04":
            stalled.set()
            time.sleep(6)

    scp = RecordingSCP(stall_once)
    big = images.make_ct(rows=2048, cols=2048, seed=1)  # 8 MiB: more than the buffers
    spool, outbox = outbox_with(tmp_path, "stall", [big])
    runner = DicomRunner(destination(scp.port, timeout=1.0), spool)
    started = time.monotonic()
    try:
        run_until_empty(runner, outbox, seconds=60)
    finally:
        scp.stop()
    assert stalled.is_set()
    assert outbox.pending_ids() == [] and outbox.failed_ids() == []
    assert str(big.SOPInstanceUID) in {str(d.SOPInstanceUID) for d in scp.stored}
    assert time.monotonic() - started < 55
    assert "cannot send: timed out" in caplog.text or "no answer: timed out" in caplog.text


# ---------------------------------------------------------------- the sending process


def sender_processes(node_pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(node_pid), "-f", "node.senders"], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


def test_the_sending_process_killed_mid_association_is_restarted_and_loses_nothing(
    nodes, tmp_path: Path
) -> None:
    slow_down = threading.Event()
    slow_down.set()

    def slow(event: evt.Event) -> int:
        if slow_down.is_set():
            time.sleep(0.1)  # 20 instances take about 2 s: time to kill the sender
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    stored: list[str] = []
    scp_port = free_port()
    ae = AE(ae_title="PEER")
    ae.add_supported_context(CTImageStorage, SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", scp_port), block=False, evt_handlers=[(evt.EVT_C_STORE, slow)]
    )
    try:
        extra = f"""
        pacs:
          type: dicom
          host: 127.0.0.1
          port: {scp_port}
          ae_title: PEER
          retry: {{initial: 0.2s, max: 1s}}
        """
        node = nodes.start(rules="- name: all\n  send_to: [pacs]\n", extra_destinations=extra)
        node.wait_until(lambda: len(sender_processes(node.proc.pid)) == 1, 30, "the sender")
        [first] = sender_processes(node.proc.pid)
        sent = [images.make_ct(rows=32, cols=32, seed=s) for s in range(20)]
        paths = []
        for i, ds in enumerate(sent):
            paths.append(tmp_path / f"{i}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        from tests.conftest import storescu

        storescu(node.port, paths)
        node.wait_until(lambda: len(stored) >= 3, 30, "sending under way")
        os.kill(first, 9)
        slow_down.clear()
        node.wait_until(
            lambda: sender_processes(node.proc.pid) not in ([], [first]), 30, "a new sender"
        )
        want = {str(ds.SOPInstanceUID) for ds in sent}
        node.wait_until(lambda: want <= set(stored), 60, "every instance delivered")
        pending = node.spool / "destinations" / "pacs" / "pending"
        node.wait_until(lambda: not list(pending.glob("*.dcm")), 30, "an empty outbox")
        assert not list((node.spool / "destinations" / "pacs" / "failed").glob("*.dcm"))
        assert "the sending process exited (killed by SIGKILL)" in node.log_text()
    finally:
        server.shutdown()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def sparse_multiframe(path: Path, pixel_bytes: int) -> str:
    """A Part 10 multi-frame CT whose Pixel Data is ``pixel_bytes`` of zeros, written
    as a sparse file (nothing of the size is held in memory or written to disk)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = images.make_ct(rows=512, cols=512, seed=5)
    del ds.PixelData
    ds.NumberOfFrames = pixel_bytes // (512 * 512 * 2)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    write_dataset(fp, ds)
    fp.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
    with open(path, "wb") as out:
        out.write(fp.getvalue())
        out.truncate(len(fp.getvalue()) + pixel_bytes)
    return str(ds.SOPInstanceUID)


def test_a_1_gib_instance_is_forwarded_with_flat_memory(nodes, tmp_path: Path) -> None:
    port = free_port()
    scp = subprocess.Popen(
        [dcmtk("storescp"), "--ignore", "+xa", "-aet", "PEER", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        wait_for_port(port, proc=scp)
        extra = f"""
        pacs: {{type: dicom, host: 127.0.0.1, port: {port}, ae_title: PEER}}
        """
        node = nodes.start(rules="- name: all\n  send_to: [pacs]\n", extra_destinations=extra)
        node.wait_until(lambda: len(sender_processes(node.proc.pid)) == 1, 30, "the sender")
        [sender] = sender_processes(node.proc.pid)
        idle = peak_rss_mb(sender)
        pending = node.spool / "destinations" / "pacs" / "pending"
        big = tmp_path / "big.dcm"
        sparse_multiframe(big, 1024**3)
        os.replace(big, pending / "00000000000000000001-1-000001.dcm")
        node.wait_until(lambda: not list(pending.glob("*.dcm")), 120, "the instance sent")
        assert not list((pending.parent / "failed").glob("*.dcm"))
        grown = peak_rss_mb(sender) - idle
        assert grown < 100, f"the sending process grew by {grown:.0f} MB for 1 GiB"
    finally:
        scp.terminate()
        scp.wait()
