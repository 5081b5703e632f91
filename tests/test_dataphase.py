"""The node's own data-transfer phase (node/dataphase.py), spoken to byte by byte.

A raw-socket peer sends PDUs the way real peers may (commands split over PDUs, many
PDV items in one PDU, one-byte fragments) and the way broken ones do (a connection
cut mid data set); storescu sends through 4 KiB PDUs; a 300 MB instance shows the
receiving process streams it instead of holding it.
"""

from __future__ import annotations

import socket
import struct
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.admission import (
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    _read_with_pydicom,
    _walk_plain,
    dataset_refusal,
    read_header_uids,
)
from node.dataphase import (
    HEADER_PREFIX,
    ProtocolError,
    _Instance,
    parse_command,
    pdata_pdus,
    store_response,
)
from tests import images
from tests.conftest import default_config, free_port, storescu
from tests.test_hostile import CT_IMAGE_STORAGE, a_associate_rq, echo_ok

# ----------------------------------------------------------------------------- helpers


def implicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def command_set(ds: Dataset) -> bytes:
    """A command set with its group length, as pydicom encodes it."""
    body = implicit_le(ds)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def c_store_rq(ds: Dataset, message_id: int) -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = ds.SOPClassUID
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = ds.SOPInstanceUID
    return command_set(cmd)


def explicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


class RawPeer:
    """An association requestor written with sockets: sends exactly what it is told."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(a_associate_rq())
        kind, _ = self.read_pdu()
        assert kind == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {kind:#x}"

    def read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the node")
            out += chunk
        return out

    def read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBL", self.read_exact(6))
        return kind, self.read_exact(length)

    def read_response(self) -> Dataset:
        """The next command set the node sends, however it is fragmented."""
        command = b""
        while True:
            kind, body = self.read_pdu()
            assert kind == 0x04, f"expected P-DATA-TF, got PDU type {kind:#x}"
            offset = 0
            while offset < len(body):
                (length,) = struct.unpack_from(">L", body, offset)
                control = body[offset + 5]
                assert control & 0x01, "a response must be a command"
                command += body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x02:
                    return read_dataset(BytesIO(command), True, True)

    def release(self) -> int:
        self.sock.sendall(pdu(0x05, bytes(4)))
        kind, _ = self.read_pdu()
        self.sock.close()
        return kind


# ----------------------------------------------------------------------------- units


def test_the_c_store_response_is_what_pydicom_reads_back() -> None:
    instance = _Instance(
        context_id=1,
        message_id=513,
        sop_class=CT_IMAGE_STORAGE,
        sop_instance="1.2.3.45",  # odd length: padded with NUL
        transfer_syntax=str(ExplicitVRLittleEndian),
        started=0.0,
    )
    raw = store_response(instance, 0xA700, "node cannot store the instance: disk full")
    rsp = read_dataset(BytesIO(raw), True, True)
    assert rsp.CommandGroupLength == len(raw) - 12
    assert rsp.CommandField == 0x8001
    assert rsp.MessageIDBeingRespondedTo == 513
    assert rsp.CommandDataSetType == 0x0101
    assert rsp.Status == 0xA700
    assert rsp.ErrorComment == "node cannot store the instance: disk full"
    assert rsp.AffectedSOPInstanceUID == "1.2.3.45"
    assert rsp.AffectedSOPClassUID == CT_IMAGE_STORAGE


def test_a_response_is_fragmented_to_the_peers_maximum_pdu() -> None:
    command = bytes(range(100))
    raw = pdata_pdus(3, command, peer_max=40)
    gathered, controls, offset = b"", [], 0
    while offset < len(raw):
        kind, _, length = struct.unpack_from(">BBL", raw, offset)
        assert kind == 0x04 and length <= 40
        item_length, context_id, control = struct.unpack_from(">LBB", raw, offset + 6)
        assert context_id == 3
        gathered += raw[offset + 12 : offset + 10 + item_length]
        controls.append(control)
        offset += 6 + length
    assert gathered == command
    assert controls == [0x01] * (len(controls) - 1) + [0x03]


def test_a_command_set_that_lies_about_its_lengths_is_a_protocol_error() -> None:
    good = c_store_rq(images.make_ct(rows=8, cols=8, seed=1), 1)
    assert parse_command(good)[0x0100] == b"\x01\x00"
    with pytest.raises(ProtocolError):
        parse_command(good[:-3])
    with pytest.raises(ProtocolError):
        parse_command(struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00")


# ----------------------------------------------------------------------------- real node


def test_fragments_in_any_layout_arrive_whole_and_bit_exact(nodes, tmp_path) -> None:
    node = nodes.start()
    ds = images.make_ct(rows=64, cols=64, seed=71)
    command, data = c_store_rq(ds, 7), explicit_le(ds)
    peer = RawPeer(node.port)
    # The command over two PDUs; then, in one PDU, ten one-byte data fragments
    # followed by the rest in two PDVs.
    peer.sock.sendall(pdu(0x04, pdv(1, 0x01, command[:10])))
    peer.sock.sendall(pdu(0x04, pdv(1, 0x03, command[10:])))
    tiny = b"".join(pdv(1, 0x00, data[i : i + 1]) for i in range(10))
    half = 10 + (len(data) - 10) // 2
    peer.sock.sendall(pdu(0x04, tiny + pdv(1, 0x00, data[10:half]) + pdv(1, 0x02, data[half:])))
    rsp = peer.read_response()
    assert rsp.Status == 0x0000
    assert rsp.MessageIDBeingRespondedTo == 7
    assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID
    assert peer.release() == 0x06  # A-RELEASE-RP
    [out] = node.wait_archived(1)
    stored = pydicom.dcmread(out)
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(stored.pixel_array, ds.pixel_array)
    assert "association released: FUZZER" in node.log_text()


def _ahead_files(node) -> list[Path]:
    return sorted((node.spool / "incoming").glob(".ahead-*.partial"))


def test_the_next_spool_file_is_created_ahead_and_none_outlives_its_association(
    nodes, tmp_path
) -> None:
    node = nodes.start()
    first, second, third = (images.make_ct(rows=32, cols=32, seed=s) for s in (81, 82, 83))
    peer = RawPeer(node.port)
    peer.sock.sendall(pdu(0x04, pdv(1, 0x03, c_store_rq(first, 1))))
    peer.sock.sendall(pdu(0x04, pdv(1, 0x02, explicit_le(first))))
    assert peer.read_response().Status == 0x0000
    # Created after the response, before the next request: used by the next instance.
    node.wait_until(lambda: len(_ahead_files(node)) == 1, 10, "a file created ahead")
    [ahead] = _ahead_files(node)
    peer.sock.sendall(pdu(0x04, pdv(1, 0x03, c_store_rq(second, 2))))
    peer.sock.sendall(pdu(0x04, pdv(1, 0x02, explicit_le(second))))
    assert peer.read_response().Status == 0x0000
    node.wait_until(lambda: _ahead_files(node) not in ([], [ahead]), 10, "the next one")
    assert peer.release() == 0x06
    node.wait_until(lambda: not _ahead_files(node), 10, "no file ahead after the release")
    # Cut off with a file ahead of it: dropped as well.
    peer = RawPeer(node.port)
    peer.sock.sendall(pdu(0x04, pdv(1, 0x03, c_store_rq(third, 3))))
    peer.sock.sendall(pdu(0x04, pdv(1, 0x02, explicit_le(third))))
    assert peer.read_response().Status == 0x0000
    node.wait_until(lambda: len(_ahead_files(node)) == 1, 10, "a file created ahead")
    peer.sock.close()
    node.wait_until(lambda: not _ahead_files(node), 10, "no file ahead after the cut")
    archived = {pydicom.dcmread(f).SOPInstanceUID for f in node.wait_archived(3)}
    assert archived == {first.SOPInstanceUID, second.SOPInstanceUID, third.SOPInstanceUID}
    assert not list((node.spool / "incoming").iterdir())


def test_a_connection_cut_mid_data_set_acknowledges_and_keeps_nothing(nodes, tmp_path) -> None:
    node = nodes.start()
    ds = images.make_ct(rows=64, cols=64, seed=72)
    peer = RawPeer(node.port)
    peer.sock.sendall(pdu(0x04, pdv(1, 0x03, c_store_rq(ds, 1))))
    peer.sock.sendall(pdu(0x04, pdv(1, 0x00, explicit_le(ds)[:1000])))
    peer.sock.close()
    node.wait_until(lambda: "not received whole" in node.log_text(), 20, "the log line")
    assert echo_ok(node.port)  # and the node serves the next peer
    assert not list((node.spool / "incoming").iterdir())
    assert node.archived() == []


def test_data_after_a_different_context_is_refused_with_an_abort(nodes, tmp_path) -> None:
    node = nodes.start()
    ds = images.make_ct(rows=16, cols=16, seed=73)
    peer = RawPeer(node.port)
    peer.sock.sendall(pdu(0x04, pdv(1, 0x03, c_store_rq(ds, 1))))
    peer.sock.sendall(pdu(0x04, pdv(9, 0x02, explicit_le(ds))))  # context 9 was never proposed
    kind, body = peer.read_pdu()
    assert kind == 0x07  # A-ABORT
    assert body[2] == 0x02  # by the service provider
    node.wait_until(lambda: "was not accepted" in node.log_text(), 20, "the log line")
    assert echo_ok(node.port)


def test_storescu_through_4_kib_pdus_is_bit_exact(nodes, tmp_path) -> None:
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    node = nodes.start(default_config(root, port, node_extra="max_pdu: 4096"), root=root, port=port)
    sources = [images.make_ct(rows=128, cols=128, seed=80 + i) for i in range(3)]
    files = []
    for i, ds in enumerate(sources):
        files.append(tmp_path / f"ct{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    storescu(port, files)
    archived = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, node.wait_archived(3))}
    for ds in sources:
        assert np.array_equal(archived[str(ds.SOPInstanceUID)].pixel_array, ds.pixel_array)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_the_receiving_process_streams_a_300_mb_instance_to_disk(nodes, tmp_path) -> None:
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    rules = """
      - name: as received
        send_to: [archive]
    """
    node = nodes.start(default_config(root, port, rules=rules), root=root, port=port)
    assert echo_ok(port)
    before = _peak_rss_mb(node.proc.pid)
    # 150 frames of 1024x1024 16-bit: 300 MiB in one data set.
    frames, size = 150, 1024
    ds = images.make_ct(rows=size, cols=size, seed=90)
    pixels = np.tile(ds.pixel_array, (frames, 1, 1))
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = generate_uid()
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    del pixels, ds
    storescu(port, [path])
    [out] = node.wait_archived(1, timeout=120)
    assert out.stat().st_size > frames * size * size * 2
    grown = _peak_rss_mb(node.proc.pid) - before
    # pynetdicom's own path held the data set whole, and a copy of it: 600 MB.
    assert grown < 64, f"the receiving process grew by {grown:.0f} MB"


# ------------------------------------------------------------ header check fast path

_MAKERS = [
    images.make_ct,
    images.make_mr,
    images.make_rgb,
    images.make_multiframe,
    images.make_sr,
    images.make_signed16,
    images.make_one_bit,
    images.make_uint32,
]


def _judge(data: bytes, syntax: str, ds) -> object:
    return dataset_refusal(data, syntax, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


@pytest.mark.parametrize("make", _MAKERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_the_header_check_fast_path_agrees_with_pydicom(make, implicit: bool) -> None:
    ds = make()
    data = (implicit_le if implicit else explicit_le)(ds)[:HEADER_PREFIX]
    syntax = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    plain = _walk_plain(data, implicit)
    assert plain is not None and plain.complete
    # pydicom's path (the fallback) finds the same UIDs, byte for byte.
    assert _read_with_pydicom(data, implicit, True, SERIES_INSTANCE_UID) == plain.found
    assert plain.found[SOP_INSTANCE_UID].rstrip(b"\0") == str(ds.SOPInstanceUID).encode()
    assert _judge(data, syntax, ds) is None
    # What the fast path does not take, pydicom still judges.
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    data = (implicit_le if implicit else explicit_le)(ds)[:HEADER_PREFIX]
    assert (
        SOP_INSTANCE_UID
        not in (_walk_plain(data, implicit) or read_header_uids(data, syntax)).found
    )
    ds.SOPInstanceUID = uid
    assert _judge(data, syntax, ds).comment == "data set has no SOP Instance UID"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"SQ", b"UN", b"OB"):
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def test_the_header_check_fast_path_declines_what_it_cannot_read_plainly() -> None:
    uid = _element(0x0008, 0x0018, b"UI", b"1.2.3.4\x00")
    after = _element(0x0028, 0x0010, b"US", b"\x01\x00")
    # A sequence of undefined length before the UID: pydicom's path reads it.
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + _element(0x0008, 0x0100, b"SH", b"X ")
    item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence = struct.pack("<HH2sHL", 0x0008, 0x0006, b"SQ", 0, 0xFFFFFFFF) + item
    sequence += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    data = sequence + uid + after
    explicit = "1.2.840.10008.1.2.1"
    assert _walk_plain(data, implicit=False) is None
    assert dataset_refusal(data, explicit, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4") is None
    # An unknown VR, garbage, a cut-off value: never read plainly.
    assert _walk_plain(_element(0x0008, 0x0016, b"ZZ", b"12") + uid + after, False) is None
    assert _walk_plain(b"\xff" * 64, False) is None
    assert _walk_plain(uid[:-3], False) is None
    assert dataset_refusal(b"\xff" * 64, explicit, "1.2", "1.2.3.4") is not None
    # An empty UID is found, and refused.
    empty = _element(0x0008, 0x0018, b"UI", b"  ") + after
    refusal = dataset_refusal(empty, explicit, "1.2", "1.2.3.4")
    assert refusal is not None and refusal.status == 0xC000


# ------------------------------------------------------------ one receive path


@pytest.mark.parametrize("peer_is_scp", [False, True], ids=["modality-as-scu", "pacs-as-scp"])
def test_storage_beside_storage_commitment_takes_the_one_receive_path(
    nodes, peer_is_scp: bool
) -> None:
    """Storage Commitment is accepted only from a peer that reports (SCP role); either
    way its C-STOREs are served by the data phase, the only path that stores."""
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel

    from tests.conftest import guarded

    node = nodes.start(rules="- name: all\n  send_to: [archive]\n")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StorageCommitmentPushModel)
    roles = [build_role(StorageCommitmentPushModel, scp_role=True)] if peer_is_scp else []
    assoc = guarded(ae.associate("127.0.0.1", node.port, ae_title="TEST-NODE", ext_neg=roles))
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert CTImageStorage in accepted
    assert (StorageCommitmentPushModel in accepted) is peer_is_scp
    sent = [images.make_ct(rows=64, cols=64, seed=s) for s in range(3)]
    statuses = [int(assoc.send_c_store(ds).Status) for ds in sent]
    assoc.release()
    assert statuses == [0, 0, 0]
    archived = node.wait_archived(3)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in archived} == {
        ds.SOPInstanceUID for ds in sent
    }
