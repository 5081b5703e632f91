"""Data sets as Part 10 files, written by the workers (PS3.10 7.1, PS3.5 7.1.2).

``save_as`` spends most of its time on per-element bookkeeping
(docs/decisions.md#d8); most elements of a routed instance are still as they were read, so they are copied byte for byte, and only
what the codecs changed is encoded (simple values here, the rest by pydicom).
``tests/test_fast_paths.py`` holds the output to pydicom's, byte for byte.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import UID

from node.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, element_header

PIXEL_DATA = 0x7FE00010
ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0
META_GROUP_LENGTH = 0x00020000
# What pydicom's writer would add or refuse when missing: version, SOP class and
# instance, transfer syntax, implementation class and version name.
_REQUIRED_META = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)
_TEXT_VRS = frozenset({"UI", "AE", "SH", "LO", "CS", "UR"})
_INT_FORMATS = {"US": "<H", "SS": "<h", "UL": "<L", "SL": "<l"}


def encode_part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file with the node's own implementation identity."""
    return b"".join(part10_chunks(ds))


def part10_chunks(ds: Dataset) -> list[bytes]:
    """:func:`encode_part10` in pieces, so that a large Pixel Data value is written
    to the file as it is, not copied into the encoded data set first."""
    meta = ds.file_meta if isinstance(ds.file_meta, FileMetaDataset) else FileMetaDataset()
    identity = {
        "MediaStorageSOPClassUID": ds.SOPClassUID,
        "MediaStorageSOPInstanceUID": ds.SOPInstanceUID,
        "ImplementationClassUID": IMPLEMENTATION_CLASS_UID,
        "ImplementationVersionName": IMPLEMENTATION_VERSION_NAME,
    }
    for keyword, value in identity.items():
        if meta.get(keyword) != value:  # setting a UID validates it, usually for nothing
            setattr(meta, keyword, value)
    ds.file_meta = meta
    if _raw_elements_reusable(ds):
        return _encode_explicit_little(ds)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return [buffer.getvalue()]


def _raw_elements_reusable(ds: Dataset) -> bool:
    """True if the elements still as read can be copied byte for byte into the output.

    That holds when input and output are both Explicit VR Little Endian (encapsulated
    syntaxes included, deflated excepted) and the character set did not change.
    """
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    return (
        ds.original_encoding == (False, True)
        and ds.original_character_set == ds._character_set
        and not syntax.is_implicit_VR
        and syntax.is_little_endian
        and not syntax.is_deflated
    )


def _encode_explicit_little(ds: Dataset) -> list[bytes]:
    """What ``save_as`` writes, a few times faster: elements still as read are copied.

    pydicom's per-element bookkeeping adds up over an image's 50-100 elements, once
    per instance in every worker (docs/decisions.md#d8).
    """
    chunks: list[bytes] = []
    fp = _little_explicit_buffer()
    preamble = getattr(ds, "preamble", None)
    fp.write((preamble if preamble and len(preamble) == 128 else bytes(128)) + b"DICM")
    meta = _file_meta_bytes(ds.file_meta)
    if meta is None:
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    else:
        fp.write(meta)
    charset = ds.get("SpecificCharacterSet", default_encoding)
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # retired group lengths, as pydicom's writer drops them
        elem = ds.get_item(tag)
        if (raw := _copyable(elem)) is not None:
            fp.write(element_header(tag, raw[0], raw[1]))
            fp.write(raw[2])
        elif tag == PIXEL_DATA and _value_writable_as_is(ds[tag]):
            chunks += [fp.getvalue(), *_pixel_data_chunks(ds[tag])]
            fp = _little_explicit_buffer()
        elif not _undefined_length(elem) and (
            (data := _plain_value_bytes(elem.VR, elem.value)) is not None
        ):
            fp.write(element_header(tag, elem.VR, len(data)))
            fp.write(data)
        else:
            write_data_element(fp, ds[tag], charset)
    chunks.append(fp.getvalue())
    return chunks


def _file_meta_bytes(meta: FileMetaDataset) -> bytes | None:
    """What ``write_file_meta_info`` writes for ``meta``, or None if this cannot tell.

    pydicom validates and re-encodes every element (docs/decisions.md#d8); the node's own
    file meta holds a handful of elements, still raw or plain text, that need neither.
    Anything unusual (a missing element pydicom would add, a value that is not plain
    ASCII text) is left to pydicom.
    """
    if any(tag not in meta or meta[tag].is_empty for tag in _REQUIRED_META):
        return None
    parts: list[bytes] = []
    for tag in sorted(meta.keys()):
        if tag == META_GROUP_LENGTH:
            continue
        elem = meta.get_item(tag)
        if (raw := _copyable(elem)) is not None:
            parts += [element_header(tag, raw[0], raw[1]), raw[2]]
            continue
        data = None if _undefined_length(elem) else _plain_value_bytes(elem.VR, elem.value)
        if data is None:
            return None
        parts += [element_header(tag, elem.VR, len(data)), data]
    body = b"".join(parts)
    return element_header(META_GROUP_LENGTH, "UL", 4) + struct.pack("<L", len(body)) + body


def _plain_value_bytes(vr: str, value: Any) -> bytes | None:
    """The value as pydicom writes it, for the simple cases only (else None).

    One ASCII string of a text VR (the same bytes in every character set), one
    integer of a binary VR, or OB bytes: what routing and compression typically read
    or set (UIDs, Rows, Photometric Interpretation...), which pydicom re-encodes
    slowly (docs/decisions.md#d8).
    """
    if vr in _TEXT_VRS and isinstance(value, str) and value.isascii():
        data = value.encode()
        return data + (b"\x00" if vr == "UI" else b" ") if len(data) % 2 else data
    if vr in _INT_FORMATS and type(value) is int:
        try:
            return struct.pack(_INT_FORMATS[vr], value)
        except struct.error:  # out of range: let pydicom say so
            return None
    if vr == "OB" and isinstance(value, bytes):
        return value + b"\x00" if len(value) % 2 else value
    return None


def _undefined_length(elem: DataElement | RawDataElement) -> bool:
    if isinstance(elem, RawDataElement):
        return elem.length == 0xFFFFFFFF
    return elem.is_undefined_length


def _little_explicit_buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _value_writable_as_is(elem: DataElement) -> bool:
    """True if pydicom would write this Pixel Data value unchanged (no padding or check)."""
    value = elem.value
    return (
        elem.VR in ("OB", "OW")
        and isinstance(value, bytes)
        and len(value) % 2 == 0
        and (not elem.is_undefined_length or value.startswith(ITEM_TAG))
    )


def _pixel_data_chunks(elem: DataElement) -> list[bytes]:
    if elem.is_undefined_length:  # encapsulated: items, then the sequence delimiter
        return [element_header(PIXEL_DATA, elem.VR, 0xFFFFFFFF), elem.value, SEQUENCE_DELIMITER]
    return [element_header(PIXEL_DATA, elem.VR, len(elem.value)), elem.value]


def _copyable(elem: Any) -> tuple[str, int, bytes] | None:
    """(VR, length, value) of an element that can be copied as it was read, else None."""
    if (
        isinstance(elem, RawDataElement)
        and elem.value is not None  # not deferred
        and elem.VR is not None
        and elem.VR not in ("SQ", "UN")
        and elem.length != 0xFFFFFFFF
        and len(elem.value) == elem.length
    ):
        return elem.VR, elem.length, elem.value
    return None
