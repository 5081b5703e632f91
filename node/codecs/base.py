"""The small interface every codec family sits behind.

A rule's ``compress:`` section becomes a :class:`CompressSpec`; the pipeline hands
it with a dataset to :func:`node.codecs.compress_dataset` and gets a
:class:`CompressResult` back. Nothing in here touches the network or the spool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID


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
    compression_ratio: float | None = None  # JPEG 2000 lossy
    psnr: float | None = None  # JPEG 2000 lossy
    new_uid_on_lossy: bool = True
    # Decode lossless output once and compare it with the input before accepting it.
    # Costs about one decode per instance; lossy output is always verified.
    verify_lossless: bool = False


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
