"""Transfer syntaxes the node can write, by the names configs use, and what each may hold."""

from __future__ import annotations

from typing import cast

from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from node.codecs.base import SyntaxInfo

SYNTAXES: tuple[SyntaxInfo, ...] = (
    SyntaxInfo("htj2k-lossless", HTJ2KLossless, lossy=False),
    SyntaxInfo("htj2k-lossless-rpcl", HTJ2KLosslessRPCL, lossy=False),
    SyntaxInfo(
        "htj2k",
        HTJ2K,
        lossy=True,
        parameters=("compression_ratio", "psnr"),
        method="ISO_15444_15",
    ),
    SyntaxInfo("jpeg-ls-lossless", JPEGLSLossless, lossy=False),
    SyntaxInfo(
        "jpeg-ls-near-lossless",
        JPEGLSNearLossless,
        lossy=True,
        parameters=("max_error",),
        method="ISO_14495_1",
    ),
    SyntaxInfo("jpeg-2000-lossless", JPEG2000Lossless, lossy=False),
    SyntaxInfo(
        "jpeg-2000",
        JPEG2000,
        lossy=True,
        parameters=("compression_ratio", "psnr"),
        method="ISO_15444_1",
    ),
    SyntaxInfo("jpeg-lossless", JPEGLosslessSV1, lossy=False),
    SyntaxInfo(
        "jpeg-baseline",
        JPEGBaseline8Bit,
        lossy=True,
        parameters=("quality",),
        method="ISO_10918_1",
    ),
    SyntaxInfo("rle-lossless", RLELossless, lossy=False),
    SyntaxInfo("deflated", DeflatedExplicitVRLittleEndian, lossy=False),
    SyntaxInfo("uncompressed", ExplicitVRLittleEndian, lossy=False),
)

BY_NAME: dict[str, SyntaxInfo] = {s.name: s for s in SYNTAXES}
BY_UID: dict[str, SyntaxInfo] = {str(s.uid): s for s in SYNTAXES}

# One allowed pixel format: (Photometric Interpretation of the *output*, Samples per
# Pixel, Pixel Representations, Bits Allocated values, Bits Stored values), as in
# pydicom's ENCODING_PROFILES.
Profile = tuple[str, int, tuple[int, ...], tuple[int, ...], range]

_HTJ2K_BITS = ((8, 16), range(1, 17))
# PS3.5 Table 8.2.14-1 allows 1-38 bits, but imagecodecs writes a codestream precision
# of Bits Allocated, and OpenJPEG (pydicom's HTJ2K decoder) cannot read 32-bit streams:
# 8 and 16 bits only, so every output has a decoder other than its writer.
_HTJ2K_LOSSLESS: list[Profile] = [
    ("MONOCHROME1", 1, (0, 1), *_HTJ2K_BITS),
    ("MONOCHROME2", 1, (0, 1), *_HTJ2K_BITS),
    ("PALETTE COLOR", 1, (0,), *_HTJ2K_BITS),
    ("YBR_RCT", 3, (0,), *_HTJ2K_BITS),
    ("YBR_FULL", 3, (0,), *_HTJ2K_BITS),
]
_HTJ2K_LOSSY: list[Profile] = [
    ("MONOCHROME1", 1, (0, 1), *_HTJ2K_BITS),
    ("MONOCHROME2", 1, (0, 1), *_HTJ2K_BITS),
    ("YBR_ICT", 3, (0,), *_HTJ2K_BITS),
    ("YBR_FULL", 3, (0,), *_HTJ2K_BITS),
]

# Where the node's rules differ from pydicom's table.
NODE_PROFILES: dict[UID, list[Profile]] = {
    HTJ2KLossless: _HTJ2K_LOSSLESS,
    HTJ2KLosslessRPCL: _HTJ2K_LOSSLESS,
    HTJ2K: _HTJ2K_LOSSY,
    # libjpeg-turbo codes lossless precisions 2-16 (ITU T.81 H.1.2.1: P from 2 to 16).
    JPEGLosslessSV1: [
        ("MONOCHROME1", 1, (0, 1), (8, 16), range(2, 17)),
        ("MONOCHROME2", 1, (0, 1), (8, 16), range(2, 17)),
        ("PALETTE COLOR", 1, (0,), (8, 16), range(2, 17)),
        ("YBR_FULL", 3, (0,), (8, 16), range(2, 17)),
        ("RGB", 3, (0,), (8, 16), range(2, 17)),
    ],
    # Colour is always written as sub-sampled YCbCr (PS3.5 8.2.1); never palette.
    JPEGBaseline8Bit: [
        ("MONOCHROME1", 1, (0,), (8,), range(8, 9)),
        ("MONOCHROME2", 1, (0,), (8,), range(8, 9)),
        ("YBR_FULL_422", 3, (0,), (8,), range(8, 9)),
    ],
}


def profiles(uid: UID) -> list[Profile]:
    """The pixel formats `uid` may hold when the node writes it (PS3.5 section 8.2)."""
    # pydicom's table has the same layout, typed more loosely.
    return NODE_PROFILES.get(uid) or cast(list[Profile], list(ENCODING_PROFILES.get(uid, [])))


def lookup_syntax(name_or_uid: str) -> SyntaxInfo | None:
    """The syntax a config names, by friendly name or UID; None if unknown."""
    key = str(name_or_uid).strip()
    return BY_NAME.get(key.lower()) or BY_UID.get(key)


def known_names() -> list[str]:
    return [s.name for s in SYNTAXES]


__all__ = ["SYNTAXES", "lookup_syntax", "known_names", "profiles", "UID"]
