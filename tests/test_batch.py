"""``dicom-node compress`` on real trees, run as a real process.

The trees hold several modalities, a multi-frame and an RGB image, files already
compressed (JPEG-LS and RLE), a non-DICOM file, a structured report (no pixels), a
truncated file, a read-only file, a symbolic link out of the tree and a DICOMDIR
(written by pydicom's FileSet). Lossless output is decoded by DCMTK (dcmdjpls) or
GDCM (gdcmconv), not by the encoder's library, and compared with the original
pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from tests import images
from tests.conftest import ROOT, dcmtk

TEMP_SUFFIX = ".dicom-node-compress.partial"
GDCMCONV = "/usr/bin/gdcmconv"


@dataclass
class Tree:
    root: Path
    pixels: dict[str, np.ndarray]  # relative path -> original pixel values
    syntaxes: dict[str, str]  # relative path -> original transfer syntax
    digests: dict[str, str]  # relative path -> sha256 of the original bytes
    sizes: dict[str, int]  # relative path -> original size
    outside: Path  # a file outside the tree that a symlink in it points to
    outside_digest: str


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_tree(base: Path, ct_count: int = 4) -> Tree:
    root = base / "archive"
    made: dict[str, Dataset] = {}
    for i in range(ct_count):
        made[f"ct/ct{i:03d}.dcm"] = images.make_ct(rows=128, cols=128, seed=i)
    made["mr/mr1.dcm"] = images.make_mr(seed=1)
    made["mr/mr2.dcm"] = images.make_mr(seed=2)
    made["sc/rgb.dcm"] = images.make_rgb(seed=3)
    made["sc/multiframe.dcm"] = images.make_multiframe(seed=4)
    made["sc/readonly.dcm"] = images.make_mr(seed=6)
    rle = images.make_mr(seed=7)
    rle.compress(RLELossless, encoding_plugin="pydicom")
    made["compressed/rle.dcm"] = rle
    jls = images.make_mr(seed=8)
    jls.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
    made["compressed/jls.dcm"] = jls
    made["sr/report.dcm"] = images.make_sr()
    pixels, syntaxes = {}, {}
    for rel, ds in made.items():
        _save(ds, root / rel)
        read = pydicom.dcmread(root / rel)
        syntaxes[rel] = str(read.file_meta.TransferSyntaxUID)
        if "PixelData" in read:
            pixels[rel] = read.pixel_array.copy()
    os.chmod(root / "sc/readonly.dcm", 0o444)
    os.chmod(root / "mr/mr2.dcm", 0o600)
    (root / "notes.txt").write_text("not a DICOM file\n")
    whole = (root / "ct/ct000.dcm").read_bytes()
    (root / "ct/truncated.dcm").write_bytes(whole[: len(whole) // 2])
    outside = base / "outside.dcm"
    _save(images.make_mr(seed=9), outside)
    (root / "link.dcm").symlink_to(outside)
    os.mkfifo(root / "fifo.dcm")  # never opened: reading it would block
    # A DICOMDIR with its own PTxxxxxx/STxxxxxx/... folders, as on a CD.
    fs = FileSet()
    for seed in (10, 11):
        ds = images.make_ct(rows=64, cols=64, seed=seed)
        fs.add(ds)
    fs.write(root / "media")
    for instance in FileSet(pydicom.dcmread(root / "media/DICOMDIR")):
        rel = Path(instance.path).relative_to(root).as_posix()
        read = pydicom.dcmread(instance.path)
        pixels[rel], syntaxes[rel] = read.pixel_array.copy(), str(read.file_meta.TransferSyntaxUID)
    digests = {
        p.relative_to(root).as_posix(): _digest(p)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    sizes = {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    return Tree(root, pixels, syntaxes, digests, sizes, outside, _digest(outside))


def compress(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "compress", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def decoded_by(tool: str, path: Path, tmp: Path) -> np.ndarray:
    """Pixel values of ``path`` as decoded by DCMTK or GDCM into a native file."""
    out = tmp / f"decoded-{path.name}-{tool}.dcm"
    if tool == "dcmdjpls":
        cmd = [dcmtk("dcmdjpls"), str(path), str(out)]
    else:
        # Debian's GDCM tools (a pip package may put another gdcmconv first on PATH).
        cmd = [GDCMCONV if Path(GDCMCONV).exists() else "gdcmconv", "--raw", str(path), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID.is_little_endian
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    return ds.pixel_array


def no_temp_files(root: Path) -> list[Path]:
    return list(root.rglob(f"*{TEMP_SUFFIX}"))


# --------------------------------------------------------------------------- in place


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_in_place_compresses_the_tree_bit_exact(tmp_path: Path, verify: bool) -> None:
    tree = build_tree(tmp_path)
    root = tree.root
    mode_before = os.stat(root / "mr/mr2.dcm").st_mode
    report = tmp_path / "report.json"
    args = ["--in-place", "--transfer-syntax", "jpeg-ls-lossless", "--workers", "2"]
    args += ["--journal", tmp_path / "j.sqlite", "--report", report]
    done = compress(root, *args, *(["--verify"] if verify else []), cwd=tmp_path)
    # The truncated file is a failure, listed; everything else goes on.
    assert done.returncode == 1, done.stderr
    assert "truncated.dcm: truncated" in done.stdout
    data = json.loads(report.read_text())
    assert [Path(f["path"]).name for f in data["failures"]] == ["truncated.dcm"]

    for rel, original in tree.pixels.items():
        path = root / rel
        ds = pydicom.dcmread(path)
        if rel == "sc/readonly.dcm":
            assert _digest(path) == tree.digests[rel], "a read-only file is left as it is"
            continue
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless, rel
        if rel == "compressed/jls.dcm":
            assert _digest(path) == tree.digests[rel], "already JPEG-LS: untouched"
            continue
        # Bit-exact, decoded by DCMTK's own JPEG-LS decoder, same UID.
        assert np.array_equal(decoded_by("dcmdjpls", path, tmp_path), original), rel
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert os.path.getsize(path) < tree.sizes[rel], rel
    for rel in ("notes.txt", "sr/report.dcm", "ct/truncated.dcm"):
        assert _digest(root / rel) == tree.digests[rel], rel
    assert os.stat(root / "mr/mr2.dcm").st_mode == mode_before  # mode kept (0600)
    assert (root / "link.dcm").is_symlink()
    assert _digest(tree.outside) == tree.outside_digest, "a link out of the tree is not followed"
    assert no_temp_files(root) == []
    # The DICOMDIR's records name the files' new syntax, and pydicom reads it whole.
    fs = FileSet(pydicom.dcmread(root / "media/DICOMDIR"))
    assert len(fs) == 2
    for instance in fs:
        assert instance.ReferencedTransferSyntaxUIDInFile == JPEGLSLossless
        assert pydicom.dcmread(instance.path).file_meta.TransferSyntaxUID == JPEGLSLossless
    reasons = {r["reason"] for r in data["left_as_they_were"]}
    assert "not a DICOM file (no DICM prefix)" in reasons
    assert "already in target syntax" in reasons
    assert any("read-only" in r for r in reasons)
    assert any("symbolic link" in r for r in reasons)
    assert "not a regular file" in reasons
    ct = next(g for g in data["groups"] if g["modality"] == "CT")
    assert ct["done"] == 6 and ct["failed"] == 1 and ct["ratio"] > 1.5


# --------------------------------------------------------------------------- --output


def test_output_tree_leaves_the_source_untouched_and_a_rerun_skips_what_is_done(
    tmp_path: Path,
) -> None:
    tree = build_tree(tmp_path)
    out = tmp_path / "out"
    journal = tmp_path / "j.sqlite"
    args = [tree.root, "--output", out, "--transfer-syntax", "jpeg-ls-lossless"]
    args += ["--journal", journal, "--exclude", "ct/truncated.dcm", "--workers", "2"]
    first = compress(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    now = {
        p.relative_to(tree.root).as_posix(): _digest(p)
        for p in tree.root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    assert now == tree.digests, "the source tree is untouched"
    for rel, original in tree.pixels.items():
        ds = pydicom.dcmread(out / rel)
        if rel == "sc/readonly.dcm":
            continue  # only read-only *in place* is left alone
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless, rel
        # GDCM decodes (CharLS inside GDCM, not the encoder's build).
        assert np.array_equal(decoded_by("gdcmconv", out / rel, tmp_path), original), rel
    assert (out / "notes.txt").read_text() == "not a DICOM file\n"  # copied as it is
    assert not (out / "ct/truncated.dcm").exists()  # excluded
    assert not (out / "link.dcm").exists()
    fs = FileSet(pydicom.dcmread(out / "media/DICOMDIR"))
    assert {i.ReferencedTransferSyntaxUIDInFile for i in fs} == {JPEGLSLossless}
    source_fs = FileSet(pydicom.dcmread(tree.root / "media/DICOMDIR"))
    assert {i.ReferencedTransferSyntaxUIDInFile for i in source_fs} == {ExplicitVRLittleEndian}

    # The same command again: everything is settled in the journal, nothing redone...
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    stale = out / "mr" / f".mr1.dcm.4242{TEMP_SUFFIX}"  # as a killed run leaves it
    stale.write_bytes(b"partial")
    second = compress(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "settled by an earlier run" in second.stdout
    assert not stale.exists() and "removed 1 temp file(s)" in second.stdout
    assert {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "DICOMDIR"
    } == {p: m for p, m in mtimes.items() if p.name != "DICOMDIR"}
    # ...except a file changed since.
    _save(images.make_mr(seed=42), tree.root / "mr/mr1.dcm")
    third = compress(*args, "--report", tmp_path / "r.json", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["files_this_run"] == 1
    redone = pydicom.dcmread(out / "mr/mr1.dcm")
    assert redone.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert redone.PatientID == "MR0042"


def test_lossy_is_marked_as_the_daemon_marks_it_and_layout_places_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _save(images.make_mr(seed=3), src / "mr.dcm")
    (src / "notes.txt").write_text("not DICOM")
    original = pydicom.dcmread(src / "mr.dcm")
    out = tmp_path / "out"
    done = compress(
        src,
        "--output",
        out,
        "--layout",
        "{Modality}/{SOPInstanceUID}.dcm",
        "--transfer-syntax",
        "jpeg-ls-near-lossless",
        "--max-error",
        "2",
        "--verify",
        "--journal",
        tmp_path / "j.sqlite",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    [written] = out.rglob("*.dcm")
    ds = pydicom.dcmread(written)
    assert written == out / "MR" / f"{ds.SOPInstanceUID}.dcm"  # named by its new UID
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.81"
    assert ds.LossyImageCompression == "01"
    assert ds.SOPInstanceUID != original.SOPInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    diff = np.abs(ds.pixel_array.astype(int) - original.pixel_array.astype(int))
    assert 0 < diff.max() <= 2
    assert "not copied: --layout places DICOM files only" in done.stdout
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [written.name]
    # A tree with a DICOMDIR cannot be laid out anew: its records name the paths.
    fs = FileSet()
    fs.add(images.make_mr(seed=5))
    fs.write(src / "media")
    refused = compress(
        src, "--output", tmp_path / "out2", "--layout", "{SOPInstanceUID}.dcm",
        "--transfer-syntax", "jpeg-ls-lossless", "--journal", tmp_path / "j2.sqlite", cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2 and "a DICOMDIR names its files by path" in refused.stderr
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------- dry run


def test_dry_run_writes_nothing_and_projects_the_saving(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    (tree.root / f".x.dcm.999999{TEMP_SUFFIX}").write_bytes(b"stale")  # not even removed

    def snapshot() -> dict[str, tuple[str, int]]:
        return {
            str(p): (_digest(p), p.stat().st_mtime_ns)
            for p in tmp_path.rglob("*")
            if p.is_file() and not p.is_symlink()
        }

    before = snapshot()
    done = compress(
        tree.root, "--dry-run", "--sample", "6", "--transfer-syntax", "jpeg-ls-lossless", cwd=work
    )
    assert done.returncode == 0, done.stderr
    assert snapshot() == before
    assert list(work.iterdir()) == []  # no journal either
    assert "a sample of 6 files" in done.stdout
    assert "projected saving" in done.stdout and "projected time" in done.stdout


# --------------------------------------------------------------------------- crashes


def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    src = tmp_path / "archive"
    originals: dict[Path, np.ndarray] = {}
    for i in range(48):
        path = src / f"s{i // 12}" / f"ct{i:03d}.dcm"
        _save(images.make_ct(rows=256, cols=256, seed=i), path)
        originals[path] = pydicom.dcmread(path).pixel_array.copy()
    journal = tmp_path / "j.sqlite"
    args = [src, "--in-place", "--transfer-syntax", "jpeg-ls-lossless", "--verify"]
    args += ["--workers", "2", "--journal", journal]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "compress", *map(str, args)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        # Killed while a new file is being written beside its original, if we catch one.
        while _done_rows(journal) < 8 or (
            not no_temp_files(src) and time.monotonic() < deadline - 50
        ):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    time.sleep(0.2)  # the workers die with the main process (PDEATHSIG)

    # Every file is either the untouched original or the complete new one.
    syntaxes = set()
    for path, original in originals.items():
        ds = pydicom.dcmread(path)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, JPEGLSLossless)
        assert np.array_equal(ds.pixel_array, original), path
    assert syntaxes == {ExplicitVRLittleEndian, JPEGLSLossless}, "killed mid-run"
    done_before = _done_files(journal)
    stamps = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in done_before}

    stale = no_temp_files(src)
    resumed = compress(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert no_temp_files(src) == []
    if stale:  # the next run removes what the killed one left
        assert f"removed {len(stale)} temp file(s) left by an interrupted run" in resumed.stdout
    print(f"temp files left by the kill: {len(stale)}")
    for path, original in originals.items():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert np.array_equal(ds.pixel_array, original), path
    # What was done before the kill was not done again.
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in done_before} == stamps
    assert f"{len(done_before)} settled by an earlier run" in resumed.stdout
    # A file renamed into place just before the kill, but not yet journaled, is read
    # again: it is then already JPEG-LS and kept as it is (not compressed twice).
    with sqlite3.connect(journal) as db:
        rows = dict(db.execute("SELECT path, status || ': ' || reason FROM files").fetchall())
    assert len(rows) == len(originals)
    assert set(rows.values()) <= {"done: ", "kept: already in target syntax"}, rows


def _done_rows(journal: Path) -> int:
    return len(_done_files(journal))


def _done_files(journal: Path) -> list[Path]:
    if not journal.exists():
        return []
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
            rows = db.execute("SELECT path FROM files WHERE status = 'done'").fetchall()
    except sqlite3.OperationalError:
        return []  # being created
    return [Path(r[0]) for r in rows]


def test_a_worker_killed_mid_run_fails_its_files_only(tmp_path: Path) -> None:
    """A worker that dies (as a crashing codec would) costs the files it held, nothing more."""
    src = tmp_path / "archive"
    for i in range(40):
        _save(images.make_ct(rows=256, cols=256, seed=i), src / f"ct{i:03d}.dcm")
    digests = {p: _digest(p) for p in src.iterdir()}
    journal = tmp_path / "j.sqlite"
    args = [src, "--in-place", "--transfer-syntax", "jpeg-ls-lossless", "--workers", "2"]
    args += ["--journal", journal]
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "compress", *map(str, args)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while _done_rows(journal) < 4:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert "the worker process died (exit code -9)" in out
    for path, digest in digests.items():
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
            assert _digest(path) == digest
    assert no_temp_files(src) == []
    again = compress(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in digests} == {JPEGLSLossless}


def test_ctrl_c_finishes_the_files_in_hand_and_stops(tmp_path: Path) -> None:
    src = tmp_path / "archive"
    for i in range(40):
        _save(images.make_ct(rows=256, cols=256, seed=i), src / f"ct{i:03d}.dcm")
    journal = tmp_path / "j.sqlite"
    args = [src, "--in-place", "--transfer-syntax", "jpeg-ls-lossless", "--workers", "2"]
    args += ["--journal", journal]
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "compress", *map(str, args)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while _done_rows(journal) < 4:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "stopped early: SIGINT received" in err and "Run the same command again" in err
    assert no_temp_files(src) == []
    done = set(_done_files(journal))
    assert 4 <= len(done) < 40
    for path in src.iterdir():  # journaled done, or not touched at all
        syntax = pydicom.dcmread(path).file_meta.TransferSyntaxUID
        assert syntax == (JPEGLSLossless if path in done else ExplicitVRLittleEndian), path
    again = compress(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_done_files(journal)) == 40


NOBODY = 65534
# Root without the capabilities that bypass file permissions and ownership.
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-chown,-fowner", "--"]


def test_permission_denied_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    """A file the run cannot read, a folder it cannot list, a file whose owner it could
    not keep: each is a failure with its reason, and the rest is compressed. (The run is
    root without CAP_DAC_OVERRIDE and friends, so another user's files are closed to it.)"""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to make files the run cannot read")
    src = tmp_path / "archive"
    _save(images.make_mr(seed=1), src / "mine.dcm")
    _save(images.make_mr(seed=2), src / "secret.dcm")
    _save(images.make_mr(seed=3), src / "someone-elses.dcm")
    _save(images.make_mr(seed=4), src / "locked" / "hidden.dcm")
    for name, mode in (("secret.dcm", 0o600), ("someone-elses.dcm", 0o666), ("locked", 0o700)):
        os.chown(src / name, NOBODY, NOBODY)
        (src / name).chmod(mode)
    digests = {p: _digest(p) for p in src.rglob("*.dcm")}
    done = subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-m", "node.cli", "compress", str(src), "--in-place"]
        + ["--transfer-syntax", "jpeg-ls-lossless", "--journal", str(tmp_path / "j.sqlite")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "secret.dcm: cannot read: Permission denied" in done.stdout
    assert "locked: cannot list folder: Permission denied" in done.stdout
    assert "someone-elses.dcm: cannot write (Operation not permitted); original kept" in done.stdout
    assert pydicom.dcmread(src / "mine.dcm").file_meta.TransferSyntaxUID == JPEGLSLossless
    for name in ("secret.dcm", "someone-elses.dcm", "locked/hidden.dcm"):
        assert _digest(src / name) == digests[src / name], name
    assert os.stat(src / "someone-elses.dcm").st_uid == NOBODY
    assert no_temp_files(src) == []


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a full file system for the archive."""
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


def test_full_disk_stops_cleanly_and_the_next_run_finishes(tmp_path: Path, tiny_fs: Path) -> None:
    src = tiny_fs / "archive"
    originals = {}
    for i in range(8):
        path = src / f"ct{i}.dcm"
        _save(images.make_ct(rows=256, cols=256, seed=i), path)
        originals[path] = _digest(path)
    filler = tiny_fs / "filler"
    with open(filler, "wb") as f:  # leave about 8 KB: less than one compressed CT
        free = os.statvfs(tiny_fs).f_bavail * os.statvfs(tiny_fs).f_frsize
        f.write(b"\0" * (free - 8192))
    args = [src, "--in-place", "--transfer-syntax", "jpeg-ls-lossless", "--workers", "1"]
    args += ["--journal", tmp_path / "j.sqlite"]
    full = compress(*args, cwd=tmp_path)
    assert full.returncode == 1
    assert "stopped early: the disk is full" in full.stderr
    assert "disk full" in full.stdout
    assert no_temp_files(src) == []
    for path, digest in originals.items():
        assert _digest(path) == digest, "the originals are untouched"
    filler.unlink()
    again = compress(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    for path in originals:
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGLSLossless


# --------------------------------------------------------------------------- config, arguments


def test_rules_from_a_config_with_a_network_only_rule(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _save(images.make_ct(rows=64, cols=64, seed=1), src / "ct.dcm")
    _save(images.make_mr(seed=1), src / "mr.dcm")
    config = tmp_path / "node.yaml"
    config.write_text(
        """
destinations:
  archive: {type: folder, path: archive}
rules:
  - name: from-the-ct
    match: {calling_ae_title: "*"}
    compress: {transfer_syntax: htj2k-lossless}
    send_to: [archive]
  - name: ct
    match: {Modality: CT}
    compress: {transfer_syntax: jpeg-ls-lossless}
    send_to: [archive]
  - name: rest
    send_to: [archive]
"""
    )
    done = compress(
        src, "--in-place", "--config", config, "--journal", tmp_path / "j.sqlite", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "rule 'from-the-ct'" in done.stderr and "never matches in batch mode" in done.stderr
    assert pydicom.dcmread(src / "ct.dcm").file_meta.TransferSyntaxUID == JPEGLSLossless
    assert pydicom.dcmread(src / "mr.dcm").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "rule 'rest' does not compress" in done.stdout
    assert not (tmp_path / "archive").exists()  # send_to is ignored
    check = subprocess.run(
        [sys.executable, "-m", "node.cli", "check-config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    line = next(x for x in check.stdout.splitlines() if "from-the-ct" in x)
    assert "never matches in `dicom-node compress`" in line


def test_runs_that_cannot_start_exit_2(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _save(images.make_mr(seed=1), src / "mr.dcm")
    missing = compress(
        tmp_path / "nope", "--in-place", "--transfer-syntax", "jpeg-ls-lossless", cwd=tmp_path
    )
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    bad = compress(src, "--in-place", "--transfer-syntax", "jpeg-xx", cwd=tmp_path)
    assert bad.returncode == 2 and "--transfer-syntax" in bad.stderr
    journal = tmp_path / "j.sqlite"
    first = compress(
        src,
        "--in-place",
        "--transfer-syntax",
        "rle-lossless",
        "--journal",
        journal,
        "--min-age",
        "1h",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr
    assert "modified less than 3600 s ago" in first.stdout  # --min-age: left for later
    assert pydicom.dcmread(src / "mr.dcm").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    other = compress(
        src,
        "--in-place",
        "--transfer-syntax",
        "jpeg-ls-lossless",
        "--journal",
        journal,
        cwd=tmp_path,
    )
    assert other.returncode == 2 and "other paths, output or rules" in other.stderr
    journal.write_bytes(b"this is not a database" * 100)
    broken = compress(
        src, "--in-place", "--transfer-syntax", "rle-lossless", "--journal", journal, cwd=tmp_path
    )
    assert broken.returncode == 2 and "cannot use the journal" in broken.stderr
