"""Which pydicom encoding plugin to use for a transfer syntax.

pydicom keeps one :class:`~pydicom.pixels.encoders.base.Encoder` per transfer syntax,
each holding named plugins that are either available or missing a dependency. Its
default order is registration order, not speed, so this module adds a speed ranking
on top and answers the two questions the rest of the node asks: "which encoders can
I use, fastest first?" and "is the plugin this config names usable?".
"""

from __future__ import annotations

from pydicom.pixels import get_encoder
from pydicom.pixels.encoders.base import Encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

# Fastest first. Measured on one core with a 512x512 signed 12-bit CT (MB/s of input):
# RLE gdcm ~100, pylibjpeg-rle ~40-48, pydicom's pure-Python encoder ~5 (also
# pitfalls.md item 11). Plugins pydicom knows but this table does not rank are
# tried after the ranked ones.
SPEED_RANK: dict[UID, tuple[str, ...]] = {
    RLELossless: ("gdcm", "pylibjpeg", "pydicom"),
    JPEGLSLossless: ("pyjpegls",),
    JPEGLSNearLossless: ("pyjpegls",),
    JPEG2000Lossless: ("pylibjpeg",),
    JPEG2000: ("pylibjpeg",),
}

# Writing native little endian needs no encoder; configs may not name one.
NO_ENCODER_SYNTAXES: frozenset[UID] = frozenset({ExplicitVRLittleEndian})


def _pydicom_encoder(uid: str) -> Encoder | None:
    try:
        return get_encoder(UID(uid))
    except NotImplementedError:
        return None


def _known_plugins(encoder: Encoder) -> set[str]:
    # pydicom exposes only the available names publicly; the unavailable ones
    # (with their missing dependencies) are needed for a helpful error message.
    return set(encoder.available_plugins) | set(encoder._unavailable)


def available_encoders(uid: str) -> list[str]:
    """Names of the installed pydicom encoding plugins for `uid`, fastest first.

    Empty for a syntax that needs no encoder (Explicit VR Little Endian) or that
    pydicom cannot encode.
    """
    encoder = _pydicom_encoder(uid)
    if encoder is None:
        return []
    installed = set(encoder.available_plugins)
    ranked = [name for name in SPEED_RANK.get(UID(uid), ()) if name in installed]
    return ranked + sorted(installed - set(ranked))


def check_plugin(uid: str, plugin: str | None) -> str | None:
    """An error message if `plugin` cannot encode `uid` here, else None.

    ``plugin=None`` means "fastest installed" and is fine as long as one is installed.
    """
    uid = UID(uid)
    if uid in NO_ENCODER_SYNTAXES:
        if plugin:
            return f"'{uid.name}' is written without an encoder; remove 'plugin: {plugin}'"
        return None

    encoder = _pydicom_encoder(uid)
    if encoder is None:
        return f"no encoder exists for '{uid.name}' ({uid})"

    installed = available_encoders(uid)
    if plugin is None:
        if installed:
            return None
        missing = "; ".join(encoder.missing_dependencies)
        return f"no encoder for '{uid.name}' is installed ({missing})"

    if plugin in installed:
        return None
    if plugin in encoder._unavailable:
        needs = ", ".join(encoder._unavailable[plugin])
        return (
            f"encoder plugin '{plugin}' for '{uid.name}' is not installed: it needs "
            f"{needs}; install that or use one of: {', '.join(installed) or 'none installed'}"
        )
    known = ", ".join(sorted(_known_plugins(encoder)))
    return f"unknown encoder plugin '{plugin}' for '{uid.name}'; known plugins: {known}"
