"""A durable, bounded FIFO of outgoing messages (SQLite in WAL mode).

Every event is written here before it is published and deleted only once the broker acknowledged it, so a
broker outage, or the monitor itself being killed, loses nothing: the next run replays what is left, in order.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spooled:
    rowid: int
    topic: str
    payload: str | bytes  # bytes for binary messages (distributed jobs), kept as a BLOB
    final: bool


class SpoolInUseError(RuntimeError):
    """Another process holds this spool: two publishers would send (and delete) each other's events."""


class Spool:
    """`path=None` keeps the queue in memory (nothing survives the process). A spool file belongs to one
    process at a time (an exclusive lock beside it), since a second one would block on SQLite and publish the
    first one's events."""

    def __init__(self, path: str | Path | None, max_events: int = 100_000) -> None:
        self._owner = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._owner = open(f"{path}.lock", "w")  # noqa: SIM115 (held until close)
            try:
                fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._owner.close()
                raise SpoolInUseError(
                    f"spool {path} is in use by another process (same node and broker?): give each process its own"
                    " --node, or its own mqtt.spool path"
                ) from None
        self.path, self.max_events = path, max_events
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            if path:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
                " payload TEXT NOT NULL, final INTEGER NOT NULL)"
            )
            self._size = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self.dropped = 0
        self.high_water = self._size
        if self.high_water:
            log.warning("spool %s holds %d events from an earlier run: they are sent first", path, self.high_water)

    def size(self) -> int:
        return self._size

    def append(self, topic: str, payload: str | bytes, final: bool = True) -> None:
        """Add a message; when full, drop the oldest interim message, else the oldest one, and say so."""
        with self._lock:
            if self._size >= self.max_events:
                row = self._db.execute("SELECT id FROM outbox WHERE final = 0 ORDER BY id LIMIT 1").fetchone()
                row = row or self._db.execute("SELECT id FROM outbox ORDER BY id LIMIT 1").fetchone()
                self._db.execute("DELETE FROM outbox WHERE id = ?", row)
                self.dropped += 1
                log.error(
                    "spool full (%d messages): dropped the oldest to make room (%d dropped so far)",
                    self.max_events,
                    self.dropped,
                )
                self._size -= 1
            self._db.execute("INSERT INTO outbox (topic, payload, final) VALUES (?, ?, ?)", (topic, payload, final))
            self._size += 1
            self.high_water = max(self.high_water, self._size)

    def head(self, limit: int = 64) -> list[Spooled]:
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, final FROM outbox ORDER BY id LIMIT ?", (limit,))
            return [Spooled(r[0], r[1], r[2], bool(r[3])) for r in rows.fetchall()]

    def remove(self, rowid: int) -> None:
        with self._lock:
            self._size -= self._db.execute("DELETE FROM outbox WHERE id = ?", (rowid,)).rowcount

    def close(self) -> None:
        """Release the spool. An empty spool file goes, so that a run that sent everything, or a mistyped broker
        that was never reached, leaves no file behind (the lock is held while deleting: nobody else has it)."""
        with self._lock:
            self._db.close()
            if self._owner:
                if not self._size:
                    for suffix in ("", "-wal", "-shm", ".lock"):
                        Path(f"{self.path}{suffix}").unlink(missing_ok=True)
                self._owner.close()
                self._owner = None
