"""Realistic synthetic test images (smooth anatomy plus noise), cached as Part 10 files.

Every image is Explicit VR Little Endian with deterministic UIDs, so a cached folder is
reused across runs. Bump ``CACHE_VERSION`` whenever the generated content changes.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

CACHE_VERSION = "v1"
DATA_DIR = Path(__file__).resolve().parent / ".data"
SERIES_LENGTH = 200  # anatomy positions; image i shows position i % SERIES_LENGTH
WARMUP_COUNT = 2  # images sent before the timed window (one per node worker)

Array = np.ndarray


# ------------------------------------------------------------------ shape helpers


def grid(rows: int, cols: int) -> tuple[Array, Array]:
    """Normalised coordinates: x in [-1, 1] across the columns, y scaled by the aspect."""
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32) * (rows / cols)
    return np.meshgrid(x, y)


def soft_ellipse(
    xx: Array, yy: Array, cx: float, cy: float, rx: float, ry: float, edge: float = 0.01
) -> Array:
    """1 inside the ellipse, 0 outside, with a smooth edge ``edge`` wide (normalised units)."""
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    scale = edge / min(rx, ry)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / scale, -30, 30)))


def smooth_noise(rows: int, cols: int, rng: np.random.Generator, cells: int) -> Array:
    """Low-frequency texture in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, cells, rows, dtype=np.float32)
    xs = np.linspace(0, cells, cols, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def texture(rows: int, cols: int, rng: np.random.Generator) -> Array:
    """Multi-scale smooth texture (organ parenchyma, fibroglandular tissue)."""
    return (
        0.6 * smooth_noise(rows, cols, rng, 6)
        + 0.3 * smooth_noise(rows, cols, rng, 24)
        + 0.1 * smooth_noise(rows, cols, rng, 96)
    )


# ------------------------------------------------------------------ pixel makers
# Each maker gets (rng, position in the series 0..1) and returns the stored pixel array.


def ct_pixels(rng: np.random.Generator, z: float) -> Array:
    """Axial chest/abdomen slice in HU, signed 12 bits stored, -2048 outside the FOV."""
    size = 512
    xx, yy = grid(size, size)
    body = soft_ellipse(xx, yy, 0, 0.05, 0.78 + 0.04 * z, 0.55, edge=0.01)
    hu = -1000.0 + body * (1040.0 + 25.0 * texture(size, size, rng))
    fat = body - soft_ellipse(xx, yy, 0, 0.05, 0.72 + 0.04 * z, 0.49)
    hu -= 140.0 * np.clip(fat, 0, 1)
    lung_size = max(0.05, 0.8 - z)  # lungs shrink towards the abdomen
    for side in (-1, 1):
        lung = soft_ellipse(xx, yy, 0.33 * side, -0.02, 0.22 * lung_size + 0.02, 0.33 * lung_size)
        hu -= lung * (880.0 + 40.0 * smooth_noise(size, size, rng, 40))
    liver = soft_ellipse(xx, yy, -0.25, 0.05, 0.3 * z + 0.01, 0.25 * z + 0.01)
    hu += liver * 25.0
    spine = soft_ellipse(xx, yy, 0, 0.38, 0.08, 0.08, edge=0.005)
    cortex = spine - soft_ellipse(xx, yy, 0, 0.38, 0.06, 0.06, edge=0.005)
    hu += spine * 250.0 + np.clip(cortex, 0, 1) * 700.0
    aorta = soft_ellipse(xx, yy, 0.08, 0.22, 0.05, 0.05)
    hu += aorta * 160.0  # contrast-enhanced
    table = soft_ellipse(xx, yy, 0, 0.67, 0.8, 0.015, edge=0.003)
    hu += table * 600.0
    hu += rng.normal(0.0, 12.0, hu.shape)
    out = np.clip(np.round(hu), -1024, 2047).astype(np.int16)
    out[xx**2 + yy**2 > 0.98] = -2048  # outside the reconstruction circle
    return out


def ct_unsigned_pixels(rng: np.random.Generator, z: float) -> Array:
    """The same slice stored unsigned (HU + 1024, padding 0), as many scanners write CT."""
    return np.clip(ct_pixels(rng, z).astype(np.int32) + 1024, 0, 4095).astype(np.uint16)


def mr_pixels(rng: np.random.Generator, z: float) -> Array:
    """Axial T2-like head slice, 12 bits stored, Rician noise."""
    size = 256
    xx, yy = grid(size, size)
    head = soft_ellipse(xx, yy, 0, 0, 0.7, 0.85, edge=0.02)
    skull = head - soft_ellipse(xx, yy, 0, 0, 0.64, 0.79)
    brain = soft_ellipse(xx, yy, 0, 0, 0.6 - 0.1 * abs(z - 0.5), 0.75 - 0.1 * abs(z - 0.5))
    signal = 300.0 * np.clip(skull, 0, 1) + brain * (1100.0 + 250.0 * texture(size, size, rng))
    for side in (-1, 1):
        ventricle = soft_ellipse(xx, yy, 0.1 * side, -0.05, 0.06, 0.22 * (1 - abs(z - 0.5)))
        signal += ventricle * 1600.0
    noise_re = rng.normal(0.0, 25.0, signal.shape)
    noise_im = rng.normal(0.0, 25.0, signal.shape)
    out = np.sqrt((signal + noise_re) ** 2 + noise_im**2)
    return np.clip(np.round(out), 0, 4095).astype(np.uint16)


def cr_pixels(rng: np.random.Generator, z: float) -> Array:
    """PA chest radiograph, 2500 rows x 2000 columns, 12 bits stored."""
    rows, cols = 2500, 2000
    xx, yy = grid(rows, cols)
    body = soft_ellipse(xx, yy, 0, 0.15, 0.85, 1.3, edge=0.03)
    value = 3600.0 - body * (1700.0 + 200.0 * texture(rows, cols, rng))
    for side in (-1, 1):
        lung = soft_ellipse(xx, yy, 0.38 * side, -0.05, 0.3, 0.6, edge=0.05)
        value += lung * (900.0 + 150.0 * smooth_noise(rows, cols, rng, 30))
    mediastinum = soft_ellipse(xx, yy, 0.05, 0.2, 0.17, 0.6, edge=0.05)
    value -= mediastinum * 700.0
    for rib in range(10):  # faint rib shadows
        y = -0.55 + rib * 0.11 + 0.01 * z
        value -= 120.0 * np.exp(-(((yy - y - 0.15 * xx**2) / 0.015) ** 2)) * body
    value += rng.normal(0.0, 18.0, value.shape)
    return np.clip(np.round(value), 0, 4095).astype(np.uint16)


def mg_pixels(rng: np.random.Generator, z: float) -> Array:
    """Mammogram (for presentation), 4096 rows x 3328 columns, 12 bits stored."""
    rows, cols = 4096, 3328
    xx, yy = grid(rows, cols)
    breast = soft_ellipse(xx, yy, -1.0, 0.0, 1.55 + 0.1 * z, 1.05, edge=0.02)
    tissue = texture(rows, cols, rng)
    value = 80.0 + breast * (1500.0 + 900.0 * np.clip(tissue + 0.2, 0, None))
    value += rng.normal(0.0, 14.0, value.shape) * (0.3 + breast)
    return np.clip(np.round(value), 0, 4095).astype(np.uint16)


def us_gray(rng: np.random.Generator, z: float, rows: int = 480, cols: int = 640) -> Array:
    """B-mode sector: smooth echogenic structures times Rayleigh speckle, 0 outside."""
    xx, yy = grid(rows, cols)
    apex_y = -0.72
    radius = np.sqrt(xx**2 + (yy - apex_y) ** 2)
    angle = np.arctan2(xx, yy - apex_y)
    sector = (np.abs(angle) < 0.62) & (radius > 0.08) & (radius < 1.38)
    echo = 90.0 + 45.0 * texture(rows, cols, rng)
    vessel = soft_ellipse(xx, yy, 0.1 + 0.05 * z, 0.1, 0.18, 0.08, edge=0.02)
    echo *= 1.0 - 0.8 * vessel
    echo += 120.0 * np.exp(-(((yy - 0.42 - 0.08 * np.sin(3 * xx + z)) / 0.02) ** 2))  # fascia
    speckle = rng.rayleigh(0.8, (rows, cols))
    depth_gain = np.clip(1.15 - 0.35 * radius, 0.4, 1.2)
    out = np.clip(echo * speckle * depth_gain, 0, 255) * sector
    return np.round(out).astype(np.uint8)


def us_rgb_pixels(rng: np.random.Generator, z: float) -> Array:
    """Colour ultrasound frame: grey B-mode in RGB plus a colour-Doppler box."""
    gray = us_gray(rng, z)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    xx, yy = grid(*gray.shape)
    flow = soft_ellipse(xx, yy, 0.1, 0.1, 0.16, 0.06, edge=0.02)
    red = flow * (150 + 80 * smooth_noise(*gray.shape, rng, 12))
    mask = flow > 0.5
    rgb[mask, 0] = np.clip(red[mask], 0, 255).astype(np.uint8)
    rgb[mask, 1] = 20
    rgb[mask, 2] = np.clip(255 - red[mask], 0, 255).astype(np.uint8) // 3
    return rgb


def us_cine_pixels(rng: np.random.Generator, z: float) -> Array:
    """30-frame monochrome cine loop, 8 bits."""
    return np.stack([us_gray(rng, z + f / 30.0) for f in range(30)])


# ------------------------------------------------------------------ modality table


@dataclass(frozen=True)
class Modality:
    key: str  # name on the command line
    modality: str
    sop_class: str
    make_pixels: Callable[[np.random.Generator, float], Array]
    bits_stored: int
    signed: bool = False
    photometric: str = "MONOCHROME2"
    description: str = ""


MODALITIES: dict[str, Modality] = {
    m.key: m
    for m in (
        Modality("ct", "CT", CTImageStorage, ct_pixels, 12, signed=True,
                 description="CT 512x512 int16, 12 bits stored"),
        Modality("ct-u", "CT", CTImageStorage, ct_unsigned_pixels, 12,
                 description="CT 512x512 uint16, 12 bits stored, intercept -1024"),
        Modality("mr", "MR", MRImageStorage, mr_pixels, 12, description="MR 256x256 uint16"),
        Modality("cr", "CR", ComputedRadiographyImageStorage, cr_pixels, 12,
                 description="CR 2000x2500 uint16"),
        Modality("mg", "MG", DigitalMammographyXRayImageStorageForPresentation, mg_pixels, 12,
                 description="MG 3328x4096 uint16"),
        Modality("us", "US", UltrasoundImageStorage, us_rgb_pixels, 8, photometric="RGB",
                 description="US 640x480 RGB 8-bit"),
        Modality("us-cine", "US", UltrasoundMultiFrameImageStorage, us_cine_pixels, 8,
                 description="US 30 frames 640x480 mono 8-bit"),
    )
}  # fmt: skip


# ------------------------------------------------------------------ datasets


def uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["dicom-node-benchmarks", CACHE_VERSION, *map(str, parts)])


def base_dataset(mod: Modality, index: int, tag: str) -> Dataset:
    """Patient/study/series/instance attributes shared by every modality."""
    now = datetime.datetime(2024, 5, 14, 9, 30, 0)
    ds = Dataset()
    ds.SOPClassUID = mod.sop_class
    ds.SOPInstanceUID = uid(mod.key, tag, index, "instance")
    ds.StudyInstanceUID = uid(mod.key, tag, "study")
    ds.SeriesInstanceUID = uid(mod.key, tag, "series")
    ds.PatientName = f"BENCH^{mod.key.upper()}"
    ds.PatientID = f"BENCH-{mod.key.upper()}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{mod.key.upper()[:4]}1"
    ds.StudyID = "1"
    ds.SeriesNumber = 1 if tag == "img" else 99
    ds.InstanceNumber = index + 1
    ds.Modality = mod.modality
    ds.Manufacturer = "dicom-node benchmarks"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"Benchmark {mod.description}"
    ds.SeriesDescription = "warm-up" if tag == "warmup" else "timed"
    return ds


def add_pixels(ds: Dataset, mod: Modality, pixels: Array) -> None:
    frames = pixels.shape[0] if pixels.ndim == 3 and mod.photometric != "RGB" else 1
    rows, cols = pixels.shape[-3:-1] if mod.photometric == "RGB" else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if mod.photometric == "RGB" else 1
    ds.PhotometricInterpretation = mod.photometric
    if mod.photometric == "RGB":
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = mod.bits_stored
    ds.HighBit = mod.bits_stored - 1
    ds.PixelRepresentation = 1 if mod.signed else 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"


def add_modality_attributes(ds: Dataset, mod: Modality, z: float, index: int) -> None:
    if mod.key in ("ct", "ct-u"):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = uid(mod.key, "for")
        ds.SliceThickness = "1.25"
        ds.KVP = "120"
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-179.2, -179.2, round(-index * 1.25, 2)]
        ds.RescaleSlope, ds.RescaleType = "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        if mod.signed:
            ds.RescaleIntercept = "0"
            ds.add_new(0x00280120, "SS", -2048)  # PixelPaddingValue
        else:
            ds.RescaleIntercept = "-1024"
            ds.add_new(0x00280120, "US", 0)
    elif mod.key == "mr":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.FrameOfReferenceUID = uid(mod.key, "for")
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = "90", "4000", "3"
        ds.SliceThickness = "4"
        ds.PixelSpacing = ["0.9", "0.9"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-115.2, -115.2, round(index * 4.0 * z, 2)]
    elif mod.key in ("cr", "mg"):
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImagerPixelSpacing = ["0.1", "0.1"]
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
        if mod.key == "mg":
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ViewPosition, ds.ImageLaterality = "CC", "L"
        else:
            ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    else:  # ultrasound
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.LossyImageCompression = "00"


def make_dataset(mod: Modality, index: int, tag: str, total: int) -> Dataset:
    """Image ``index`` of a series of ``total`` slices (the anatomy repeats after that);
    ``tag`` separates warm-up from timed images."""
    rng = np.random.default_rng(_seed(mod.key, tag, index))
    z = (index % total) / max(total - 1, 1)
    ds = base_dataset(mod, index, tag)
    add_modality_attributes(ds, mod, z, index)
    add_pixels(ds, mod, mod.make_pixels(rng, z))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _seed(*parts: object) -> int:
    return int(uid(*parts).rsplit(".", 1)[-1]) % (2**63)


# ------------------------------------------------------------------ cache


def series_dir(mod: Modality) -> Path:
    return DATA_DIR / CACHE_VERSION / mod.key


def ensure_images(mod: Modality, count: int) -> list[Path]:
    """The first ``count`` timed images of ``mod``, generated if not cached yet."""
    return [_ensure(mod, "img", i, SERIES_LENGTH) for i in range(count)]


def ensure_warmup(mod: Modality) -> list[Path]:
    """Images sent before timing starts (own UIDs, own series); never counted."""
    return [_ensure(mod, "warmup", i, WARMUP_COUNT) for i in range(WARMUP_COUNT)]


def _ensure(mod: Modality, tag: str, index: int, total: int) -> Path:
    folder = series_dir(mod)
    path = folder / f"{tag}_{index:05d}.dcm"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    make_dataset(mod, index, tag, total).save_as(partial, enforce_file_format=True)
    partial.rename(path)
    return path
