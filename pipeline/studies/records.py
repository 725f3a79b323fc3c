"""The filter's durable study records under ``<spool>/run/studies/`` (never in a stage).

* ``reached.log`` — one line ``<name>\\t<endpoint>`` per copy made of a file that still
  waits in ``accepted/`` (the instance-level copies made on arrival, and each release).
  After a restart, recovery never links such a file again for those endpoints, even
  when the copy has left ``sent/`` already (inode and name matching cannot see a pruned
  copy). Lines are appended and the log is fsynced once per filter step: a copy made
  in the last step before a kill -9 is still in its outbox (or ``sent/``), where the
  name-prefix check of recovery sees it.
* ``decisions.log`` — one JSON line per release decision (endpoint, study, series, sent
  or not, the aggregate of its conditions), appended and fsynced *before* any file of
  the release is linked, so that a release cut short is finished as the same decision
  (``late = follow``) and never decided twice; it is also what ``late`` relies on
  across restarts. Decisions are kept :data:`DECISION_MEMORY`.

Both are rewritten compactly at start-up (tmp, fsync, rename through the spool). A torn
last line (a kill -9 mid-append) is skipped when read.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from pipeline.spool import FILE_MODE, Spool
from pipeline.studies.levels import Aggregate

#: a decision is remembered this long: an instance of that study arriving later is new
DECISION_MEMORY = 30 * 86400.0
#: …and at most this many (the newest), so a busy site's memory stays bounded
MAX_DECISIONS = 200_000
RECENT = 200                      # decisions shown in the state file
MAX_LINE = 64 * 1024              # longer lines are not ours: skipped
COMPACT_AFTER = 10_000            # appended lines before a log is worth rewriting
#: (endpoint, Study Instance UID, Series Instance UID or "" at study level)
GroupKey = tuple[str, str, str]


def studies_dir(spool: Spool) -> Path:
    return spool.run_dir / "studies"


class _AppendLog:
    """An append-only text file, fsynced on :meth:`sync`, rewritten on :meth:`rewrite`."""

    def __init__(self, spool: Spool, name: str) -> None:
        self.spool = spool
        self.directory = studies_dir(spool)
        self.path = self.directory / name
        self._fd: int | None = None
        self._dirty = False
        #: lines appended since the log was last read or rewritten
        self.appended = 0

    def lines(self) -> Iterable[str]:
        """Every complete line (a torn or oversized one is skipped)."""
        try:
            with open(self.path, "rb") as file:
                for raw in file:
                    if len(raw) > MAX_LINE or not raw.endswith(b"\n"):
                        continue
                    yield raw[:-1].decode("utf-8", "replace")
        except FileNotFoundError:
            return

    def append(self, line: str) -> None:
        if self._fd is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                               | os.O_NOFOLLOW, FILE_MODE)
        os.write(self._fd, (line + "\n").encode("utf-8"))
        self._dirty = True
        self.appended += 1

    def sync(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def rewrite(self, lines: Iterable[str]) -> None:
        """Replace the whole log atomically with ``lines``."""
        self.close()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        self.spool.write_bytes(self.directory, self.path.name, data, replace=True)
        self.appended = 0

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None


class ReachedLog:
    """Which endpoints each waiting file has reached (made durable once per step).

    Records are by name, and a standard name comes back when an operator moves a copy
    back into ``incoming/``: :meth:`reset` (a line with no endpoint) makes the old
    records void, durably, before the file enters ``accepted/`` again."""

    def __init__(self, spool: Spool) -> None:
        self._log = _AppendLog(spool, "reached.log")
        self.reached: dict[str, set[str]] = {}
        #: names with lines in the log (forgotten or not): a returning one needs a reset
        self._logged: set[str] = set()

    def load(self) -> None:
        self.reached, self._logged = {}, set()
        for line in self._log.lines():
            name, _, endpoint = line.partition("\t")
            if not name:
                continue
            self._logged.add(name)
            if endpoint:
                self.reached.setdefault(name, set()).add(endpoint)
            else:  # reset: the name came back as a new file
                self.reached.pop(name, None)

    def of(self, name: str) -> set[str]:
        return self.reached.get(name, set())

    def add(self, name: str, endpoint: str) -> None:
        known = self.reached.setdefault(name, set())
        if endpoint not in known:
            known.add(endpoint)
            self._logged.add(name)
            self._log.append(f"{name}\t{endpoint}")

    def reset(self, name: str) -> None:
        """A file of this name enters ``accepted/`` anew: records of an earlier file of
        the same name must not count (durable before it returns)."""
        if name in self._logged:
            self.reached.pop(name, None)
            self._logged.discard(name)
            self._log.append(f"{name}\t")
            self._log.sync()

    def forget(self, name: str) -> None:
        """The file left ``accepted/``: its line goes at the next compaction."""
        self.reached.pop(name, None)

    def sync(self) -> None:
        self._log.sync()

    def worth_compacting(self) -> bool:
        """Lines of files long gone outnumber the live ones (and there are many)."""
        return self._log.appended > COMPACT_AFTER and self._log.appended > 2 * len(self.reached)

    def compact(self, live: set[str]) -> None:
        """Keep only the records of files still in ``accepted/`` (``live``)."""
        self.reached = {n: eps for n, eps in self.reached.items() if n in live}
        self._logged = set(self.reached)
        self._log.rewrite(f"{n}\t{ep}" for n, eps in sorted(self.reached.items())
                          for ep in sorted(eps))

    def close(self) -> None:
        self._log.close()


@dataclass(frozen=True)
class Released:
    """One release decision: a group's files were sent to the endpoint, or not."""

    key: GroupKey
    send: bool
    at: float                      # wall time
    count: int
    why: str
    conditions: tuple[str, ...]    # the conditions it was decided on (a reload may change them)
    aggregate: Aggregate | None

    def as_line(self) -> str:
        endpoint, study, series = self.key
        return json.dumps({"endpoint": endpoint, "study": study, "series": series or None,
                           "send": self.send, "at": self.at, "count": self.count,
                           "why": self.why, "conditions": list(self.conditions),
                           "aggregate": self.aggregate.as_json() if self.aggregate else None},
                          separators=(",", ":"))

    @classmethod
    def from_line(cls, line: str) -> Released | None:
        try:
            data = json.loads(line)
            key = (str(data["endpoint"]), str(data["study"]), str(data["series"] or ""))
            count = int(data["count"])
            return cls(key, bool(data["send"]), float(data["at"]), count, str(data["why"]),
                       tuple(str(c) for c in data["conditions"]),
                       Aggregate.from_json(data["aggregate"], count))
        except (ValueError, KeyError, TypeError, RecursionError, OverflowError):
            return None  # not a line we wrote (torn, edited, hostile): skipped


class DecisionBook:
    """Release decisions, by group; appended and fsynced before the release's links."""

    def __init__(self, spool: Spool) -> None:
        self._log = _AppendLog(spool, "decisions.log")
        self.decisions: dict[GroupKey, Released] = {}
        self._recent: deque[Released] = deque(maxlen=RECENT)

    def worth_compacting(self) -> bool:
        return (self._log.appended > COMPACT_AFTER and self._log.appended > len(self.decisions)
                or len(self.decisions) > MAX_DECISIONS)

    def load(self, now: float | None = None) -> None:
        """Read the log (later lines win); forget decisions older than DECISION_MEMORY.
        Also the compaction (the log is rewritten with what is kept)."""
        now = time.time() if now is None else now
        self.decisions = {}
        bad = 0
        for line in self._log.lines():
            released = Released.from_line(line)
            if released is None:
                bad += 1
            elif now - released.at < DECISION_MEMORY:
                self.decisions[released.key] = released
        if bad:
            logger.bind(daemon="filter").warning(
                f"{self._log.path}: {bad} unreadable line(s) skipped")
        ordered = sorted(self.decisions.values(), key=lambda r: r.at)[-MAX_DECISIONS:]
        self.decisions = {r.key: r for r in ordered}
        self._recent = deque(ordered[-RECENT:], maxlen=RECENT)
        self._log.rewrite(r.as_line() for r in ordered)

    def get(self, key: GroupKey) -> Released | None:
        return self.decisions.get(key)

    def record(self, released: Released) -> None:
        """Durable before it returns: the release's links come after it."""
        self.decisions[released.key] = released
        self._recent.append(released)
        self._log.append(released.as_line())
        self._log.sync()

    def recent(self) -> list[Released]:
        """The last :data:`RECENT` decisions, newest first (for the state file)."""
        return list(reversed(self._recent))

    def close(self) -> None:
        self._log.close()
