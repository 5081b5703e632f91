"""Peak memory of the node (all its processes) while it takes one very large instance.

Builds a multi-frame 16-bit image of about ``--megabytes`` (smooth anatomy plus noise,
cached in benchmarks/.data), sends it with DCMTK storescu to a node that compresses it,
samples the RSS of the node's process tree every 0.1 s until the result is archived,
and compares the peak with the budget of issue 6: 4x the instance plus 300 MB.

    python3 benchmarks/memory.py                       # 1 GiB, JPEG-LS lossless
    python3 benchmarks/memory.py --megabytes 256 --syntax htj2k-lossless
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import DATA_DIR  # noqa: E402
from procstat import rss_bytes, tree  # noqa: E402
from receivers import DCMTK, NodeReceiver, count_files  # noqa: E402

MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
ROWS, COLS = 1024, 1024


def big_instance(megabytes: int) -> Path:
    """A cached multi-frame instance of ``megabytes`` MiB of 12-bit pixels."""
    frames = max(1, megabytes * 2**20 // (ROWS * COLS * 2))
    path = DATA_DIR / f"big-{frames}x{ROWS}x{COLS}.dcm"
    if path.exists():
        return path
    rng = np.random.default_rng(frames)
    y, x = np.mgrid[0:ROWS, 0:COLS]
    body = 1500 * np.exp(-(((x - COLS / 2) / 380) ** 2 + ((y - ROWS / 2) / 300) ** 2))
    pixels = np.empty((frames, ROWS, COLS), dtype=np.uint16)
    for i in range(frames):
        slab = body * (0.8 + 0.2 * np.cos(i / 17)) + rng.normal(0, 12, (ROWS, COLS))
        pixels[i] = np.clip(slab + 200, 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MULTIFRAME_WORD_SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BIG-1", "Memory^Test", "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLS, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    del pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    ds.save_as(partial, enforce_file_format=True)
    partial.rename(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=1024, help="size of the instance")
    parser.add_argument("--syntax", default="jpeg-ls-lossless", help="rule's transfer syntax")
    args = parser.parse_args()
    path = big_instance(args.megabytes)
    size = path.stat().st_size
    frames = pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames
    with tempfile.TemporaryDirectory(prefix="dicom-node-memory-") as tmp:
        node = NodeReceiver(Path(tmp), args.syntax)
        node.start()
        try:
            idle = sum(rss_bytes(p) for p in tree(node.pid))
            peak, stop = [idle], threading.Event()

            def sample() -> None:
                while not stop.wait(0.1):
                    peak[0] = max(peak[0], sum(rss_bytes(p) for p in tree(node.pid)))

            threading.Thread(target=sample, daemon=True).start()
            started = time.monotonic()
            env = {**os.environ, "TCP_NODELAY": "1"}
            command = [str(DCMTK / "storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port)]
            subprocess.run([*command, str(path)], env=env, check=True, capture_output=True)
            acknowledged = time.monotonic() - started
            while count_files(node.archive) < 1:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"node died:\n{node.log_tail()}")
                time.sleep(0.2)
            archived = time.monotonic() - started
            stop.set()
            out = next(p for p in node.archive.rglob("*.dcm"))
            out_syntax = pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID
        finally:
            node.stop()
    budget = 4 * size + 300 * 2**20
    mb = 2**20
    print(f"instance: {frames} frames of {ROWS}x{COLS} 16-bit, {size / mb:.0f} MB -> {args.syntax}")
    print(f"acknowledged after {acknowledged:.1f} s, archived ({out_syntax.name}) after "
          f"{archived:.1f} s")  # fmt: skip
    print(f"node RSS (all processes): idle {idle / mb:.0f} MB, peak {peak[0] / mb:.0f} MB; "
          f"budget 4 x instance + 300 MB = {budget / mb:.0f} MB: "
          f"{'met' if peak[0] <= budget else 'MISSED'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
