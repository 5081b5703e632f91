"""Hostile and broken input: fuzzed PDUs and data sets, a full disk, PDU-length tricks.

The node must stay up, answer every bad instance with a failure status (or keep it
in quarantine/ with a reason if it was already acknowledged), and keep serving
good peers meanwhile.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification

from tests import images
from tests.conftest import RunningNode, guarded, storescu

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FUZZ = settings(
    max_examples=int(os.environ.get("DICOM_NODE_FUZZ_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


def echo_ok(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = guarded(ae.associate("127.0.0.1", port, ae_title="TEST-NODE"))
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return ok


def a_associate_rq(called: bytes = b"TEST-NODE", calling: bytes = b"FUZZER") -> bytes:
    """A well-formed A-ASSOCIATE-RQ proposing CT Image Storage, Explicit VR LE."""

    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(payload)) + payload

    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    cx = item(
        0x20,
        bytes([1, 0, 0, 0])
        + item(0x30, CT_IMAGE_STORAGE.encode())
        + item(0x40, EXPLICIT_LE.encode()),
    )
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)
        + calling.ljust(16)
        + bytes(32)
        + app
        + cx
        + user
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def send_raw(port: int, data: bytes, linger: float = 0.05) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
            s.settimeout(linger)
            s.recv(4096)
        except OSError:
            pass


class GoodSender(threading.Thread):
    """Stores valid instances on its own association while the fuzzing goes on."""

    def __init__(self, port: int, folder: Path) -> None:
        super().__init__(daemon=True)
        self.port, self.folder = port, folder
        self.statuses: list[int] = []
        self.sent: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        ae = AE(ae_title="GOOD_CT")
        ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
        assoc = guarded(ae.associate("127.0.0.1", self.port, ae_title="TEST-NODE"))
        seed = 1000
        while not self.stop.is_set() and assoc.is_established:
            ds = images.make_ct(rows=32, cols=32, seed=seed)
            seed += 1
            self.statuses.append(int(assoc.send_c_store(ds).Status))
            self.sent.append(str(ds.SOPInstanceUID))
            self.stop.wait(0.05)
        if assoc.is_established:
            assoc.release()


pdu_fuzz = st.one_of(
    st.binary(min_size=1, max_size=512),  # noise
    st.builds(  # a PDU header of any type with a length that lies
        lambda kind, length, body: struct.pack(">BBI", kind, 0, length) + body,
        st.integers(0, 255),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=256),
    ),
    st.builds(  # a valid A-ASSOCIATE-RQ cut short or with bytes flipped
        lambda cut, flips: _flip(a_associate_rq()[:cut], flips),
        st.integers(1, 300),
        st.lists(st.tuples(st.integers(0, 299), st.integers(0, 255)), max_size=4),
    ),
    st.builds(  # an association, then garbage where P-DATA should be
        lambda junk: a_associate_rq() + junk,
        st.binary(min_size=1, max_size=256),
    ),
)


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in flips:
        if at < len(out):
            out[at] = value
    return bytes(out)


def test_fuzzed_pdus_leave_the_node_up_and_good_peers_served(nodes, tmp_path) -> None:
    node = nodes.start(
        rules="""
      - name: all
        send_to: [archive]
    """
    )
    good = GoodSender(node.port, tmp_path)
    good.start()
    cases = []

    @FUZZ
    @given(pdu_fuzz)
    def fuzz(data: bytes) -> None:
        cases.append(len(data))
        send_raw(node.port, data)
        assert node.proc.poll() is None, node.log_text()

    fuzz()
    good.stop.set()
    good.join(30)
    print(f"\nfuzzed PDU cases: {len(cases)}")
    assert len(cases) >= 50
    assert node.proc.poll() is None
    assert echo_ok(node.port), "the node no longer accepts associations"
    assert good.statuses and set(good.statuses) == {0x0000}, good.statuses
    node.wait_archived(len(good.sent))


def test_declared_huge_pdus_do_not_lock_others_out(nodes) -> None:
    node = nodes.start()
    for _ in range(60):  # more than pynetdicom's default 10 slots, more than our 32
        send_raw(node.port, b"\x01\x00" + struct.pack(">I", 0x7FFFFFFF) + b"\x00\x01", linger=0)
    assert echo_ok(node.port)


def mutate(data: bytes, rng: random.Random, how: str) -> bytes:
    if how == "truncate":
        return data[: rng.randrange(1, len(data))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if how == "huge-length":
        # Overwrite the 32-bit length of some element header with a huge value.
        out = bytearray(data)
        at = rng.randrange(0, min(len(out) - 4, 1200))
        out[at : at + 4] = struct.pack("<I", rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0x00FFFFFF]))
        return bytes(out)
    if how == "short-pixels":
        return data[: len(data) - rng.randint(2, 2000)]
    raise ValueError(how)


def test_corrupt_data_sets_get_a_status_or_a_reasoned_quarantine(
    nodes, tmp_path, monkeypatch
) -> None:
    node = nodes.start(
        rules="""
      - name: all
        compress: {transfer_syntax: jpeg-ls-lossless}
        send_to: [archive]
    """
    )
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send bytes as they are
    ae = AE(ae_title="BROKEN_CT")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = guarded(ae.associate("127.0.0.1", node.port, ae_title="TEST-NODE"))
    assert assoc.is_established
    statuses: list[int] = []

    @FUZZ
    @given(
        st.integers(0, 2**32 - 1),
        st.sampled_from(["truncate", "flip", "huge-length", "short-pixels"]),
    )
    def fuzz(seed: int, how: str) -> None:
        nonlocal assoc
        rng = random.Random(seed)
        ds = images.make_ct(rows=32, cols=32, seed=seed % 1000)
        good = tmp_path / "good.dcm"
        ds.save_as(good, enforce_file_format=True)
        raw = good.read_bytes()
        _meta, meta_end = split_dataset(good)
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(raw[:meta_end] + mutate(raw[meta_end:], rng, how))
        if not assoc.is_established:  # a broken P-DATA stream may end an association
            assoc = guarded(ae.associate("127.0.0.1", node.port, ae_title="TEST-NODE"))
        status = assoc.send_c_store(bad)
        statuses.append(int(status.Status) if "Status" in status else -1)
        assert node.proc.poll() is None, node.log_text()

    fuzz()
    if assoc.is_established:
        assoc.release()
    acknowledged = statuses.count(0x0000)
    print(
        f"\ncorrupt data set cases: {len(statuses)}, acknowledged {acknowledged}, "
        f"refused {sum(1 for s in statuses if s not in (0, -1))}"
    )
    assert len(statuses) >= 50
    # A900: a flipped byte in the data set's SOP Class/Instance UID (docs/conformance.md 3.5).
    assert set(statuses) - {0x0000} <= {0xC000, 0xA700, 0xA900, -1}, set(statuses)
    assert any(s == 0xC000 for s in statuses), "no corrupt header was refused"
    # Everything acknowledged was routed or quarantined with a reason: nothing vanished.
    node.wait_spool_empty()
    log = node.log_text()
    node.wait_until(
        lambda: (
            node.log_text().count(" rule=all ") + node.log_text().count("quarantined:")
            >= acknowledged
        ),
        60,
        "every acknowledged instance accounted for",
    )
    log = node.log_text()
    routed, quarantined = log.count(" rule=all "), log.count("quarantined:")
    assert routed + quarantined == acknowledged, (routed, quarantined, acknowledged)
    for reason in (node.spool / "quarantine").glob("*.txt"):
        assert reason.read_text().strip()
    assert echo_ok(node.port)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs for the spool: it fills up after a few CT images."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs this test as root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (needs root): {result.stderr}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def worker_processes(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "node.workers import main"], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


def test_full_disk_answers_out_of_resources_and_loses_nothing(nodes, tmp_path, tiny_disk) -> None:
    root = tmp_path / "n"
    root.mkdir()
    from tests.conftest import default_config, free_port

    port = free_port()
    config = default_config(root, port, node_extra="min_free_space: 1MiB").replace(
        str(root / "spool"), str(tiny_disk / "spool")
    )
    node: RunningNode = nodes.start(config, root=root, port=port)
    node.wait_until(lambda: len(worker_processes(node.proc.pid)) == 2, 30, "workers")
    workers = worker_processes(node.proc.pid)
    for pid in workers:  # hold the workers so the spool cannot drain
        os.kill(pid, signal.SIGSTOP)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = guarded(ae.associate("127.0.0.1", port, ae_title="TEST-NODE"))
    acknowledged, refused = [], []
    for seed in range(40):  # 40 x 128 KiB > 4 MiB
        ds = images.make_ct(rows=256, cols=256, seed=seed)
        status = int(assoc.send_c_store(ds).Status)
        (acknowledged if status == 0 else refused).append((ds, status))
    assoc.release()
    assert acknowledged, "nothing fitted on the disk"
    assert refused and {s for _, s in refused} == {0xA700}
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    archived = node.wait_archived(len(acknowledged))
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archived}
    assert uids == {str(ds.SOPInstanceUID) for ds, _ in acknowledged}
    # The space is free again: what was refused can be sent now.
    files = []
    for i, (ds, _) in enumerate(refused[:3]):
        path = tmp_path / f"again{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    storescu(port, files)
    node.wait_archived(len(acknowledged) + len(files))
    assert "No space left on device" in node.log_text()


def test_a_data_set_over_the_size_limit_aborts_only_its_association(nodes, tmp_path) -> None:
    from tests.conftest import default_config, free_port

    root, port = tmp_path / "n", free_port()
    root.mkdir()
    config = default_config(root, port, node_extra="max_dataset_size: 100KB")
    node = nodes.start(config, root=root, port=port)
    big = images.make_ct(rows=256, cols=256, seed=61)  # 128 KiB of pixels
    small = images.make_ct(rows=64, cols=64, seed=62)
    paths = []
    for name, ds in (("big.dcm", big), ("small.dcm", small)):
        paths.append(tmp_path / name)
        ds.save_as(paths[-1], enforce_file_format=True)
    refused = storescu(port, [paths[0]], check=False)
    assert refused.returncode != 0
    node.wait_until(lambda: "larger than node.max_dataset_size" in node.log_text(), 20, "the log")
    storescu(port, [paths[1]])
    [out] = node.wait_archived(1)
    assert pydicom.dcmread(out).SOPInstanceUID == small.SOPInstanceUID
    assert node.proc.poll() is None
