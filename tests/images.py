"""Generated test images: pydicom Datasets with file meta, ready to save or send.

Each has valid SOP Class/Instance, Study and Series UIDs, Patient ID and Modality, and
Explicit VR Little Endian file meta. The pixel values are deterministic for a given
seed; the UIDs are new on every call so that instances never collide.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
PRIVATE_CREATOR = "DICOM-NODE TEST"


def _base(sop_class: UID, modality: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = f"Test^{modality}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "dicom-node tests"
    # A private block, so tests can check that compression keeps private tags.
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "private value kept")
    block.add_new(0x02, "OB", b"\x01\x02\x03\x04")
    return ds


def _set_pixels(ds: Dataset, arr: np.ndarray, *, bits_stored: int, photometric: str) -> None:
    # arr is (frames,) rows, columns(, samples), colour-by-pixel.
    colour = photometric == "RGB"
    frame_ndim = 3 if colour else 2
    frames = arr.shape[0] if arr.ndim > frame_ndim else 1
    ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def make_ct(rows: int = 512, cols: int = 512, seed: int = 0) -> Dataset:
    """Axial CT: signed 16-bit, 12 bits stored, padding -2048 outside the scan circle.

    Stored value = HU + 1024: soft tissue with noise, a brighter organ and bone
    values up to the top of the 12-bit range.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, cx = rows / 2, cols / 2
    r = np.hypot((y - cy) / rows, (x - cx) / cols)
    hu = -1000.0 + 1040.0 * (r < 0.40)  # air around a water-like body
    hu += 60 * np.exp(-(((x - cx * 0.8) / (cols * 0.1)) ** 2 + ((y - cy) / (rows * 0.12)) ** 2))
    hu += 1100 * (np.abs(r - 0.36) < 0.015)  # cortical bone ring
    hu += 20 * np.sin(x / 7.0 + seed) * np.cos(y / 11.0)
    hu += rng.normal(0, 12, size=(rows, cols))
    stored = np.clip(np.rint(hu) + 1024, -2048, 2047)
    stored[r >= 0.48] = -2048  # outside the reconstruction circle
    ds = _base(CTImageStorage, "CT", f"CT{seed:04d}")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    _set_pixels(ds, stored.astype(np.int16), bits_stored=12, photometric="MONOCHROME2")
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelPaddingValue = -2048
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.KVP = 120
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImagePositionPatient = [0.0, 0.0, float(seed)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid()
    return ds


def make_mr(rows: int = 64, cols: int = 64, seed: int = 0) -> Dataset:
    """MR: unsigned 16-bit with 12 bits stored."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    body = np.hypot((y - rows / 2) / rows, (x - cols / 2) / cols) < 0.42
    signal = 1800 * body + 900 * np.sin(x / 5.0) ** 2 * body + rng.normal(40, 15, (rows, cols))
    ds = _base(MRImageStorage, "MR", f"MR{seed:04d}")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    _set_pixels(
        ds, np.clip(signal, 0, 4095).astype(np.uint16), bits_stored=12, photometric="MONOCHROME2"
    )
    ds.PixelSpacing = [1.0, 1.0]
    ds.EchoTime, ds.RepetitionTime = 10, 500
    return ds


def make_rgb(rows: int = 96, cols: int = 128, seed: int = 0) -> Dataset:
    """Secondary Capture: 8-bit RGB, colour-by-pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    red = 255 * x / max(1, cols - 1)
    green = 255 * y / max(1, rows - 1)
    blue = 127 + 100 * np.sin((x + y) / 9.0)
    arr = np.stack([red, green, blue], axis=-1) + rng.normal(0, 4, (rows, cols, 3))
    ds = _base(SecondaryCaptureImageStorage, "OT", f"SC{seed:04d}")
    ds.ConversionType = "WSD"
    _set_pixels(ds, np.clip(arr, 0, 255).astype(np.uint8), bits_stored=8, photometric="RGB")
    return ds


def make_multiframe(frames: int = 10, rows: int = 48, cols: int = 64, seed: int = 0) -> Dataset:
    """Multi-frame Grayscale Byte Secondary Capture: a moving blob, 8-bit."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    stack = []
    for i in range(frames):
        cx = cols * (0.2 + 0.6 * i / max(1, frames - 1))
        blob = 200 * np.exp(-(((x - cx) / 8) ** 2 + ((y - rows / 2) / 6) ** 2))
        stack.append(blob + 30 + rng.normal(0, 3, (rows, cols)))
    arr = np.clip(np.stack(stack), 0, 255).astype(np.uint8)
    ds = _base(MultiFrameGrayscaleByteSecondaryCaptureImageStorage, "OT", f"MF{seed:04d}")
    ds.ConversionType = "WSD"
    _set_pixels(ds, arr, bits_stored=8, photometric="MONOCHROME2")
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40.0
    return ds


def make_sr(seed: int = 0) -> Dataset:
    """Basic Text SR with one text item: no Pixel Data."""
    ds = _base(BASIC_TEXT_SR_STORAGE, "SR", f"SR{seed:04d}")
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "11528-7", "LN", "Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    finding = Dataset()
    finding.CodeValue, finding.CodingSchemeDesignator = "121071", "DCM"
    finding.CodeMeaning = "Finding"
    text.ConceptNameCodeSequence = Sequence([finding])
    text.TextValue = "No abnormality detected."
    ds.ContentSequence = Sequence([text])
    return ds


def with_junk_high_bits(ds: Dataset, seed: int = 0) -> Dataset:
    """`ds` (16-bit, Bits Stored < 16) with random garbage in the bits above Bits Stored.

    The stored values (low Bits Stored bits, read signed if Pixel Representation is 1)
    do not change.
    """
    rng = np.random.default_rng(seed)
    words = np.frombuffer(ds.PixelData, dtype="<u2")
    junk = rng.integers(0, 1 << 16, size=words.shape, dtype=np.uint16)
    keep = np.uint16((1 << int(ds.BitsStored)) - 1)
    ds.PixelData = ((words & keep) | (junk & ~keep)).astype("<u2").tobytes()
    return ds


def as_read(ds: Dataset) -> Dataset:
    """`ds` written as a Part-10 file and read back, as the node receives instances."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


# --------------------------------------------------------------------------- pixel formats


def make_gray(
    arr: np.ndarray, *, bits_stored: int | None = None, photometric: str = "MONOCHROME2"
) -> Dataset:
    """Secondary Capture of `arr` ((frames,) rows, columns), its dtype as the container."""
    ds = _base(SecondaryCaptureImageStorage, "OT", "GRAY")
    ds.ConversionType = "WSD"
    bits = bits_stored or arr.dtype.itemsize * 8
    _set_pixels(ds, arr, bits_stored=bits, photometric=photometric)
    return ds


def make_signed16(rows: int = 40, cols: int = 56, seed: int = 0) -> Dataset:
    """Signed 16-bit with Bits Stored 16 over the whole range, both extremes included."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(-32768, 32767, size=(rows, cols), endpoint=True).astype(np.int16)
    arr[0, 0], arr[-1, -1] = -32768, 32767
    return make_gray(arr)


def make_odd(rows: int, cols: int, seed: int = 0) -> Dataset:
    """Unsigned 10-bit in 16 of an odd or degenerate size (1xN, Nx1, odd sides)."""
    rng = np.random.default_rng(seed)
    return make_gray(rng.integers(0, 1 << 10, size=(rows, cols)).astype(np.uint16), bits_stored=10)


def make_one_bit(rows: int = 32, cols: int = 40) -> Dataset:
    """A binary (Bits Allocated 1) image, as segmentations store masks."""
    y, x = np.mgrid[0:rows, 0:cols]
    mask = ((x - cols / 2) ** 2 + (y - rows / 2) ** 2 < (rows / 3) ** 2).astype(np.uint8)
    ds = make_gray(mask, bits_stored=1)
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelData = np.packbits(mask.ravel(), bitorder="little").tobytes()
    return ds


def make_us_cine(frames: int = 100, rows: int = 48, cols: int = 64, seed: int = 0) -> Dataset:
    """Ultrasound Multi-frame: an RGB cine loop (a grey sector with a colour Doppler blob)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    sector = np.abs(np.arctan2(x - cols / 2, y + 1)) < 0.6
    stack = []
    for i in range(frames):
        grey = sector * (90 + 40 * np.sin(y / 4 + i / 5)) + rng.normal(0, 6, (rows, cols))
        blob = np.exp(-(((x - cols / 2 - 8 * np.sin(i / 8)) / 6) ** 2 + ((y - rows / 2) / 5) ** 2))
        rgb = np.stack([grey + 150 * blob, grey, grey + 120 * blob * (i % 2)], axis=-1)
        stack.append(np.clip(rgb, 0, 255))
    ds = _base(UID("1.2.840.10008.5.1.4.1.1.3.1"), "US", f"US{seed:04d}")
    _set_pixels(ds, np.stack(stack).astype(np.uint8), bits_stored=8, photometric="RGB")
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 33.3
    return ds


def with_planar_configuration_1(ds: Dataset) -> Dataset:
    """`ds` (8-bit RGB) with its pixels rewritten colour-by-plane."""
    frames = int(ds.get("NumberOfFrames") or 1)
    arr = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(frames, ds.Rows, ds.Columns, 3)
    ds.PixelData = np.ascontiguousarray(arr.transpose(0, 3, 1, 2)).tobytes()
    ds.PlanarConfiguration = 1
    return ds


def with_embedded_overlay(ds: Dataset, bit: int = 15) -> Dataset:
    """`ds` (16-bit, Bits Stored <= `bit`) with a rectangle overlay in pixel bit `bit`.

    The retired encoding: Overlay Bits Allocated 16 and no Overlay Data (60xx,3000).
    """
    words = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns).copy()
    words &= np.uint16((1 << int(ds.BitsStored)) - 1)
    words[2:6, 3:9] |= np.uint16(1 << bit)
    ds.PixelData = words.tobytes()
    ds.add_new(0x60000010, "US", int(ds.Rows))
    ds.add_new(0x60000011, "US", int(ds.Columns))
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 16)
    ds.add_new(0x60000102, "US", bit)
    return ds


def make_uint32(rows: int = 12, cols: int = 10) -> Dataset:
    """Unsigned 32-bit, as RT Dose grids store doses."""
    # Products wrap around in uint32, spreading values over the whole range.
    arr = np.arange(rows * cols, dtype=np.uint32).reshape(rows, cols) * np.uint32(97_003_001)
    return make_gray(arr)
