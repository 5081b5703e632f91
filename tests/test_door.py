"""What the node refuses at the door, what it keeps however hostile, and what never
holds a thread: issue 13's five faults, each against a real node process.

The hostile bytes come from tests/rawscu.py (no real sender produces them); the
good traffic beside them from pynetdicom and DCMTK.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from tests import images, rawscu
from tests.conftest import default_config, free_port
from tests.test_hostile import echo_ok, worker_processes

CT = rawscu.CT_IMAGE_STORAGE.encode()
ALL_SYNTAXES = [
    (1, rawscu.CT_IMAGE_STORAGE, rawscu.EXPLICIT_LE),
    (3, rawscu.CT_IMAGE_STORAGE, rawscu.DEFLATED),
    (5, rawscu.CT_IMAGE_STORAGE, rawscu.RLE),
    (7, rawscu.CT_IMAGE_STORAGE, rawscu.JPEG_LS),
]


def ct_bytes(uid: str | None = None, **values: object) -> tuple[str, bytes]:
    ds = images.make_ct(rows=32, cols=32, seed=7)
    ds.SOPInstanceUID = uid or generate_uid()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return str(ds.SOPInstanceUID), rawscu.encode(ds)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# ---------------------------------------------------------------- UIDs at the door

LONG_UTF8_UID = b"1" * 20 + "ü".encode() * 70  # 160 bytes: the campaign's case
BAD_UIDS = {
    "non-ASCII, 160 bytes": LONG_UTF8_UID,
    "65 bytes": b"1.2." + b"3" * 61,
    "empty component": b"1.2..3",
    "letters": b"1.2.abc",
    "trailing dot": b"1.2.3.",
}


def test_invalid_uids_and_mismatches_are_refused_and_nothing_is_left_behind(nodes) -> None:
    node = nodes.start(rules="- name: all\n  send_to: [archive]\n")
    assoc = rawscu.associate(node.port)
    results: dict[str, tuple[int, str] | None] = {}
    for what, bad in BAD_UIDS.items():
        uid, data = ct_bytes()
        # In the data set only (the command's is valid), then in both.
        data = rawscu.with_value(data, 0x0008, 0x0018, b"UI", bad)
        results[f"SOP Instance UID {what}"] = rawscu.c_store(assoc, CT, uid.encode(), data)
        results[f"command UID {what}"] = rawscu.c_store(assoc, CT, bad, data)
    for keyword, element in (("Study", 0x000D), ("Series", 0x000E)):
        uid, data = ct_bytes()
        data = rawscu.with_value(data, 0x0020, element, b"UI", b"1.2.x" + b"9" * 70)
        results[f"{keyword} Instance UID"] = rawscu.c_store(assoc, CT, uid.encode(), data)
    uid, data = ct_bytes()
    results["command UID of 60,000 bytes"] = rawscu.c_store(assoc, CT, b"1." * 30000, data)
    results["command SOP Instance UID differs"] = rawscu.c_store(
        assoc, CT, generate_uid().encode(), data
    )
    results["command SOP Class UID differs"] = rawscu.c_store(
        assoc, b"1.2.840.10008.5.1.4.1.1.4", uid.encode(), data
    )
    kept_uid, kept = ct_bytes("1.2.826.0.1.3680043.2.0099.7")  # a leading zero: accepted
    results["leading zero"] = rawscu.c_store(assoc, CT, kept_uid.encode(), kept)
    good_uid, good = ct_bytes()
    results["good"] = rawscu.c_store(assoc, CT, good_uid.encode(), good)
    assoc.close()

    statuses = {what: result and result[0] for what, result in results.items()}
    assert statuses == {
        **{f"SOP Instance UID {what}": 0xC000 for what in BAD_UIDS},
        **{f"command UID {what}": 0xC000 for what in BAD_UIDS},
        "Study Instance UID": 0xC000,
        "Series Instance UID": 0xC000,
        "command UID of 60,000 bytes": 0xC000,
        "command SOP Instance UID differs": 0xA900,
        "command SOP Class UID differs": 0xA900,
        "leading zero": 0x0000,
        "good": 0x0000,
    }, results
    assert results["SOP Instance UID non-ASCII, 160 bytes"][1] == (
        "SOP Instance UID is 160 bytes long, over 64"
    )
    assert results["command UID non-ASCII, 160 bytes"][1] == (
        "Affected SOP Instance UID is 160 bytes long, over 64"
    )
    assert "differs" in results["command SOP Instance UID differs"][1]
    archived = node.wait_archived(2)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archived}
    assert uids == {kept_uid, good_uid}
    node.wait_spool_empty()
    assert not list((node.spool / "quarantine").iterdir())
    assert not list((node.spool / "incoming").glob("*"))


def test_every_acknowledged_instance_ends_in_a_known_place_whatever_its_header(
    nodes, tmp_path
) -> None:
    """Hostile header values that pass the door: each instance ends archived or in
    failed/ with its reason within seconds, never retried for days."""
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    deep_layout = "/".join(["{PatientID}"] * 40) + "/{SOPInstanceUID}.dcm"
    extra = f"""
    wide:
      type: folder
      path: {root / "wide"}
      layout: "{{PatientID}}_{{PatientName}}_{{StudyDescription}}/{{SOPInstanceUID}}.dcm"
    deep:
      type: folder
      path: {root / "deep"}
      layout: "{deep_layout}"
    """
    rules = "- name: all\n  send_to: [archive, wide, deep]\n"
    node = nodes.start(default_config(root, port, rules, extra), root=root, port=port)
    values = [
        {"PatientID": "ü" * 200, "PatientName": "é" * 200, "StudyDescription": "ß" * 60},
        {"PatientID": "../../etc", "PatientName": "a/b\\c", "StudyDescription": ".."},
        {"PatientID": "\x00\x1f\x7f" * 10, "PatientName": "", "StudyDescription": "x" * 64},
        {"PatientID": "P" * 64, "PatientName": "N" * 64, "StudyDescription": "D" * 64},
    ]
    assoc = rawscu.associate(port)
    sent = []
    for fields in values:
        uid, data = ct_bytes(**fields)
        result = rawscu.c_store(assoc, CT, uid.encode(), data)
        assert result is not None and result[0] == 0x0000, result
        sent.append(uid)
    assoc.close()
    started = time.monotonic()
    node.wait_archived(len(sent), timeout=30)
    wide = root / "wide"
    node.wait_until(lambda: len(list(wide.rglob("*.dcm"))) == len(sent), 30, "wide layout")
    for path in wide.rglob("*"):
        assert len(path.name.encode()) <= 255
        assert path.resolve().is_relative_to(wide.resolve())
    # The deep layout's paths are longer than PATH_MAX for the 200-character IDs:
    # ENAMETOOLONG is permanent, so that one goes to failed/ with its reason at once.
    failed = node.spool / "destinations" / "deep" / "failed"
    delivered = root / "deep"
    node.wait_until(
        lambda: len(list(failed.glob("*.dcm"))) + len(list(delivered.rglob("*.dcm"))) == len(sent),
        30,
        "every deep copy delivered or failed",
    )
    assert time.monotonic() - started < 30
    [reason] = [json.loads(p.read_text()) for p in failed.glob("*.json")]
    assert "File name too long" in reason["error"], reason
    assert reason["reason"] == "permanent failure"
    assert not list((node.spool / "destinations" / "deep" / "pending").glob("*.dcm"))
    assert echo_ok(port)


# ---------------------------------------------------------------- deflate bombs


def test_a_deflate_bomb_is_refused_while_it_arrives_with_memory_bounded(nodes, tmp_path) -> None:
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    config = default_config(
        root, port, "- name: all\n  send_to: [archive]\n", node_extra="max_dataset_size: 64MiB"
    )
    node = nodes.start(config, root=root, port=port)
    assoc = rawscu.associate(port, ALL_SYNTAXES)
    # A sane deflated instance is acknowledged and kept as received.
    uid, data = ct_bytes()
    assert rawscu.c_store(assoc, CT, uid.encode(), rawscu.deflate(data), context_id=3) == (0, "")
    before = peak_rss_mb(node.proc.pid)
    # 2.5 MiB on the wire that inflate to 2 GiB: refused, and never inflated whole.
    ds = images.make_ct(rows=32, cols=32, seed=8)
    del ds.PixelData
    pieces = rawscu.deflate_bomb(rawscu.encode(ds), 2 * 1024**3)
    assert sum(map(len, pieces)) < 3 * 1024**2
    result = rawscu.c_store(assoc, CT, str(ds.SOPInstanceUID).encode(), pieces, context_id=3)
    assert result == (0xA700, "data set inflates past node.max_dataset_size"), result
    grown = peak_rss_mb(node.proc.pid) - before
    assert grown < 32, f"the receiving process grew by {grown:.0f} MB"
    # Deflate data that is corrupt or cut short: Cannot Understand.
    uid, data = ct_bytes()
    broken = rawscu.deflate(data)
    result = rawscu.c_store(assoc, CT, uid.encode(), broken[: len(broken) // 2], context_id=3)
    assert result is not None and result[0] == 0xC000, result
    assoc.close()
    [out] = node.wait_archived(1)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == rawscu.DEFLATED
    node.wait_spool_empty()
    assert not list((node.spool / "quarantine").iterdir())


# ---------------------------------------------------------------- decoder panics


def rle_panic_frame() -> bytes:
    """An RLE frame whose segments decode to more bytes than the 32x32 16-bit image
    holds: pylibjpeg-rle panics on it (a Rust index out of bounds)."""
    segment = b"\x81\x00" * 12  # 12 runs of 128 zero bytes: 1,536 > 1,024 per segment
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    return header + segment + segment


def test_corrupt_compressed_pixel_data_is_kept_as_received_without_killing_workers(
    nodes,
) -> None:
    node = nodes.start(
        rules="- name: all\n  compress: {transfer_syntax: htj2k-lossless}\n  send_to: [archive]\n"
    )
    node.wait_until(lambda: len(worker_processes(node.proc.pid)) == 2, 30, "workers")
    workers = set(worker_processes(node.proc.pid))
    ds = images.make_ct(rows=32, cols=32, seed=9)
    rle = ds.copy()
    rle.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    rle.PixelData = encapsulate([rle_panic_frame()])
    jls = images.make_ct(rows=32, cols=32, seed=10)
    jls.compress(JPEGLSLossless, generate_instance_uid=False)
    frame = next(pydicom.encaps.generate_frames(jls.PixelData, number_of_frames=1))
    jls.PixelData = encapsulate([frame[: len(frame) // 2]])  # cut short, no EOI
    assoc = rawscu.associate(node.port, ALL_SYNTAXES)
    for instance, context in ((rle, 5), (jls, 7)):
        uid = str(instance.SOPInstanceUID).encode()
        result = rawscu.c_store(assoc, CT, uid, rawscu.encode(instance), context_id=context)
        assert result == (0, ""), result
    assoc.close()
    archived = node.wait_archived(2)
    syntaxes = {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in archived}
    assert syntaxes == {RLELossless, JPEGLSLossless}
    for path in archived:  # the pixel data exactly as received
        out = pydicom.dcmread(path)
        sent = rle if out.file_meta.TransferSyntaxUID == RLELossless else jls
        assert out.PixelData == sent.PixelData
    # The outcome is logged by the main process just after the worker wrote the file.
    for reason in ("cannot decode the RLE Lossless pixel data", "cannot decode the JPEG-LS"):
        node.wait_until(lambda reason=reason: reason in node.log_text(), 20, reason)
    log = node.log_text()
    assert set(worker_processes(node.proc.pid)) == workers, "a worker died"
    assert "worker" not in log.lower() or "died" not in log.lower()


# ---------------------------------------------------------------- pynetdicom's reactor


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the node closed ``sock`` within ``seconds``, and what it sent first."""
    sock.settimeout(seconds)
    got = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except TimeoutError:
        return False, got
    except OSError:
        return True, got
    return False, got


def test_protocol_breaking_requests_and_probes_release_their_threads(nodes) -> None:
    node = nodes.start()
    assert echo_ok(node.port)
    time.sleep(0.5)
    idle = threads(node.proc.pid)
    # An even presentation context ID: pynetdicom raises while decoding it.
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(
            rawscu.associate_rq(contexts=[(2, rawscu.CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")])
        )
        closed, got = _closed_within(sock, 1.0)
    assert closed and got[:1] == b"\x07", got[:10]  # an A-ABORT, then the close
    # Two A-ASSOCIATE-RQs in one segment: the second arrives in Sta6/Sta13.
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(rawscu.associate_rq() + rawscu.associate_rq())
        closed, got = _closed_within(sock, 1.0)
    assert closed, got[:10]

    # A presentation context without its abstract syntax: the negotiation raises.
    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(payload)) + payload

    rq = bytearray(rawscu.associate_rq())
    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x40, b"1.2.840.10008.1.2.1"))
    start = rq.index(b"\x20\x00", 74)
    (length,) = struct.unpack_from(">H", rq, start + 2)
    rq[start : start + 4 + length] = context
    rq[2:6] = struct.pack(">L", len(rq) - 6)
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(bytes(rq))
        closed, got = _closed_within(sock, 1.0)
    assert closed, got[:10]
    # 50 connect-and-close probes (a port scan, a load balancer's TCP check).
    for _ in range(50):
        socket.create_connection(("127.0.0.1", node.port)).close()
    node.wait_until(lambda: threads(node.proc.pid) <= idle, 3, f"threads back to {idle}")
    log = node.log_text()
    assert "Exception in thread" not in log, log
    assert "it broke the protocol (ValueError" in log
    assert echo_ok(node.port)


# ---------------------------------------------------------------- units behind the above


def _part10(tmp_path: Path, name: str, syntax: str, body: list[bytes]) -> Path:
    from node.spool import PREAMBLE, Arrival, encode_file_meta

    arrival = Arrival(rawscu.CT_IMAGE_STORAGE, "1.2.3", syntax, "A", "B", "127.0.0.1", 1)
    path = tmp_path / name
    with open(path, "wb") as out:
        out.write(PREAMBLE + encode_file_meta(arrival))
        for piece in body:
            out.write(piece)
    return path


def test_a_worker_judges_a_deflated_file_before_pydicom_inflates_it(tmp_path) -> None:
    from node.admission import deflated_file_refusal

    ds = images.make_ct(rows=16, cols=16, seed=1)
    plain = rawscu.encode(ds)
    good = _part10(tmp_path, "good.dcm", rawscu.DEFLATED, [rawscu.deflate(plain)])
    assert deflated_file_refusal(good, 1024**2) is None
    assert pydicom.dcmread(good).SOPInstanceUID == ds.SOPInstanceUID
    del ds.PixelData
    bomb = _part10(
        tmp_path, "bomb.dcm", rawscu.DEFLATED, rawscu.deflate_bomb(rawscu.encode(ds), 2**30)
    )
    refusal = deflated_file_refusal(bomb, 64 * 1024**2)
    assert refusal is not None and refusal.status == 0xA700
    cut = _part10(tmp_path, "cut.dcm", rawscu.DEFLATED, [rawscu.deflate(plain)[:100]])
    assert deflated_file_refusal(cut, 1024**2).comment == "deflated data set is incomplete"
    # Not deflated: not its business, whatever the size.
    native = _part10(tmp_path, "native.dcm", rawscu.EXPLICIT_LE, [plain])
    assert deflated_file_refusal(native, 10) is None


def test_folder_names_fit_in_bytes_keep_their_extension_and_stay_apart() -> None:
    from node.destinations.folder import MAX_NAME_BYTES, fit_name, safe_component

    assert len(safe_component("ü" * 200).encode()) <= 128
    assert safe_component("\udcff" * 3) == "___"  # undecodable bytes are no file name
    long_a, long_b = "ü" * 150 + "a.dcm", "ü" * 150 + "b.dcm"
    fitted = {fit_name(long_a), fit_name(long_b)}
    assert len(fitted) == 2
    for name in fitted:
        assert len(name.encode()) <= MAX_NAME_BYTES and name.endswith(".dcm")
    assert fit_name("short.dcm") == "short.dcm"


def test_pynetdicom_private_api_is_fenced_in_one_module() -> None:
    """Only node/pynetdicom_private.py reaches into pynetdicom's private API, and it
    refuses to load with a pynetdicom it was not written for."""
    import re

    import node

    private = re.compile(
        r"\._(run_loop_delay|is_transport_event|kill_thread|config|reactor_checkpoint|"
        r"serve_request|STORAGE_CLASSES)\b|\.dul\.|from pynetdicom\.\w+ import _"
    )
    root = Path(node.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        if path.name != "pynetdicom_private.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert offenders == []
    import subprocess
    import sys

    probe = (
        "import pynetdicom; pynetdicom.__version__ = '3.1.0'\n"
        "try:\n    import node.pynetdicom_private\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "pynetdicom 3.0; 3.1.0 is installed" in out.stdout, out
