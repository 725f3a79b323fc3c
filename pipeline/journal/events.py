"""What the journal records: the kinds of event and the shape of one.

An event is a tuple in :data:`pipeline.journal.schema.COLUMNS` order, made on the data
path at the cost of building a tuple; its ``detail`` dict is turned into JSON by the
writer thread, not by the caller.
"""

from __future__ import annotations

from typing import Any, NamedTuple

RECEIVED = "received"        # acknowledged to a sender (C-STORE success): receive
QUARANTINED = "quarantined"  # moved to quarantine/ with a reason: filter
REJECTED = "rejected"        # moved to rejected/ by a rule: filter
ROUTED = "routed"            # copies made for these endpoints (or waiting for its study)
SHAPED = "shaped"            # an endpoint's own copy written (coercion, de-identification)
SENT = "sent"                # the destination's C-STORE response was a success: send
ATTEMPT = "attempt"          # a try that failed and will be retried: send
FAILED = "failed"            # moved to failed/<endpoint> with a reason: send or filter
RETRIED = "retried"          # moved back from failed/ to the outbox by an operator
DELETED = "deleted"          # a delivered copy removed from sent/ (retention, disk floor)

#: the header tags the filter reads for its events (study, series), and with journal_phi
#: (Patient ID, Accession Number)
JOURNAL_TAGS = frozenset({0x0020000D, 0x0020000E})
JOURNAL_PHI_TAGS = frozenset({0x00100020, 0x00080050})

KINDS = (RECEIVED, QUARANTINED, REJECTED, ROUTED, SHAPED, SENT, ATTEMPT, FAILED, RETRIED,
         DELETED)


class Event(NamedTuple):
    """One row of the journal (see :mod:`pipeline.journal.schema`)."""

    at: float
    kind: str
    daemon: str
    uid: str | None
    file: str | None
    endpoint: str | None
    study: str | None
    series: str | None
    status: int | None
    detail: dict[str, Any]
    patient_id: str | None
    accession: str | None
