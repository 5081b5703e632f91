"""The transcoder: compress (or decompress) one DICOM instance to a rule's syntax.

Entry point: :func:`compress_dataset`. It never raises for a pixel format it cannot
handle and never drops an instance: anything it will not or cannot encode comes back
unchanged with ``compressed=False`` and a one-line ``reason``.

Transfer syntax of an instance that is passed through: the syntax it was received
in, except Explicit VR Big Endian, which becomes Explicit VR Little Endian (retired,
and many receivers no longer accept it). Implicit VR and Deflated stay as they are:
converting them gains nothing and re-encodes private elements whose VR is unknown.

``result.transfer_syntax == spec.transfer_syntax`` tells whether the output is in the
syntax the rule asked for (it can be JPEG-LS Lossless instead of Near-Lossless, see
:func:`_encode_near_lossless`).

Lossy coding of input that is already lossy is refused unless the rule sets
``allow_lossy_recompression``. With ``verify`` (``CompressSpec.verify_lossless``) the
output is decoded by a decoder built on another library than the encoder, where one
is installed, and a mismatch keeps the original (logged as an error).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from io import BytesIO
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import compress
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
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import VR

from node.codecs import frames, verify
from node.codecs.base import (
    CodecError,
    CompressResult,
    CompressSpec,
    SyntaxInfo,
    reraise_unless_codec_failure,
)
from node.codecs.endian import is_big_endian, to_little_endian
from node.codecs.lossy import format_ratio, mark_lossy
from node.codecs.pixels import (
    PixelFormatError,
    Pixels,
    check_encodable,
    decode_stored,
    move_embedded_overlays,
    one_line,
)
from node.codecs.plugins import available_encoders, check_plugin, library_of, node_plugin
from node.codecs.spec import check_spec
from node.codecs.syntaxes import BY_UID, lookup_syntax, profiles

log = logging.getLogger(__name__)

# dcmcjpls' default NEAR, used when a near-lossless rule sets no max_error.
DEFAULT_MAX_ERROR = 2

# Input syntaxes that are lossy whatever their parameters.
_ALWAYS_LOSSY_INPUT = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
# JPEG baseline quality when a rule sets none (libjpeg's scale, 1-100).
DEFAULT_QUALITY = 90
_REVERSIBLE_J2K = frozenset({JPEG2000Lossless, HTJ2KLossless, HTJ2KLosslessRPCL})
_IRREVERSIBLE_J2K = frozenset({JPEG2000, HTJ2K})

# Elements that describe the old encapsulation and must not outlive it.
_OFFSET_TABLE_KEYWORDS = (
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "EncapsulatedPixelDataValueTotalLength",
)


class _EncodeFailed(PixelFormatError):
    """Every candidate encoder raised; the message lists them."""


class VerifyError(PixelFormatError):
    """The output did not decode to the input (within the allowed error)."""


__all__ = [
    "CodecError",
    "CompressResult",
    "CompressSpec",
    "SyntaxInfo",
    "available_encoders",
    "check_plugin",
    "check_spec",
    "compress_dataset",
    "is_big_endian",
    "lookup_syntax",
    "passthrough",
    "to_little_endian",
]


# --------------------------------------------------------------------------- entry


def compress_dataset(ds: Dataset, spec: CompressSpec, *, copy_input: bool = True) -> CompressResult:
    """Encode `ds` as `spec.transfer_syntax`; the input dataset is not modified.

    With ``copy_input=False`` the encoding works on `ds` itself, saving a deep copy
    (about a quarter of the non-codec time for a CT image); `ds` may then be left
    half-changed, so on a pass-through (``result.reason`` set) the caller must use
    a fresh copy of the instance, e.g. by reading its file again.

    Raises CodecError only when `spec` itself is unusable (see :func:`check_spec`).
    """
    problem = check_spec(spec)
    if problem:
        raise CodecError(problem)
    target = UID(spec.transfer_syntax)
    source = _source_syntax(ds)
    if source is None:
        return passthrough(ds, "no Transfer Syntax UID in the file meta information")
    if source == target:
        return passthrough(ds, "already in target syntax")
    try:
        if target not in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            check_encodable(ds)  # before copying: most non-images stop here
            _refuse_lossy_recompression(ds, source, target, spec)
        work = _working_copy(ds) if copy_input else to_little_endian(ds)
        if target == ExplicitVRLittleEndian:
            return _to_explicit_little(work, source)
        if target == DeflatedExplicitVRLittleEndian:
            return _to_deflated(work, source)
        return _transcode(work, source, target, spec)
    except VerifyError as exc:
        log.error("verification failed, instance kept as received: %s", exc)
        return passthrough(ds, str(exc))
    except PixelFormatError as exc:
        return passthrough(ds, str(exc))
    except BaseException as exc:  # an encoder or decoder bug must not lose the instance
        reraise_unless_codec_failure(exc)
        return passthrough(ds, f"codec error: {type(exc).__name__}: {one_line(exc)}")


def passthrough(ds: Dataset, reason: str) -> CompressResult:
    """`ds` as received (big endian turned little), with the reason it was not encoded."""
    try:
        out = to_little_endian(ds)
    except Exception as exc:  # keep the instance even if it cannot be byte-swapped
        out, reason = ds, f"{reason}; left big endian: {one_line(exc)}"
    return CompressResult(
        dataset=out,
        transfer_syntax=_source_syntax(out) or UID(""),
        compressed=False,
        reason=reason,
    )


def _source_syntax(ds: Dataset) -> UID | None:
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return UID(syntax) if syntax else None


def _working_copy(ds: Dataset) -> Dataset:
    # Pixel Data bytes are immutable, so a deep copy shares them instead of
    # duplicating them; the input stays intact for a pass-through.
    little = to_little_endian(ds)
    return copy.deepcopy(ds) if little is ds else little


# --------------------------------------------------------------------------- native


def _to_explicit_little(work: Dataset, source: UID) -> CompressResult:
    """Explicit VR Little Endian output: decompress, or just re-declare native data."""
    notes: list[str] = []
    if source.is_compressed:
        pixels = decode_stored(work, source)
        notes = _note_lossy_input(work, source)
        _set_native_pixels(work, pixels)
    # Native input keeps its pixel bytes as they are, junk high bits included.
    work.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return CompressResult(
        dataset=work,
        transfer_syntax=ExplicitVRLittleEndian,
        compressed=False,
        notes=notes,
    )


def _to_deflated(work: Dataset, source: UID) -> CompressResult:
    """Deflated Explicit VR Little Endian: the whole data set is zlib-deflated on writing.

    Meant for objects without pixel data (SR, KOS, PR, RT plans...) and for native
    images such as 1-bit segmentations that no pixel codec takes. Encapsulated pixel
    data cannot be held by this syntax and is left as received.
    """
    if source.is_compressed:
        raise PixelFormatError(
            f"{DeflatedExplicitVRLittleEndian.name} holds native pixel data only; "
            f"the {source.name} pixel data is kept as received"
        )
    work.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    # pydicom deflates when the data set is written (dcmwrite).
    return CompressResult(
        dataset=work,
        transfer_syntax=DeflatedExplicitVRLittleEndian,
        compressed=True,
        encoder="zlib",
    )


def _set_native_pixels(ds: Dataset, pixels: Pixels) -> None:
    _describe_pixels(ds, pixels, pixels.photometric_interpretation)
    data = pixels.array.astype(pixels.array.dtype.newbyteorder("<"), copy=False).tobytes()
    ds.PixelData = data + b"\x00" * (len(data) % 2)  # values have even length
    elem = ds["PixelData"]
    elem.VR = VR.OW if pixels.bits_allocated > 8 else VR.OB
    elem.is_undefined_length = False


# --------------------------------------------------------------------------- encode


def _transcode(work: Dataset, source: UID, target: UID, spec: CompressSpec) -> CompressResult:
    source = UID(work.file_meta.TransferSyntaxUID)  # big endian is now little
    notes = move_embedded_overlays(work, source)
    pixels = decode_stored(work, source)
    pi = _output_photometric(pixels.photometric_interpretation, target)
    problem = _profile_problem(target, pi, pixels)
    if problem:
        raise PixelFormatError(problem)
    notes += _note_lossy_input(work, source)
    _describe_pixels(work, pixels, pi)

    if target == JPEGLSNearLossless:
        result = _encode_near_lossless(work, pixels, spec)
    elif target == JPEG2000:
        result = _encode_j2k_lossy(work, pixels, spec)
    elif target == HTJ2K:
        result = _encode_htj2k_lossy(work, pixels, spec)
    elif target == JPEGBaseline8Bit:
        result = _encode_jpeg_baseline(work, pixels, spec)
    else:
        encoder = _encode(work, pixels, target, spec.plugin)
        result = _result(work, target, pixels, encoder, lossy=False)
        if spec.verify_lossless:
            result.notes.append(_verify(work, target, pixels, encoder, limit=0))
    result.notes[:0] = notes
    return result


def is_lossy_input(ds: Dataset, source: UID) -> bool:
    """True if `ds` has been lossy compressed at some point (PS3.3 C.7.6.1.1.5)."""
    return source in _ALWAYS_LOSSY_INPUT or ds.get("LossyImageCompression") == "01"


def _refuse_lossy_recompression(ds: Dataset, source: UID, target: UID, spec: CompressSpec) -> None:
    info = BY_UID[str(target)]
    lossless_coding = target == JPEGLSNearLossless and spec.max_error == 0
    if not info.lossy or lossless_coding or spec.allow_lossy_recompression:
        return
    if is_lossy_input(ds, source):
        raise PixelFormatError(
            f"input is already lossy compressed ({source.name}, Lossy Image Compression "
            f"{ds.get('LossyImageCompression', 'absent')}); {info.name} would add a second "
            "lossy step; set allow_lossy_recompression: true to allow it"
        )


def _output_photometric(pi: str, target: UID) -> str:
    # PS3.5 8.2: JPEG 2000 and HTJ2K code RGB much better with their colour
    # transform (reversible RCT, irreversible ICT), which pydicom only applies when
    # the dataset already says YBR_RCT/YBR_ICT. JPEG baseline stores colour as
    # sub-sampled YCbCr. JPEG-LS, JPEG lossless and RLE keep RGB.
    if pi == "RGB" and target in _REVERSIBLE_J2K:
        return "YBR_RCT"
    if pi == "RGB" and target in _IRREVERSIBLE_J2K:
        return "YBR_ICT"
    if pi in ("RGB", "YBR_FULL") and target == JPEGBaseline8Bit:
        return "YBR_FULL_422"
    return pi


def _profile_problem(target: UID, pi: str, pixels: Pixels) -> str | None:
    """Why PS3.5 section 8.2 does not allow this pixel format in `target`, or None."""
    spp = pixels.samples_per_pixel
    signed = int(pixels.signed)
    for p_pi, p_spp, p_signed, p_alloc, p_stored in profiles(target):
        if (
            (pi, spp) == (p_pi, p_spp)
            and signed in p_signed
            and pixels.bits_allocated in p_alloc
            and pixels.bits_stored in p_stored
        ):
            return None
    sign = "signed" if pixels.signed else "unsigned"
    return (
        f"{target.name} cannot hold {pi} {spp}-sample {sign} data with Bits Allocated "
        f"{pixels.bits_allocated}, Bits Stored {pixels.bits_stored} (PS3.5 8.2)"
    )


def _describe_pixels(ds: Dataset, pixels: Pixels, pi: str) -> None:
    """Set the Image Pixel attributes that change with the new pixel data."""
    ds.PhotometricInterpretation = pi
    if pixels.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0  # decoded arrays are colour-by-pixel
    for keyword in _OFFSET_TABLE_KEYWORDS:
        if keyword in ds:
            del ds[keyword]


def _note_lossy_input(ds: Dataset, source: UID) -> list[str]:
    # Lossy Image Compression "shall not be reset" once lossy compression happened;
    # a few senders omit it on baseline JPEG, so record it before re-encoding.
    if source in _ALWAYS_LOSSY_INPUT and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        return [f"input was {source.name}: set Lossy Image Compression to 01"]
    return []


def _encode(ds: Dataset, pixels: Pixels, target: UID, plugin: str | None, **options: Any) -> str:
    """Compress `pixels` into `ds` with `plugin` or the fastest working one; its name."""
    candidates = [plugin] if plugin else available_encoders(target)
    failures: list[str] = []
    for name in candidates:
        for keyword in _OFFSET_TABLE_KEYWORDS:  # a previous attempt may have set them
            if keyword in ds:
                del ds[keyword]
        try:
            # Both paths only touch `ds` once every frame has been encoded, so a
            # failed attempt leaves it as it was.
            own = node_plugin(target, name)
            crash = _known_crash(target, name, pixels)
            if crash:
                raise PixelFormatError(crash)
            if own is not None:
                frames.encode_frames(
                    ds, pixels, target, own.load(), **_node_options(target, options)
                )
            else:
                compress(
                    ds,
                    target,
                    pixels.array,
                    encoding_plugin=name,
                    generate_instance_uid=False,
                    **options,
                )
        except BaseException as exc:
            reraise_unless_codec_failure(exc)
            failures.append(f"{name}: {one_line(exc)}")
            continue
        return name
    raise _EncodeFailed(f"{target.name} encoding failed: {'; '.join(failures)}")


def _known_crash(target: UID, plugin: str, pixels: Pixels) -> str | None:
    """Why `plugin` must not be called for `pixels`: it would abort the process."""
    rows, cols = (
        pixels.array.shape[-2:] if pixels.samples_per_pixel == 1 else pixels.array.shape[-3:-1]
    )
    # python-gdcm 3.2.6's RLE encoder hits a C assertion (SIGABRT, killing the
    # worker) on frames with an odd number of pixels, e.g. 3x3 or 33x17.
    if target == RLELossless and plugin == "gdcm" and rows * cols % 2:
        return f"gdcm aborts on RLE frames with an odd pixel count ({rows}x{cols})"
    return None


def _node_options(target: UID, options: dict[str, Any]) -> dict[str, Any]:
    # The node's frame encoders take their own option names; translate pydicom's.
    if "jls_error" in options:
        return {"near": options["jls_error"]}
    if target == HTJ2KLosslessRPCL:
        return {"rpcl": True, **options}
    return dict(options)


def _encode_near_lossless(ds: Dataset, pixels: Pixels, spec: CompressSpec) -> CompressResult:
    """JPEG-LS near-lossless, verified by decoding; JPEG-LS lossless when unsafe.

    JPEG-LS does not know about sign: it codes the Bits Stored bit pattern, so an
    error of +-NEAR around the pattern's wrap point (-2**(BitsStored-1) and
    2**(BitsStored-1)-1) turns -2048 padding into +2046 (pitfalls.md item 5).
    Signed data is therefore only coded lossy when no value lies within NEAR of
    either end of the range, and every lossy result is decoded and checked.
    """
    near = DEFAULT_MAX_ERROR if spec.max_error is None else spec.max_error
    if near == 0:
        encoder = _encode(ds, pixels, JPEGLSNearLossless, spec.plugin, jls_error=0)
        result = _result(ds, JPEGLSNearLossless, pixels, encoder, lossy=False)
        result.notes.append("max_error 0: near-lossless syntax, lossless coding")
        return result

    unsafe = _signed_wrap_problem(pixels, near)
    if unsafe is None:
        try:
            encoder = _encode(ds, pixels, JPEGLSNearLossless, spec.plugin, jls_error=near)
            error = _output_error(ds, JPEGLSNearLossless, pixels, encoder, spec)
            if error <= near:
                description = (
                    f"Lossy compression with JPEG-LS near-lossless (NEAR={near}), "
                    f"compression ratio {format_ratio(_ratio(ds, pixels))}"
                )
                result = _lossy_result(ds, pixels, encoder, spec, description)
                result.notes.append(f"max abs error {error} (NEAR {near})")
                return result
            unsafe = f"decoded error {error} exceeds max_error {near}"
        except _EncodeFailed as exc:
            unsafe = str(exc)

    encoder = _encode(ds, pixels, JPEGLSLossless, _lossless_plugin(spec.plugin))
    result = _result(ds, JPEGLSLossless, pixels, encoder, lossy=False)
    result.notes.append(f"fell back to JPEG-LS lossless: {unsafe}")
    if spec.verify_lossless:
        result.notes.append(_verify(ds, JPEGLSLossless, pixels, encoder, limit=0))
    return result


def _lossless_plugin(plugin: str | None) -> str | None:
    # The same library codes both JPEG-LS syntaxes; keep the rule's choice if it can.
    return plugin if plugin in available_encoders(JPEGLSLossless) else None


def _signed_wrap_problem(pixels: Pixels, near: int) -> str | None:
    if not pixels.signed:
        return None
    low = -(1 << (pixels.bits_stored - 1))
    high = (1 << (pixels.bits_stored - 1)) - 1
    amin, amax = int(pixels.array.min()), int(pixels.array.max())
    if amin < low + near or amax > high - near:
        return (
            f"signed values {amin}..{amax} come within max_error {near} of the "
            f"Bits Stored {pixels.bits_stored} limits {low}..{high} and would wrap"
        )
    return None


def _encode_j2k_lossy(ds: Dataset, pixels: Pixels, spec: CompressSpec) -> CompressResult:
    if spec.compression_ratio is not None:
        encoder = _encode(ds, pixels, JPEG2000, spec.plugin, j2k_cr=[spec.compression_ratio])
        target_text = f"target ratio {spec.compression_ratio:g}"
    else:
        encoder = _encode(ds, pixels, JPEG2000, spec.plugin, j2k_psnr=[spec.psnr])
        target_text = f"target PSNR {spec.psnr:g} dB"
    # Decode once: a stream that does not decode must never be written.
    error = _output_error(ds, JPEG2000, pixels, encoder, spec)
    description = (
        f"Lossy compression with JPEG 2000 ({target_text}), "
        f"compression ratio {format_ratio(_ratio(ds, pixels))}"
    )
    result = _lossy_result(ds, pixels, encoder, spec, description)
    result.notes.append(f"max abs error {error}")
    return result


def _encode_htj2k_lossy(ds: Dataset, pixels: Pixels, spec: CompressSpec) -> CompressResult:
    """HTJ2K irreversible: OpenJPH has no rate control, so search its quantisation step.

    The step is searched on one frame (the middle one) and used for all frames.
    OpenJPH writes a precision of Bits Allocated, and lossy decoding can overshoot
    the input's range, so Bits Stored becomes Bits Allocated: values such as 4097
    in a 12-bit image must not be masked into 1 by a receiver.
    """
    sample = list(frames.iter_frames(pixels))[frames.frame_count(pixels) // 2]
    if spec.compression_ratio is not None:
        step = frames.htj2k_step_for_ratio(sample, pixels, spec.compression_ratio)
        target_text = f"target ratio {spec.compression_ratio:g}"
    else:
        step = frames.htj2k_step_for_psnr(sample, pixels, float(spec.psnr or 0))
        target_text = f"target PSNR {spec.psnr:g} dB"
    encoder = _encode(ds, pixels, HTJ2K, spec.plugin, step=step)
    notes = []
    if pixels.bits_stored != pixels.bits_allocated:
        ds.BitsStored, ds.HighBit = pixels.bits_allocated, pixels.bits_allocated - 1
        notes.append(
            f"Bits Stored {pixels.bits_stored} -> {pixels.bits_allocated}: the codestream "
            "precision, so decoded values beyond the original range stay intact"
        )
    error = _output_error(ds, HTJ2K, pixels, encoder, spec)
    description = (
        f"Lossy compression with HTJ2K ({target_text}), "
        f"compression ratio {format_ratio(_ratio(ds, pixels))}"
    )
    result = _lossy_result(ds, pixels, encoder, spec, description)
    result.notes.extend([*notes, f"quantisation step {step:.3g}, max abs error {error}"])
    return result


def _encode_jpeg_baseline(ds: Dataset, pixels: Pixels, spec: CompressSpec) -> CompressResult:
    quality = spec.quality or DEFAULT_QUALITY
    encoder = _encode(ds, pixels, JPEGBaseline8Bit, spec.plugin, quality=quality)
    error = _output_error(ds, JPEGBaseline8Bit, pixels, encoder, spec)
    description = (
        f"Lossy compression with JPEG baseline (quality {quality}), "
        f"compression ratio {format_ratio(_ratio(ds, pixels))}"
    )
    result = _lossy_result(ds, pixels, encoder, spec, description)
    result.notes.append(f"max abs error {error}")
    return result


# --------------------------------------------------------------------------- results


def _result(
    ds: Dataset, target: UID, pixels: Pixels, encoder: str, *, lossy: bool
) -> CompressResult:
    return CompressResult(
        dataset=ds,
        transfer_syntax=target,
        compressed=True,
        lossy=lossy,
        ratio=_ratio(ds, pixels),
        encoder=encoder,
    )


def _lossy_result(
    ds: Dataset, pixels: Pixels, encoder: str, spec: CompressSpec, description: str
) -> CompressResult:
    target = UID(ds.file_meta.TransferSyntaxUID)
    result = _result(ds, target, pixels, encoder, lossy=True)
    method = BY_UID[str(target)].method or ""
    result.notes.extend(
        mark_lossy(
            ds,
            method=method,
            ratio=result.ratio or 0.0,
            description=description,
            new_uid=spec.new_uid_on_lossy,
        )
    )
    return result


def _ratio(ds: Dataset, pixels: Pixels) -> float:
    """Uncompressed size over encoded size, as DCMTK computes it."""
    uncompressed = pixels.array.size * pixels.bits_allocated // 8
    return uncompressed / max(1, encoded_length(ds.PixelData))


def encoded_length(pixel_data: bytes) -> int:
    """Total length of the fragments of encapsulated `pixel_data` (no item headers)."""
    buffer = BytesIO(pixel_data)
    parse_basic_offsets(buffer)
    return sum(len(fragment) for fragment in generate_fragments(buffer))


# --------------------------------------------------------------------------- verify


def _decoded_differences(ds: Dataset, target: UID, pixels: Pixels) -> Iterable[np.ndarray]:
    decoded = decode_stored(ds, target)
    if decoded.array.shape != pixels.array.shape:
        raise PixelFormatError(
            f"{target.name} output decodes to shape {decoded.array.shape}, not {pixels.array.shape}"
        )
    wide = np.int64 if pixels.bits_allocated > 16 else np.int32
    # Frame by frame keeps the widened copies small for large multi-frame images.
    for got, want in zip(decoded.array, pixels.array, strict=True):
        yield np.abs(got.astype(wide) - want.astype(wide))


def _max_abs_error(ds: Dataset, target: UID, pixels: Pixels) -> int:
    """Largest error of the output decoded by pydicom's default decoder."""
    if target == JPEGBaseline8Bit:
        return _independent_check(ds, target, pixels, "").max_error
    return max(int(diff.max()) for diff in _decoded_differences(ds, target, pixels))


def _output_error(
    ds: Dataset, target: UID, pixels: Pixels, encoder: str, spec: CompressSpec
) -> int:
    """Largest decoded error of lossy output; by an independent decoder with `verify`."""
    if not spec.verify_lossless:
        return _max_abs_error(ds, target, pixels)
    return _independent_check(ds, target, pixels, library_of(target, encoder)).max_error


def _independent_check(ds: Dataset, target: UID, pixels: Pixels, library: str) -> verify.Check:
    convert = None
    if (
        ds.PhotometricInterpretation == "YBR_FULL_422"
        and pixels.photometric_interpretation == "RGB"
    ):
        # Compare JPEG baseline colour in the colour space it came in.
        def convert(arr: np.ndarray) -> np.ndarray:
            return convert_color_space(arr, "YBR_FULL", "RGB")

    try:
        return verify.compare(ds, target, pixels, library, convert=convert)
    except PixelFormatError as exc:
        raise VerifyError(f"{target.name} output failed verification: {exc}") from exc


def _verify(ds: Dataset, target: UID, pixels: Pixels, encoder: str, *, limit: int) -> str:
    """Check lossless output with the most independent decoder; a note, or VerifyError."""
    library = library_of(target, encoder)
    check = _independent_check(ds, target, pixels, library)
    if check.max_error > limit:
        raise VerifyError(
            f"{target.name} output written by {encoder} does not decode to the input "
            f"with {check.decoder}: max abs error {check.max_error}, allowed {limit}"
        )
    return check.note(library)
