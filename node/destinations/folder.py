"""Folder destination: a tree of Part 10 files laid out by a template of DICOM keywords.

Workers write to the folder at once (:meth:`FolderType.deliver`); only a failed
write (disk full, a share that is away) leaves the instance in the outbox, which
:class:`~node.destinations.folder_retry.FolderRetryRunner` retries.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset

from node.destinations import CannotDeliver, DestinationType, ParseContext, Put, Runner
from node.errors import ConfigError
from node.fsutil import link_or_copy_durably, makedirs_durably
from node.schema import INTERNAL, as_path, defaults, reject_unknown, yaml_keys

if TYPE_CHECKING:
    from node.spool import Spool

PLACEHOLDER = "UNKNOWN"
# A path component's length in bytes (UTF-8), not characters: NAME_MAX is 255 bytes on
# Linux file systems, and a temporary name adds about 40 to it (fsutil._tmp_name).
MAX_COMPONENT_BYTES = 128
# A whole component of the layout (several fields and literal text) is fitted to this.
MAX_NAME_BYTES = 200
_FIELD = re.compile(r"\{([^{}]+)\}")
# Anything that could change the meaning of a path, or confuse a shell or a file browser.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


@dataclass(frozen=True)
class FolderDestination:
    name: str = field(metadata=INTERNAL)
    path: Path
    layout: str = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    type: Literal["folder"] = "folder"


class UnsafePathError(CannotDeliver):
    """A layout produced a path outside the destination folder (should not happen)."""


def safe_component(value: object) -> str:
    """``value`` as one harmless path component: no separators, no ``..``, never empty,
    at most :data:`MAX_COMPONENT_BYTES` bytes in UTF-8."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        text = "_".join(str(v) for v in value)  # type: ignore[attr-defined]
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
    component of the path: docs/decisions.md#d9.) A symlink an administrator put inside
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


def deliver_with(dest: FolderDestination, ds: Dataset, put: Put) -> Path:
    """Have ``put`` write the file for ``ds`` at its layout path; return that path.

    ``put`` writes atomically and durably; the same SOP Instance UID delivered again
    replaces its file (idempotent).
    """
    path = target_path(dest, ds)
    makedirs_durably(path.parent)
    put(path)
    return path


def deliver(dest: FolderDestination, ds: Dataset, encoded: Path) -> Path:
    """Put the encoded file ``encoded`` for ``ds`` at its layout path (linked or copied)."""
    return deliver_with(dest, ds, lambda path: link_or_copy_durably(encoded, path))


# --------------------------------------------------------------------------- the type


class FolderType(DestinationType[FolderDestination]):
    name = "folder"
    sends = False  # retries of local writes: no need for the sending process
    settings = FolderDestination

    def parse(
        self, name: str, body: dict[str, Any], where: str, context: ParseContext
    ) -> FolderDestination:
        reject_unknown(body, where, yaml_keys(FolderDestination))
        if "path" not in body:
            raise ConfigError(f"{where}.path: required for a folder destination")
        layout = body.get("layout", defaults(FolderDestination)["layout"])
        validate_layout(layout, f"{where}.layout")
        path = as_path(body["path"], f"{where}.path", context.base_dir)
        return FolderDestination(name=name, path=path, layout=layout)

    def describe(self, dest: FolderDestination) -> str:
        return f"folder {dest.path} layout {dest.layout}"

    def summary(self, dest: FolderDestination) -> str:
        return f"folder {dest.path}"

    def deliver(self, dest: FolderDestination, ds: Dataset, put: Put) -> bool:
        deliver_with(dest, ds, put)
        return True

    def runner(self, dest: FolderDestination, spool: Spool) -> Runner:
        from node.destinations.folder_retry import FolderRetryRunner

        return FolderRetryRunner(dest, spool)


TYPE = FolderType()


_LAYOUT_FIELD = re.compile(r"\{([^{}]*)\}")


def validate_layout(layout: Any, where: str) -> None:
    if not isinstance(layout, str) or not layout.strip():
        raise ConfigError(
            f"{where}: expected a path template such as '{{PatientID}}/{{SOPInstanceUID}}.dcm'"
        )
    fields = _LAYOUT_FIELD.findall(layout)
    if "{" in _LAYOUT_FIELD.sub("", layout) or "}" in _LAYOUT_FIELD.sub("", layout):
        raise ConfigError(f"{where}: unbalanced braces in {layout!r}")
    for name in fields:
        if name not in keyword_dict:
            raise ConfigError(f"{where}: {{{name}}} is not a DICOM keyword (e.g. PatientID)")
    if "SOPInstanceUID" not in fields:
        raise ConfigError(
            f"{where}: must contain {{SOPInstanceUID}} so that each instance gets its own file"
        )
    if layout.startswith("/") or ".." in Path(_LAYOUT_FIELD.sub("x", layout)).parts:
        raise ConfigError(f"{where}: must be a relative path below the destination's path")
