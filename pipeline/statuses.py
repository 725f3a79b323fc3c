"""C-STORE statuses: what each code means and what the sender does with it.

Success and *every* warning are *delivered*: PS3.4 (B.2.3) and PS3.7 (C) say a warning
status means the object was stored — 0x0001, 0x0107, 0x0116 and the whole 0xBxxx range,
codes not listed today included — so sending it again would only make a duplicate.
Out of resources (0xA7xx, and the general 0x0213 resource limitation) is *transient*:
the sender treats it as a condition of the endpoint (busy), not of the file. Every
other failure is *permanent* (``failed/`` with this module's explanation in the
sidecar, written for an integration engineer, not a DICOM expert).
"""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


_MEANINGS = {
    0x0000: "Success",
    0x0001: "Warning: requested optional attributes are not supported",
    0x0107: "Warning: attribute list error",
    0x0116: "Warning: attribute value out of range",
    0xB000: "Warning: coercion of data elements (the destination changed some values)",
    0xB006: "Warning: elements discarded by the destination",
    0xB007: "Warning: data set does not match SOP class (stored anyway)",
    0x0105: "Failure: no such attribute",
    0x0106: "Failure: invalid attribute value",
    0x0110: "Failure: processing failure (the destination could not process the object)",
    0x0111: "Failure: duplicate SOP Instance (the destination already has it)",
    0x0117: "Failure: invalid SOP Instance UID",
    0x0118: "Failure: no such SOP class",
    0x0119: "Failure: class-instance conflict",
    0x0120: "Failure: missing attribute",
    0x0121: "Failure: missing attribute value",
    0x0122: "Failure: SOP class not supported by the destination",
    0x0124: "Failure: not authorised (refused by the destination's access rules)",
    0x0210: "Failure: duplicate invocation",
    0x0211: "Failure: unrecognised operation",
    0x0212: "Failure: mistyped argument",
    0x0213: "Failure: resource limitation",
    0xFE00: "Cancelled",
}

_RANGES = (
    (0xA700, 0xA7FF, "Failure: out of resources at the destination (disk full or busy; retried)"),
    (0xA900, 0xA9FF, "Failure: data set does not match SOP class"),
    (0xC000, 0xCFFF, "Failure: cannot understand (the destination could not parse the object)"),
    (0xB000, 0xBFFF, "Warning (the destination stored the object)"),
)

_DELIVERED = frozenset({0x0000, 0x0001, 0x0107, 0x0116})
_WARNING_RANGE = (0xB000, 0xBFFF)


def meaning(status: int) -> str:
    """A human explanation of a C-STORE status code."""
    if status in _MEANINGS:
        return _MEANINGS[status]
    for low, high, text in _RANGES:
        if low <= status <= high:
            return text
    return "Failure: unknown status"


def classify(status: int) -> Outcome:
    """What a sender does with a C-STORE status: every warning means stored."""
    if status in _DELIVERED or _WARNING_RANGE[0] <= status <= _WARNING_RANGE[1]:
        return Outcome.DELIVERED
    if 0xA700 <= status <= 0xA7FF or status == 0x0213:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def describe(status: int) -> str:
    """``0xA700 (Failure: out of resources …)`` for logs and ``.error`` sidecars."""
    return f"0x{status:04X} ({meaning(status)})"
