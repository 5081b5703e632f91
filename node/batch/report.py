"""What a run did, by modality and transfer syntax: the closing table and its JSON."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from node.batch.work import FileResult, Status

GB = 1e9
SHOWN_FAILURES = 50
_NUMBERS = re.compile(r"\s*\([^)]*\d[^)]*\)")


def syntax_name(uid: str) -> str:
    if not uid:
        return "-"
    name = UID(uid).name
    return name if name != uid else uid


@dataclass
class Group:
    files: int = 0
    done: int = 0
    kept: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    after_syntaxes: Counter[str] = field(default_factory=Counter)

    def add(self, result: FileResult) -> None:
        self.files += 1
        setattr(self, result.status.value, getattr(self, result.status.value) + 1)
        self.bytes_before += result.bytes_before
        after = result.bytes_after if result.status is Status.DONE else result.bytes_before
        self.bytes_after += after
        if result.status is Status.DONE:
            self.after_syntaxes[syntax_name(result.syntax_after)] += 1

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 0.0


@dataclass
class Tally:
    """Running totals of a run, for the progress line and the closing report."""

    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    total: Group = field(default_factory=Group)
    failures: list[tuple[str, str]] = field(default_factory=list)
    reasons: Counter[tuple[str, str]] = field(default_factory=Counter)  # (status, reason)
    earlier: int = 0  # settled by an earlier run (journal)
    disk_full: str | None = None

    def add(self, result: FileResult, *, earlier: bool = False) -> None:
        key = (result.modality or "-", syntax_name(result.syntax_before))
        self.groups.setdefault(key, Group()).add(result)
        self.total.add(result)
        if earlier:
            self.earlier += 1
        if result.status is Status.FAILED:
            self.failures.append((result.path, result.reason))
        elif result.status is not Status.DONE:
            self.reasons[(result.status.value, _NUMBERS.sub("", result.reason))] += 1
        if result.disk_full and self.disk_full is None:
            self.disk_full = result.reason

    @property
    def saved(self) -> int:
        return self.total.bytes_before - self.total.bytes_after


def format_table(tally: Tally, title: str) -> str:
    header = (
        f"{'modality':<9} {'transfer syntax':<34} {'files':>7} {'done':>7} {'kept':>6} "
        f"{'skipped':>7} {'failed':>6} {'GB before':>10} {'GB after':>9} {'ratio':>6}"
    )
    lines = [title, header, "-" * len(header)]
    for (modality, syntax), g in sorted(tally.groups.items()):
        lines.append(_row(modality, syntax, g))
    lines.append("-" * len(header))
    lines.append(_row("all", "", tally.total))
    if tally.earlier:
        lines.append(f"(of these, {tally.earlier} settled by an earlier run, from the journal)")
    if tally.reasons:
        lines.append("left as they were:")
        for (status, reason), count in tally.reasons.most_common():
            lines.append(f"  {count:>7} {status}: {reason}")
    if tally.failures:
        lines.append(f"failed ({len(tally.failures)}):")
        for path, reason in tally.failures[:SHOWN_FAILURES]:
            lines.append(f"  {path}: {reason}")
        if len(tally.failures) > SHOWN_FAILURES:
            lines.append(f"  ... and {len(tally.failures) - SHOWN_FAILURES} more (see --report)")
    return "\n".join(lines)


def _row(modality: str, syntax: str, g: Group) -> str:
    return (
        f"{modality[:9]:<9} {syntax[:34]:<34} {g.files:>7} {g.done:>7} {g.kept:>6} "
        f"{g.skipped:>7} {g.failed:>6} {g.bytes_before / GB:>10.3f} {g.bytes_after / GB:>9.3f} "
        f"{g.ratio:>6.2f}"
    )


def as_json(tally: Tally, extra: dict[str, Any]) -> dict[str, Any]:
    def group(g: Group) -> dict[str, Any]:
        return {
            "files": g.files,
            "done": g.done,
            "kept": g.kept,
            "skipped": g.skipped,
            "failed": g.failed,
            "bytes_before": g.bytes_before,
            "bytes_after": g.bytes_after,
            "ratio": round(g.ratio, 4),
            "transfer_syntaxes_after": dict(g.after_syntaxes),
        }

    return {
        **extra,
        "groups": [
            {"modality": m, "transfer_syntax": s, **group(g)}
            for (m, s), g in sorted(tally.groups.items())
        ],
        "total": group(tally.total),
        "settled_by_earlier_run": tally.earlier,
        "left_as_they_were": [
            {"status": status, "reason": reason, "files": count}
            for (status, reason), count in tally.reasons.most_common()
        ],
        "failures": [{"path": p, "reason": r} for p, r in tally.failures],
        "disk_full": tally.disk_full,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
