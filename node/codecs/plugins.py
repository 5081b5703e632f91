"""Which encoder to use for a transfer syntax: pydicom's plugins plus the node's own.

pydicom keeps one :class:`~pydicom.pixels.encoders.base.Encoder` per transfer syntax,
each holding named plugins that are either available or missing a dependency. The
node adds its own plugins the same way (a name, a lazily imported function, the
packages it needs) for what pydicom 3.0 cannot write or writes more slowly: HTJ2K,
JPEG lossless and JPEG baseline, and JPEG-LS through imagecodecs. A speed ranking
on top answers the questions the rest of the node asks: "which encoders can I use,
fastest first?", "is the plugin this config names usable?" and "which library wrote
this codestream?" (so that verification can pick a decoder built on another one).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

from pydicom.pixels.encoders.base import Encoder, get_encoder
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

from node.codecs.frames import FrameEncoder


@dataclass(frozen=True)
class NodePlugin:
    """An encoder the node drives frame by frame (see :mod:`node.codecs.frames`)."""

    name: str
    # "module:function" of the frame encoder, imported on first use.
    function: str
    # The codec library that writes the codestream.
    library: str
    # imagecodecs is built with optional codecs: (module, attribute whose
    # ``available`` must be true).
    requires: tuple[str, str]

    @property
    def is_available(self) -> bool:
        return _requirement_met(*self.requires)

    @property
    def missing(self) -> str:
        module, codec = self.requires
        return f"{module} with its {codec} codec"

    def load(self) -> FrameEncoder:
        module, func = self.function.split(":")
        encoder: FrameEncoder = getattr(importlib.import_module(module), func)
        return encoder


@cache
def _requirement_met(module: str, codec: str) -> bool:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return bool(getattr(getattr(mod, codec, None), "available", False))


_HTJ2K = NodePlugin("imagecodecs", "node.codecs.frames:htj2k", "openjph", ("imagecodecs", "HTJ2K"))
_JPEG_LOSSLESS = NodePlugin(
    "imagecodecs", "node.codecs.frames:jpeg_lossless", "libjpeg-turbo", ("imagecodecs", "JPEG8")
)
_JPEG_BASELINE = NodePlugin(
    "imagecodecs", "node.codecs.frames:jpeg_baseline", "libjpeg-turbo", ("imagecodecs", "JPEG8")
)
_JPEGLS = NodePlugin(
    "imagecodecs", "node.codecs.frames:jpegls", "charls", ("imagecodecs", "JPEGLS")
)

NODE_PLUGINS: dict[UID, tuple[NodePlugin, ...]] = {
    HTJ2KLossless: (_HTJ2K,),
    HTJ2KLosslessRPCL: (_HTJ2K,),
    HTJ2K: (_HTJ2K,),
    JPEGLosslessSV1: (_JPEG_LOSSLESS,),
    JPEGBaseline8Bit: (_JPEG_BASELINE,),
    JPEGLSLossless: (_JPEGLS,),
    JPEGLSNearLossless: (_JPEGLS,),
}

# Fastest first, as `dicom-node codecs` measured them (docs/decisions.md#d11; for
# JPEG-LS see frames.jpegls and node.codecs.charls). Plugins not ranked here are tried
# after the ranked ones.
SPEED_RANK: dict[UID, tuple[str, ...]] = {
    RLELossless: ("gdcm", "pylibjpeg", "pydicom"),
    JPEGLSLossless: ("imagecodecs", "pyjpegls"),
    JPEGLSNearLossless: ("imagecodecs", "pyjpegls"),
    JPEG2000Lossless: ("pylibjpeg",),
    JPEG2000: ("pylibjpeg",),
}

# The library behind each pydicom encoding plugin, by syntax where it differs.
_PYDICOM_LIBRARIES: dict[str, str] = {
    "pyjpegls": "charls",
    "gdcm": "gdcm",
    "pydicom": "pydicom",
}
_PYLIBJPEG_LIBRARIES: dict[UID, str] = {
    RLELossless: "pylibjpeg-rle",
    JPEG2000Lossless: "openjpeg",
    JPEG2000: "openjpeg",
}

# Written without a pixel encoder; configs may not name one.
NO_ENCODER_SYNTAXES: frozenset[UID] = frozenset(
    {ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)


def _pydicom_encoder(uid: str) -> Encoder | None:
    try:
        return get_encoder(UID(uid))
    except NotImplementedError:
        return None


def node_plugin(uid: str, name: str | None) -> NodePlugin | None:
    """The node's own plugin `name` for `uid`, or None if `name` is pydicom's."""
    for plugin in NODE_PLUGINS.get(UID(uid), ()):
        if plugin.name == name:
            return plugin
    return None


def library_of(uid: str, name: str) -> str:
    """The codec library that plugin `name` uses to write `uid`."""
    plugin = node_plugin(uid, name)
    if plugin is not None:
        return plugin.library
    if name == "pylibjpeg":
        return _PYLIBJPEG_LIBRARIES.get(UID(uid), "pylibjpeg")
    return _PYDICOM_LIBRARIES.get(name, name)


@cache
def _installed(uid: str) -> frozenset[str]:
    # What is installed does not change while the node runs, and asking pydicom and
    # the node's plugins is not free (docs/decisions.md#d12).
    names = {p.name for p in NODE_PLUGINS.get(UID(uid), ()) if p.is_available}
    encoder = _pydicom_encoder(uid)
    if encoder is not None:
        names |= set(encoder.available_plugins)
    return frozenset(names)


def _unavailable(uid: str) -> dict[str, str]:
    """Known but uninstalled plugins and what each needs."""
    missing = {p.name: p.missing for p in NODE_PLUGINS.get(UID(uid), ()) if not p.is_available}
    encoder = _pydicom_encoder(uid)
    if encoder is not None:
        # pydicom exposes only the available names publicly; the unavailable ones
        # (with their missing dependencies) are needed for a helpful error message.
        for name, needs in encoder._unavailable.items():
            missing.setdefault(name, ", ".join(needs))
    return missing


def available_encoders(uid: str) -> list[str]:
    """Names of the installed encoding plugins for `uid`, fastest first.

    Empty for a syntax that needs no encoder (Explicit VR Little Endian, Deflated)
    or that nothing installed can encode.
    """
    installed = _installed(uid)
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

    installed = available_encoders(uid)
    unavailable = _unavailable(uid)
    if not installed and not unavailable:
        return f"no encoder exists for '{uid.name}' ({uid})"
    if plugin is None:
        if installed:
            return None
        missing = "; ".join(f"{name} needs {needs}" for name, needs in unavailable.items())
        return f"no encoder for '{uid.name}' is installed ({missing})"

    if plugin in installed:
        return None
    if plugin in unavailable:
        return (
            f"encoder plugin '{plugin}' for '{uid.name}' is not installed: it needs "
            f"{unavailable[plugin]}; install that or use one of: "
            f"{', '.join(installed) or 'none installed'}"
        )
    known = ", ".join(sorted(set(installed) | set(unavailable)))
    return f"unknown encoder plugin '{plugin}' for '{uid.name}'; known plugins: {known}"
