"""JPEG-LS encoding through CharLS's C API, in the CharLS build that imagecodecs ships.

imagecodecs' ``jpegls_encode`` always writes a sample precision (P) of the array's
bit width, 16 for CT. Signed data coded with P = 16 must then carry sign-extended
16-bit values (DCMTK's ``dcmcjpls`` writes that); their Bits Stored pattern with
P = 16 decodes in pydicom with -2048 as +2048. pyjpegls writes P = Bits Stored but
its CharLS build is much slower (same CharLS API; docs/decisions.md#d10). CharLS's own C API takes P as a parameter, so the node
calls it, through ctypes, in the library imagecodecs' JPEG-LS module is linked with,
with P = Bits Stored as pyjpegls writes it. ctypes releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

# charls_interleave_mode (CharLS public_types.h)
INTERLEAVE_NONE = 0
INTERLEAVE_SAMPLE = 2


class CharLSError(Exception):
    """CharLS refused the frame or its parameters."""


class _FrameInfo(ctypes.Structure):
    # charls_frame_info (CharLS 2.x public_types.h)
    _fields_ = [
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("bits_per_sample", ctypes.c_int32),
        ("component_count", ctypes.c_int32),
    ]


@cache
def _library() -> ctypes.CDLL | None:
    """CharLS as loaded by imagecodecs, or None if this imagecodecs build has no CharLS API.

    dlsym on the imagecodecs module's handle also searches the libraries it is linked
    with, whatever the wheel named its copy of libcharls.
    """
    try:
        from imagecodecs import _jpegls
    except ImportError:
        return None
    try:
        lib = ctypes.CDLL(_jpegls.__file__)
        _declare(lib)
    except (OSError, AttributeError):
        return None
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    handle, size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
    signatures = {
        "charls_jpegls_encoder_create": (handle, []),
        "charls_jpegls_encoder_destroy": (None, [handle]),
        "charls_jpegls_encoder_set_frame_info": (
            ctypes.c_int32,
            [handle, ctypes.POINTER(_FrameInfo)],
        ),
        "charls_jpegls_encoder_set_near_lossless": (ctypes.c_int32, [handle, ctypes.c_int32]),
        "charls_jpegls_encoder_set_interleave_mode": (ctypes.c_int32, [handle, ctypes.c_int32]),
        "charls_jpegls_encoder_get_estimated_destination_size": (ctypes.c_int32, [handle, size_p]),
        "charls_jpegls_encoder_set_destination_buffer": (
            ctypes.c_int32,
            [handle, ctypes.c_void_p, ctypes.c_size_t],
        ),
        "charls_jpegls_encoder_encode_from_buffer": (
            ctypes.c_int32,
            [handle, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32],
        ),
        "charls_jpegls_encoder_get_bytes_written": (ctypes.c_int32, [handle, size_p]),
        "charls_get_error_message": (ctypes.c_char_p, [ctypes.c_int32]),
    }
    for name, (restype, argtypes) in signatures.items():
        func = getattr(lib, name)
        func.restype, func.argtypes = restype, argtypes


def is_available() -> bool:
    return _library() is not None


def encode(samples: np.ndarray, bits_per_sample: int, *, near: int = 0) -> bytearray:
    """One frame as a JPEG-LS codestream with sample precision ``bits_per_sample``.

    ``samples``: unsigned, C-contiguous, (rows, columns) or colour-by-pixel
    (rows, columns, samples); 8-bit for a precision up to 8, else 16-bit.
    """
    lib = _library()
    if lib is None:
        raise CharLSError("imagecodecs' CharLS library is not available")
    if samples.dtype != (np.uint8 if bits_per_sample <= 8 else np.uint16):
        raise CharLSError(f"{bits_per_sample}-bit samples cannot be coded from {samples.dtype}")
    if not samples.flags.c_contiguous:
        raise CharLSError("the samples must be C-contiguous")
    rows, columns = samples.shape[:2]
    components = samples.shape[2] if samples.ndim == 3 else 1
    encoder = lib.charls_jpegls_encoder_create()
    if not encoder:
        raise MemoryError("CharLS could not create an encoder")
    try:
        info = _FrameInfo(columns, rows, bits_per_sample, components)
        _check(lib, lib.charls_jpegls_encoder_set_frame_info(encoder, ctypes.byref(info)))
        _check(lib, lib.charls_jpegls_encoder_set_near_lossless(encoder, near))
        mode = INTERLEAVE_SAMPLE if components > 1 else INTERLEAVE_NONE
        _check(lib, lib.charls_jpegls_encoder_set_interleave_mode(encoder, mode))
        size = ctypes.c_size_t()
        _check(
            lib,
            lib.charls_jpegls_encoder_get_estimated_destination_size(encoder, ctypes.byref(size)),
        )
        out = bytearray(size.value)
        target = (ctypes.c_char * len(out)).from_buffer(out)
        try:
            _check(
                lib,
                lib.charls_jpegls_encoder_set_destination_buffer(
                    encoder, ctypes.addressof(target), len(out)
                ),
            )
            _check(
                lib,
                lib.charls_jpegls_encoder_encode_from_buffer(
                    encoder, samples.ctypes.data, samples.nbytes, 0
                ),
            )
            written = ctypes.c_size_t()
            _check(lib, lib.charls_jpegls_encoder_get_bytes_written(encoder, ctypes.byref(written)))
        finally:
            del target  # the buffer export ends here, so that ``out`` may shrink
        del out[written.value :]  # in place: no copy of the codestream
        return out
    finally:
        lib.charls_jpegls_encoder_destroy(encoder)


def _check(lib: ctypes.CDLL, code: int) -> None:
    if code != 0:
        message = lib.charls_get_error_message(code) or b"unknown error"
        raise CharLSError(f"CharLS error {code}: {message.decode(errors='replace')}")
