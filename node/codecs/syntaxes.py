"""Transfer syntaxes the node can write, by the names configs use."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from node.codecs.base import SyntaxInfo

SYNTAXES: tuple[SyntaxInfo, ...] = (
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
    SyntaxInfo("rle-lossless", RLELossless, lossy=False),
    SyntaxInfo("uncompressed", ExplicitVRLittleEndian, lossy=False),
)

BY_NAME: dict[str, SyntaxInfo] = {s.name: s for s in SYNTAXES}
BY_UID: dict[str, SyntaxInfo] = {str(s.uid): s for s in SYNTAXES}


def lookup_syntax(name_or_uid: str) -> SyntaxInfo | None:
    """The syntax a config names, by friendly name or UID; None if unknown."""
    key = str(name_or_uid).strip()
    return BY_NAME.get(key.lower()) or BY_UID.get(key)


def known_names() -> list[str]:
    return [s.name for s in SYNTAXES]


__all__ = ["SYNTAXES", "lookup_syntax", "known_names", "UID"]
