"""Progress a person can read: a live bar on a terminal, a plain line every few seconds in logs.

The bar is tqdm's: one small, dependency-free, long-maintained package that draws a
bar with rate and ETA on a terminal and gets out of the way elsewhere (rich would
bring markdown and syntax-highlighting packages along for one bar).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from node.batch.report import GB, Tally

MB = 1e6


class Progress:
    def __init__(
        self, total_files: int, total_bytes: int, every: float, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.every = every
        self.started = time.monotonic()
        self.files = 0
        self.bytes = 0
        self._last_line = self.started
        self._bar: Any = None
        if self.stream.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(
                total=total_files,
                file=self.stream,
                dynamic_ncols=True,
                # Rates and ETA are ours (the ETA by bytes: files differ a lot in size).
                bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} files [{elapsed}{postfix}]",
            )

    def advance(self, files: int, bytes_in: int, tally: Tally) -> None:
        self.files += files
        self.bytes += bytes_in
        if self._bar is not None:
            self._bar.update(files)
            self._bar.set_postfix_str(self._postfix(tally), refresh=False)
        else:
            self.tick(tally)

    def tick(self, tally: Tally) -> None:
        """A plain line if it is time for one (not on a terminal)."""
        now = time.monotonic()
        if self._bar is None and now - self._last_line >= self.every:
            self._last_line = now
            print(self.line(tally), file=self.stream, flush=True)

    def line(self, tally: Tally) -> str:
        share = 100.0 * self.files / self.total_files if self.total_files else 100.0
        return (
            f"compress: {self.files}/{self.total_files} files ({share:.1f} %), "
            f"{self._postfix(tally)}"
        )

    def _postfix(self, tally: Tally) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        byte_rate = self.bytes / elapsed
        remaining = max(self.total_bytes - self.bytes, 0)
        eta = _clock(remaining / byte_rate) if byte_rate > 0 else "?"
        return (
            f"{self.files / elapsed:.1f} files/s, {byte_rate / MB:.1f} MB/s, "
            f"{tally.saved / GB:.2f} GB saved, {len(tally.failures)} failed, ETA {eta}"
        )

    def close(self, tally: Tally) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(tally))
            self._bar.close()
        else:
            print(self.line(tally), file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
