"""The associations of one endpoint (``[endpoint] associations = N``), each driven by
its own worker thread: a *lane*. Lane 0 carries the first association — the one whose
refusal means the endpoint is down; ``associations = 1`` is one lane, on the same code
path as N. The others (*extras*) are opened in their own threads while lane 0 already
sends, with the first one's calling AE title and presentation contexts, so any lane can
take any file of the batch; a destination that refuses an extra is busy, not down: the
sender uses the lanes it has and asks for more later, with backoff.

A worker thread does network work only — the C-STORE of one file, or opening its
association — and hands the result back as a :class:`~concurrent.futures.Future`; the
sender's loop applies every outcome itself, one at a time (``sent/``, ``failed/``, the
retry book, the state file), so none of that bookkeeping needs to be thread-safe. At
most one file is in flight per lane: nothing is queued beyond the N files on the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.dicom import scu as net
from pipeline.log import escape
from pipeline.sending.planning import Current
from pipeline.sending.state import SenderState

if TYPE_CHECKING:
    from pipeline.dicom.filemeta import FileMeta

EXTRA_ACSE_WAIT = 5.0  # an extra association's answer is awaited at most this long


@dataclass
class Lane:
    """One association slot and the thread that drives it."""

    index: int
    current: Current | None = None
    job: Future[Any] | None = None
    #: the file the job is sending; None while the job opens the association
    file: tuple[Path, FileMeta] | None = None
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def free(self) -> bool:
        """Has an association and nothing to do: the next file may go here (a lost or
        answered-but-useless association included: the send says what became of it,
        as it always has for the first)."""
        return self.job is None and self.current is not None

    @property
    def spare(self) -> bool:
        """Free, and its association alive: it can stand in for the first one."""
        return self.free and self.current is not None and self.current.alive

    @property
    def opening(self) -> bool:
        return self.job is not None and self.file is None

    def submit(self, work: Callable[[], Any], file: tuple[Path, FileMeta] | None) -> None:
        """Run ``work`` on this lane's own thread (started on first use)."""
        assert self.job is None, "one job per lane at a time"
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"dicomflow-assoc-{self.index}")
        self.file = file
        self.job = self._executor.submit(work)

    def take(self) -> tuple[Future[Any], tuple[Path, FileMeta] | None]:
        """The finished job and its file; the lane is free again."""
        job, file = self.job, self.file
        assert job is not None and job.done()
        self.job, self.file = None, None
        return job, file

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


class LanesMixin(SenderState):
    """Opening, reusing and releasing the lanes' associations (mixed into
    :class:`services.send.Sender`; its loop thread calls every method here)."""

    def release(self, abort: bool = False) -> None:
        """Release (or abort) every association; an extra still being opened is waited
        for first (bounded by ``connect_timeout`` and ``acse_timeout``), then closed."""
        for lane in reversed(self.lanes):
            self._close_lane(lane, abort)

    def _close_lane(self, lane: Lane, abort: bool) -> None:
        if lane.job is not None:
            assert lane.opening, "a lane is released only between rounds"
            wait([lane.job])
            self._opened(lane)
        current, lane.current = lane.current, None
        if current is None:
            return
        try:
            was_alive = current.alive
            current.link.close(abort=abort)
            if was_alive and not abort:
                self.log.debug("association released")
        except Exception as exc:  # noqa: BLE001 - a dying peer must not kill the sender
            self.log.debug("error releasing association: {}", exc)

    def _harvest(self) -> None:
        """Take in the extras whose opening finished meanwhile; forget dead ones; keep
        lane 0 filled from an extra when its own association ended."""
        for lane in self.lanes[1:]:
            if lane.job is not None and lane.job.done():
                self._opened(lane)
            if lane.job is None and lane.current is not None and not lane.current.alive:
                self._close_lane(lane, abort=False)
        first = self.lanes[0]
        if first.current is None or not first.current.alive:
            spare = next((lane for lane in self.lanes[1:] if lane.spare), None)
            if spare is not None:
                if first.current is not None:
                    self._close_lane(first, abort=False)
                first.current, spare.current = spare.current, None

    def _open_extras(self, files: int) -> None:
        """Ask for more associations, on their own lanes' threads, when the batch has
        files for them: never more than ``associations - 1``, never while the endpoint
        is busy (then one lane probes), not before ``extras_next`` after a refusal."""
        first = self.current
        if first is None or not first.alive or len(self.lanes) == 1 or self.busy_since is not None:
            return
        for lane in self.lanes[1:]:  # made for another calling AE title or other contexts
            if lane.job is None and lane.current is not None and (
                    lane.current.calling_ae, lane.current.pairs) != (first.calling_ae, first.pairs):
                self._close_lane(lane, abort=False)
        if self.clock.monotonic() < self.extras_next:
            return
        wanted = min(len(self.lanes), files) - sum(
            1 for lane in self.lanes if lane.current is not None or lane.opening)
        calling, pairs = first.calling_ae, first.pairs
        for lane in self.lanes[1:]:
            if wanted <= 0:
                break
            if lane.job is None and lane.current is None:
                lane.submit(partial(self._open_extra, calling, pairs), None)
                wanted -= 1

    def _open_extra(self, calling: str, pairs: frozenset[tuple[str, str]]) -> Current | str:
        """On a lane's thread: an extra association, or why the destination refused it.
        Its answer is awaited at most :data:`EXTRA_ACSE_WAIT`: a destination that holds
        extra requests unanswered until its current association ends (DCMTK storescp
        without ``--fork``) has refused them in effect, and a shutdown or a release,
        which wait for an extra being opened, stay short."""
        ep = replace(self.ep, acse_timeout=min(self.ep.acse_timeout, EXTRA_ACSE_WAIT))
        link = net.associate(ep, calling, pairs, fallback=ep.transcode)
        if isinstance(link, net.AssociationFailure):
            return link.reason
        if not link.established:  # answered, but without the contexts the first one has
            link.close(abort=True)
            return "it accepted none of the presentation contexts on another association"
        return Current(link, calling, pairs)

    def _opened(self, lane: Lane) -> None:
        """An extra's opening finished: use it, or note the refusal — once, without
        charging a file or calling the endpoint down — and ask again after a backoff."""
        job, _ = lane.take()
        try:
            result = job.result()
        except Exception as exc:  # noqa: BLE001 - an extra must never stop the sender
            result = f"{type(exc).__name__}: {exc}"
        if isinstance(result, Current):
            lane.current = result
            self.associations += 1
            if self.extras_refused is not None:
                self.log.info("the destination accepts more associations again")
            self.extras_refused = None
            self.extras_backoff.reset()
            self.log.debug("association {} established (extra)", lane.index + 1)
            return
        mono = self.clock.monotonic()
        if mono >= self.extras_next:  # one step of backoff per round, however many refused
            self.extras_next = mono + self.extras_backoff.next_delay()
        if self.extras_refused is None:
            open_now = sum(1 for one in self.lanes if one.current is not None)
            self.log.info("the destination refused an extra association ({}); using {} of up to "
                          "{}, asking for more with backoff (the endpoint is not down)",
                          escape(result, limit=300), open_now, len(self.lanes))
        else:
            self.log.debug("extra association refused again: {}", escape(result, limit=300))
        self.extras_refused = result
