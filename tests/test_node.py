"""The whole path with real peers: DCMTK's storescu and pynetdicom send to a node
process on loopback; the files on disk are checked, bit for bit where lossless."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE

from tests import images
from tests.conftest import dcmtk, guarded, storescu

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def write(ds: pydicom.Dataset, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_values(ds: pydicom.Dataset) -> np.ndarray:
    """The stored pixel values (bits above Bits Stored ignored, sign applied)."""
    arr = ds.pixel_array
    bits = int(ds.BitsStored)
    if arr.dtype.kind in "iu" and bits < arr.dtype.itemsize * 8:
        raw = arr.astype(np.int64) & ((1 << bits) - 1)
        if int(ds.PixelRepresentation) == 1:
            raw = np.where(raw >= 1 << (bits - 1), raw - (1 << bits), raw)
        return raw
    return arr.astype(np.int64)


def decode_with_dcmtk(path: Path, tmp: Path) -> pydicom.Dataset:
    """Decompress with DCMTK (an encoder-independent decoder), read the result."""
    out = tmp / f"{path.stem}.dcmtk.dcm"
    tool = {JPEG_LS_LOSSLESS: "dcmdjpls", RLE_LOSSLESS: "dcmdrle"}[
        str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    ]
    subprocess.run([dcmtk(tool), str(path), str(out)], check=True, capture_output=True)
    return pydicom.dcmread(out)


def by_uid(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}


def worker_processes(pid: int) -> list[int]:
    """The node's worker processes."""
    out = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "node.workers import main"], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


# ----------------------------------------------------------------------------- tests


def test_storescu_ct_arrives_jpeg_ls_bit_exact_with_its_uid(nodes, tmp_path) -> None:
    node = nodes.start()
    sources = [images.make_ct(rows=256, cols=256, seed=i) for i in range(3)]
    files = [write(ds, tmp_path / "send", f"ct{i}.dcm") for i, ds in enumerate(sources)]
    storescu(node.port, files)
    archived = by_uid(node.wait_archived(3))
    for source in sources:
        out = archived[str(source.SOPInstanceUID)]  # lossless keeps the identity
        assert out.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
        assert out.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
        assert out.file_meta.ImplementationClassUID == "1.2.826.0.1.3680043.10.1497.1"
        assert out["PixelData"].is_undefined_length
        assert out.PatientID == source.PatientID and out.Modality == "CT"
        np.testing.assert_array_equal(stored_values(out), stored_values(source))
        dcmtk_view = decode_with_dcmtk(Path(out.filename), tmp_path)
        np.testing.assert_array_equal(stored_values(dcmtk_view), stored_values(source))
    # The layout is PatientID/Study/Series/SOP.dcm below the archive.
    relative = Path(archived[str(sources[0].SOPInstanceUID)].filename).relative_to(node.archive)
    assert relative.parts == (
        sources[0].PatientID,
        sources[0].StudyInstanceUID,
        sources[0].SeriesInstanceUID,
        f"{sources[0].SOPInstanceUID}.dcm",
    )
    node.wait_spool_empty()


def test_pynetdicom_sender_gets_success_and_rules_route_by_calling_ae(nodes) -> None:
    node = nodes.start(
        rules="""
      - name: ct-from-ct-scanners
        match: {Modality: CT, calling_ae_title: "CT*"}
        compress: {transfer_syntax: jpeg-ls-lossless}
        send_to: [archive]
      - name: rest
        compress: {transfer_syntax: rle-lossless}
        send_to: [archive]
    """
    )
    ct_a, ct_b = images.make_ct(rows=64, cols=64, seed=1), images.make_ct(rows=64, cols=64, seed=2)
    for calling, ds in (("CT_SCANNER1", ct_a), ("WORKSTATION", ct_b)):
        ae = AE(ae_title=calling)
        ae.add_requested_context(ds.SOPClassUID, EXPLICIT_LE)
        assoc = guarded(ae.associate("127.0.0.1", node.port, ae_title="TEST-NODE"))
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000
    archived = by_uid(node.wait_archived(2))
    assert archived[str(ct_a.SOPInstanceUID)].file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
    assert archived[str(ct_b.SOPInstanceUID)].file_meta.TransferSyntaxUID == RLE_LOSSLESS
    for ds in (ct_a, ct_b):
        np.testing.assert_array_equal(
            stored_values(archived[str(ds.SOPInstanceUID)]), stored_values(ds)
        )


def test_hostile_patient_id_stays_inside_the_archive(nodes, tmp_path) -> None:
    node = nodes.start()
    ds = images.make_ct(rows=32, cols=32, seed=3)
    ds.PatientID = "../../../etc"
    storescu(node.port, [write(ds, tmp_path, "evil.dcm")])
    [out] = node.wait_archived(1)
    assert out.resolve().is_relative_to(node.archive.resolve())
    assert not (node.root / "etc").exists() and not (tmp_path / "etc").exists()
    assert ".." not in out.relative_to(node.archive).parts
    # A UID of ".." is not a UID: refused at the door (docs/conformance.md 3.5).
    ds.StudyInstanceUID = ".."
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    refused = storescu(node.port, [write(ds, tmp_path, "evil2.dcm")], check=False)
    assert refused.returncode != 0
    node.wait_until(
        lambda: "Study Instance UID is not digits and dots" in node.log_text(), 10, "the refusal"
    )
    assert len(node.archived()) == 1


def test_sr_without_pixels_passes_through_with_a_reason(nodes, tmp_path) -> None:
    node = nodes.start()
    sr = images.make_sr()
    storescu(node.port, [write(sr, tmp_path, "sr.dcm")], extra=["-R"])
    [out] = node.wait_archived(1)
    kept = pydicom.dcmread(out)
    assert kept.SOPInstanceUID == sr.SOPInstanceUID
    assert "PixelData" not in kept
    assert kept.ContentSequence[0].TextValue == sr.ContentSequence[0].TextValue
    node.wait_until(lambda: "not compressed" in node.log_text(), 10, "the reason in the log")


def test_unmatched_instance_is_kept_in_unrouted_with_a_warning(nodes, tmp_path) -> None:
    node = nodes.start(
        rules="""
      - name: only-ct
        match: {Modality: CT}
        send_to: [archive]
    """
    )
    mr = images.make_mr()
    storescu(node.port, [write(mr, tmp_path, "mr.dcm")])
    unrouted = node.spool / "unrouted"
    node.wait_until(lambda: any(unrouted.glob("*.dcm")), 30, "a file in unrouted/")
    [kept] = list(unrouted.glob("*.dcm"))
    assert pydicom.dcmread(kept).SOPInstanceUID == mr.SOPInstanceUID
    assert "no rule matched" in kept.with_suffix(".txt").read_text()
    # The worker moves the file; the node logs once the worker has reported back.
    node.wait_until(lambda: "kept in unrouted/" in node.log_text(), 10, "the log line")
    assert "WARNING" in node.log_text()
    assert node.archived() == []


def test_big_endian_input_comes_out_little_endian_with_equal_pixels(nodes, tmp_path) -> None:
    node = nodes.start()
    source_path = Path(get_testdata_file("MR_small_bigendian.dcm"))
    source = pydicom.dcmread(source_path)
    assert source.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    storescu(node.port, [source_path], extra=["-xb"])  # propose big endian: sent as is
    [out] = node.wait_archived(1)
    result = pydicom.dcmread(out)
    assert result.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
    assert result.SOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(stored_values(result), stored_values(source))
    np.testing.assert_array_equal(
        stored_values(decode_with_dcmtk(out, tmp_path)), stored_values(source)
    )


def test_same_instance_twice_is_one_file(nodes, tmp_path) -> None:
    node = nodes.start()
    path = write(images.make_ct(rows=32, cols=32, seed=4), tmp_path, "twice.dcm")
    storescu(node.port, [path])
    node.wait_archived(1)
    storescu(node.port, [path])
    node.wait_spool_empty()
    time.sleep(0.5)
    assert len(node.archived()) == 1


def test_killed_node_loses_nothing_it_acknowledged(nodes, tmp_path) -> None:
    """Freeze the workers, send, SIGKILL everything, restart: all arrive."""
    node = nodes.start()
    node.wait_until(lambda: len(worker_processes(node.proc.pid)) == 2, 30, "2 worker processes")
    workers = worker_processes(node.proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    sources = [images.make_ct(rows=64, cols=64, seed=10 + i) for i in range(10)]
    files = [write(ds, tmp_path / "send", f"k{i}.dcm") for i, ds in enumerate(sources)]
    storescu(node.port, files)  # every one answered Success
    node.proc.kill()
    node.proc.wait()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert node.archived() == []
    assert len(list((node.spool / "incoming").glob("*.dcm"))) == 10
    restarted = nodes.start(root=node.root, port=node.port)
    archived = by_uid(restarted.wait_archived(10))
    assert set(archived) == {str(ds.SOPInstanceUID) for ds in sources}
    restarted.wait_spool_empty()
    assert "recovered 10 instance(s)" in restarted.log_text()


def test_spool_write_failure_answers_out_of_resources(nodes, tmp_path) -> None:
    node = nodes.start()
    incoming = node.spool / "incoming"
    hidden = node.spool / "incoming-away"
    incoming.rename(hidden)  # the node can no longer write there
    ds = images.make_ct(rows=32, cols=32, seed=5)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, EXPLICIT_LE)
    assoc = guarded(ae.associate("127.0.0.1", node.port, ae_title="TEST-NODE"))
    status = assoc.send_c_store(ds)
    assert status.Status == 0xA700
    hidden.rename(incoming)
    assert assoc.send_c_store(ds).Status == 0x0000  # the sender's retry succeeds
    assoc.release()
    node.wait_archived(1)


def test_sigterm_exits_zero(nodes, tmp_path) -> None:
    node = nodes.start()
    storescu(node.port, [write(images.make_ct(rows=32, cols=32, seed=6), tmp_path, "t.dcm")])
    node.wait_archived(1)
    assert node.stop(signal.SIGTERM) == 0
    assert "stopped;" in node.log_text()


@pytest.mark.parametrize("syntax", ["jpeg-ls-lossless", "rle-lossless", "jpeg-2000-lossless"])
def test_rgb_and_multiframe_round_trip_losslessly(nodes, tmp_path, syntax) -> None:
    node = nodes.start(
        rules=f"""
      - name: all
        compress: {{transfer_syntax: {syntax}}}
        send_to: [archive]
    """
    )
    sources = [images.make_rgb(), images.make_multiframe(frames=5)]
    files = [write(ds, tmp_path, f"s{i}.dcm") for i, ds in enumerate(sources)]
    storescu(node.port, files, extra=["-R"])
    archived = by_uid(node.wait_archived(2))
    for ds in sources:
        out = archived[str(ds.SOPInstanceUID)]
        assert out.file_meta.TransferSyntaxUID != EXPLICIT_LE, "was not compressed"
        np.testing.assert_array_equal(stored_values(out), stored_values(ds))
        assert int(out.get("NumberOfFrames", 1)) == int(ds.get("NumberOfFrames", 1))


def test_rule_without_compress_stores_the_data_set_as_received(nodes, tmp_path) -> None:
    node = nodes.start(
        rules="""
      - name: as-received
        send_to: [archive]
    """
    )
    ds = images.make_ct(rows=64, cols=64, seed=71)
    ds.add_new(0x00091010, "LO", "private value kept")
    sent = write(ds, tmp_path, "raw.dcm")
    storescu(node.port, [sent], extra=["-R"])
    [out] = node.wait_archived(1)
    kept = pydicom.dcmread(out)
    assert kept.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert kept.file_meta.ImplementationClassUID == "1.2.826.0.1.3680043.10.1497.1"
    assert kept.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    original = pydicom.dcmread(sent)
    assert kept == original  # every attribute, private ones included, and the pixels
    node.wait_spool_empty()


def test_workers_only_take_cpu_the_receiving_side_leaves(nodes) -> None:
    node = nodes.start()
    node.wait_until(lambda: len(worker_processes(node.proc.pid)) == 2, 30, "2 workers")
    for pid in worker_processes(node.proc.pid):
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, pid) == 15  # lowest best-effort I/O too
    assert os.sched_getscheduler(node.proc.pid) == os.SCHED_OTHER


def test_a_worker_killed_mid_compression_is_replaced_and_nothing_is_lost(nodes, tmp_path) -> None:
    """A worker that dies (as from a codec crash) costs a retry, not an instance."""
    node = nodes.start(
        rules="""
      - name: slow
        compress: {transfer_syntax: jpeg-2000-lossless}
        send_to: [archive]
    """
    )
    node.wait_until(lambda: len(worker_processes(node.proc.pid)) == 2, 30, "2 workers")
    sources = [images.make_ct(rows=3072, cols=3072, seed=80 + i) for i in range(2)]
    files = [write(ds, tmp_path, f"big{i}.dcm") for i, ds in enumerate(sources)]
    storescu(node.port, files)
    time.sleep(0.5)  # both workers are inside OpenJPEG now (about 2 s per image here)
    victim = worker_processes(node.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    archived = by_uid(node.wait_archived(2, timeout=120))
    assert set(archived) == {str(ds.SOPInstanceUID) for ds in sources}
    assert "(killed by signal 9; 1 of 3); trying again" in node.log_text()
    assert not any((node.spool / "quarantine").glob("*.dcm"))
    assert len(worker_processes(node.proc.pid)) == 2  # the pool was rebuilt
    for ds in sources:
        np.testing.assert_array_equal(
            stored_values(archived[str(ds.SOPInstanceUID)]), stored_values(ds)
        )
