"""Folder destination: a tree of Part 10 files laid out by a template of DICOM keywords."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from pydicom.dataset import Dataset

from node.config import FolderDestination
from node.fsutil import link_or_copy_durably, makedirs_durably

PLACEHOLDER = "UNKNOWN"
# A path component's length in bytes (UTF-8), not characters: NAME_MAX is 255 bytes on
# Linux file systems, and a temporary name adds about 40 to it (fsutil._tmp_name).
MAX_COMPONENT_BYTES = 128
# A whole component of the layout (several fields and literal text) is fitted to this.
MAX_NAME_BYTES = 200
_FIELD = re.compile(r"\{([^{}]+)\}")
# Anything that could change the meaning of a path, or confuse a shell or a file browser.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


class UnsafePathError(Exception):
    """A layout produced a path outside the destination folder (should not happen)."""


def safe_component(value: object) -> str:
    """``value`` as one harmless path component: no separators, no ``..``, never empty,
    at most :data:`MAX_COMPONENT_BYTES` bytes in UTF-8."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        text = "_".join(str(v) for v in value)  # type: ignore[union-attr]
    else:
        text = "" if value is None else str(value)
    # Lone surrogates (undecodable input) cannot be file names: "?" and then "_".
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = _UNSAFE.sub("_", text).strip().strip(".")
    text = _cut_to_bytes(text, MAX_COMPONENT_BYTES).strip().strip(".")
    return text or PLACEHOLDER


def _cut_to_bytes(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")  # never half a character


def fit_name(name: str) -> str:
    """``name`` if it fits :data:`MAX_NAME_BYTES`, else its head, a hash and its tail.

    The tail keeps the extension; the hash keeps different long names apart.
    """
    data = name.encode("utf-8")
    if len(data) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(data).hexdigest()[:16]
    head = data[: MAX_NAME_BYTES - 40].decode("utf-8", "ignore")
    tail = data[-20:].decode("utf-8", "ignore")
    return f"{head}~{digest}~{tail}"


def target_path(dest: FolderDestination, ds: Dataset) -> Path:
    """Where ``ds`` goes below ``dest.path``; raises if it would leave the folder.

    The check is lexical: every value is a safe component (no separator, never
    ``..``) and the layout is checked when the config is loaded, so only a ``..``
    could lead out, and normpath settles that. (``Path.resolve()`` stat'ed every
    component of the path, 0.2 ms per instance.) A symlink an administrator put inside
    the folder is followed.
    """
    relative = _FIELD.sub(lambda m: safe_component(ds.get(m.group(1))), dest.layout)
    relative = "/".join(fit_name(part) for part in relative.split("/"))
    root = Path(os.path.normpath(dest.path))
    path = Path(os.path.normpath(root / relative))
    if not path.is_relative_to(root) or path == root:
        # The values are not quoted: they may hold patient identifiers.
        raise UnsafePathError(f"layout {dest.layout!r} gave a path outside {root}")
    return path


def deliver(dest: FolderDestination, ds: Dataset, encoded: Path) -> Path:
    """Put the encoded file for ``ds`` at its layout path, atomically and durably.

    The same SOP Instance UID delivered again replaces its file (idempotent).
    """
    path = target_path(dest, ds)
    makedirs_durably(path.parent)
    link_or_copy_durably(encoded, path)
    return path
