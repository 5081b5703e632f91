"""Reading stored pixel values out of a dataset in any transfer syntax.

"Stored values" are what every conformant decoder must reproduce: the low Bits Stored
bits of each sample, read as two's complement when Pixel Representation is 1. Bits
above Bits Stored are not pixel data (PS3.5 8.1.1), so they are cleared or
sign-extended here, and the encoders see clean values in the Bits Allocated container.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pack_bits
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.codecs.base import reraise_unless_codec_failure

# Decoders hand back sub-sampled colour (YBR_FULL_422) already up-sampled to full
# resolution, so what gets re-encoded is full YBR.
_FULL_RESOLUTION_PI: dict[str, str] = {"YBR_FULL_422": "YBR_FULL"}


class PixelFormatError(Exception):
    """The pixel data cannot be compressed; the message says why, in one line."""


@dataclass(frozen=True)
class Pixels:
    """Decoded stored values and the Image Pixel description that goes with them."""

    array: np.ndarray  # (frames,) rows, columns(, samples); samples interleaved
    photometric_interpretation: str
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    signed: bool


def container_dtype(bits_allocated: int, signed: bool) -> np.dtype:
    """The numpy type of one sample in a Bits Allocated container."""
    return np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")


def stored_values(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """The low `bits_stored` bits of each sample, sign-extended if `signed`.

    Works in the array's own width: unsigned arithmetic wraps, so
    ``(v ^ sign) - sign`` is the two's complement sign extension.
    """
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    width = arr.dtype.itemsize
    if _already_stored_values(arr, bits_stored, signed):
        # Most images: no stray bits above Bits Stored, so no copy of the pixels.
        same: np.ndarray = arr.view(f"{'i' if signed else 'u'}{width}")
        return same
    unsigned = arr.view(f"u{width}")
    utype = unsigned.dtype.type
    mask = utype((1 << bits_stored) - 1)
    values: np.ndarray = unsigned & mask
    if signed:
        sign = utype(1 << (bits_stored - 1))
        values = (values ^ sign) - sign
        extended: np.ndarray = values.view(f"i{width}")
        return extended
    return values


def _already_stored_values(arr: np.ndarray, bits_stored: int, signed: bool) -> bool:
    """True if every sample already is its stored value (bits above Bits Stored clean)."""
    width = arr.dtype.itemsize
    if bits_stored >= width * 8 or arr.size == 0:
        return True
    if signed:
        view = arr.view(f"i{width}")
        # In range means the bits above Bits Stored all repeat its sign bit.
        return bool(view.min() >= -(1 << (bits_stored - 1)) and view.max() < 1 << (bits_stored - 1))
    return bool(arr.view(f"u{width}").max() < 1 << bits_stored)


def decode_stored(ds: Dataset, syntax: UID) -> Pixels:
    """Decode the pixel data of `ds` (little endian, any syntax) to stored values.

    Raises PixelFormatError for pixel data this node will not re-encode.
    """
    check_encodable(ds)
    bits_allocated = int(ds.BitsAllocated)
    bits_stored = int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    plain = _plain_native_array(ds, syntax)
    meta: dict[str, Any]
    if plain is not None:
        arr, meta = plain, {}
    else:
        try:
            arr, meta = get_decoder(syntax).as_array(ds, raw=True)
        except BaseException as exc:
            reraise_unless_codec_failure(exc)
            message = f"cannot decode the {syntax.name} pixel data: {one_line(exc)}"
            raise PixelFormatError(message) from exc

    if arr.dtype.kind not in "iu":
        raise PixelFormatError(f"decoded pixel data has type {arr.dtype}, not integers")
    values = stored_values(arr, bits_stored, signed)
    # Junk above Bits Stored is only expected in native data. A compressed stream
    # whose values do not fit Bits Stored disagrees with its own header, and masking
    # would change the image, so leave such an instance alone.
    if syntax.is_compressed and not np.array_equal(values, arr):
        raise PixelFormatError(
            f"decoded values do not fit Bits Stored {bits_stored}; header and codestream disagree"
        )
    pi = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
    return Pixels(
        array=values.astype(container_dtype(bits_allocated, signed), copy=False),
        photometric_interpretation=_FULL_RESOLUTION_PI.get(pi, pi),
        samples_per_pixel=int(meta.get("samples_per_pixel", ds.get("SamplesPerPixel", 1))),
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=signed,
    )


_NATIVE_LITTLE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


def _plain_native_array(ds: Dataset, syntax: UID) -> np.ndarray | None:
    """Native pixel data in the common layouts as an array view, or None.

    The same array pydicom's decoder returns with ``raw=True``, without its
    per-call setup (docs/decisions.md#d13).
    Planar colour, sub-sampled YBR and odd containers go through pydicom.
    """
    if syntax not in _NATIVE_LITTLE:
        return None
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", ""))
    if spp == 3:
        if int(ds.get("PlanarConfiguration", 0) or 0) != 0 or pi not in ("RGB", "YBR_FULL"):
            return None
    elif spp != 1:
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return None
    rows, cols, bits_allocated = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    if bits_allocated not in (8, 16, 32):
        return None
    dtype = container_dtype(bits_allocated, int(ds.PixelRepresentation) == 1)
    count = frames * rows * cols * spp
    data = ds.PixelData
    if frames < 1 or not isinstance(data, bytes) or len(data) < count * dtype.itemsize:
        return None  # short or odd data: pydicom's decoder says what is wrong
    arr = np.frombuffer(data, dtype=dtype.newbyteorder("<"), count=count)
    shape = (rows, cols) if spp == 1 else (rows, cols, spp)
    return arr.reshape((frames, *shape) if frames > 1 else shape)


def check_encodable(ds: Dataset) -> None:
    """Raise PixelFormatError unless `ds` has integer pixel data a codec can take."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelFormatError("float pixel data: no lossless codec takes it")
        raise PixelFormatError("no Pixel Data (not an image): nothing to compress")
    missing = [
        kw
        for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")
        if ds.get(kw) is None
    ]
    if missing:
        raise PixelFormatError(f"Image Pixel attributes missing: {', '.join(missing)}")
    bits_allocated = int(ds.BitsAllocated)
    if bits_allocated not in (8, 16, 32):
        raise PixelFormatError(f"Bits Allocated {bits_allocated} is not supported by the codecs")
    bits_stored = int(ds.BitsStored)
    if not 1 <= bits_stored <= bits_allocated:
        raise PixelFormatError(
            f"Bits Stored {bits_stored} does not fit Bits Allocated {bits_allocated}"
        )


def embedded_overlay_groups(ds: Dataset) -> list[int]:
    """Overlay groups (60xx) whose bits live in Pixel Data rather than Overlay Data.

    A retired encoding (Overlay Bits Allocated 16, no (60xx,3000)): clearing the bits
    above Bits Stored would erase the overlay.
    """
    groups = []
    for group in range(0x6000, 0x6020, 2):
        if (group, 0x0010) not in ds:  # Overlay Rows: the overlay module is present
            continue
        if (group, 0x3000) not in ds:
            groups.append(group)
    return groups


def move_embedded_overlays(ds: Dataset, syntax: UID) -> list[str]:
    """Copy overlays kept in unused pixel bits into Overlay Data (60xx,3000), in place.

    The bits above Bits Stored are cleared before encoding, which would erase such an
    overlay; DCMTK's encoders move it out first (``DcmCodec::adjustOverlays``), and so
    does this. Raises PixelFormatError when it cannot be moved safely.
    """
    groups = embedded_overlay_groups(ds)
    if not groups:
        return []
    if syntax.is_compressed:
        raise PixelFormatError(
            "overlay declared without Overlay Data in compressed pixel data; cannot extract it"
        )
    words = _native_words(ds)
    notes = []
    for group in groups:
        notes.append(_move_overlay(ds, group, words))
    return notes


def _native_words(ds: Dataset) -> np.ndarray:
    """Native little endian pixel words as (frames, rows, columns), unsigned."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise PixelFormatError("overlay in the pixel bits of a colour image; cannot extract it")
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames") or 1)
    dtype = np.dtype(f"<u{int(ds.BitsAllocated) // 8}")
    count = rows * cols * frames
    words = np.frombuffer(ds.PixelData, dtype=dtype, count=count)
    return words.reshape(frames, rows, cols)


def _move_overlay(ds: Dataset, group: int, words: np.ndarray) -> str:
    name = f"overlay {group:04X}"
    elem = ds.get((group, 0x0102))  # Overlay Bit Position
    bit = None if elem is None else int(elem.value)
    if bit is None or not int(ds.BitsStored) <= bit < words.itemsize * 8:
        raise PixelFormatError(
            f"{name} in the pixel data (bit {bit}) is not above Bits Stored; cannot extract it"
        )
    rows, cols = int(ds[group, 0x0010].value), int(ds[group, 0x0011].value)
    if (rows, cols) != words.shape[1:]:
        raise PixelFormatError(f"{name} is {rows}x{cols}, not the image size; cannot extract it")
    first = int(ds[group, 0x0051].value) - 1 if (group, 0x0051) in ds else 0  # Image Frame Origin
    count = int(ds[group, 0x0015].value) if (group, 0x0015) in ds else 1  # Frames in Overlay
    selected = words[first : first + count]
    if selected.shape[0] != count:
        raise PixelFormatError(f"{name} refers to frames the image does not have")
    plane = (selected >> np.array(bit, dtype=words.dtype)) & 1
    ds.add_new((group, 0x3000), "OW", pack_bits(plane.ravel().astype(np.uint8)))
    ds.add_new((group, 0x0100), "US", 1)  # Overlay Bits Allocated
    ds[group, 0x0102].value = 0
    return f"{name} moved from pixel bit {bit} to Overlay Data ({group:04X},3000)"


def one_line(exc: BaseException) -> str:
    """An exception as one short line, for `CompressResult.reason`."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
