"""``dicomflow send ENDPOINT``: deliver ``outbox/<endpoint>/`` to one destination.

One process per endpoint (README, How it works). The loop, in the manner of rq's worker:
filesystem events only *trigger* a rescan of the outbox (inotify is not a ledger);
files go out in arrival (name) order over a reused association whose presentation
contexts come from the files at hand — or, with ``[endpoint] associations = N``, over up
to N of them, each driven by its own thread, handed one file each in that order (so
they may arrive out of order), every outcome applied by this loop; each file ends in
``sent/`` or ``failed/`` (with its reason) or stays for a later retry. Endpoint health
is separate from file failure: an unreachable destination charges no file an attempt, it is probed with a
capped backoff until it answers; a destination out of resources (0xA7xx) is *busy*,
the same way. The sender's own bookkeeping never stops it: a delivered file whose
move to ``sent/`` fails is never sent again (see :class:`pipeline.sending.outcomes.Pending`). Outside its
delivery window the sender sleeps until the next opening. A study released by the
filter (study/series level) has a *study list* under ``run/studies/queue/<endpoint>/``:
its files go out whole, in the list's order, on an association of their own
(:mod:`pipeline.sending.studies`); the list is removed once they have left the outbox.
A signal only sets a flag: the file in flight (on each association) finishes, the
association is released, the process exits 0 — but a transfer blocked on a
destination that stopped reading (or answering) is cut, so a shutdown never waits on a
peer.

The loop and life cycle are here (:mod:`pipeline.daemon`); the concerns it drives are
in :mod:`pipeline.sending`: endpoint health (``health``), the associations and their
threads (``lanes``), association planning and each file's meta (``planning``), the
C-STOREs and transcoding (``delivery``), and what becomes of each file (``outcomes``).
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
from pathlib import Path

from pipeline import daemon
from pipeline import log as logsetup
from pipeline.backoff import Backoff
from pipeline.clock import SystemClock
from pipeline.config import Config, EndpointConfig
from pipeline.daemon import Signals, Step
from pipeline.dicom import patches
from pipeline.dicom.filemeta import FileMeta
from pipeline.journal import Journal, NoJournal, for_daemon
from pipeline.lock import DaemonLock
from pipeline.log import escape, logger
from pipeline.sender_state import RetryBook, StateReporter, sender_name
from pipeline.sending.delivery import DeliveryMixin
from pipeline.sending.health import HealthMixin
from pipeline.sending.lanes import Lane, LanesMixin
from pipeline.sending.outcomes import OutcomesMixin, Pending
from pipeline.sending.planning import Current, PlanningMixin
from pipeline.sending.studies import StudyLists
from pipeline.spool import DICOM_SUFFIX, Spool, is_hidden
from pipeline.watch import DirectoryWatcher

RESCAN_INTERVAL = 5.0        # idle rescan: inotify overflows silently on big bursts
PRUNE_INTERVAL = 3600.0      # sent/ retention is enforced hourly
MAX_WINDOW_SLEEP = 900.0     # recompute the next opening now and then (clock jumps, DST)
SHUTDOWN_STALL = 2.0         # on SIGTERM, a send blocked this long on the peer is cut
SHUTDOWN_ANSWER_WAIT = 15.0  # …and an answer is awaited at most this long (or dimse_timeout)


class Sender(HealthMixin, LanesMixin, PlanningMixin, DeliveryMixin, OutcomesMixin):
    """The delivery daemon of one endpoint; every dependency is injectable for tests."""

    def __init__(self, config: Config, endpoint: str, clock=None, rng: random.Random | None = None,
                 install_signals: bool = True, rescan_interval: float = RESCAN_INTERVAL,
                 journal: Journal | None = None) -> None:
        self.config = config
        self.ep: EndpointConfig = config.endpoints[endpoint]
        self.name = endpoint
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.install_signals = install_signals
        self.rescan_interval = rescan_interval
        self.spool = Spool(config.spool)
        self.outbox = self.spool.outbox(endpoint)
        self.log = logger.bind(endpoint=endpoint)
        self.retry = RetryBook(self.spool, endpoint, self.clock)
        self.state = StateReporter(self.spool, endpoint, self.clock)
        self.probes = Backoff(self.ep.retry.probe_backoff, self.ep.retry.probe_backoff_cap, self.rng)
        self.watcher = DirectoryWatcher(self.outbox)
        self.lock = DaemonLock(self.spool.run_dir, sender_name(endpoint))
        self.stopping = False
        self.closed = False
        # [endpoint] associations: lane 0 is the first association, the rest the extras
        self.lanes = [Lane(i) for i in range(self.ep.associations)]
        self.extras_next = 0.0
        self.extras_backoff = Backoff(self.ep.retry.probe_backoff, self.ep.retry.probe_backoff_cap,
                                      self.rng)
        self.extras_refused: str | None = None
        self.last_activity = self.clock.monotonic()
        self.down_reason: str | None = None
        self.down_at = 0.0
        self.next_probe = 0.0
        self.last_probe: float | None = None
        self.verification = True  # False once the destination refused Verification
        self.next_prune = 0.0
        self.metas: dict[str, FileMeta] = {}
        self.suspects: dict[str, int] = {}
        self.pending: dict[str, Pending] = {}
        self.good_pairs: set[tuple[str, str]] = set()
        # Out of resources (0xA7xx) is the endpoint's condition: a file is charged only
        # if another one was stored since its last such refusal.
        self.stored = 0                                   # files stored since start
        self.refused: dict[str, tuple[int, int]] = {}     # name -> (self.stored then, order)
        self.refusals = 0
        self.busy_since: float | None = None
        self.busy_until = 0.0
        self.busy_probes = Backoff(self.ep.retry.probe_backoff, self.ep.retry.probe_backoff_cap,
                                   self.rng)
        self.associations = 0
        #: made in start() unless a test gives one
        self.journal: Journal = journal or NoJournal()
        self._own_journal = journal is None
        self.store_times: dict[str, float] = {}
        self.studies = StudyLists(self.spool, endpoint, self.clock)

    def start(self) -> None:
        self.spool.create([self.name])
        self.lock.acquire()
        for directory in (self.outbox, self.spool.sent(self.name), self.spool.failed(self.name)):
            self.spool.clean_tmp(directory)
        self.spool.clean_dead_tmp(self.spool.run_dir)  # a state file cut short by a kill -9
        self.retry.load()
        if self._own_journal:
            router = self.config.router
            self.journal = for_daemon(self.spool.run_dir, sender_name(self.name), router.journal,
                                      router.journal_phi)
        self.watcher.start()
        self.log.info("sender started for {}@{}:{} (window: {})", escape(self.ep.ae_title),
                      self.ep.host, self.ep.port, escape(self.ep.window.describe()))

    def _on_stop(self) -> None:
        """SIGTERM/SIGINT, called by :class:`Signals` from its own thread (never in the
        handler: the main thread may be inside the watcher's own lock right now)."""
        self.stopping = True
        self.watcher.wake()
        threading.Thread(target=self._cut_stalled_send, name="dicomflow-stop", daemon=True).start()

    def _cut_stalled_send(self) -> None:
        """While stopping: the files in flight may finish — unless a send is blocked on
        a destination that stopped reading, or the destination has kept it waiting for
        its answer longer than ``SHUTDOWN_ANSWER_WAIT`` (or ``dimse_timeout``, if
        shorter); that association is cut, so a shutdown never waits on a peer beyond
        supervisord's stop timeout (the file stays in the outbox and is sent again).
        Each lane's association is watched, until the sender has closed."""
        answer_wait = min(self.ep.dimse_timeout, SHUTDOWN_ANSWER_WAIT)
        cut: list[Current] = []
        while not self.closed:
            for lane in self.lanes:
                current = lane.current
                if current is None or any(current is done for done in cut):
                    continue
                if (current.link.send_blocked_for() >= SHUTDOWN_STALL
                        or current.link.exchange_quiet_for() >= answer_wait):
                    current.link.cut("stopping: the destination stopped reading or answering")
                    self.log.warning("stopping: the destination stopped reading or answering; "
                                     "transfer cut, the file stays in the outbox")
                    cut.append(current)
            if cut and len(self.lanes) == 1:
                return
            threading.Event().wait(0.1)

    def stop(self) -> None:
        """Ask the loop to finish the file in flight and exit (signal-safe)."""
        self.stopping = True
        self.watcher.wake()

    def close(self) -> None:
        self.closed = True
        self.release()
        for lane in self.lanes:
            lane.shutdown()
        self.state.set("stopped")
        self.state.flush()
        self.watcher.stop()
        if self._own_journal:
            self.journal.close()
        self.lock.release()
        self.log.info("sender stopped")

    def run(self, once: bool = False) -> int:
        """Deliver until stopped (:func:`pipeline.daemon.run`). With ``once``, return as
        soon as nothing is deliverable without new files or the endpoint coming back
        (outbox empty, endpoint down, or a move to ``sent/`` the disk refuses); waits for
        retries, a busy endpoint and windows still happen, through the injected clock."""
        signals = Signals(self._on_stop) if self.install_signals else contextlib.nullcontext()
        with signals:
            return daemon.run(self, once)

    # -- one turn of the loop ----------------------------------------------------------

    def step(self) -> Step:
        """Do the next thing. Returns (seconds to wait or None to go on at once, whether
        the sender is *idle*: blocked on something outside it, new files or the endpoint)."""
        self._maybe_prune()
        self._bookkeeping()
        now = self.clock.now()
        if not self.ep.window.is_open(now):
            return Step(self._outside_window(now), False)
        mono = self.clock.monotonic()
        if self.down_reason is not None and mono < self.next_probe:
            self.state.set("down")
            return Step(self.next_probe - mono, True)
        stalled = self._stalled_until()
        if stalled is not None:
            self.state.flush()
            return Step(self._idle_timeout(stalled), True)
        if self.busy_since is not None and mono < self.busy_until:
            # each probe on a fresh association: the one that was refused may be served by
            # a process of the destination that is going away (a restarted storescp's
            # child, a PACS node being drained) while a new association would be taken
            self.release()
            self.state.set("busy")
            return Step(self._idle_timeout(self.busy_until), False)
        due, next_due = self._scan()
        if not due:
            if self.current is not None and self.current.study is not None:
                self.release()  # a study's association carries that study alone: it is done
            self.busy_since = None  # nothing left to try: whatever comes next goes out at once
            self.busy_probes.reset()
            self.state.set("down" if self.down_reason else "idle")
            self.state.flush()
            return Step(self._idle_timeout(next_due), next_due is None)
        if self.down_reason is not None and not self._probe():
            return Step(None, False)
        self._deliver(due)
        return Step(None, False)

    def _scan(self) -> tuple[list[Path], float | None]:
        """Files waiting in the outbox (``.dcm``, visible), in sending order (name order,
        released studies by their lists: :mod:`pipeline.sending.studies`), split into due
        now and the earliest monotonic time a backed-off file becomes due."""
        paths = self.studies.arrange([p for p in self.spool.list_stage(self.outbox)
                                      if p.name.endswith(DICOM_SUFFIX) and not is_hidden(p.name)])
        names = {p.name for p in paths}
        self.retry.keep_only(names)
        for cache in (self.metas, self.refused):
            for stale in [n for n in cache if n not in names]:
                del cache[stale]
        mono = self.clock.monotonic()
        due = [p for p in paths if self.retry.is_due(p.name, mono) and p.name not in self.pending]
        if len(due) == len(paths):
            return due, None
        ready = {p.name for p in due}
        times = [self.pending[n].due if n in self.pending else self.retry.not_before.get(n, mono)
                 for n in names if n not in ready]
        return due, min(times, default=None)

    def wait(self, seconds: float) -> None:
        """Until ``seconds`` pass on the clock or a file event (or :meth:`stop`) wakes us."""
        if not self.stopping:
            self.clock.wait(self.watcher, seconds)

    def _idle_timeout(self, next_due: float | None) -> float:
        """Until a retry falls due, the idle association is to be released, or the
        periodic rescan (a file event ends the wait earlier)."""
        mono = self.clock.monotonic()
        timeout = self.rescan_interval
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - mono))
        if self.current is not None:
            idle_left = self.last_activity + self.ep.idle_release - mono
            if idle_left <= 0 or not self.current.alive:
                self.release()
            else:
                timeout = min(timeout, idle_left)
        return timeout

    def _outside_window(self, now) -> float:
        opening = self.ep.window.next_open(now)
        self.release()
        if self.state.state != "outside_window":
            self.log.info("outside the delivery window; next opening {}", opening.isoformat())
        self.state.set("outside_window", next_open=opening)
        seconds = (opening - now).total_seconds()
        return min(max(seconds, 0.0), MAX_WINDOW_SLEEP)

    def _maybe_prune(self) -> None:
        mono = self.clock.monotonic()
        if mono < self.next_prune:
            return
        self.next_prune = mono + PRUNE_INTERVAL
        try:
            removed = self.spool.prune_sent(older_than=self.ep.sent_retention, endpoint=self.name,
                                            now=self.clock.time(),
                                            on_delete=self.journal.deleted_from_sent("retention"))
        except OSError as exc:  # bookkeeping: never worth stopping delivery for
            self.log.warning("cannot prune sent/{}: {}; trying again in {:g}s", self.name,
                             exc.strerror or exc, PRUNE_INTERVAL)
            return
        if removed:
            self.log.info("pruned {} delivered files older than {:g}s from sent/{}", removed,
                          self.ep.sent_retention, self.name)



def main(config: Config, endpoint: str) -> int:
    if endpoint not in config.endpoints:
        known = ", ".join(sorted(config.endpoints)) or "none"
        print(f"dicomflow: unknown endpoint {endpoint!r} (configured: {known}; "
              f"add {config.conf_dir / 'endpoints' / (endpoint + '.ini')})", file=sys.stderr)
        return 1
    ep = config.endpoints[endpoint]
    logsetup.setup_daemon(sender_name(endpoint), config.router, ep.log_level)
    patches.install("send")
    return Sender(config, endpoint).run()
