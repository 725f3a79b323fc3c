"""Accounting for one instance: what its events and files say about each endpoint.

Shared by ``reconcile`` (which streams the events of a window into one :class:`Ledger`
per arrival) and ``trace`` (one instance's events): the same facts give the same verdict.
The spool comes first — it is the truth, and a kill -9 can cost the journal its last
events, never a file — then the journal's word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.journal import events as kinds
from pipeline.journal.whereabouts import DELIVERED, FAILED, QUARANTINED, QUEUED, REJECTED, Place

UNACCOUNTED = "unaccounted"
STATES = (DELIVERED, QUEUED, FAILED, REJECTED, QUARANTINED, UNACCOUNTED)


@dataclass
class Ledger:
    """What the journal and the spool say about one arrival."""

    uid: str | None
    received: bool = False
    routed: bool = False
    acknowledged: bool = False
    owed: set[str] = field(default_factory=set)        # endpoints routed to (journal)
    declined: set[str] = field(default_factory=set)
    sent: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    dead_end: tuple[str, str] | None = None             # (rejected|quarantined, reason)
    last: dict[str, tuple[str, float]] = field(default_factory=dict)  # endpoint ("" = none)
    places: list[Place] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """One instance on one endpoint ("" for an instance never routed)."""

    uid: str | None
    endpoint: str
    state: str
    where: str = ""             # the file it was found as, or the event
    reason: str = ""
    last: tuple[str, float] | None = None


def apply(ledger: Ledger, kind: str, at: float, endpoint: str | None,
          detail: dict[str, Any]) -> None:
    """One event of the instance (``detail`` decoded for the kinds that need it)."""
    ledger.last[endpoint or ""] = (kind, at)
    if kind == kinds.RECEIVED:
        ledger.received = True
    elif kind == kinds.ROUTED:
        _routed(ledger, detail)
    elif kind in (kinds.REJECTED, kinds.QUARANTINED):
        ledger.dead_end = (REJECTED if kind == kinds.REJECTED else QUARANTINED,
                           str(detail.get("reason", "")))
    if not endpoint:
        return
    if kind != kinds.RETRIED:
        ledger.owed.add(endpoint)
    if kind == kinds.SENT:
        ledger.sent.add(endpoint)
        ledger.failed.pop(endpoint, None)
    elif kind == kinds.DELETED:
        ledger.deleted.add(endpoint)
    elif kind == kinds.FAILED:
        ledger.failed[endpoint] = str(detail.get("reason", "")) or "failed"
    elif kind == kinds.RETRIED:
        ledger.failed.pop(endpoint, None)


def _routed(ledger: Ledger, detail: dict[str, Any]) -> None:
    ledger.routed = True
    for key in ("endpoints", "waiting"):
        value = detail.get(key)
        if isinstance(value, list):
            ledger.owed.update(ep for ep in value if isinstance(ep, str))
    declined = detail.get("declined")
    if isinstance(declined, dict):
        ledger.declined.update(ep for ep in declined if isinstance(ep, str))


def outcomes(ledger: Ledger) -> list[Outcome]:
    """Where the instance stands on each endpoint: the spool first (it is the truth), then
    the journal's word."""
    copies = {p.endpoint for p in ledger.places if p.endpoint}
    endpoints = (ledger.owed - ledger.declined) | copies | ledger.sent | ledger.deleted
    if not endpoints:
        return [_unrouted(ledger)]
    return [_on(ledger, ep) for ep in sorted(endpoints)]


def _on(ledger: Ledger, endpoint: str) -> Outcome:
    mine = [p for p in ledger.places if p.endpoint == endpoint]
    for state in (DELIVERED, FAILED, QUEUED):
        place = next((p for p in mine if p.state == state), None)
        if place is not None:
            reason = (place.reason() or "no .error file") if state == FAILED else ""
            return Outcome(ledger.uid, endpoint, state, place.relative, reason)
    if endpoint in ledger.sent or endpoint in ledger.deleted:
        kind = kinds.SENT if endpoint in ledger.sent else kinds.DELETED
        return Outcome(ledger.uid, endpoint, DELIVERED, f"{kind} event")
    if endpoint in ledger.failed:
        return Outcome(ledger.uid, endpoint, FAILED, "failed event", ledger.failed[endpoint])
    original = _instance_place(ledger)
    if original is not None and original.state == QUEUED:  # its copies are still to be made
        return Outcome(ledger.uid, endpoint, QUEUED, original.relative)
    return Outcome(ledger.uid, endpoint, UNACCOUNTED, last=_last(ledger, endpoint))


def _unrouted(ledger: Ledger) -> Outcome:
    """An instance with no endpoint: still before routing, or deliberately stopped."""
    original = _instance_place(ledger)
    if original is not None:
        return Outcome(ledger.uid, "", original.state, original.relative,
                       original.reason() or "" if original.state != QUEUED else "")
    if ledger.dead_end is not None:
        return Outcome(ledger.uid, "", ledger.dead_end[0], f"{ledger.dead_end[0]} event",
                       ledger.dead_end[1])
    return Outcome(ledger.uid, "", UNACCOUNTED, last=_last(ledger, ""))


def _instance_place(ledger: Ledger) -> Place | None:
    dead = [p for p in ledger.places if p.endpoint is None and p.state != QUEUED]
    queued = [p for p in ledger.places if p.endpoint is None and p.state == QUEUED]
    return (dead or queued)[0] if dead or queued else None


def _last(ledger: Ledger, endpoint: str) -> tuple[str, float] | None:
    return ledger.last.get(endpoint) or max(ledger.last.values(), key=lambda v: v[1], default=None)
