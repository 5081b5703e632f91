"""Compression codecs: the transcoder and what it is built from.

- :mod:`node.codecs.transcode`: :func:`compress_dataset`, the one entry point;
- :mod:`node.codecs.spec`: whether a rule's ``compress:`` block can be carried out
  (shared with the config loader);
- :mod:`node.codecs.syntaxes`, :mod:`node.codecs.base`: the syntaxes and value types;
- :mod:`node.codecs.plugins`, :mod:`node.codecs.frames`, :mod:`node.codecs.charls`:
  the encoders; :mod:`node.codecs.verify`: independent decoders.

This package module only re-exports, and lazily: the config loader imports
``node.codecs.base`` and ``node.codecs.spec`` in the receiving process, which must not
load the transcoder and the encoder libraries it pulls in (only workers compress).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.codecs.base import CodecError, CompressResult, CompressSpec, SyntaxInfo
    from node.codecs.endian import is_big_endian, to_little_endian
    from node.codecs.plugins import available_encoders, check_plugin
    from node.codecs.spec import check_spec
    from node.codecs.syntaxes import lookup_syntax
    from node.codecs.transcode import compress_dataset, passthrough

_WHERE = {
    "CodecError": "node.codecs.base",
    "CompressResult": "node.codecs.base",
    "CompressSpec": "node.codecs.base",
    "SyntaxInfo": "node.codecs.base",
    "available_encoders": "node.codecs.plugins",
    "check_plugin": "node.codecs.plugins",
    "check_spec": "node.codecs.spec",
    "compress_dataset": "node.codecs.transcode",
    "is_big_endian": "node.codecs.endian",
    "lookup_syntax": "node.codecs.syntaxes",
    "passthrough": "node.codecs.transcode",
    "to_little_endian": "node.codecs.endian",
}

__all__ = [
    "CodecError",
    "CompressResult",
    "CompressSpec",
    "SyntaxInfo",
    "available_encoders",
    "check_plugin",
    "check_spec",
    "compress_dataset",
    "is_big_endian",
    "lookup_syntax",
    "passthrough",
    "to_little_endian",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
