"""``dicom-node codecs``: what this machine can write, with which encoders, how fast.

Like ``openssl speed``: every installed encoder of every syntax the node writes codes
a built-in 512x512 CT for a fixed time; the table gives MB/s of input (one core),
the compression ratio, and whether the output decodes back (bit-exact, or the
largest error for lossy syntaxes) with a decoder other than the encoder's library.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from node.codecs import compress_dataset
from node.codecs.base import CompressResult, CompressSpec, SyntaxInfo
from node.codecs.plugins import available_encoders
from node.codecs.syntaxes import SYNTAXES

# Parameters for the lossy syntaxes, which a rule would have to set.
LOSSY_PARAMETERS: dict[str, dict[str, float | int]] = {
    "jpeg-ls-near-lossless": {"max_error": 2},
    "jpeg-2000": {"compression_ratio": 10},
    "htj2k": {"compression_ratio": 10},
    "jpeg-baseline": {"quality": 90},
}


@dataclass
class Measurement:
    syntax: SyntaxInfo
    encoder: str
    automatic: bool  # the encoder a rule without `plugin:` gets
    mb_per_s: float | None = None
    ratio: float | None = None
    check: str = ""


def bench_ct(rows: int = 512, cols: int = 512, bits8: bool = False) -> Dataset:
    """A synthetic axial CT: signed 16-bit, 12 bits stored, padding -2000 (-3024 HU).

    With `bits8`, the same image windowed to unsigned 8-bit, for 8-bit-only syntaxes.
    """
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    r = np.hypot((y - rows / 2) / rows, (x - cols / 2) / cols)
    hu = -1000.0 + 1040.0 * (r < 0.40) + 1100 * (np.abs(r - 0.36) < 0.015)
    hu += 60 * np.exp(
        -(((x - cols * 0.4) / (cols * 0.1)) ** 2 + ((y - rows / 2) / (rows * 0.12)) ** 2)
    )
    hu += 20 * np.sin(x / 7.0) * np.cos(y / 11.0) + rng.normal(0, 12, size=(rows, cols))
    stored = np.clip(np.rint(hu) + 1024, -2000, 2000)
    stored[r >= 0.48] = -2000
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if bits8:
        arr = np.clip((stored - 1024 + 160) * 255 / 400, 0, 255).astype(np.uint8)  # W400 L40
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
    else:
        arr = stored.astype("<i2")
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.PixelData = arr.tobytes()
    return ds


def _spec(info: SyntaxInfo, encoder: str | None, verify: bool) -> CompressSpec:
    plugin = None if encoder in (None, "zlib") else encoder
    return CompressSpec(
        transfer_syntax=info.uid,
        plugin=plugin,
        verify_lossless=verify,
        **LOSSY_PARAMETERS.get(info.name, {}),  # type: ignore[arg-type]
    )


def _written_size(result: CompressResult) -> int:
    buffer = BytesIO()
    result.dataset.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


def measure(info: SyntaxInfo, encoder: str, automatic: bool, seconds: float) -> Measurement:
    """Time `encoder` on the bench CT for about `seconds`, then check one output."""
    row = Measurement(info, encoder, automatic)
    ds = bench_ct(bits8=info.uid == JPEGBaseline8Bit)
    size = len(ds.PixelData)
    result = compress_dataset(ds, _spec(info, encoder, verify=True))
    if not result.compressed:
        row.check = f"not written: {result.reason}"
        return row
    deflated = info.uid == DeflatedExplicitVRLittleEndian
    row.ratio = result.ratio
    if deflated:  # the whole data set is deflated when it is written
        plain = compress_dataset(ds, CompressSpec(ExplicitVRLittleEndian))
        row.ratio = _written_size(plain) / _written_size(result)
    row.check = _check_text(result)
    runs, started = 0, time.perf_counter()
    spec = _spec(info, encoder, verify=False)
    while runs < 2 or time.perf_counter() - started < seconds:
        out = compress_dataset(ds, spec)
        if deflated:
            _written_size(out)
        runs += 1
    row.mb_per_s = size * runs / (time.perf_counter() - started) / 1e6
    return row


def _check_text(result: CompressResult) -> str:
    verified = [n for n in result.notes if n.startswith("verified with")]
    errors = [n for n in result.notes if "max abs error" in n]
    if result.transfer_syntax == DeflatedExplicitVRLittleEndian:
        return "lossless (zlib)"
    if verified:
        text = verified[-1].removeprefix("verified with ")
        return "bit-exact, " + text.split(":")[0] if text.endswith("error 0") else text
    if result.lossy and errors:
        return errors[-1]
    return "; ".join(result.notes) or "not verified"


def run(seconds: float = 0.5) -> list[Measurement]:
    """Measure every installed encoder of every syntax the node writes."""
    rows = []
    for info in SYNTAXES:
        if info.uid == ExplicitVRLittleEndian:
            continue
        encoders = available_encoders(info.uid)
        if info.uid == DeflatedExplicitVRLittleEndian:
            encoders = ["zlib"]
        if not encoders:
            rows.append(Measurement(info, "-", False, check="no encoder installed"))
        chosen = _automatic_choice(info)
        for name in encoders:
            rows.append(measure(info, name, automatic=name == chosen, seconds=seconds))
    return rows


def _automatic_choice(info: SyntaxInfo) -> str | None:
    # What a rule without `plugin:` gets for this image: the fastest installed
    # encoder that accepts it (libjpeg-turbo's JPEG baseline declines 12-bit data, say).
    ds = bench_ct(bits8=info.uid == JPEGBaseline8Bit)
    return compress_dataset(ds, _spec(info, None, verify=False)).encoder or "zlib"


def format_table(rows: list[Measurement]) -> str:
    head = ("syntax", "UID", "encoder", "MB/s", "ratio", "output check")
    lines = [head]
    for row in rows:
        lines.append(
            (
                row.syntax.name,
                str(row.syntax.uid),
                row.encoder + (" *" if row.automatic else ""),
                f"{row.mb_per_s:.0f}" if row.mb_per_s is not None else "-",
                f"{row.ratio:.2f}" if row.ratio is not None else "-",
                row.check,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in lines
    ]
    return "\n".join(
        [
            *text,
            "",
            "* chosen when a rule names no plugin (the fastest installed that codes the image).",
            "Input: built-in 512x512 CT, signed 12-bit in 16 (jpeg-baseline: the same CT windowed",
            "to 8 bits). MB/s of uncompressed pixel data on one core, including the node's own",
            f"work (decode, checks, attributes). Lossy parameters: {LOSSY_PARAMETERS}.",
        ]
    )
