"""node.codecs: every target syntax on CT, MR, RGB, multi-frame, big endian and junk bits.

Lossless output is checked bit-exact twice: with pydicom and with an independent
decoder (DCMTK for JPEG-LS and RLE, GDCM for JPEG 2000), called by absolute path
because a virtual environment's bin may hold other programs of the same name.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import compress
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import node.codecs.transcode as codecs
from node.codecs import (
    CodecError,
    CompressResult,
    CompressSpec,
    available_encoders,
    check_plugin,
    check_spec,
    compress_dataset,
    to_little_endian,
)
from tests import images

DCMDJPLS = Path("/usr/bin/dcmdjpls")
DCMDRLE = Path("/usr/bin/dcmdrle")
GDCMCONV = Path("/usr/bin/gdcmconv")

LOSSLESS = [JPEGLSLossless, JPEG2000Lossless, RLELossless]
# Attributes a lossless re-encoding may change (PS3.5 8.2, PS3.3 C.7.6.3).
PIXEL_KEYWORDS = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration"}


# --------------------------------------------------------------------------- helpers


def pydicom_file(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return pydicom.dcmread(path)


def stored(ds: Dataset) -> np.ndarray:
    """Stored values as int64, decoded by pydicom; written independently of node.codecs."""
    arr, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, raw=True)
    bits = int(ds.BitsStored)
    values = arr.astype(np.int64) & ((1 << bits) - 1)
    if int(ds.PixelRepresentation) == 1:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    return values


def written(result: CompressResult) -> Dataset:
    """The result as the caller writes it, read back."""
    buffer = BytesIO()
    result.dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def save(ds: Dataset, folder: Path, name: str) -> Path:
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def decode_independently(ds: Dataset, folder: Path) -> Dataset:
    """Decode compressed `ds` with DCMTK or GDCM into a native file and read it."""
    syntax = ds.file_meta.TransferSyntaxUID
    src, out = save(ds, folder, "in.dcm"), folder / "out.dcm"
    if syntax in (JPEGLSLossless, JPEGLSNearLossless):
        cmd = [str(DCMDJPLS), str(src), str(out)]
    elif syntax == RLELossless:
        cmd = [str(DCMDRLE), str(src), str(out)]
    else:
        cmd = [str(GDCMCONV), "--raw", str(src), str(out)]
    if not Path(cmd[0]).exists():
        pytest.skip(f"{cmd[0]} is not installed")
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    decoded = pydicom.dcmread(out)
    assert not decoded.file_meta.TransferSyntaxUID.is_compressed
    return decoded


def non_pixel_elements(ds: Dataset) -> dict:
    # pydicom never writes the retired group lengths (gggg,0000), so skip them too.
    return {
        elem.tag: elem.value
        for elem in ds
        if elem.keyword not in PIXEL_KEYWORDS and elem.tag.group != 0x0002 and elem.tag.element
    }


def spec(syntax: UID, **kwargs) -> CompressSpec:
    return CompressSpec(transfer_syntax=syntax, **kwargs)


def junk_ct() -> Dataset:
    return images.as_read(images.with_junk_high_bits(images.make_ct(32, 48, seed=7)))


def junk_mr() -> Dataset:
    return images.as_read(images.with_junk_high_bits(images.make_mr(32, 32, seed=8), seed=1))


# Inputs, as the node receives them: Part-10 files read with dcmread.
INPUTS: dict[str, Callable[[], Dataset]] = {
    "ct": lambda: images.as_read(images.make_ct(96, 128, seed=1)),
    "mr_small": lambda: pydicom_file("MR_small.dcm"),
    "mr_12bit": lambda: images.as_read(images.make_mr()),
    "rgb": lambda: images.as_read(images.make_rgb()),
    "multiframe": lambda: images.as_read(images.make_multiframe(frames=10)),
    "big_endian_mr": lambda: pydicom_file("MR_small_bigendian.dcm"),
    "big_endian_rgb_planar": lambda: pydicom_file("ExplVR_BigEnd.dcm"),
    "junk_bits_signed": junk_ct,
    "junk_bits_unsigned": junk_mr,
}


@pytest.fixture(scope="module")
def ct512() -> Dataset:
    return images.as_read(images.make_ct())


# --------------------------------------------------------------------------- lossless


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda u: u.name.split()[0] + u[-3:])
@pytest.mark.parametrize("name", list(INPUTS))
def test_lossless_is_bit_exact_and_keeps_everything_else(name: str, syntax: UID) -> None:
    source = INPUTS[name]()
    expected = stored(source)
    before = non_pixel_elements(to_little_endian(source))

    result = compress_dataset(source, spec(syntax))

    assert result.compressed, result.reason
    assert (result.transfer_syntax, result.lossy, result.reason) == (syntax, False, None)
    assert result.encoder in available_encoders(syntax)
    assert result.ratio and result.ratio > 0.5
    out = written(result)
    assert out.file_meta.TransferSyntaxUID == syntax
    assert out.SOPInstanceUID == source.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert "LossyImageCompression" not in out
    np.testing.assert_array_equal(stored(out), expected)
    assert non_pixel_elements(out) == before


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda u: u.name.split()[0] + u[-3:])
@pytest.mark.parametrize("name", ["ct", "rgb", "multiframe", "junk_bits_signed", "big_endian_mr"])
def test_lossless_decodes_bit_exact_with_independent_decoder(
    name: str, syntax: UID, tmp_path: Path
) -> None:
    source = INPUTS[name]()
    result = compress_dataset(source, spec(syntax))
    assert result.compressed, result.reason

    decoded = decode_independently(result.dataset, tmp_path)

    np.testing.assert_array_equal(stored(decoded), stored(source))


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda u: u.name.split()[0] + u[-3:])
def test_512_ct_lossless_with_independent_decoder(
    ct512: Dataset, syntax: UID, tmp_path: Path
) -> None:
    result = compress_dataset(ct512, spec(syntax))
    assert result.compressed and result.ratio > 2, (result.reason, result.ratio)
    np.testing.assert_array_equal(
        stored(decode_independently(result.dataset, tmp_path)), stored(ct512)
    )


def test_multiframe_has_one_fragment_per_frame_and_a_basic_offset_table() -> None:
    result = compress_dataset(INPUTS["multiframe"](), spec(JPEGLSLossless))
    out = written(result)

    elem = out["PixelData"]
    assert elem.VR == "OB" and elem.is_undefined_length
    buffer = BytesIO(out.PixelData)
    offsets = parse_basic_offsets(buffer)
    fragments = list(generate_fragments(buffer))
    assert len(offsets) == len(fragments) == 10
    assert all(len(f) % 2 == 0 for f in fragments)
    assert offsets == [sum(len(f) + 8 for f in fragments[:i]) for i in range(10)]
    assert "ExtendedOffsetTable" not in out


def test_three_column_multiframe_is_not_mistaken_for_colour() -> None:
    source = images.as_read(images.make_multiframe(frames=4, rows=8, cols=3))
    out = written(compress_dataset(source, spec(RLELossless)))
    assert out.SamplesPerPixel == 1
    np.testing.assert_array_equal(stored(out), stored(source))


def test_jpeg_2000_lossless_colour_uses_the_reversible_transform() -> None:
    result = compress_dataset(INPUTS["rgb"](), spec(JPEG2000Lossless))
    assert result.dataset.PhotometricInterpretation == "YBR_RCT"
    assert result.dataset.PlanarConfiguration == 0


def test_planar_colour_input_becomes_colour_by_pixel() -> None:
    source = INPUTS["big_endian_rgb_planar"]()
    assert source.PlanarConfiguration == 1
    out = written(compress_dataset(source, spec(JPEGLSLossless)))
    assert out.PlanarConfiguration == 0
    np.testing.assert_array_equal(stored(out), stored(source))


def test_verify_lossless_accepts_good_output() -> None:
    result = compress_dataset(INPUTS["ct"](), spec(JPEG2000Lossless, verify_lossless=True))
    assert result.compressed, result.reason


def test_named_plugin_is_used() -> None:
    source = images.as_read(images.make_ct(16, 16))
    for plugin in available_encoders(RLELossless):
        result = compress_dataset(source, spec(RLELossless, plugin=plugin))
        assert result.encoder == plugin
        np.testing.assert_array_equal(stored(written(result)), stored(source))


# --------------------------------------------------------------------------- lossy


def assert_lossy_attributes(out: Dataset, source: Dataset, method: str) -> None:
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == method
    assert float(out.LossyImageCompressionRatio) > 1
    assert out.ImageType[0] == "DERIVED"
    assert "compression ratio" in out.DerivationDescription
    code = out.DerivationCodeSequence[-1]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113040", "DCM")
    assert out.SOPInstanceUID != source.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    ref = out.SourceImageSequence[-1]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    purpose = ref.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121320", "DCM")
    assert purpose.CodeMeaning == "Uncompressed predecessor"


@pytest.mark.parametrize("name", ["mr_12bit", "rgb", "multiframe", "mr_small"])
def test_near_lossless_stays_within_max_error(name: str, tmp_path: Path) -> None:
    source = INPUTS[name]()
    result = compress_dataset(source, spec(JPEGLSNearLossless, max_error=3))

    assert (result.compressed, result.lossy) == (True, True), result.notes
    assert result.transfer_syntax == JPEGLSNearLossless
    out = written(result)
    assert_lossy_attributes(out, source, "ISO_14495_1")
    assert float(out.LossyImageCompressionRatio) == pytest.approx(result.ratio, rel=0.01)
    for decoded in (out, decode_independently(out, tmp_path)):
        error = np.abs(stored(decoded) - stored(source))
        assert 0 < error.max() <= 3


def test_near_lossless_on_signed_ct_with_padding_falls_back_to_lossless(
    ct512: Dataset, tmp_path: Path
) -> None:
    # pitfalls.md 5: -2048 padding would come back as +2046/+2047.
    result = compress_dataset(ct512, spec(JPEGLSNearLossless, max_error=2))

    assert result.compressed and not result.lossy
    assert result.transfer_syntax == JPEGLSLossless
    assert any("fell back to JPEG-LS lossless" in n for n in result.notes)
    out = written(result)
    assert out.SOPInstanceUID == ct512.SOPInstanceUID and "LossyImageCompression" not in out
    np.testing.assert_array_equal(stored(out), stored(ct512))
    np.testing.assert_array_equal(stored(decode_independently(out, tmp_path)), stored(ct512))


def test_near_lossless_falls_back_when_the_decoded_error_is_too_large(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(codecs, "_max_abs_error", lambda *args: 99)
    source = INPUTS["mr_12bit"]()

    result = compress_dataset(source, spec(JPEGLSNearLossless, max_error=2))

    assert result.transfer_syntax == JPEGLSLossless and not result.lossy
    assert any("decoded error 99 exceeds max_error 2" in n for n in result.notes)
    out = written(result)
    assert out.SOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(stored(out), stored(source))


def test_near_lossless_zero_error_is_lossless() -> None:
    source = INPUTS["ct"]()
    result = compress_dataset(source, spec(JPEGLSNearLossless, max_error=0))
    assert result.transfer_syntax == JPEGLSNearLossless and not result.lossy
    out = written(result)
    assert out.SOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(stored(out), stored(source))


def test_near_lossless_can_keep_the_instance_uid() -> None:
    source = INPUTS["mr_12bit"]()
    out = written(compress_dataset(source, spec(JPEGLSNearLossless, new_uid_on_lossy=False)))
    assert out.SOPInstanceUID == source.SOPInstanceUID
    assert out.LossyImageCompression == "01" and "SourceImageSequence" not in out


@pytest.mark.parametrize("name", ["ct", "rgb", "multiframe"])
def test_jpeg_2000_lossy_by_ratio(name: str) -> None:
    source = INPUTS[name]()
    result = compress_dataset(source, spec(JPEG2000, compression_ratio=10))

    assert (result.compressed, result.lossy, result.transfer_syntax) == (True, True, JPEG2000)
    assert 5 < result.ratio < 20
    out = written(result)
    assert_lossy_attributes(out, source, "ISO_15444_1")
    if name == "rgb":
        assert out.PhotometricInterpretation == "YBR_ICT"
    assert stored(out).shape == stored(source).shape


def test_jpeg_2000_lossy_by_psnr(tmp_path: Path) -> None:
    source = INPUTS["mr_12bit"]()
    out = written(compress_dataset(source, spec(JPEG2000, psnr=60)))
    assert_lossy_attributes(out, source, "ISO_15444_1")
    decoded = stored(decode_independently(out, tmp_path))
    np.testing.assert_array_equal(decoded, stored(out))


def test_lossy_steps_append_to_existing_values() -> None:
    source = INPUTS["mr_12bit"]()
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = 5
    source.LossyImageCompressionMethod = "ISO_10918_1"
    allowed = spec(JPEG2000, compression_ratio=8, allow_lossy_recompression=True)
    out = written(compress_dataset(source, allowed))
    assert list(out.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_15444_1"]
    assert len(out.LossyImageCompressionRatio) == 2
    assert out.ImageType[1:] == ["PRIMARY", "OTHER"]


# --------------------------------------------------------------------------- other inputs


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", RLELossless),
        ("MR_small_RLE.dcm", JPEG2000Lossless),
        ("MR_small_jp2klossless.dcm", JPEGLSLossless),
        ("SC_rgb_rle_16bit_2frame.dcm", JPEGLSLossless),
        ("examples_jpeg2k.dcm", RLELossless),
    ],
)
def test_compressed_input_is_recompressed_losslessly(name: str, syntax: UID) -> None:
    source = pydicom_file(name)
    result = compress_dataset(source, spec(syntax))
    assert result.compressed, result.reason
    out = written(result)
    assert out.SOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(stored(out), stored(source))


def test_lossy_jpeg_input_stays_marked_lossy() -> None:
    source = pydicom_file("SC_rgb_jpeg_dcmtk.dcm")  # baseline JPEG, YBR_FULL
    result = compress_dataset(source, spec(JPEG2000Lossless))
    out = written(result)
    assert out.LossyImageCompression == "01"
    assert out.PhotometricInterpretation == "YBR_FULL"
    np.testing.assert_array_equal(stored(out), stored(source))


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "examples_jpeg2k.dcm"],
)
def test_uncompressed_target_decompresses(name: str) -> None:
    source = pydicom_file(name)
    result = compress_dataset(source, spec(ExplicitVRLittleEndian))
    out = written(result)
    assert result.reason is None and not result.compressed
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not out["PixelData"].is_undefined_length
    np.testing.assert_array_equal(stored(out), stored(source))


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
        ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
        ("SC_rgb_small_odd_big_endian.dcm", ExplicitVRBigEndian),
    ],
)
def test_uncompressed_target_converts_native_syntaxes(name: str, syntax: UID) -> None:
    source = pydicom_file(name)
    assert source.file_meta.TransferSyntaxUID == syntax
    out = written(compress_dataset(source, spec(ExplicitVRLittleEndian)))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(stored(out), stored(source))


def test_big_endian_matches_its_little_endian_twin() -> None:
    big, little = pydicom_file("MR_small_bigendian.dcm"), pydicom_file("MR_small.dcm")
    out = written(compress_dataset(big, spec(RLELossless)))
    np.testing.assert_array_equal(stored(out), stored(little))
    assert out.SmallestImagePixelValue == little.SmallestImagePixelValue
    assert out.PixelSpacing == little.PixelSpacing


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # rtdose_expb.dcm's own UIDs
@pytest.mark.parametrize(
    ("big", "little"),
    [("liver_expb_1frame.dcm", "liver_1frame.dcm"), ("rtdose_expb.dcm", None)],
)
def test_big_endian_passthrough_becomes_little_endian(big: str, little: str | None) -> None:
    source = pydicom_file(big)  # 1-bit SEG-like data; 32-bit dose: no JPEG-LS profile
    result = compress_dataset(source, spec(JPEGLSLossless))
    assert not result.compressed and result.reason
    out = written(result)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    reference = pydicom_file(little) if little else source
    np.testing.assert_array_equal(out.pixel_array, reference.pixel_array)


def test_to_little_endian_leaves_little_endian_alone() -> None:
    ds = pydicom_file("MR_small.dcm")
    assert to_little_endian(ds) is ds


# --------------------------------------------------------------------------- pass-through


def test_same_syntax_passes_through_untouched() -> None:
    source = pydicom_file("MR_small_RLE.dcm")
    result = compress_dataset(source, spec(RLELossless))
    assert result.dataset is source
    assert (result.compressed, result.reason) == (False, "already in target syntax")


def test_sr_passes_through_with_reason() -> None:
    source = images.as_read(images.make_sr())
    result = compress_dataset(source, spec(JPEGLSLossless))
    assert result.dataset is source and not result.compressed
    assert "no Pixel Data" in result.reason
    assert written(result).SOPInstanceUID == source.SOPInstanceUID


def float_image() -> Dataset:
    ds = images.make_mr(8, 8)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.ones((8, 8), dtype="<f4").tobytes()
    return images.as_read(ds)


def overlay_in_pixel_bits() -> Dataset:
    ds = images.make_mr(8, 8)
    ds.add_new(0x60000010, "US", 8)  # Overlay Rows, but no Overlay Data: bits in pixels
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000102, "US", 3)  # inside Bits Stored 12: cannot be separated
    return images.as_read(ds)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (float_image, "float pixel data"),
        (lambda: pydicom_file("liver_1frame.dcm"), "Bits Allocated 1"),
        (lambda: pydicom_file("JPEG-lossy.dcm"), "already lossy compressed"),
        (lambda: pydicom_file("examples_palette.dcm"), "cannot hold PALETTE COLOR"),
        (overlay_in_pixel_bits, "not above Bits Stored"),
    ],
)
def test_unsupported_pixel_data_passes_through(make: Callable[[], Dataset], reason: str) -> None:
    source = make()
    # Palette colour is fine for lossless syntaxes; near-lossless has no profile for it.
    result = compress_dataset(source, spec(JPEGLSNearLossless, max_error=2))
    assert not result.compressed and reason in result.reason
    assert "\n" not in result.reason
    written(result)


def test_missing_transfer_syntax_passes_through() -> None:
    source = images.make_mr(8, 8)
    del source.file_meta.TransferSyntaxUID
    result = compress_dataset(source, spec(RLELossless))
    assert result.dataset is source and "no Transfer Syntax UID" in result.reason


def test_encoder_exception_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(codecs, "compress", broken)
    source = INPUTS["ct"]()
    result = compress_dataset(source, spec(RLELossless))
    assert result.dataset is source and not result.compressed
    assert "boom second line" in result.reason


def test_input_dataset_is_not_modified() -> None:
    source = INPUTS["mr_12bit"]()
    pixel_data, uid = source.PixelData, source.SOPInstanceUID
    compress_dataset(source, spec(JPEG2000, compression_ratio=5))
    assert source.PixelData is pixel_data and source.SOPInstanceUID == uid
    assert source.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "LossyImageCompression" not in source


def test_stale_extended_offset_table_is_removed() -> None:
    source = INPUTS["multiframe"]()
    compress(source, RLELossless, encapsulate_ext=True, generate_instance_uid=False)
    source = images.as_read(source)
    assert "ExtendedOffsetTable" in source
    out = written(compress_dataset(source, spec(JPEGLSLossless)))
    assert "ExtendedOffsetTable" not in out and "ExtendedOffsetTableLengths" not in out
    np.testing.assert_array_equal(stored(out), stored(source))


def test_jpeg_ls_precision_is_bits_stored_so_signed_ct_decodes_with_its_sign() -> None:
    # Coded as its 12-bit pattern with P = 16 (what imagecodecs' jpegls_encode would
    # write), this image decodes in pydicom with -2048 as +2048: the node codes P = Bits
    # Stored through CharLS's C API.
    source = INPUTS["ct"]()
    assert source.PixelRepresentation == 1 and source.BitsStored == 12
    result = compress_dataset(source, spec(JPEGLSLossless))
    assert result.encoder == "imagecodecs", result.encoder
    out = written(result)
    codestream = next(generate_fragments(_after_bot(out.PixelData)))
    sof55 = codestream.index(b"\xff\xf7")
    assert codestream[sof55 + 4] == 12  # P
    assert out.pixel_array.min() == -2048
    np.testing.assert_array_equal(out.pixel_array, source.pixel_array)


# --------------------------------------------------------------------------- config


def test_available_encoders_are_ranked_fastest_first() -> None:
    rle = available_encoders(RLELossless)
    assert rle[-1] == "pydicom" and "pylibjpeg" in rle
    assert available_encoders(JPEGLSLossless) == ["imagecodecs", "pyjpegls"]
    assert available_encoders(HTJ2KLossless) == ["imagecodecs"]
    assert available_encoders(ExplicitVRLittleEndian) == []
    assert available_encoders(DeflatedExplicitVRLittleEndian) == []


def test_check_plugin_messages() -> None:
    assert check_plugin(RLELossless, None) is None
    assert check_plugin(RLELossless, "pylibjpeg") is None
    assert "unknown encoder plugin 'nope'" in check_plugin(RLELossless, "nope")
    assert "known plugins: pylibjpeg" in check_plugin(JPEG2000, "gdcm")
    assert "without an encoder" in check_plugin(ExplicitVRLittleEndian, "pydicom")


def test_check_plugin_names_missing_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = pydicom.pixels.get_encoder(RLELossless)
    monkeypatch.setitem(encoder._unavailable, "fake", ("fakelib>=9",))
    message = check_plugin(RLELossless, "fake")
    assert "not installed" in message and "fakelib>=9" in message


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (spec(JPEG2000), "exactly one of compression_ratio or psnr"),
        (spec(JPEG2000, compression_ratio=10, psnr=40), "exactly one"),
        (spec(JPEG2000Lossless, compression_ratio=10), "applies only to jpeg-2000"),
        (spec(RLELossless, max_error=2), "applies only to jpeg-ls-near-lossless"),
        (spec(JPEGLSNearLossless, max_error=300), "max_error must be"),
        (spec(UID("1.2.840.10008.1.2.4.51")), "not one the node can write"),
        (spec(HTJ2K), "htj2k needs exactly one"),
        (spec(JPEGBaseline8Bit, quality=0), "quality must be"),
        (spec(RLELossless, quality=50), "quality applies only to jpeg-baseline"),
        (spec(RLELossless, plugin="nope"), "unknown encoder plugin"),
    ],
)
def test_bad_specs_raise_codec_error(bad: CompressSpec, message: str) -> None:
    assert message in check_spec(bad)
    with pytest.raises(CodecError, match=message):
        compress_dataset(INPUTS["mr_12bit"](), bad)


# --------------------------------------------------------------------------- issue 4


def test_jpeg_lossy_input_recompresses_losslessly_but_not_lossy() -> None:
    source = pydicom_file("SC_rgb_jpeg_dcmtk.dcm")  # baseline JPEG
    refused = compress_dataset(source, spec(HTJ2K, compression_ratio=10))
    assert not refused.compressed and "allow_lossy_recompression" in refused.reason
    assert refused.dataset is source
    allowed = compress_dataset(
        source, spec(HTJ2K, compression_ratio=10, allow_lossy_recompression=True)
    )
    assert allowed.compressed and allowed.lossy
    assert list(written(allowed).LossyImageCompressionMethod)[-1] == "ISO_15444_15"


def test_verify_mismatch_keeps_the_original_and_logs_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from node.codecs import verify

    real = verify.compare

    def off_by_one(*args, **kwargs):
        check = real(*args, **kwargs)
        return verify.Check(check.decoder, check.independent, check.max_error + 1)

    monkeypatch.setattr(verify, "compare", off_by_one)
    source = INPUTS["ct"]()
    result = compress_dataset(source, spec(HTJ2KLossless, verify_lossless=True))
    assert result.dataset is source and not result.compressed
    assert "does not decode to the input" in result.reason
    assert any(
        r.levelname == "ERROR" and "verification failed" in r.message for r in caplog.records
    )


@pytest.mark.parametrize(
    ("syntax", "decoder"),
    [
        (HTJ2KLossless, "pydicom/pylibjpeg"),  # OpenJPEG for OpenJPH output
        (JPEGLosslessSV1, "imagecodecs.jpegsof3_decode"),  # not libjpeg-turbo
        (RLELossless, "pydicom/pydicom"),  # gdcm writes, pydicom reads
    ],
)
def test_verify_uses_an_independent_decoder(syntax: UID, decoder: str) -> None:
    result = compress_dataset(INPUTS["junk_bits_signed"](), spec(syntax, verify_lossless=True))
    assert result.compressed, result.reason
    assert any(f"verified with {decoder} (independent of" in n for n in result.notes), result.notes


def test_htj2k_rpcl_codestream_follows_ps3_5() -> None:
    ds = images.as_read(images.make_ct(300, 520))
    out = written(compress_dataset(ds, spec(UID("1.2.840.10008.1.2.4.202"))))
    stream = next(generate_fragments(_after_bot(out.PixelData)))
    cod = stream[stream.index(b"\xff\x52") + 4 :]
    assert cod[1] == 2  # progression order RPCL
    assert 520 / 2 ** cod[5] <= 64  # decompositions: base resolution <= 64
    assert b"\xff\x55" in stream[: stream.index(b"\xff\x90")]  # TLM in the main header


def _after_bot(pixel_data: bytes) -> BytesIO:
    buffer = BytesIO(pixel_data)
    parse_basic_offsets(buffer)
    return buffer


def test_htj2k_lossy_widens_bits_stored_and_keeps_within_error() -> None:
    source = INPUTS["ct"]()
    result = compress_dataset(source, spec(HTJ2K, psnr=55))
    out = written(result)
    assert (out.BitsStored, out.HighBit) == (16, 15)
    assert out.LossyImageCompressionMethod == "ISO_15444_15"
    error = np.abs(stored(out) - stored(source)).max()
    assert 0 < error <= int(result.notes[-1].rsplit(" ", 1)[1])


def test_jpeg_baseline_colour_is_ybr_full_422() -> None:
    out = written(compress_dataset(INPUTS["rgb"](), spec(JPEGBaseline8Bit, quality=80)))
    assert out.PhotometricInterpretation == "YBR_FULL_422"
    assert out.LossyImageCompressionMethod == "ISO_10918_1"
    assert "quality 80" in out.DerivationDescription


def test_deflated_writes_the_whole_data_set_deflated() -> None:
    source = images.as_read(images.make_sr())
    result = compress_dataset(source, spec(DeflatedExplicitVRLittleEndian))
    assert result.compressed and result.transfer_syntax == DeflatedExplicitVRLittleEndian
    out = written(result)
    assert out.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert out.ContentSequence[0].TextValue == "No abnormality detected."
    compressed_input = compress_dataset(
        pydicom_file("MR_small_RLE.dcm"), spec(DeflatedExplicitVRLittleEndian)
    )
    assert not compressed_input.compressed and "native pixel data only" in compressed_input.reason


def test_gdcm_rle_is_not_called_where_it_aborts() -> None:
    # python-gdcm's RLE encoder kills the process (SIGABRT) on odd pixel counts.
    source = images.as_read(images.make_odd(33, 17))
    result = compress_dataset(source, spec(RLELossless, plugin="gdcm"))
    assert not result.compressed and "odd pixel count" in result.reason
    assert compress_dataset(source, spec(RLELossless)).encoder == "pylibjpeg"


def test_config_accepts_the_new_compress_keys() -> None:
    from node.config import _parse_compress

    parsed = _parse_compress(
        {
            "transfer_syntax": "jpeg-baseline",
            "quality": 75,
            "verify": True,
            "allow_lossy_recompression": True,
        },
        "rules[0].compress",
        True,
    )
    assert (parsed.quality, parsed.verify_lossless, parsed.allow_lossy_recompression) == (
        75,
        True,
        True,
    )
    from node.errors import ConfigError

    with pytest.raises(ConfigError, match="quality: not a parameter of htj2k-lossless"):
        _parse_compress({"transfer_syntax": "htj2k-lossless", "quality": 5}, "c", True)


def test_codecs_command_lists_every_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    assert main(["codecs", "--seconds", "0.01"]) == 0
    table = capsys.readouterr().out
    for name in (
        "htj2k-lossless",
        "htj2k-lossless-rpcl",
        "jpeg-lossless",
        "jpeg-baseline",
        "deflated",
    ):
        assert name in table
    assert "bit-exact, pydicom/pylibjpeg (independent of openjph)" in table


def test_jpeg_baseline_works_without_pydicom_jpeg_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    # python-gdcm is an optional extra: without it imagecodecs checks the output.
    from node.codecs import verify

    monkeypatch.setattr(verify, "_available", lambda uid, d: d.pydicom_plugin is None)
    result = compress_dataset(INPUTS["rgb"](), spec(JPEGBaseline8Bit, verify_lossless=True))
    assert result.compressed and result.lossy, result.reason
