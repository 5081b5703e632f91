"""The worker's shortcuts give exactly what the pydicom calls they replace give.

``encode_part10`` copies elements still as read instead of re-encoding them,
``decode_stored`` views plain native pixel data without pydicom's decoder, and
``encapsulate_with_offsets`` copies codestreams once; all are compared here with
pydicom on its own test files and the node's generated images.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from node.codecs import CompressSpec, compress_dataset
from node.codecs.endian import to_little_endian
from node.codecs.frames import encapsulate_with_offsets
from node.codecs.pixels import _plain_native_array
from node.workers import DEFER_BYTES, _raw_elements_reusable, encode_part10
from tests import images

TARGETS = ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.1"]
# The files bundled with pydicom only: get_testdata_files() would try to download the
# rest of pydicom's test data, which CI machines cannot reach.
FILES = sorted(str(p) for p in (Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def _read(path: str) -> pydicom.Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
        except Exception:
            return None
    return ds if "SOPClassUID" in ds and "TransferSyntaxUID" in ds.file_meta else None


@pytest.mark.parametrize("target", TARGETS)
def test_part10_output_is_byte_identical_to_pydicoms(target) -> None:
    compared = copied = 0
    for path in FILES:
        ds = _read(path)
        if ds is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compress_dataset(ds, CompressSpec(UID(target)), copy_input=False).dataset
            ours = encode_part10(out)  # first: it sets the node's implementation identity
            expected = BytesIO()
            out.save_as(expected, enforce_file_format=True)
            assert ours == expected.getvalue(), path
        compared += 1
        copied += _raw_elements_reusable(out)
    assert compared > 40 and copied > 30  # the shortcut was taken, not only the fallback


def _datasets() -> list[tuple[str, pydicom.Dataset]]:
    out = []
    for path in FILES:
        ds = _read(path)
        if ds is not None and "PixelData" in ds:
            out.append((path.rsplit("/", 1)[-1], ds))
    out += [("ct", images.make_ct(rows=64, cols=48, seed=3))]
    out += [("rgb", images.make_rgb(rows=31, cols=17, seed=4))]
    out += [("multiframe", images.make_multiframe(frames=3, rows=32, cols=32, seed=5))]
    out += [("signed", images.make_signed16(seed=6)), ("uint32", images.make_uint32())]
    out += [("us cine", images.make_us_cine(frames=4, seed=7))]
    return out


def test_plain_native_arrays_equal_pydicoms_decoder() -> None:
    viewed = 0
    for name, ds in _datasets():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = to_little_endian(ds)
            except Exception:
                continue
            syntax = UID(ds.file_meta.TransferSyntaxUID)
            try:
                plain = _plain_native_array(ds, syntax)
            except (AttributeError, TypeError):
                continue
            if plain is None:
                continue
            expected, _ = get_decoder(syntax).as_array(ds, raw=True)
        assert plain.shape == expected.shape, name
        assert plain.dtype == expected.dtype, name
        assert np.array_equal(plain, expected), name
        viewed += 1
    assert viewed >= 15


def test_the_allocator_setting_takes_on_glibc() -> None:
    from node.allocator import keep_large_buffers

    # CI and the supported platforms run glibc; elsewhere it would return False.
    assert keep_large_buffers() is True


@pytest.mark.parametrize(
    ("raw", "bits", "signed", "expected"),
    [
        ([0, 4095, 17], 12, False, [0, 4095, 17]),  # clean: the input itself
        ([0xF000 | 5, 4095], 12, False, [5, 4095]),  # junk above Bits Stored: masked
        ([-2048, 2047, -1], 12, True, [-2048, 2047, -1]),  # clean signed
        ([0x0800, 0x7FFF], 12, True, [-2048, -1]),  # sign bit 11 set, high bits not: extended
    ],
)
def test_stored_values_copy_only_what_needs_cleaning(raw, bits, signed, expected) -> None:
    from node.codecs.pixels import stored_values

    arr = np.array(raw, dtype=np.int16 if signed and min(raw) < 0 else np.uint16)
    if signed:
        arr = arr.view(np.int16)
    out = stored_values(arr, bits, signed)
    assert out.tolist() == expected
    clean = arr.tolist() == expected
    assert np.shares_memory(out, arr) == clean


@pytest.mark.parametrize("lengths", [[1], [2], [7, 8], [3, 2, 10, 11, 1]])
def test_encapsulation_is_byte_identical_to_pydicoms(lengths: list[int]) -> None:
    rng = np.random.default_rng(len(lengths))
    frames = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    assert encapsulate_with_offsets(frames) == encapsulate(frames, has_bot=True)


def test_odd_length_encapsulated_pixel_data_is_written_as_pydicom_writes_it() -> None:
    ds = images.as_read(images.make_ct(8, 8))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.80")
    ds.PixelData = encapsulate([b"\xff\xd8abc\xff\xd9"]) + b"\x00"  # odd: pydicom pads it
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ours = encode_part10(ds)
    expected = BytesIO()
    ds.save_as(expected, enforce_file_format=True)
    assert ours == expected.getvalue()
