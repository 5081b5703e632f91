"""Keep a DICOMDIR true to the files it references (PS3.10 media).

Compression keeps every file's path, so a DICOMDIR's Referenced File IDs stay right;
what changes is each file's Referenced Transfer Syntax UID in File (0004,1512) (and,
for lossy output with a new UID, its Referenced SOP Instance UID in File). After a
run the records are set from the files' own meta information, so that a run killed
halfway is put right by the next one. The DICOMDIR is re-encoded by pydicom's
FileSet (which recomputes the record offsets) and replaced durably, like the images.

A DICOMDIR that pydicom cannot read refuses its tree before anything is compressed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileSet

from node.batch.options import StartError
from node.batch.work import replace_durably


@dataclass(frozen=True)
class DicomDirUpdate:
    path: Path
    records: int  # instance records in it
    changed: int  # records whose transfer syntax or UID was updated
    error: str | None = None


def check_readable(path: Path) -> None:
    """Refuse the run if pydicom cannot read ``path`` as a File-set."""
    try:
        FileSet(pydicom.dcmread(path))
    except Exception as exc:
        raise StartError(
            f"{path}: a DICOMDIR that cannot be read ({type(exc).__name__}: {exc}); its "
            "records could not be kept true to compressed files, so this tree is refused "
            "(leave its folder out with --exclude, or repair it)"
        ) from exc


def update(source: Path, target: Path) -> DicomDirUpdate:
    """Write ``source``'s DICOMDIR to ``target`` with records matching the files there.

    ``target`` is ``source`` itself in place; with --output, the DICOMDIR's place in
    the output tree, whose files are read (a file missing there keeps its record).
    """
    try:
        fs = FileSet(pydicom.dcmread(source))
        root_in = Path(fs.path or source.parent)
        root_out = target.parent
        changed = 0
        count = 0
        for instance in fs:
            count += 1
            record = instance.node._record
            relative = Path(instance.path).relative_to(root_in)
            changed += _update_record(record, root_out / relative)
        if changed == 0 and source == target:
            return DicomDirUpdate(target, count, 0)
        buffer = BytesIO()
        fs._write_dicomdir(DicomFileLike(buffer))  # recomputes the record offsets
        replace_durably(
            target, [buffer.getvalue()], like=os.stat(source), strict_owner=source == target
        )
        return DicomDirUpdate(target, count, changed)
    except Exception as exc:
        return DicomDirUpdate(target, 0, 0, f"{type(exc).__name__}: {exc}")


def _update_record(record: pydicom.Dataset, file: Path) -> int:
    try:
        meta = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=[]).file_meta
    except (OSError, pydicom.errors.InvalidDicomError):
        return 0  # not there (a failed file in --output): the record stays as it was
    changed = 0
    syntax = meta.get("TransferSyntaxUID")
    if syntax and record.get("ReferencedTransferSyntaxUIDInFile") != syntax:
        record.ReferencedTransferSyntaxUIDInFile = syntax
        changed = 1
    uid = meta.get("MediaStorageSOPInstanceUID")
    if uid and record.get("ReferencedSOPInstanceUIDInFile") != uid:
        record.ReferencedSOPInstanceUIDInFile = uid
        changed = 1
    return changed
