"""Every image a modality may send, in every syntax the node writes.

Each (image, syntax) pair must end one of three ways, and never in an exception:

* lossless output: the stored values come back bit-exact;
* lossy output: within the error the node declares in its notes (``max abs error N``)
  or, for JPEG baseline, which declares no bound, above 30 dB PSNR;
* pass-through: the instance is unchanged (big endian turned little) with a reason.

Every written file is decoded by a decoder that shares no code with its writer:
DCMTK for JPEG, JPEG-LS and RLE, GDCM for JPEG 2000 (its OpenJPEG build), OpenJPEG (pydicom with
pylibjpeg-openjpeg) for the node's OpenJPH HTJ2K, DCMTK's dcmconv for the native
syntaxes pydicom writes. Images: pydicom's bundled test files (only those shipped in
the wheel, so no download) and generated ones.
"""

from __future__ import annotations

import re
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space, get_decoder
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

from node.codecs import CompressResult, CompressSpec, compress_dataset, to_little_endian
from tests import images
from tests.test_codecs import stored

BIN = Path("/usr/bin")
NEAR = 2

# name -> spec; `verify` on everywhere, so the node's own check runs as well.
SPECS: dict[str, CompressSpec] = {
    "htj2k-lossless": CompressSpec(HTJ2KLossless, verify_lossless=True),
    "htj2k-rpcl": CompressSpec(HTJ2KLosslessRPCL, verify_lossless=True),
    "htj2k": CompressSpec(HTJ2K, compression_ratio=8, verify_lossless=True),
    "jpeg-ls": CompressSpec(JPEGLSLossless, verify_lossless=True),
    "jpeg-ls-near": CompressSpec(JPEGLSNearLossless, max_error=NEAR, verify_lossless=True),
    "j2k-lossless": CompressSpec(JPEG2000Lossless, verify_lossless=True),
    "j2k": CompressSpec(JPEG2000, compression_ratio=8, verify_lossless=True),
    "jpeg-lossless": CompressSpec(JPEGLosslessSV1, verify_lossless=True),
    "jpeg-baseline": CompressSpec(JPEGBaseline8Bit, quality=90, verify_lossless=True),
    "rle": CompressSpec(RLELossless, verify_lossless=True),
    "deflated": CompressSpec(DeflatedExplicitVRLittleEndian),
    "uncompressed": CompressSpec(ExplicitVRLittleEndian),
}

# pydicom's bundled files (pydicom.data.get_testdata_files() lists them).
PYDICOM_FILES = [
    "CT_small.dcm",  # signed 16-bit CT
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_16.dcm",  # lossy input
    "693_J2KI.dcm",  # lossy J2K, signed 14-bit
    "JPEG2000.dcm",  # 1024x256 .91
    "SC_rgb_small_odd.dcm",  # 3x3 RGB
    "SC_rgb_small_odd_big_endian.dcm",
    "ExplVR_BigEnd.dcm",  # big endian RGB, planar configuration 1
    "SC_rgb_rle_16bit_2frame.dcm",  # 16-bit RGB, 2 frames
    "SC_rgb_rle_32bit.dcm",  # 32-bit RGB
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless RGB input
    "SC_rgb_jpeg_dcmtk.dcm",  # baseline JPEG, YBR_FULL: lossy input
    "SC_ybr_full_422_uncompressed.dcm",  # native sub-sampled YBR
    "examples_ybr_color.dcm",  # 30-frame YBR_FULL_422 baseline JPEG
    "examples_jpeg2k.dcm",  # YBR_RCT
    "examples_palette.dcm",
    "examples_overlay.dcm",  # overlay already in (60xx,3000)
    "image_dfl.dcm",  # deflated input
    "liver_1frame.dcm",  # 1-bit
    "rtdose.dcm",  # 32-bit, 15 frames
]


def _pydicom(name: str) -> Callable[[], Dataset]:
    def load() -> Dataset:
        path = get_testdata_file(name)
        if path is None:
            pytest.skip(f"pydicom test file {name} is not installed")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some files have odd UIDs on purpose
            return pydicom.dcmread(path)

    return load


def _read(make: Callable[[], Dataset]) -> Callable[[], Dataset]:
    return lambda: images.as_read(make())


GENERATED: dict[str, Callable[[], Dataset]] = {
    "ct_signed_12bit": _read(lambda: images.make_ct(64, 80, seed=3)),
    "ct_junk_high_bits": _read(lambda: images.with_junk_high_bits(images.make_ct(40, 48))),
    "mr_junk_high_bits": _read(lambda: images.with_junk_high_bits(images.make_mr(40, 40))),
    "signed_16bit_full_range": _read(images.make_signed16),
    "rgb_planar_1": _read(lambda: images.with_planar_configuration_1(images.make_rgb(33, 47))),
    "odd_33x17": _read(lambda: images.make_odd(33, 17)),
    "row_1x57": _read(lambda: images.make_odd(1, 57)),
    "column_57x1": _read(lambda: images.make_odd(57, 1)),
    "one_bit": _read(images.make_one_bit),
    "us_cine_100_frames": _read(images.make_us_cine),
    "embedded_overlay": _read(lambda: images.with_embedded_overlay(images.make_mr(24, 24))),
    "uint32": _read(images.make_uint32),
}

IMAGES: dict[str, Callable[[], Dataset]] = {
    **{name.removesuffix(".dcm"): _pydicom(name) for name in PYDICOM_FILES},
    **GENERATED,
}

_cache: dict[str, Dataset] = {}


def source_image(name: str) -> Dataset:
    # Read once; compress_dataset never modifies its input (tested in test_codecs).
    if name not in _cache:
        _cache[name] = IMAGES[name]()
    return _cache[name]


# --------------------------------------------------------------------------- decoding


def independent_decode(path: Path, syntax: UID, folder: Path) -> Dataset:
    """`path` decoded to a native data set by a library other than its writer's."""
    out = folder / "decoded.dcm"
    # In process: HTJ2K is written with OpenJPH and read with OpenJPEG (pylibjpeg);
    # JPEG 2000 is written with pylibjpeg-openjpeg and read with GDCM, in process
    # because gdcmconv refuses to write some inputs (multi-frame SC) back out.
    plugin = {HTJ2KLossless: "pylibjpeg", HTJ2KLosslessRPCL: "pylibjpeg", HTJ2K: "pylibjpeg"}
    plugin |= {JPEG2000Lossless: "gdcm", JPEG2000: "gdcm"}
    if syntax in plugin:
        ds = pydicom.dcmread(path)
        arr, _ = get_decoder(syntax).as_array(ds, raw=True, decoding_plugin=plugin[syntax])
        ds.PixelData = arr.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds
    tool = {
        # +cn: hand back the samples as stored; by default DCMTK converts YBR to RGB.
        JPEGLosslessSV1: ["dcmdjpeg", "+cn"],
        JPEGBaseline8Bit: ["dcmdjpeg"],
        JPEGLSLossless: ["dcmdjpls"],
        JPEGLSNearLossless: ["dcmdjpls"],
        RLELossless: ["dcmdrle"],
        DeflatedExplicitVRLittleEndian: ["dcmconv", "+te"],
        ExplicitVRLittleEndian: ["dcmconv", "+te"],
    }[syntax]
    exe = BIN / tool[0]
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    done = subprocess.run(
        [str(exe), *tool[1:], str(path), str(out)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{tool[0]} cannot decode the output: {done.stderr[-500:]}"
    return pydicom.dcmread(out)


def as_rgb(arr: np.ndarray, pi: str) -> np.ndarray:
    if pi.startswith("YBR_FULL"):
        return convert_color_space(arr, "YBR_FULL", "RGB")
    return arr


def declared_error(result: CompressResult) -> int:
    found = [int(m) for n in result.notes for m in re.findall(r"max abs error (\d+)", n)]
    assert found, f"lossy result declares no error: {result.notes}"
    return found[-1]


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


# --------------------------------------------------------------------------- the matrix


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("syntax", list(SPECS))
@pytest.mark.parametrize("image", list(IMAGES))
def test_matrix(image: str, syntax: str, tmp_path: Path) -> None:
    source = source_image(image)
    spec = SPECS[syntax]

    result = compress_dataset(source, spec)

    path = tmp_path / "out.dcm"
    result.dataset.save_as(path, enforce_file_format=True)
    if result.reason is not None:
        assert not result.compressed and "\n" not in result.reason
        assert_unchanged(source, pydicom.dcmread(path))
        return
    assert result.transfer_syntax in (spec.transfer_syntax, JPEGLSLossless), result.reason
    decoded = independent_decode(path, result.transfer_syntax, tmp_path)
    if "PixelData" not in source:
        return
    if result.lossy:
        assert_within_declared_error(source, decoded, result)
    else:
        np.testing.assert_array_equal(stored(decoded), stored(source))
    if result.transfer_syntax.is_encapsulated:
        assert_overlays_kept(source, pydicom.dcmread(path))


def assert_unchanged(source: Dataset, out: Dataset) -> None:
    little = to_little_endian(source)
    assert out.SOPInstanceUID == source.SOPInstanceUID
    if "PixelData" in little:
        assert out.PixelData == little.PixelData


def assert_within_declared_error(source: Dataset, decoded: Dataset, result: CompressResult) -> None:
    if result.transfer_syntax == JPEGBaseline8Bit:
        # No error bound is declared for JPEG; compare in RGB (DCMTK decodes to RGB).
        want = as_rgb(stored(source), source.PhotometricInterpretation)
        got = as_rgb(stored(decoded), decoded.PhotometricInterpretation)
        assert psnr(got, want, 255) > 30
        return
    limit = declared_error(result)
    if result.transfer_syntax == JPEGLSNearLossless:
        assert limit <= NEAR
    error = np.abs(stored(decoded).astype(np.int64) - stored(source)).max()
    assert error <= limit


def assert_overlays_kept(source: Dataset, out: Dataset) -> None:
    for group in range(0x6000, 0x6020, 2):
        if (group, 0x0010) in source:
            assert (group, 0x3000) in out, f"overlay {group:04X} lost"


def test_embedded_overlay_moves_to_overlay_data() -> None:
    source = source_image("embedded_overlay")
    result = compress_dataset(source, SPECS["htj2k-lossless"])
    assert result.compressed, result.reason
    out = result.dataset
    assert any("moved from pixel bit 15" in n for n in result.notes)
    assert (out[0x60000100].value, out[0x60000102].value) == (1, 0)
    plane = np.unpackbits(np.frombuffer(out[0x60003000].value, np.uint8), bitorder="little")
    plane = plane[: 24 * 24].reshape(24, 24)
    expected = np.zeros((24, 24), np.uint8)
    expected[2:6, 3:9] = 1
    np.testing.assert_array_equal(plane, expected)
    assert out.pixel_array.max() < 1 << 12  # the overlay bits are gone from the pixels


def test_every_frame_is_one_fragment_with_an_offset() -> None:
    from io import BytesIO

    from pydicom.encaps import generate_fragments, parse_basic_offsets

    result = compress_dataset(source_image("us_cine_100_frames"), SPECS["htj2k-lossless"])
    buffer = BytesIO(result.dataset.PixelData)
    offsets = parse_basic_offsets(buffer)
    assert len(offsets) == 100 and len(list(generate_fragments(buffer))) == 100
    assert result.dataset.PhotometricInterpretation == "YBR_RCT"
