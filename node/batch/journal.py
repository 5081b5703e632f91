"""The journal that makes a run resumable: one SQLite row per file settled.

A row records what happened to a file (done, kept, skipped, failed) with the size
and modification time the file had afterwards. A later run with the same journal
passes over every file whose row says done, kept or skipped and whose size and
mtime are unchanged; a failed file, or one changed since, is done again.

Rows are committed one by one in WAL mode with ``synchronous=NORMAL``: a killed run
loses no committed row (only a power cut may lose the last ones). A file compressed
whose row was lost is simply read again next time: it is then already in its target
syntax and left as it is, so nothing is compressed twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from node.batch.options import StartError

SCHEMA_VERSION = "1"
SETTLED = ("done", "kept", "skipped")


@dataclass(frozen=True)
class Row:
    path: str
    status: str
    reason: str
    size: int
    mtime_ns: int
    modality: str
    syntax_before: str
    syntax_after: str
    bytes_before: int
    bytes_after: int


class Journal:
    """One run's journal; only the main process writes it."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self._lock_fd = _lock(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS files (
                    path TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT NOT NULL,
                    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, modality TEXT NOT NULL,
                    syntax_before TEXT NOT NULL, syntax_after TEXT NOT NULL,
                    bytes_before INTEGER NOT NULL, bytes_after INTEGER NOT NULL,
                    seconds REAL NOT NULL, time REAL NOT NULL
                );
                """
            )
            self._check_settings(fingerprint)
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise StartError(f"{path}: cannot use the journal: {exc}") from exc

    def _check_settings(self, fingerprint: str) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            self._db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("schema", SCHEMA_VERSION), ("settings", fingerprint)],
            )
            return
        if meta.get("schema") != SCHEMA_VERSION:
            raise StartError(f"{self.path}: journal of another version ({meta.get('schema')})")
        if meta.get("settings") != fingerprint:
            raise StartError(
                f"{self.path}: this journal belongs to a run with other paths, output or rules; "
                "give another --journal (or delete this one to start over)"
            )

    def settled(self, path: Path, size: int, mtime_ns: int) -> Row | None:
        """The row of ``path`` if it is settled and the file has not changed since."""
        found = self._db.execute(
            "SELECT path, status, reason, size, mtime_ns, modality, syntax_before, "
            "syntax_after, bytes_before, bytes_after FROM files WHERE path = ?",
            (str(path),),
        ).fetchone()
        if found is None:
            return None
        row = Row(*found)
        if row.status in SETTLED and row.size == size and row.mtime_ns == mtime_ns:
            return row
        return None

    def record(self, row: Row, seconds: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.path,
                row.status,
                row.reason,
                row.size,
                row.mtime_ns,
                row.modality,
                row.syntax_before,
                row.syntax_after,
                row.bytes_before,
                row.bytes_after,
                seconds,
                time.time(),
            ),
        )

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        os.close(self._lock_fd)


def _lock(path: Path) -> int:
    """Hold the journal for this run alone: two runs on one journal would mix their rows."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StartError(f"{path}: cannot open the journal: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StartError(f"{path}: another run is using this journal") from exc
    return fd
