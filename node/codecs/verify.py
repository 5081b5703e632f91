"""Decode freshly written pixel data with a decoder built on another library.

A codestream that its own library reads back proves little: a bug shared by the
encoder and decoder halves (or a convention such as the sign of 12-bit samples)
goes unnoticed. So each syntax lists decoders with the library they use, and
:func:`pick_decoder` prefers one whose library differs from the encoder's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from node.codecs.base import reraise_unless_codec_failure
from node.codecs.pixels import PixelFormatError, Pixels, container_dtype, one_line, stored_values


@dataclass(frozen=True)
class Decoder:
    """A way to decode a syntax: through pydicom with one plugin, or imagecodecs."""

    name: str
    library: str
    pydicom_plugin: str | None = None  # decode with pydicom using this plugin
    imagecodecs_function: str | None = None  # or frame by frame with imagecodecs
    # Keyword arguments for the imagecodecs function on three-sample images.
    colour_options: tuple[tuple[str, str], ...] = ()

    @property
    def is_available(self) -> bool:
        if self.pydicom_plugin is not None:
            return False  # answered per syntax in pick_decoder
        try:
            return callable(
                getattr(importlib.import_module("imagecodecs"), self.imagecodecs_function or "")
            )
        except ImportError:
            return False


def _pydicom(plugin: str, library: str) -> Decoder:
    return Decoder(f"pydicom/{plugin}", library, pydicom_plugin=plugin)


def _imagecodecs(function: str, library: str, **colour: str) -> Decoder:
    return Decoder(
        f"imagecodecs.{function}",
        library,
        imagecodecs_function=function,
        colour_options=tuple(colour.items()),
    )


_J2K = (_pydicom("pylibjpeg", "openjpeg"), _pydicom("gdcm", "openjpeg"))
_HT = (_pydicom("pylibjpeg", "openjpeg"), _imagecodecs("htj2k_decode", "openjph"))
_JLS = (
    _pydicom("pyjpegls", "charls"),
    _pydicom("gdcm", "charls"),
    _imagecodecs("jpegls_decode", "charls"),
)

DECODERS: dict[UID, tuple[Decoder, ...]] = {
    HTJ2KLossless: _HT,
    HTJ2KLosslessRPCL: _HT,
    HTJ2K: _HT,
    JPEG2000Lossless: _J2K,
    JPEG2000: _J2K,
    JPEGLSLossless: _JLS,
    JPEGLSNearLossless: _JLS,
    # jpegsof3 (Chris Rorden's decoder) shares no code with libjpeg-turbo.
    JPEGLosslessSV1: (
        _imagecodecs("jpegsof3_decode", "jpegsof3"),
        _pydicom("gdcm", "gdcm"),
        _pydicom("pylibjpeg", "libjpeg"),
        _imagecodecs("jpeg8_decode", "libjpeg-turbo"),
    ),
    JPEGBaseline8Bit: (
        _pydicom("gdcm", "gdcm"),
        _pydicom("pylibjpeg", "libjpeg"),
        _pydicom("pillow", "pillow"),
        # The writer's own library: the last resort when python-gdcm (an optional
        # extra), pylibjpeg-libjpeg and Pillow are all missing. YCbCr is kept as is.
        _imagecodecs("jpeg8_decode", "libjpeg-turbo", colorspace="YCBCR", outcolorspace="YCBCR"),
    ),
    RLELossless: (
        _pydicom("pydicom", "pydicom"),
        _pydicom("pylibjpeg", "pylibjpeg-rle"),
        _pydicom("gdcm", "gdcm"),
    ),
}


def _available(uid: UID, decoder: Decoder) -> bool:
    if decoder.pydicom_plugin is None:
        return decoder.is_available
    try:
        return decoder.pydicom_plugin in get_decoder(uid).available_plugins
    except NotImplementedError:
        return False


def pick_decoder(uid: UID, encoder_library: str) -> tuple[Decoder, bool] | None:
    """The decoder to check `uid` output with, and whether it is independent."""
    usable = [d for d in DECODERS.get(UID(uid), ()) if _available(uid, d)]
    for decoder in usable:
        if decoder.library != encoder_library:
            return decoder, True
    return (usable[0], False) if usable else None


def decode_with(decoder: Decoder, ds: Dataset, uid: UID) -> np.ndarray:
    """The raw decoded samples of `ds`, shaped like :attr:`Pixels.array`."""
    if decoder.pydicom_plugin is not None:
        arr, _ = get_decoder(uid).as_array(ds, raw=True, decoding_plugin=decoder.pydicom_plugin)
        return arr
    function = getattr(importlib.import_module("imagecodecs"), decoder.imagecodecs_function or "")
    count = int(ds.get("NumberOfFrames") or 1)
    options = dict(decoder.colour_options) if int(ds.get("SamplesPerPixel", 1)) == 3 else {}
    data = generate_frames(ds.PixelData, number_of_frames=count)
    frames = [function(frame, **options) for frame in data]
    return frames[0] if count == 1 else np.stack(frames)


def as_stored(arr: np.ndarray, pixels: Pixels, bits_stored: int) -> np.ndarray:
    """Decoder output as stored values in the input's container type."""
    unsigned = container_dtype(pixels.bits_allocated, signed=False)
    values = stored_values(arr.astype(unsigned, copy=False), bits_stored, pixels.signed)
    return values.astype(container_dtype(pixels.bits_allocated, pixels.signed), copy=False)


@dataclass(frozen=True)
class Check:
    decoder: str
    independent: bool
    max_error: int

    def note(self, encoder_library: str) -> str:
        how = "independent of" if self.independent else "same library as"
        return f"verified with {self.decoder} ({how} {encoder_library}): max abs error {self.max_error}"


def compare(
    ds: Dataset,
    uid: UID,
    pixels: Pixels,
    encoder_library: str,
    convert: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Check:
    """Decode `ds` with the most independent decoder and measure the largest error.

    `convert` maps the decoded samples into the input's colour space when the
    encoder changed it (JPEG baseline's YCbCr). Raises PixelFormatError when no
    decoder is installed, decoding fails or the shape differs.
    """
    choice = pick_decoder(uid, encoder_library)
    if choice is None:
        raise PixelFormatError(f"no decoder for {uid.name} is installed to verify the output")
    decoder, independent = choice
    try:
        raw = decode_with(decoder, ds, uid)
    except BaseException as exc:
        reraise_unless_codec_failure(exc)
        raise PixelFormatError(f"{decoder.name} cannot decode the output: {one_line(exc)}") from exc
    if convert is not None:
        raw = convert(raw)
    if raw.shape != pixels.array.shape:
        raise PixelFormatError(
            f"{decoder.name} decodes the output to shape {raw.shape}, not {pixels.array.shape}"
        )
    got = as_stored(raw, pixels, int(ds.BitsStored))
    return Check(decoder.name, independent, max_abs_difference(got, pixels.array))


def max_abs_difference(got: np.ndarray, want: np.ndarray) -> int:
    wide = np.int64 if want.dtype.itemsize > 2 else np.int32
    # Frame by frame keeps the widened copies small for large multi-frame images.
    worst = 0
    for a, b in zip(np.atleast_3d(got), np.atleast_3d(want), strict=True):
        worst = max(worst, int(np.abs(a.astype(wide) - b.astype(wide)).max(initial=0)))
    return worst
