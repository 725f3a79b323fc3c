"""A sender's runtime state under ``<spool>/run/`` (never in a stage directory).

Two small files, both replaced atomically through the spool:

* ``retry-<endpoint>.json`` — per-file attempts of transient failures, so that a
  restart neither forgets how often a file was refused nor lets it retry forever; and
  the files the destination acknowledged whose move to ``sent/`` could not be done
  yet, so that a restart moves them instead of sending them again; and when each
  file was first refused with 0xA7xx, so that ``max_age`` ends a refusal that only
  looks like a busy destination (it persists across restarts);
* ``send-<endpoint>.json`` — what the operator sees in ``dicomflow status``
  (delivering / idle / busy / down since … / outside window until … / stopped).

Neither file may stop delivery: when one cannot be written (a full disk), the
in-memory copy stays authoritative while the sender runs, one line says so, and the
write is tried again later.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from pipeline.clock import SystemClock
from pipeline.config import RetryPolicy
from pipeline.log import logger
from pipeline.spool import Spool

STATES = ("delivering", "idle", "busy", "down", "outside_window", "stopped")


def iso_utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_local(moment: datetime) -> str:
    """A naive local time (croniter's) as ISO-8601 with the host's UTC offset."""
    return moment.astimezone().isoformat(timespec="seconds")


@dataclass
class RetryEntry:
    attempts: int
    first_failure: float
    last_error: str


class RetryBook:
    """Attempts of files refused with a transient status, persisted per endpoint.

    The wait before the next attempt is kept in memory only (monotonic clock): after a
    restart a waiting file is tried again at once, but its attempt count survives.
    ``delivered`` names acknowledged files still waiting for their move to ``sent/``;
    ``refused_since`` holds each file's first 0xA7xx refusal (wall clock, like
    ``first_failure``), uncharged ones included, so that ``max_age`` bounds them too.
    """

    def __init__(self, spool: Spool, endpoint: str, clock=None) -> None:
        self.spool, self.endpoint = spool, endpoint
        self.clock = clock or SystemClock()
        self.name = f"retry-{endpoint}.json"
        self.entries: dict[str, RetryEntry] = {}
        self.not_before: dict[str, float] = {}
        self.delivered: dict[str, str] = {}   # name -> when acknowledged (ISO UTC)
        self.refused_since: dict[str, float] = {}  # name -> first 0xA7xx refusal (epoch)
        self.unsaved = False

    def load(self) -> RetryBook:
        path = self.spool.run_dir / self.name
        try:
            raw = json.loads(path.read_text())
            self.entries = {k: RetryEntry(**v) for k, v in raw.get("files", {}).items()}
            self.delivered = {str(k): str(v) for k, v in raw.get("delivered", {}).items()}
            self.refused_since = {str(k): float(v)
                                  for k, v in raw.get("refused_since", {}).items()}
        except FileNotFoundError:
            self.entries, self.delivered, self.refused_since = {}, {}, {}
        except (ValueError, TypeError, AttributeError) as exc:
            logger.warning("ignoring unreadable retry state {}: {}", path, exc)
            self.entries, self.delivered, self.refused_since = {}, {}, {}
        return self

    def save(self) -> bool:
        """Persist the book; False (one warning, the first time) when it cannot be
        written — the in-memory book stays authoritative and :meth:`flush` retries."""
        data = {"endpoint": self.endpoint, "files": {k: asdict(v) for k, v in self.entries.items()}}
        if self.delivered:
            data["delivered"] = self.delivered
        if self.refused_since:
            data["refused_since"] = self.refused_since
        payload = json.dumps(data, indent=1, sort_keys=True).encode()
        try:
            self.spool.write_bytes(self.spool.run_dir, self.name, payload, replace=True)
        except OSError as exc:
            if not self.unsaved:
                logger.bind(endpoint=self.endpoint).warning(
                    "cannot save the retry state {}: {}; attempts are counted in memory "
                    "and saved when possible", self.name, exc.strerror or exc)
            self.unsaved = True
            return False
        if self.unsaved:
            logger.bind(endpoint=self.endpoint).info("retry state saved again")
        self.unsaved = False
        return True

    def flush(self) -> None:
        """Save again if an earlier save failed."""
        if self.unsaved:
            self.save()

    def mark_delivered(self, name: str) -> bool:
        """Record that the destination acknowledged ``name`` (its move is pending)."""
        self.delivered[name] = iso_utc(self.clock.time())
        return self.save()

    def clear_delivered(self, name: str) -> None:
        if self.delivered.pop(name, None) is not None:
            self.save()

    def record(self, name: str, error: str, wait: float) -> RetryEntry:
        """Charge ``name`` one attempt; it may be retried after ``wait`` seconds."""
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = RetryEntry(0, self.clock.time(), error)
        entry.attempts += 1
        entry.last_error = error
        self.not_before[name] = self.clock.monotonic() + wait
        self.save()
        return entry

    def refused_at(self, name: str) -> float:
        """When ``name`` was first refused with 0xA7xx (recorded now, and saved, if this
        is its first such refusal): ``max_age`` counts from there."""
        since = self.refused_since.get(name)
        if since is None:
            since = self.refused_since[name] = self.clock.time()
            self.save()
        return since

    def get(self, name: str) -> RetryEntry | None:
        return self.entries.get(name)

    def attempts(self, name: str) -> int:
        entry = self.entries.get(name)
        return entry.attempts if entry else 0

    def is_due(self, name: str, mono_now: float) -> bool:
        return self.not_before.get(name, 0.0) <= mono_now

    def next_due(self) -> float | None:
        return min(self.not_before.values(), default=None)

    def exhausted(self, entry: RetryEntry, policy: RetryPolicy) -> bool:
        age = self.clock.time() - entry.first_failure
        return entry.attempts >= policy.max_attempts or age >= policy.max_age

    def forget(self, name: str) -> None:
        self.not_before.pop(name, None)
        dropped = self.entries.pop(name, None) is not None
        if self.refused_since.pop(name, None) is not None or dropped:
            self.save()

    def keep_only(self, names: set[str]) -> None:
        """Drop entries of files that left the outbox by other means (an operator)."""
        self.not_before = {k: v for k, v in self.not_before.items() if k in names}
        stale = [k for k in self.entries if k not in names]
        for key in stale:
            del self.entries[key]
        gone = [k for k in self.delivered if k not in names]
        for key in gone:
            del self.delivered[key]
        unrefused = [k for k in self.refused_since if k not in names]
        for key in unrefused:
            del self.refused_since[key]
        if stale or gone or unrefused:
            self.save()


def sender_name(endpoint: str) -> str:
    """``send-<endpoint>``: the sender's supervisord program, lock and log name."""
    return f"send-{endpoint}"


def state_file_name(endpoint: str) -> str:
    """The sender's state file under ``<spool>/run/`` (read by ``dicomflow status``)."""
    return f"{sender_name(endpoint)}.json"


class StateReporter:
    """The operator-facing state file, rewritten when the state changes and at most
    about once a second when only the counters move."""

    def __init__(self, spool: Spool, endpoint: str, clock=None, min_interval: float = 1.0) -> None:
        self.spool, self.endpoint = spool, endpoint
        self.clock = clock or SystemClock()
        self.min_interval = min_interval
        self.state = "idle"
        self.since = self.clock.time()
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.next_open: datetime | None = None
        self.sent = 0
        self.failed = 0
        self._last_write = -1e18
        self._dirty = True
        self._write_failed = False

    def set(self, state: str, next_open: datetime | None = None) -> None:
        assert state in STATES, state
        if state == self.state and next_open == self.next_open:
            if self._dirty and self.clock.monotonic() - self._last_write >= self.min_interval:
                self.write()
            return
        if state != self.state:
            self.since = self.clock.time()
        if state == "down" and self.down_since is None:
            self.down_since = self.clock.time()
        if state not in ("down", "stopped"):
            self.down_since = None
        self.state, self.next_open = state, next_open
        self.write()

    def error(self, text: str) -> None:
        self.last_error, self.last_error_at = text, self.clock.time()
        self._dirty = True

    def count(self, sent: int = 0, failed: int = 0) -> None:
        self.sent += sent
        self.failed += failed
        self._dirty = True
        if self.clock.monotonic() - self._last_write >= self.min_interval:
            self.write()

    def flush(self) -> None:
        if self._dirty:
            self.write()

    def as_dict(self) -> dict:
        return {
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "state": self.state,
            "since": iso_utc(self.since),
            "down_since": iso_utc(self.down_since) if self.down_since is not None else None,
            "last_error": self.last_error,
            "last_error_at": iso_utc(self.last_error_at) if self.last_error_at is not None else None,
            "next_open": iso_local(self.next_open) if self.next_open is not None else None,
            "sent": self.sent,
            "failed": self.failed,
            "updated": iso_utc(self.clock.time()),
        }

    def write(self) -> None:
        payload = json.dumps(self.as_dict(), indent=1).encode()
        try:
            self.spool.write_bytes(self.spool.run_dir, state_file_name(self.endpoint), payload,
                                   replace=True)
        except OSError as exc:  # a full disk must not stop delivery; say so once
            if not self._write_failed:
                logger.bind(endpoint=self.endpoint).warning("cannot write state file: {}", exc)
            self._write_failed = True
            self._dirty = True
            return
        self._write_failed = False
        self._last_write = self.clock.monotonic()
        self._dirty = False
