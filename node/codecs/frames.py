"""Encoders the node drives itself: imagecodecs, one frame at a time, then encapsulated.

pydicom 3.0 has no encoder for HTJ2K, JPEG lossless or JPEG baseline, so these are
written here: each function codes one frame of stored values (see
:class:`~node.codecs.pixels.Pixels`) and :func:`encode_frames` puts the codestreams
into Pixel Data the way pydicom's ``compress()`` would (PS3.5 A.4: one fragment per
frame, Basic Offset Table filled, Extended Offset Table when it cannot address them).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate_extended
from pydicom.uid import UID
from pydicom.valuerep import VR

from node.codecs import charls
from node.codecs.pixels import PixelFormatError, Pixels

# A frame encoder: (one frame of stored values, its description, options) -> codestream.
FrameEncoder = Callable[..., bytes | bytearray]

# Basic Offset Table entries are 32-bit (PS3.5 A.4).
_BOT_LIMIT = 2**32 - 1
# OpenJPH's default; more only when RPCL needs a <= 64 pixel base resolution.
_DEFAULT_DECOMPOSITIONS = 5
_RPCL_BASE_SIZE = 64


def iter_frames(pixels: Pixels) -> Iterator[np.ndarray]:
    """Each frame of `pixels` as a C-contiguous (rows, columns[, samples]) array."""
    frame_ndim = 2 if pixels.samples_per_pixel == 1 else 3
    arr = pixels.array
    frames = arr if arr.ndim > frame_ndim else arr[np.newaxis]
    for frame in frames:
        yield np.ascontiguousarray(frame)


def frame_count(pixels: Pixels) -> int:
    frame_ndim = 2 if pixels.samples_per_pixel == 1 else 3
    return pixels.array.shape[0] if pixels.array.ndim > frame_ndim else 1


def encode_frames(
    ds: Dataset, pixels: Pixels, target: UID, encode: FrameEncoder, **options: Any
) -> None:
    """Code every frame with `encode` and store the result in `ds` as `target`.

    `ds` is only changed once every frame has been coded, so a failure leaves it as
    it was (the caller can then try another encoder).
    """
    fragments = [encode(frame, pixels, **options) for frame in iter_frames(pixels)]
    set_encapsulated(ds, fragments, target)


def set_encapsulated(ds: Dataset, frames: list[bytes | bytearray], target: UID) -> None:
    # Item header (8 bytes) plus the even-padded frame, as encapsulate() lays it out.
    total = sum(8 + len(f) + len(f) % 2 for f in frames)
    if total > _BOT_LIMIT:
        # pydicom takes any bytes-like frame (its annotation says bytes).
        data, offsets, lengths = encapsulate_extended(cast(list[bytes], frames))
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    else:
        ds.PixelData = encapsulate_with_offsets(frames)
    elem = ds["PixelData"]
    elem.VR = VR.OB
    elem.is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = target


def encapsulate_with_offsets(frames: list[bytes | bytearray]) -> bytes:
    """What ``pydicom.encaps.encapsulate(frames, has_bot=True)`` returns, with one copy.

    pydicom copies each frame into an item, the items into a growing buffer and the
    buffer into bytes: for a mammogram that is three more codestream-sized buffers
    in the worker at once. Here the frames are copied once, by ``bytes.join``.
    """
    offsets, position = [], 0
    parts: list[bytes | bytearray] = [b""]  # the Basic Offset Table item, once known
    for frame in frames:
        padding = b"\x00" if len(frame) % 2 else b""
        offsets.append(position)
        parts += [struct.pack("<HHL", 0xFFFE, 0xE000, len(frame) + len(padding)), frame, padding]
        position += 8 + len(frame) + len(padding)
    parts[0] = struct.pack(f"<HHL{len(offsets)}L", 0xFFFE, 0xE000, 4 * len(offsets), *offsets)
    return b"".join(parts)


# --------------------------------------------------------------------------- HTJ2K


def htj2k(
    frame: np.ndarray,
    pixels: Pixels,
    *,
    rpcl: bool = False,
    step: float | None = None,
) -> bytes:
    """HTJ2K (ISO 15444-15) with OpenJPH: reversible 5/3 unless a quantisation step is given.

    OpenJPH writes the RPCL progression order by default. For the RPCL syntax PS3.5
    10.18 also asks for a base resolution of at most 64 pixels and TLM markers;
    tile-parts split per resolution make those markers useful for streaming.
    """
    import imagecodecs

    rows, cols = frame.shape[:2]
    options: dict[str, Any] = {
        "reversible": step is None,
        # Colour transform (RCT when reversible, ICT otherwise) only for RGB input;
        # the caller has set the Photometric Interpretation to match.
        "rgb": pixels.photometric_interpretation == "RGB",
        "resolutions": decompositions(rows, cols) if rpcl else None,
    }
    if rpcl:
        options["tlm"] = True
        options["tilepart"] = imagecodecs.HTJ2K.TILEPART.RESOLUTIONS
    if step is not None:
        options["level"] = step
    return bytes(imagecodecs.htj2k_encode(frame, **options))


def decompositions(rows: int, cols: int) -> int:
    """Wavelet levels that leave a base resolution of at most 64 pixels a side."""
    needed = math.ceil(math.log2(max(rows, cols) / _RPCL_BASE_SIZE)) if max(rows, cols) > 64 else 0
    return max(_DEFAULT_DECOMPOSITIONS, needed)


# --------------------------------------------------------------------------- JPEG


def _unsigned_pattern(frame: np.ndarray, bits_stored: int) -> np.ndarray:
    # libjpeg-turbo, CharLS and lj92 take unsigned samples only: signed values go in
    # as their two's complement bit pattern in Bits Stored bits (pitfalls.md item 7);
    # decoders give that pattern back and Pixel Representation restores the sign.
    width = frame.dtype.itemsize
    narrow = bits_stored <= 8 and width > 1
    if frame.dtype.kind == "u" and not narrow:
        # Unsigned stored values have nothing above Bits Stored: no copy of the frame.
        return np.ascontiguousarray(frame)
    pattern = frame.view(f"u{width}") & np.array((1 << bits_stored) - 1, dtype=f"u{width}")
    if narrow:
        pattern = pattern.astype(np.uint8)  # 8-bit precision is coded from 8-bit samples
    return np.ascontiguousarray(pattern)


def jpeg_lossless(frame: np.ndarray, pixels: Pixels) -> bytes:
    """JPEG lossless process 14, selection value 1 (first-order prediction), libjpeg-turbo.

    imagecodecs' other lossless JPEG encoder (lj92) uses predictor 6, which is only
    valid for 1.2.840.10008.1.2.4.57, so it is not offered here.
    """
    import imagecodecs

    if pixels.bits_stored < 2:
        raise PixelFormatError("JPEG lossless needs a precision of 2 to 16 bits")
    options: dict[str, Any] = {}
    if pixels.samples_per_pixel == 3:
        # "RGB" in and out makes libjpeg-turbo write an Adobe marker with transform 0
        # (no colour transform) instead of JFIF, which says YCbCr: decoders such as
        # DCMTK's then hand back the samples as stored, for YBR_FULL too, rather than
        # converting them (and changing the Photometric Interpretation).
        options = {"colorspace": "RGB", "outcolorspace": "RGB"}
    return bytes(
        imagecodecs.jpeg8_encode(
            _unsigned_pattern(frame, pixels.bits_stored),
            lossless=True,
            predictor=1,
            bitspersample=pixels.bits_stored,
            **options,
        )
    )


def jpeg_baseline(frame: np.ndarray, pixels: Pixels, *, quality: int) -> bytes:
    """JPEG baseline (process 1), 8-bit; colour becomes 4:2:2 sub-sampled YCbCr."""
    import imagecodecs

    options: dict[str, Any] = {}
    if pixels.samples_per_pixel == 3:
        source = "YCBCR" if pixels.photometric_interpretation == "YBR_FULL" else "RGB"
        options = {"colorspace": source, "outcolorspace": "YCBCR", "subsampling": "422"}
    return bytes(imagecodecs.jpeg8_encode(frame, level=quality, **options))


def jpegls(frame: np.ndarray, pixels: Pixels, *, near: int = 0) -> bytes | bytearray:
    """JPEG-LS with the CharLS that imagecodecs ships (faster than pyjpegls, GIL released).

    The sample precision P is Bits Stored, as pyjpegls writes it, through CharLS's C
    API (:mod:`node.codecs.charls`). imagecodecs' own ``jpegls_encode`` always writes P
    = Bits Allocated, so the fallback for an imagecodecs build without that API codes
    Bits Stored == Bits Allocated only, NEAR 0-9, and leaves the rest to the next
    encoder.
    """
    if charls.is_available():
        return charls.encode(
            _unsigned_pattern(frame, pixels.bits_stored), pixels.bits_stored, near=near
        )
    import imagecodecs

    width = frame.dtype.itemsize * 8
    if pixels.bits_stored != width:
        raise PixelFormatError(
            f"imagecodecs writes JPEG-LS precision {width}, not Bits Stored {pixels.bits_stored}"
        )
    if not 0 <= near <= 9:
        raise PixelFormatError(f"imagecodecs codes NEAR 0-9 only, not {near}")
    return bytes(imagecodecs.jpegls_encode(_unsigned_pattern(frame, width), level=near))


# --------------------------------------------------------------------------- HTJ2K rate


# log10 of the quantisation steps searched. Below 1e-6 OpenJPH's output stops
# shrinking and, for 8-bit data, starts to misbehave; 1 is its coarsest step.
_STEP_RANGE = (-6.0, 0.0)
_SEARCH_ROUNDS = 14


def _bisect_step(good: Callable[[float], bool]) -> float:
    """The largest step for which `good(step)` holds, assuming it holds below it."""
    low, high = _STEP_RANGE
    if not good(10**low):
        return 10**low
    for _ in range(_SEARCH_ROUNDS):
        middle = (low + high) / 2
        if good(10**middle):
            low = middle
        else:
            high = middle
    return 10**low


def htj2k_step_for_ratio(frame: np.ndarray, pixels: Pixels, ratio: float) -> float:
    """The finest quantisation step whose output is at least `ratio` times smaller."""
    size = frame.nbytes
    low, high = _STEP_RANGE
    # Ratio grows with the step: find the smallest step that reaches the target.
    for _ in range(_SEARCH_ROUNDS):
        middle = (low + high) / 2
        if size / len(htj2k(frame, pixels, step=10**middle)) >= ratio:
            high = middle
        else:
            low = middle
    return 10**high


def htj2k_step_for_psnr(frame: np.ndarray, pixels: Pixels, psnr: float) -> float:
    """The coarsest quantisation step whose output keeps at least `psnr` dB.

    PSNR uses the peak of the input's Bits Stored range, as OpenJPEG does for JPEG 2000.
    """
    peak = float((1 << pixels.bits_stored) - 1)
    want = frame.astype(np.float64)

    def good(step: float) -> bool:
        got = _decode_htj2k(htj2k(frame, pixels, step=step)).astype(np.float64)
        mse = float(np.mean((got.reshape(want.shape) - want) ** 2))
        return mse == 0 or 10 * math.log10(peak * peak / mse) >= psnr

    return _bisect_step(good)


def _decode_htj2k(stream: bytes) -> np.ndarray:
    # OpenJPEG (pylibjpeg-openjpeg) clips overshoot to the sample range; imagecodecs'
    # OpenJPH decoder wraps it around in 8-bit output, which would spoil the search.
    try:
        from openjpeg.utils import decode
    except ImportError:
        import imagecodecs

        return imagecodecs.htj2k_decode(stream)
    return decode(stream)
