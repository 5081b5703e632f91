"""The attributes a lossy compression step must leave behind (PS3.3 C.7.6.1.1.5).

Follows DCMTK ``dcmdata/libsrc/dccodec.cc`` (``updateImageType``,
``insertCodeSequence``, ``newInstance``, ``updateLossyCompressionRatio``,
``updateDerivationDescription``).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

# Derivation Description (0008,2111) is ST: at most 1024 characters.
_ST_MAX = 1024


def code_item(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def format_ratio(ratio: float) -> str:
    """A compression ratio as a DS value (16 characters at most)."""
    return format_number_as_ds(round(ratio, 2))


def mark_lossy(
    ds: Dataset,
    *,
    method: str,
    ratio: float,
    description: str,
    new_uid: bool,
) -> list[str]:
    """Record a lossy step on `ds`, in place; returns notes for the result."""
    notes: list[str] = []
    ds.LossyImageCompression = "01"
    _append_value(ds, "LossyImageCompressionRatio", format_ratio(ratio))
    _append_value(ds, "LossyImageCompressionMethod", method)
    _set_derived(ds, notes)
    _append_description(ds, description)
    _append_item(ds, "DerivationCodeSequence", code_item("113040", "Lossy Compression"))
    if new_uid:
        notes.append(_new_instance(ds))
    return notes


def _append_value(ds: Dataset, keyword: str, value: str) -> None:
    # 2112 and 2114 are multi-valued, one value per lossy step, in step order.
    old = ds.get(keyword)
    if old is None or old == "":
        values: list[str] = []
    elif isinstance(old, str | int | float):
        values = [str(old)]
    else:
        values = [str(v) for v in old]
    setattr(ds, keyword, [*values, value] if values else value)


def _set_derived(ds: Dataset, notes: list[str]) -> None:
    image_type = ds.get("ImageType")
    if not image_type:
        # Image Type has VM 2-n; DCMTK writes "DERIVED" alone, which is too short.
        ds.ImageType = ["DERIVED", "SECONDARY"]
        notes.append("Image Type was missing; set to DERIVED\\SECONDARY")
        return
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    ds.ImageType = ["DERIVED", *values[1:]] if len(values) > 1 else ["DERIVED", "SECONDARY"]


def _append_description(ds: Dataset, description: str) -> None:
    old = str(ds.get("DerivationDescription") or "").strip()
    text = f"{old}; {description}" if old else description
    ds.DerivationDescription = text[:_ST_MAX]


def _append_item(ds: Dataset, keyword: str, item: Dataset) -> None:
    seq = ds.get(keyword)
    if seq is None:
        setattr(ds, keyword, Sequence([item]))
    else:
        seq.append(item)


def _new_instance(ds: Dataset) -> str:
    """Give `ds` a new SOP Instance UID and reference the one it replaces."""
    old_uid = ds.get("SOPInstanceUID")
    new_uid = generate_uid()
    if old_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = old_uid
        ref.PurposeOfReferenceCodeSequence = Sequence(
            [code_item("121320", "Uncompressed predecessor")]
        )
        _append_item(ds, "SourceImageSequence", ref)
    ds.SOPInstanceUID = new_uid
    ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    return f"new SOP Instance UID {new_uid} (was {old_uid})"
