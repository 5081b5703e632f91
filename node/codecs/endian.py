"""Turn a dataset read as Explicit VR Big Endian into Explicit VR Little Endian.

pydicom decodes numeric VRs (US, SS, FL, ...) into Python values, so those re-encode
in whatever byte order is written. It keeps OW/OF/OL/OD/OV values and Pixel Data as
raw bytes, in the order they were read, and refuses ``save_as`` across byte orders.
So the bytes of those values are swapped here, and the dataset is then declared to
have been read as little endian.
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian
from pydicom.valuerep import VR

PIXEL_DATA = Tag(0x7FE0, 0x0010)

# Width in bytes of one value for the VRs pydicom keeps as raw bytes.
_SWAP_WIDTH: dict[str, int] = {VR.OW: 2, VR.OF: 4, VR.OL: 4, VR.OD: 8, VR.OV: 8}


def is_big_endian(ds: Dataset) -> bool:
    """True if `ds` was read (or is declared) as Explicit VR Big Endian."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return syntax == ExplicitVRBigEndian or ds.original_encoding[1] is False


def to_little_endian(ds: Dataset) -> Dataset:
    """`ds` itself if it is not big endian, else a little endian copy of it.

    The copy's ``file_meta.TransferSyntaxUID`` is Explicit VR Little Endian and its
    pixel values and OW/OF/OL/OD/OV values are byte-swapped, so it can be written with
    ``save_as(..., enforce_file_format=True)``. UN values are left as they are: their
    structure is unknown, so they cannot be swapped.
    """
    if not is_big_endian(ds):
        return ds
    out = copy.deepcopy(ds)
    _swap_dataset(out, bits_allocated=out.get("BitsAllocated"))
    if getattr(out, "file_meta", None) is None:
        out.ensure_file_meta()
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return out


def _swap_dataset(ds: Dataset, bits_allocated: int | None) -> None:
    # Iterating converts every raw element while the dataset still says "big
    # endian", so numeric values are decoded with the right byte order first.
    for elem in ds:
        if elem.VR == VR.SQ:
            for item in elem.value:
                _swap_dataset(item, item.get("BitsAllocated", bits_allocated))
            continue
        if not isinstance(elem.value, bytes | bytearray) or not elem.value:
            continue
        width = _pixel_data_width(elem.VR, bits_allocated) if elem.tag == PIXEL_DATA else None
        width = width or _SWAP_WIDTH.get(elem.VR)
        if width:
            elem.value = swap_bytes(elem.value, width)
    ds.set_original_encoding(False, True)


def _pixel_data_width(vr: str, bits_allocated: int | None) -> int | None:
    # Native pixel words are stored in Bits Allocated units (pydicom reads 32-bit
    # big endian pixel data as '>u4' even when the VR is OW); 8-bit data in OW
    # is word-swapped like any OW value, in OB it is not swapped at all.
    if bits_allocated and bits_allocated > 8 and bits_allocated % 8 == 0:
        return bits_allocated // 8
    return 2 if vr == VR.OW else None


def swap_bytes(value: bytes | bytearray, width: int) -> bytes:
    """`value` with each `width`-byte word reversed; a trailing odd byte is kept."""
    whole = len(value) - len(value) % width
    words = np.frombuffer(value, dtype=f">u{width}", count=whole // width)
    return words.astype(f"<u{width}").tobytes() + bytes(value[whole:])
