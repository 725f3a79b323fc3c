"""The state the sender's concerns share, declared once for readers and the type
checker: :class:`services.send.Sender`'s ``__init__`` sets every attribute; each mixin
of this package inherits :class:`SenderState`, so a method of one concern may call
another concern's (declared below for the checker only, never at run time).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.backoff import Backoff
    from pipeline.clock import Clock
    from pipeline.config import Config, EndpointConfig
    from pipeline.dicom.filemeta import FileMeta
    from pipeline.dicom.scu import Link
    from pipeline.journal import Journal
    from pipeline.sender_state import RetryBook, StateReporter
    from pipeline.sending.lanes import Lane
    from pipeline.sending.outcomes import Pending
    from pipeline.sending.planning import Current, Plan
    from pipeline.sending.studies import StudyLists
    from pipeline.spool import Spool
    from pipeline.watch import DirectoryWatcher


class SenderState:
    """Attributes of one endpoint's sender (see ``Sender.__init__`` for their meaning)."""

    config: Config
    ep: EndpointConfig
    name: str
    clock: Clock
    rng: random.Random
    spool: Spool
    outbox: Path
    log: Any                      # loguru's logger bound to the endpoint
    retry: RetryBook
    state: StateReporter
    probes: Backoff
    watcher: DirectoryWatcher
    stopping: bool
    closed: bool
    lanes: list[Lane]             # [0]: the first association; then the extras
    extras_next: float            # monotonic time before which no extra is asked for
    extras_backoff: Backoff       # …growing while the destination refuses extras
    extras_refused: str | None    # why, said once until an extra is accepted again
    last_activity: float
    down_reason: str | None
    down_at: float
    next_probe: float
    last_probe: float | None
    verification: bool
    next_prune: float
    metas: dict[str, FileMeta]
    suspects: dict[str, int]
    pending: dict[str, Pending]
    good_pairs: set[tuple[str, str]]
    stored: int
    refused: dict[str, tuple[int, int]]
    refusals: int
    busy_since: float | None
    busy_until: float
    busy_probes: Backoff
    associations: int
    journal: Journal              # the events of each file (pipeline/journal)
    store_times: dict[str, float]  # name -> seconds its last C-STORE took (for the journal)
    studies: StudyLists           # the endpoint's study lists (send order, retirement)

    @property
    def current(self) -> Current | None:
        """The first association (lane 0): its refusal means the endpoint is down."""
        return self.lanes[0].current

    @current.setter
    def current(self, value: Current | None) -> None:
        self.lanes[0].current = value

    if TYPE_CHECKING:  # implemented by the concern named in the comment
        def release(self, abort: bool = False) -> None: ...                        # lanes
        def _close_lane(self, lane: Lane, abort: bool) -> None: ...                # lanes
        def _harvest(self) -> None: ...                                             # lanes
        def _open_extras(self, files: int) -> None: ...                             # lanes
        def _opened(self, lane: Lane) -> None: ...                                  # lanes
        def _associate(self, calling_ae: str, pairs: frozenset[tuple[str, str]],
                       study: str | None = None) -> Current | None: ...             # planning
        def _plan(self, due: list[Path]) -> Plan: ...                               # planning
        def _file_log(self, path: Path) -> Any: ...                                 # planning
        def _mark_down(self, reason: str, link: Link | None = None) -> None: ...    # health
        def _mark_up(self) -> None: ...                                             # health
        def _mark_busy(self, text: str) -> None: ...                                # health
        def _end_busy(self) -> None: ...                                            # health
        def _fail(self, path: Path, meta: FileMeta | None, text: str, log: Any) -> None: ...
        def _transient(self, path: Path, meta: FileMeta, text: str, log: Any) -> None: ...
        def _out_of_resources(self, path: Path, meta: FileMeta, text: str, log: Any) -> None: ...
        def _delivered(self, path: Path, text: str, status: int, log: Any) -> None: ...
