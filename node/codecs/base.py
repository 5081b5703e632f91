"""The small interface every codec family sits behind.

A rule's ``compress:`` section becomes a :class:`CompressSpec`; the pipeline hands
it with a dataset to :func:`node.codecs.compress_dataset` and gets a
:class:`CompressResult` back. Nothing in here touches the network or the spool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID


def is_rust_panic(exc: BaseException) -> bool:
    """True for a panic in a Rust extension (pylibjpeg-rle, ...).

    pyo3 raises it as ``pyo3_runtime.PanicException``, which derives from
    BaseException (not Exception), and every extension has its own class of that name.
    """
    kind = type(exc)
    return kind.__name__ == "PanicException" and kind.__module__ == "pyo3_runtime"


def reraise_unless_codec_failure(exc: BaseException) -> None:
    """Re-raise ``exc`` unless a codec could have raised it on bad data.

    For ``except BaseException`` around codec calls: an Exception or a Rust panic
    means "this data cannot be coded"; KeyboardInterrupt and SystemExit go on.
    """
    if not (isinstance(exc, Exception) or is_rust_panic(exc)):
        raise exc


class CodecError(Exception):
    """An encoder failed or produced output that does not decode to the input."""


@dataclass(frozen=True)
class SyntaxInfo:
    """A transfer syntax the node can write, as named in configs."""

    name: str
    uid: UID
    lossy: bool
    # Parameters a rule may set for this syntax (besides ``plugin``).
    parameters: tuple[str, ...] = ()
    # Lossy Image Compression Method (0028,2114) defined term, for lossy syntaxes.
    method: str | None = None


@dataclass(frozen=True)
class CompressSpec:
    """What a rule asks for: the target syntax and its encoder parameters."""

    transfer_syntax: UID
    plugin: str | None = None
    max_error: int | None = None  # JPEG-LS near-lossless NEAR
    compression_ratio: float | None = None  # JPEG 2000 / HTJ2K lossy
    psnr: float | None = None  # JPEG 2000 / HTJ2K lossy
    quality: int | None = None  # JPEG baseline, 1-100
    new_uid_on_lossy: bool = True
    # Config key ``verify``: decode the output with a decoder built on another library
    # than the encoder (where one is installed) and compare it with the input: bit-exact
    # for lossless, within max_error for near-lossless. A mismatch keeps the original.
    # Costs about one decode per instance.
    verify_lossless: bool = field(default=False, metadata={"key": "verify"})
    # Lossy coding of data that was already lossy compressed piles up artefacts, so it
    # is refused (the instance passes through) unless the rule opts in.
    allow_lossy_recompression: bool = False


@dataclass
class CompressResult:
    """The dataset to write (file_meta set) and what happened to it."""

    dataset: Dataset
    transfer_syntax: UID
    compressed: bool
    lossy: bool = False
    # Why the instance was passed through instead of compressed (None if compressed).
    reason: str | None = None
    ratio: float | None = None
    encoder: str | None = None
    notes: list[str] = field(default_factory=list)
