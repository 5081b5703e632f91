"""The ``dicom-node compress`` command line, and the settings a run works with."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from node.codecs.base import CompressSpec
from node.config import Match, Rule, _parse_compress, load_config
from node.destinations.folder import validate_layout
from node.errors import ConfigError, NodeError
from node.schema import as_duration

DEFAULT_SAMPLE = 200
DEFAULT_PROGRESS_SECONDS = 5.0
JOURNAL_PREFIX = "dicom-node-compress-"


class StartError(NodeError):
    """The run cannot start: bad arguments, a journal that cannot be used."""

    exit_code = 2


class Mode(Enum):
    IN_PLACE = "in-place"
    OUTPUT = "output"


@dataclass(frozen=True)
class BatchOptions:
    """Everything a run needs; the part workers need is :class:`WorkSettings`."""

    roots: tuple[Path, ...]
    mode: Mode
    output: Path | None
    layout: str | None
    rules: tuple[Rule, ...]
    rules_source: str
    workers: int
    verify: bool
    keep_larger: bool
    dry_run: bool
    sample: int
    journal: Path
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    min_age: float
    report: Path | None
    progress_seconds: float
    ignored_rules: tuple[str, ...]  # rules with network-only conditions

    def work_settings(self) -> WorkSettings:
        return WorkSettings(
            mode=self.mode,
            output=self.output,
            layout=self.layout,
            rules=self.rules,
            verify=self.verify,
            keep_larger=self.keep_larger,
            dry_run=self.dry_run,
        )

    def fingerprint(self) -> str:
        """What must not change between a run and its resumption (same journal)."""
        settings = {
            "roots": [str(r) for r in self.roots],
            "mode": self.mode.value,
            "output": str(self.output) if self.output else None,
            "layout": self.layout,
            "rules": [repr(r) for r in self.rules],
            "keep_larger": self.keep_larger,
        }
        return json.dumps(settings, sort_keys=True)


@dataclass(frozen=True)
class WorkSettings:
    """What a worker process needs to handle one file (pickled once per worker)."""

    mode: Mode
    output: Path | None
    layout: str | None
    rules: tuple[Rule, ...]
    verify: bool
    keep_larger: bool
    dry_run: bool


def add_compress_parser(commands: Any) -> None:
    """Register ``compress`` on the ``dicom-node`` sub-command parser."""
    p = commands.add_parser(
        "compress",
        help="compress an existing archive (files and trees) with the node's rules and codecs",
        description=(
            "Compress DICOM files in place or into another tree, with the same rules and "
            "codecs as the node. Resumable (a journal), verified on request, on every core. "
            "Exit status: 0 all done, 1 some files failed, 2 the run could not start."
        ),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to compress")
    # One of the two is required, except with --dry-run (checked in parse_options).
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--in-place", action="store_true", help="replace each file by its compressed version"
    )
    where.add_argument(
        "--output", metavar="DIR", help="write the same tree below DIR; the source is untouched"
    )
    p.add_argument(
        "--layout",
        metavar="TEMPLATE",
        help="with --output: place files as a folder destination does, e.g. "
        "'{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm' (default: the source's paths)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--config",
        metavar="FILE",
        help="node config: the first rule that matches decides (send_to is ignored)",
    )
    what.add_argument(
        "--transfer-syntax",
        metavar="TS",
        help="one rule for every file, e.g. jpeg-ls-lossless (names as in rules' compress:)",
    )
    p.add_argument("--max-error", type=int, metavar="N", help="jpeg-ls-near-lossless NEAR")
    p.add_argument("--compression-ratio", type=float, metavar="R", help="jpeg-2000, htj2k")
    p.add_argument("--psnr", type=float, metavar="DB", help="jpeg-2000, htj2k")
    p.add_argument("--quality", type=int, metavar="Q", help="jpeg-baseline, 1-100")
    p.add_argument("--plugin", metavar="NAME", help="encoder (imagecodecs, pyjpegls, ...)")
    p.add_argument(
        "--keep-uid-on-lossy",
        action="store_true",
        help="lossy output keeps the SOP Instance UID (default: a new one)",
    )
    p.add_argument(
        "--allow-lossy-recompression",
        action="store_true",
        help="let a lossy syntax re-encode input that is already lossy",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="worker processes (default: one per CPU)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="decode each output with a decoder other than the encoder's and compare the pixels",
    )
    p.add_argument(
        "--keep-larger",
        action="store_true",
        help="write the compressed file even when it is not smaller than the original",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="compress a sample in memory and project the saving and the time; write nothing",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        metavar="N",
        help=f"files in the dry run's sample (default: {DEFAULT_SAMPLE})",
    )
    p.add_argument(
        "--journal",
        metavar="FILE",
        help=f"SQLite journal (default: ./{JOURNAL_PREFIX}<hash of the paths>.sqlite)",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files whose path below its tree matches, e.g. '*.dcm' or 'CT/*' "
        "(* also matches /; repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files whose path below its tree matches (repeatable)",
    )
    p.add_argument(
        "--min-age",
        metavar="DURATION",
        help="skip files modified more recently than this (e.g. 10m, 2h)",
    )
    p.add_argument("--report", metavar="FILE.json", help="write the final report as JSON")
    p.add_argument(
        "--progress-every",
        type=float,
        default=DEFAULT_PROGRESS_SECONDS,
        metavar="S",
        help="seconds between progress lines when output is not a terminal (default: 5)",
    )
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from node.batch.run import run  # imported late: it loads the codecs

    return run(parse_options(args))


def parse_options(args: argparse.Namespace) -> BatchOptions:
    if not (args.in_place or args.output or args.dry_run):
        raise StartError("give --in-place or --output DIR (or --dry-run to only estimate)")
    roots = tuple(_root(p) for p in args.paths)
    output = Path(args.output).resolve() if args.output else None
    if args.layout is not None:
        if output is None:
            raise StartError("--layout: only with --output DIR")
        try:
            validate_layout(args.layout, "--layout")
        except ConfigError as exc:
            raise StartError(str(exc)) from exc
    if output is not None:
        for root in roots:
            # An output below a source tree is left out of that tree's walk.
            if root == output or output in root.parents:
                raise StartError(f"--output {output} holds the source {root}; pick another folder")
    rules, source, ignored = _rules(args)
    if not rules:
        raise StartError(
            f"{source}: no rule can match in batch mode (rules that test calling_ae_title, "
            "called_ae_title or peer_address never match a file)"
        )
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise StartError("--workers: must be at least 1")
    if args.sample < 1:
        raise StartError("--sample: must be at least 1")
    min_age = 0.0
    if args.min_age is not None:
        try:
            min_age = as_duration(args.min_age, "--min-age")
        except ConfigError as exc:
            raise StartError(str(exc)) from exc
    journal = Path(args.journal) if args.journal else default_journal(roots, output)
    return BatchOptions(
        roots=roots,
        mode=Mode.OUTPUT if output else Mode.IN_PLACE,
        output=output,
        layout=args.layout,
        rules=rules,
        rules_source=source,
        workers=workers,
        verify=bool(args.verify),
        keep_larger=bool(args.keep_larger),
        dry_run=bool(args.dry_run),
        sample=args.sample,
        journal=journal.resolve(),
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        min_age=min_age,
        report=Path(args.report) if args.report else None,
        progress_seconds=max(0.1, args.progress_every),
        ignored_rules=ignored,
    )


def default_journal(roots: tuple[Path, ...], output: Path | None) -> Path:
    """``./dicom-node-compress-<hash>.sqlite``: one journal per set of trees and output.

    In the current directory, not in the tree: an in-place run should add nothing to
    the archive, and an output tree should hold only what came from the source.
    """
    key = "\n".join([*(str(r) for r in roots), str(output or "")])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path.cwd() / f"{JOURNAL_PREFIX}{digest}.sqlite"


def _root(text: str) -> Path:
    path = Path(os.path.abspath(text))
    if not path.exists():
        raise StartError(f"{text}: no such file or folder")
    # The given path itself may be a link (e.g. /archive -> /mnt/disk1/archive); what
    # is below it is never followed out of the tree.
    return path.resolve()


def _rules(args: argparse.Namespace) -> tuple[tuple[Rule, ...], str, tuple[str, ...]]:
    """The rules a batch run uses, where they come from, and the rules left out."""
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise StartError(str(exc)) from exc
        usable = tuple(r for r in config.rules if not is_network_only(r))
        ignored = tuple(r.name for r in config.rules if is_network_only(r))
        return usable, config.source, ignored
    raw: dict[str, Any] = {"transfer_syntax": args.transfer_syntax}
    for key in ("max_error", "compression_ratio", "psnr", "quality", "plugin"):
        value = getattr(args, key)
        if value is not None:
            raw[key] = value
    if args.allow_lossy_recompression:
        raw["allow_lossy_recompression"] = True
    try:
        spec = _parse_compress(raw, "compress", new_uid_default=not args.keep_uid_on_lossy)
    except ConfigError as exc:
        raise StartError(_as_options(str(exc))) from exc
    assert spec is not None
    rule = Rule(name="command-line", match=Match(), compress=spec, send_to=())
    return (rule,), "the command line", ()


def is_network_only(rule: Rule) -> bool:
    """True if the rule tests who sent an instance: in batch mode nobody did."""
    m = rule.match
    return bool(m.calling_ae_title or m.called_ae_title or m.peer_networks)


def with_verify(spec: CompressSpec, verify: bool) -> CompressSpec:
    return replace(spec, verify_lossless=True) if verify and not spec.verify_lossless else spec


def _as_options(message: str) -> str:
    """A config message about ``compress.max_error`` as one about ``--max-error``."""
    text = message.replace("compress.transfer_syntax", "--transfer-syntax")
    for key in ("max_error", "compression_ratio", "psnr", "quality", "plugin"):
        text = text.replace(f"compress.{key}", "--" + key.replace("_", "-"))
    return text.replace("compress:", "--transfer-syntax:")
