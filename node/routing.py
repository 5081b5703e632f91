"""What a worker does with one acknowledged instance: match, compress, hand over.

:func:`prepare_incoming` is the task the pipeline's worker processes run
(:mod:`node.workers` is the process around it): it reads an incoming file, finds its
rule (:mod:`node.rules`), compresses it (:mod:`node.codecs`), and returns the writing
that is left, which hands the result to every destination of the rule (a type's
immediate delivery, or its outbox). Runs in worker processes only: pixel work stays
out of the network process.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from node.admission import Refusal, deflated_file_refusal
from node.codecs.base import CompressResult
from node.codecs.transcode import compress_dataset, passthrough
from node.config import Config, Rule
from node.destinations import CannotDeliver, type_of
from node.fsutil import is_permanent, link_or_copy_durably, makedirs_durably, write_durably
from node.outbox import Failure, ItemState, Outbox
from node.outcome import Outcome, Status
from node.part10 import part10_chunks
from node.rules import Origin, first_match
from node.spool import Spool
from node.workers import Prepared

# Values larger than this are read from the file only when a codec asks for them.
DEFER_BYTES = 64 * 1024


def prepare_incoming(config: Config, path_text: str) -> Outcome | Prepared:
    """Read, route and compress one file of ``incoming/``; what is left is writing it.

    Returns the outcome itself when there is nothing to write (the file was gone, is
    unreadable, or no rule matched it).
    """
    started = time.perf_counter()
    path = Path(path_text)
    spool = Spool(config.node.spool)
    outcome = Outcome(incoming=path.name, status=Status.DELIVERED, bytes_in=_size(path))
    if not path.exists():
        outcome.status = Status.GONE
        return outcome
    refusal = _deflate_refusal(path, config.node.max_dataset_size)
    if refusal is not None:
        reason = f"not read: {refusal.comment}"
        spool.keep_aside(path, spool.quarantine, reason)
        outcome.status, outcome.reason = Status.QUARANTINED, reason
        return outcome
    try:
        # Large values (Pixel Data) are read only if a codec asks for them.
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
        ds.SOPInstanceUID  # noqa: B018 - a data set without it cannot be routed or stored
    except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError, KeyError) as exc:
        reason = f"cannot be read as DICOM: {type(exc).__name__}: {exc}"
        spool.keep_aside(path, spool.quarantine, reason)
        outcome.status, outcome.reason = Status.QUARANTINED, reason
        return outcome
    outcome.sop_instance_uid = str(ds.SOPInstanceUID)
    origin = Origin.from_file_meta(ds.file_meta)
    rule = first_match(config.rules, ds, origin)
    if rule is None:
        reason = (
            f"no rule matched (Modality={ds.get('Modality', '')!r}, "
            f"calling AE {origin.calling_ae_title!r}, peer {origin.peer_address})"
        )
        spool.keep_aside(path, spool.unrouted, reason)
        outcome.status, outcome.reason = Status.UNROUTED, reason
        return outcome
    outcome.rule = rule.name
    if rule.compress is None:
        # Sent as received: the spool file is already a valid Part 10 file, so it is
        # linked (or copied) to the destinations as it is, without re-encoding.
        outcome.transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        return Prepared(
            outcome,
            lambda: _hand_over(config, spool, rule, ds, path, outcome, received=True),
            started,
        )
    result = _apply_rule(rule, ds, path)
    if result is None:  # not compressed, and written as received
        outcome.transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        return Prepared(
            outcome,
            lambda: _hand_over(config, spool, rule, ds, path, outcome, received=True),
            started,
        )
    outcome.transfer_syntax = str(result.transfer_syntax)
    outcome.compressed, outcome.lossy = result.compressed, result.lossy
    outcome.reason, outcome.notes = result.reason, list(result.notes)
    outcome.sop_instance_uid = str(result.dataset.SOPInstanceUID)
    return Prepared(
        outcome, lambda: _hand_over(config, spool, rule, result.dataset, path, outcome), started
    )


def _apply_rule(rule: Rule, ds: Dataset, path: Path) -> CompressResult | None:
    """The rule's compression of ``ds``; None: a deflated instance to keep as received."""
    assert rule.compress is not None
    deflated = UID(ds.file_meta.get("TransferSyntaxUID", "")).is_deflated
    # The worker owns ds: no defensive copy. A pass-through may find ds half-changed,
    # so it starts again from the file, which is still in incoming/.
    result = compress_dataset(ds, rule.compress, copy_input=False)
    if result.reason is not None and deflated:
        # Its file is valid as it is; reading it again would inflate it a second time.
        return None
    if result.reason is not None:
        kept = passthrough(pydicom.dcmread(path), result.reason)
        kept.notes = result.notes
        return kept
    return result


def _deflate_refusal(path: Path, limit: int) -> Refusal | None:
    """Why a deflated file must not be read (it inflates past ``limit``, or is corrupt).

    The receiving side checks this before acknowledging; a file may also come from
    an older spool. Costs nothing for files that are not deflated.
    """
    try:
        return deflated_file_refusal(path, limit)
    except (OSError, struct.error):
        return None  # dcmread then says what is wrong with it


def _hand_over(
    config: Config,
    spool: Spool,
    rule: Rule,
    ds: Dataset,
    incoming: Path,
    outcome: Outcome,
    received: bool = False,
) -> None:
    """Give every destination its copy (written once, then linked), or queue it.

    The first copy goes straight to its final place, so a full spool does not stop
    delivery to an archive on another disk. An OSError here (disk full) leaves the
    incoming file in place; the pipeline tries again later.
    """
    chunks = [] if received else part10_chunks(ds)
    outcome.bytes_out = outcome.bytes_in if received else sum(len(c) for c in chunks)
    written: Path | None = incoming if received else None

    def put(path: Path) -> None:
        nonlocal written
        if written is None:
            write_durably(path, chunks)
            written = path
        else:
            link_or_copy_durably(written, path)

    for name in rule.send_to:
        dest = config.destinations[name]
        permanent: str | None = None
        try:
            if type_of(dest).deliver(dest, ds, put):
                outcome.delivered.append(name)
                continue
        except (OSError, CannotDeliver) as exc:
            if isinstance(exc, OSError) and is_permanent(exc):
                permanent = f"cannot write: {exc}"
                outcome.errors.append(f"{name}: {exc}; moved to failed/")
            else:
                outcome.errors.append(f"{name}: {exc}; queued for retry")
        pending = spool.pending_dir(name)
        makedirs_durably(pending)
        put(pending / incoming.name)
        if permanent is not None:
            _fail_at_once(spool, name, incoming.name, permanent, outcome.sop_instance_uid)
        outcome.queued.append(name)
    # Every destination has it or holds it in its outbox: the incoming copy can go.
    incoming.unlink()


def _fail_at_once(spool: Spool, destination: str, name: str, error: str, uid: str) -> None:
    """Move an instance just queued for ``destination`` to its ``failed/``, with why.

    For errors that retrying cannot cure (a file name the file system refuses).
    """
    outbox = Outbox(spool, destination)
    makedirs_durably(outbox.failed)
    item_id = name.removesuffix(".dcm")
    outbox.fail(item_id, Failure(error=error), ItemState(attempts=1), uid)


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
