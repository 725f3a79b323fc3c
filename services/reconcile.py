"""``dicomflow reconcile [--since 24h] [--acknowledged FILE] [--json]``: is every image accounted for?

Every instance acknowledged in the window — a ``received`` event since then, a UID of
``--acknowledged FILE`` (what the senders were told was stored), or a file whose spool
name says it arrived since then — must be, on every endpoint it was routed to,
delivered (``sent`` event, a copy in ``sent/<ep>``, or a ``deleted`` event), failed
(a copy in ``failed/<ep>`` with its reason), still queued (``incoming/``, ``accepted/``,
``accepted/<ep>``, ``outbox/<ep>``), or deliberately rejected / quarantined. Whatever is
not is listed, and the exit status is 1.

The journal and the spool are crossed because either may miss something after a
crash: the journal loses its last second of events to a kill -9, so a copy found in
``outbox/pacs`` stands for a lost ``routed`` event; and a lost *file* cannot hide
behind a lost event when the sender's own list of acknowledged UIDs is given.

One streamed query over the window (plus one batched look-up of the acknowledged UIDs'
oldest event), one scan of the spool: no query per row, so a million events take
seconds. A file moving *backwards* while the spool is scanned (an operator's ``retry``)
can show as unaccounted: run it again.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.config_types import duration
from pipeline.journal import events as kinds
from pipeline.journal import reader, store
from pipeline.journal.accounts import STATES, UNACCOUNTED, Ledger, Outcome, apply, outcomes
from pipeline.journal.whereabouts import FAILED, QUARANTINED, REJECTED, Whereabouts, scan, split_name
from pipeline.names import escape, is_valid_uid
from pipeline.progress import Progress
from pipeline.spool import Spool

MARGIN = 60.0        # seconds read before the window: a name stamped inside it, acknowledged just before
LIST_LIMIT = 50      # failed / unaccounted lines printed (all of them in --json)
STAMP = "%Y%m%dT%H%M%S.%f"
#: the kinds whose detail the reconcile needs (the others' JSON is never decoded)
DETAILED = {kinds.ROUTED, kinds.SHAPED, kinds.FAILED, kinds.QUARANTINED, kinds.REJECTED}


class UsageError(Exception):
    """A bad ``--since`` or ``--acknowledged`` (exit 2)."""


class Books:
    """The ledgers of one run, found by prefix or UID as the events stream by."""

    def __init__(self, since: float, acknowledged: set[str]) -> None:
        self.since = since
        self.since_stamp = datetime.fromtimestamp(since, UTC).strftime(STAMP)
        self.acknowledged = acknowledged
        self.by_prefix: dict[str, Ledger] = {}
        self.by_uid: dict[str, Ledger] = {}
        self.ledgers: list[Ledger] = []

    def find(self, uid: str | None, prefix: str | None, *, arrived: bool = False) -> Ledger | None:
        """The ledger of this arrival; a new one when it belongs to the window."""
        # by prefix when there is one: the same image sent twice is two arrivals, each
        # to account for (its UID alone would merge them)
        ledger = self.by_prefix.get(prefix) if prefix else None
        if ledger is None and uid and self._renamed(prefix, arrived):
            ledger = self.by_uid.get(uid)
        if ledger is None:
            in_window = arrived or (prefix is not None and prefix >= self.since_stamp)
            if not in_window and uid not in self.acknowledged:
                return None
            ledger = Ledger(uid)
            self.ledgers.append(ledger)
        self.remember(ledger, uid, prefix)
        return ledger

    def _renamed(self, prefix: str | None, arrived: bool) -> bool:
        """Whether a file or event whose prefix no arrival has belongs to the latest
        arrival of its UID: it has no file name, or a name given after the arrival (a
        copy renamed on a clash in its stage, :func:`pipeline.spool.fresh_name_like`,
        stamped when renamed: inside the window). Never a ``received`` event's."""
        return prefix is None or (not arrived and prefix >= self.since_stamp)

    def remember(self, ledger: Ledger, uid: str | None, prefix: str | None) -> None:
        if prefix:
            self.by_prefix.setdefault(prefix, ledger)
        if uid:
            self.by_uid[uid] = ledger  # the latest arrival of a UID, for events without a file
            if uid in self.acknowledged:
                ledger.acknowledged = True

    # -- the journal ----------------------------------------------------------------

    def take(self, row: tuple[Any, ...]) -> None:
        """One streamed row (``reader.FIELDS``)."""
        _, at, kind, _, uid, file, endpoint, _, _, _, raw = row
        parts = split_name(file) if file else None
        prefix = parts[0] if parts else None
        ledger = self.find(uid, prefix, arrived=kind == kinds.RECEIVED and at >= self.since)
        if ledger is None:
            return
        detail = reader.decode_detail(raw) if kind in DETAILED else {}
        if kind == kinds.SHAPED and isinstance(detail.get("copy_uid"), str):
            self.remember(ledger, detail["copy_uid"], None)
        apply(ledger, kind, at, endpoint, detail)

    # -- the spool --------------------------------------------------------------------

    def cross(self, where: Whereabouts) -> None:
        """Attach every file of the spool to its ledger (new ones for arrivals the journal
        lost), and add the acknowledged UIDs that neither knows."""
        for place in where.places():
            ledger = self.find(place.uid, place.prefix)
            if ledger is not None:
                ledger.places.append(place)
        for uid in sorted(self.acknowledged - self.by_uid.keys()):
            self.find(uid, None)


# -- the run ------------------------------------------------------------------------------

def read_acknowledged(path: Path) -> set[str]:
    """The UIDs of ``path``, one a line; blank lines and ``#`` comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    uids = set()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not is_valid_uid(text):
            raise UsageError(f"{path}, line {number}: {escape(text, 80)!r} is not a UID")
        uids.add(text)
    return uids


def collect(spool: Spool, since: float, acknowledged: set[str],
            progress: Progress | None = None) -> tuple[Books, str]:
    """The ledgers of the window, and a warning ("" when the journal could be read)."""
    books = Books(since, acknowledged)
    warning = ""
    try:
        conn = reader.open_read(store.journal_path(spool.run_dir))
    except reader.JournalMissing as exc:
        warning = f"{exc}; accounting from the spool alone"
    else:
        try:
            _read_journal(conn, books, progress)
        except sqlite3.DatabaseError as exc:  # damaged, or locked beyond the busy timeout
            warning = (f"the journal cannot be read to the end ({escape(exc)}); what it did "
                       "not tell is accounted from the spool")
        finally:
            conn.close()
    books.cross(scan(spool))
    return books, warning


def _read_journal(conn: Any, books: Books, progress: Progress | None) -> None:
    start = books.since - MARGIN
    if books.acknowledged:
        oldest = reader.earliest(conn, books.acknowledged)
        start = min(start, oldest) if oldest is not None else start
    if progress is not None:
        progress.total = reader.count_since(conn, start)
    try:
        for count, row in enumerate(reader.stream(conn, start), 1):
            books.take(row)
            if progress is not None and count % 1000 == 0:
                progress.advance(1000)
    finally:
        if progress is not None:
            progress.finish()


def report(books: Books, window: str, now: float) -> dict[str, Any]:
    """The result as ``--json`` prints it (the text is rendered from this)."""
    results = [o for ledger in books.ledgers for o in outcomes(ledger)]
    states = Counter(o.state for o in results)
    per_endpoint: dict[str, Counter[str]] = {}
    for o in results:
        if o.endpoint:
            per_endpoint.setdefault(o.endpoint, Counter())[o.state] += 1
    unaccounted = [o for o in results if o.state == UNACCOUNTED]
    return {
        "since": books.since, "window": window, "at": now,
        "instances": len(books.ledgers),
        "acknowledged_listed": len(books.acknowledged),
        "states": {s: states.get(s, 0) for s in STATES},
        "endpoints": {ep: {s: c.get(s, 0) for s in STATES if s not in (REJECTED, QUARANTINED)}
                      for ep, c in sorted(per_endpoint.items())},
        "recovered": {
            "no_received_event": sum(1 for ledger in books.ledgers
                                     if not ledger.received and ledger.places),
            "no_routed_event": sum(1 for ledger in books.ledgers
                                   if not ledger.routed and any(p.endpoint for p in ledger.places)),
        },
        "failed": [_row(o) for o in results if o.state == FAILED],
        "unaccounted": [_row(o) for o in unaccounted],
    }


def _row(outcome: Outcome) -> dict[str, Any]:
    row: dict[str, Any] = {"uid": outcome.uid, "endpoint": outcome.endpoint or None,
                           "where": outcome.where or None}
    if outcome.reason:
        row["reason"] = outcome.reason
    if outcome.state == UNACCOUNTED:
        row["last_event"] = ({"kind": outcome.last[0], "at": outcome.last[1]}
                             if outcome.last else None)
    return row


def render(result: dict[str, Any]) -> str:
    states = result["states"]
    lines = [f"reconcile: {result['instances']:,} instance(s) since {_when(result['since'])} "
             f"(last {result['window']}), {states[UNACCOUNTED]:,} unaccounted"]
    lines += [f"  {state:<12} {states[state]:>9,}" for state in STATES]
    if result["endpoints"]:
        columns = [s for s in STATES if s not in (REJECTED, QUARANTINED)]
        lines.append("  " + "endpoint".ljust(16) + "".join(c.rjust(13) for c in columns))
        for ep, counts in result["endpoints"].items():
            lines.append("  " + escape(ep).ljust(16) + "".join(f"{counts[c]:>13,}" for c in columns))
    recovered = result["recovered"]
    lines.append(f"recovered from the spool: {recovered['no_received_event']:,} instance(s) with "
                 f"no received event, {recovered['no_routed_event']:,} with no routed event")
    for title, rows in (("failed", result["failed"]), (UNACCOUNTED, result["unaccounted"])):
        if rows:
            lines.append(f"{title}:")
            lines += [_line(row) for row in rows[:LIST_LIMIT]]
            if len(rows) > LIST_LIMIT:
                lines.append(f"  … and {len(rows) - LIST_LIMIT:,} more (--json lists them all)")
    return "\n".join(lines)


def _line(row: dict[str, Any]) -> str:
    text = f"  {row['uid'] or '(no uid)'}  {row['endpoint'] or '-'}"
    if "last_event" in row:
        last = row["last_event"]
        return text + ("  last known: " + f"{last['kind']} at {_when(last['at'])}" if last
                       else "  no event, no file")
    return text + f"  {row['where'] or ''}: {escape(row.get('reason', ''))}"


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def main(config: Config, since: str = "24h", acknowledged: Path | None = None,
         as_json: bool = False) -> int:
    try:
        window = duration(since)
        listed = read_acknowledged(acknowledged) if acknowledged is not None else set()
    except (ValueError, UsageError) as exc:
        print(f"dicomflow reconcile: {exc}", file=sys.stderr)
        return 2
    now = time.time()
    progress = Progress("reconcile: journal events read", every=100_000)
    books, warning = collect(Spool(config.spool), now - window, listed, progress)
    if warning:
        print(f"dicomflow reconcile: warning: {warning}", file=sys.stderr)
    result = report(books, since, now)
    print(json.dumps(result, indent=2) if as_json else render(result))
    return 1 if result["unaccounted"] else 0
