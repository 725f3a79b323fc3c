"""``dicomflow filter``: route every file in ``incoming/`` to its outboxes (README, How it works).

For each file, in name (arrival) order: read only its header, apply the global rules,
move it to ``accepted/`` under its standard name, hard-link it into the outbox of every
endpoint whose rules match, then unlink it from ``accepted/``. ``accepted/`` is the
durable decision point: at start-up, and after any interruption, whatever is there is
fanned out again (``Spool.link`` tolerates links that already exist), so a kill -9 at
any instant may at worst repeat a link, never lose or double a copy.

A file that nobody wants goes to ``rejected/``; a file that is unsafe or unreadable goes
to ``quarantine/``; both with a ``.reason`` sidecar. The daemon never dies on a file.

The daemon is driven by the one skeleton (``pipeline.daemon``): ``start``, ``step`` until
stopped, ``close``; ``run(once=True)`` returns at the first idle step, i.e. when nothing
in ``incoming/`` is still settling. The header read locates only the elements some rule
(or the filter) reads, computed once per configuration (``pipeline.header_scan``;
``DICOMFLOW_FASTPATH=0`` or ``DICOMFLOW_PATCHES_OFF=scan`` in the environment: pydicom's
full read). inotify (``DirectoryWatcher``) only wakes the loop and
the directory is always rescanned; signals reach it through ``pipeline.daemon.Signals``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import time
from pathlib import Path

from loguru import logger
from pydicom.uid import UID

from pipeline import config as config_module
from pipeline import daemon as daemon_module
from pipeline import header as header_module
from pipeline import header_scan
from pipeline.config import Config
from pipeline.daemon import Signals, Step
from pipeline.errors import ConfigError, DiskTrouble, QuarantineError, ShapingError
from pipeline.header import Header
from pipeline.journal import Journal, NoJournal, for_daemon
from pipeline.journal.events import (
    FAILED,
    JOURNAL_PHI_TAGS,
    JOURNAL_TAGS,
    QUARANTINED,
    REJECTED,
    ROUTED,
    SHAPED,
)
from pipeline.lock import DaemonLock
from pipeline.log import setup_daemon, shown_name
from pipeline.names import escape
from pipeline.rules import RuleSet
from pipeline.shaping.copies import TMP_OWNER, Shaper, copy_prefix
from pipeline.spool import FILE_MODE, Spool, fresh_name_like
from pipeline.spool_names import SpoolName, is_standard
from pipeline.studies import queue
from pipeline.studies.desk import SEND, STUDY_TAGS, WAIT, InstanceIds, Release, StudyDesk, instance_ids
from pipeline.studies.levels import Routing, decide_routing
from pipeline.studies.mpps import MppsStore
from pipeline.watch import DirectoryWatcher, open_for_writing, writer_pids

#: OS errors that say "the disk (or the system) is in trouble, try again later",
#: as opposed to something wrong with one file.
RETRYABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE,
                    errno.ENFILE, errno.ENOMEM}
#: the log line's endpoints of a file that only waits for its series/study so far
NONE_YET = "(none yet)"
#: a file held open for writing this many settle times is reported (one WARNING)
HELD_WARNING_FACTOR = 20
JOURNAL_PRUNE_INTERVAL = 3600.0  # seconds between runs of the journal's retention


@dataclasses.dataclass
class _Arrival:
    """A file seen in incoming/: its (size, mtime, inode), and since when it is unchanged."""

    key: tuple[int, int, int]
    since: float
    completed: bool = False
    held_since: float | None = None
    warned: bool = False


def standard_name(name: str, sop_instance_uid: str | None) -> str:
    """Keep a name the receiver (or we) gave; give anything else a fresh standard name."""
    parsed = SpoolName.parse(name)
    if parsed is not None and parsed.uid == (sop_instance_uid or None):
        return name
    return str(SpoolName.new(sop_instance_uid))


class FilterDaemon:
    """The filter loop, bound to its configuration, spool and logger (no globals)."""

    def __init__(self, config: Config, spool: Spool | None = None, log=None, *,
                 settle: float | None = None, rescan_interval: float = 5.0,
                 retry_interval: float = 5.0, journal: Journal | None = None) -> None:
        self.config = config
        #: events of each file (pipeline/journal); made in start() unless a test gives one
        self.journal: Journal = journal or NoJournal()
        self._own_journal = journal is None
        self._journal_prune_due = 0.0
        self.spool = spool or Spool(config.spool)
        self.log = log or logger.bind(daemon="filter")
        #: seconds a file without a close-write event must stay unchanged ([filter] settle_time)
        self.settle = config.router.settle_time if settle is None else settle
        #: a writer holding a file open this long (and not writing) is reported, once
        self.held_warning = HELD_WARNING_FACTOR * max(self.settle, 0.05)
        self.rescan_interval = rescan_interval
        self.retry_interval = retry_interval
        self.watcher = DirectoryWatcher(self.spool.incoming)
        self.desk = _desk(config, self.spool, self.log)
        #: operators' release requests and the receiver's MPPS steps wake the same loop
        self._side_watchers = [DirectoryWatcher(directory, self.watcher.event)
                               for directory in (self.desk.requests_dir, self.desk.mpps_dir)]
        #: when ``accepted/`` is next listed whole (at start, then now and then: files that
        #: wait for their study stay there, and are not looked at on every step)
        self._accepted_due = 0.0
        self._recovered_waiting = 0
        #: waiting files to read again (a reload changed the rules of a group they are in)
        self._reindex: set[str] = set()
        self.stopping = False
        self.reload_requested = False
        self._lock = DaemonLock(self.spool.run_dir, "filter")
        self._seen: dict[str, _Arrival] = {}
        self._retry_at: dict[Path, float] = {}
        self.wanted = _wanted(config)
        self.shaper = Shaper(config, self.spool)
        #: while recovering ``accepted/``: per endpoint, the prefixes of the copies it has
        #: (outbox, sent, failed), listed once per pass
        self._copies: dict[str, set[str]] | None = None
        self._unknown_handbacks: set[str] = set()

    # -- control (from any thread; ``Signals`` calls them outside the handler) ---------

    def request_stop(self) -> None:
        self.stopping = True
        self.watcher.wake()

    def request_reload(self) -> None:
        """Reload at the next step, on the loop's thread (never beside a file in flight)."""
        self.reload_requested = True
        self.watcher.wake()

    # -- the loop (driven by ``pipeline.daemon.run``) ----------------------------------

    def run(self, once: bool = False) -> int:
        """Process ``incoming/`` until stopped; with ``once``, until a step is idle."""
        return daemon_module.run(self, once)

    def start(self) -> None:
        """Take the lock, clean up after a previous run, watch ``incoming/``."""
        self.spool.create(self.config.endpoints)
        self._lock.acquire()
        try:
            # Not incoming/.tmp: that is the receiver's, and it may be receiving right now.
            for stage in (self.spool.accepted, self.spool.rejected, self.spool.quarantine):
                self.spool.clean_tmp(stage)
            for endpoint in self.config.endpoints:  # shaped copies cut short by a kill -9
                self.spool.clean_tmp(self.spool.outbox(endpoint), process=TMP_OWNER)
            for endpoint in self.spool.handbacks():
                self.spool.clean_tmp(self.spool.handback(endpoint))
            self.spool.clean_dead_tmp(self.spool.run_dir)
            if self._own_journal:
                router = self.config.router
                self.journal = for_daemon(self.spool.run_dir, "filter", router.journal,
                                          router.journal_phi)
            self.watcher.start()
            if self.desk.active:
                self._open_desk()
                self._recovered_waiting = 0
                with contextlib.suppress(DiskTrouble):  # retried by the loop
                    self.recover_accepted()
                self.desk.recovered()
                if self._recovered_waiting:
                    self.log.info(f"{self._recovered_waiting} file(s) in accepted/ wait for "
                                  f"{len(self.desk.index)} series/stud(y/ies): index rebuilt "
                                  f"from their headers")
            else:
                self.desk.forget_state()
        except BaseException:
            self.close()
            raise
        endpoints = ", ".join(sorted(self.config.endpoints)) or "none"
        self.log.info(f"filter ready: watching {self.spool.incoming}, endpoints: {endpoints}")

    def _open_desk(self) -> None:
        """The study side's records, and the watchers of MPPS steps and release requests."""
        self.desk.open()
        for watcher in self._side_watchers:
            watcher.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            watcher.start()

    def step(self) -> Step:
        """Fan out ``accepted/``, route every ready file; idle when nothing is settling.

        Files waiting for a retry after a disk error are timed, not settling: they do
        not keep a ``once`` run going (nor does a disk in trouble).
        """
        if self.reload_requested:
            self.reload()
        if time.monotonic() >= self._journal_prune_due:  # retention: hourly, off this thread
            self.journal.request_prune(self.config.router.journal_retention)
            self._journal_prune_due = time.monotonic() + JOURNAL_PRUNE_INTERVAL
        try:
            if not self.desk.active or time.monotonic() >= self._accepted_due:
                self.recover_accepted()
            settling = self.scan_incoming()
            self.release_due()
        except DiskTrouble:
            settling = 0
        finally:
            self._sync_records()
        return Step(self._timeout(settling), idle=settling == 0)

    def wait(self, seconds: float) -> None:
        self.watcher.wait(seconds)

    def close(self) -> None:
        """Stop watching and release the lock (also after a failed start)."""
        self.watcher.stop()
        for watcher in self._side_watchers:
            watcher.stop()
        if self.desk.active and self._lock.held:
            self.desk.write_state(force=True)
            self.desk.close()
        if self._own_journal:
            self.journal.close()
        if self._lock.held:
            self._lock.release()
            self.log.info("filter stopped")

    def _timeout(self, settling: int) -> float:
        """Sleep until an event, or sooner when files are settling or due for a retry."""
        timeout = self.rescan_interval
        if settling > 0:
            timeout = min(timeout, max(self.settle / 4, 0.05))
        if self._retry_at:
            due = min(self._retry_at.values()) - time.monotonic()
            timeout = min(timeout, max(due, 0.05))
        study_due = self.desk.next_due()
        if study_due is not None:
            timeout = min(timeout, max(study_due, 0.01))
        return timeout

    # -- scanning --------------------------------------------------------------------

    def recover_accepted(self) -> None:
        """Fan out whatever a previous run (or a disk error) left in ``accepted/``, then
        shape what senders handed back (``accepted/<endpoint>/``).

        A copy made before the interruption is recognised by the ``<time>-<counter>``
        prefix its name shares with the accepted file (a shaped copy is another inode),
        in the endpoint's outbox, ``sent/`` or ``failed/``: none is made twice.
        """
        self._copies = {}
        self._accepted_due = time.monotonic() + self.rescan_interval
        try:
            listed = self.spool.list_stage(self.spool.accepted)
            self._forget_retries(self.spool.accepted, {path.name for path in listed})
            for path in listed:
                if self.stopping:
                    return
                if (self.desk.index.waiting(path.name) and path.name not in self._reindex
                        and path not in self._retry_at):
                    continue  # waits for its series/study (and has all its other copies)
                self._reindex.discard(path.name)
                if self._due(path) and not path.is_dir():
                    self.process(path)
            for endpoint in self.spool.handbacks():
                for path in self.spool.list_stage(self.spool.handback(endpoint)):
                    if self.stopping:
                        return
                    if self._due(path):
                        self.process_handback(path, endpoint)
        finally:
            self._copies = None

    def scan_incoming(self) -> int:
        """Process every ready file in name order; return how many are still settling.

        Files waiting for a retry after a disk error are not counted (they are timed).
        """
        settling = 0
        names = set()
        for path in self.spool.list_stage(self.spool.incoming):
            if self.stopping:
                break
            names.add(path.name)
            if not self._due(path):
                continue
            if self._ready(path):
                self.process(path)
            elif os.path.lexists(path):
                settling += 1
        for name in set(self._seen) - names:
            del self._seen[name]
        self._forget_retries(self.spool.incoming, names)
        return settling

    def _forget_retries(self, stage: Path, names: set[str]) -> None:
        """Retries of files no longer in ``stage`` (moved on, or away): their timers would
        wake the loop for ever."""
        for path in [p for p in self._retry_at if p.parent == stage and p.name not in names]:
            del self._retry_at[path]

    def _due(self, path: Path) -> bool:
        at = self._retry_at.get(path)
        if at is None:
            return True
        if time.monotonic() >= at:
            del self._retry_at[path]
            return True
        return False

    def _ready(self, path: Path) -> bool:
        """Complete: nobody has it open for writing, and it was moved in / closed after
        writing or stayed unchanged for the settle time.

        A file still open for writing is never taken, however long its writer stalls:
        stability and mtime cannot tell a stalled ``cp`` from a finished one (nor survive
        a clock step). An old mtime counts only when the kernel says nobody writes.
        """
        name = path.name
        completed = self.watcher.take_completed(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._seen.pop(name, None)
            return False
        if not stat.S_ISREG(st.st_mode):
            self._seen.pop(name, None)
            return True  # nothing to wait for: it goes to quarantine
        now = time.monotonic()
        arrival = self._arrival(name, (st.st_size, st.st_mtime_ns, st.st_ino), now)
        arrival.completed |= completed
        settled = arrival.completed or now - arrival.since >= self.settle
        if not settled and time.time() - st.st_mtime < self.settle:
            return False
        writing = open_for_writing(path)
        if writing:
            self._held(path, st, arrival, now)
            return False
        if not settled and writing is None:
            return False  # only the mtime says it is old, and nobody can confirm it
        del self._seen[name]
        return True

    def _arrival(self, name: str, key: tuple[int, int, int], now: float) -> _Arrival:
        """What we know of a file in incoming/; a change of size/mtime/inode restarts its clock."""
        arrival = self._seen.get(name)
        if arrival is None:
            arrival = self._seen[name] = _Arrival(key, now)
        elif arrival.key != key:  # a writer at work: not (yet) a stalled one either
            arrival.key, arrival.since, arrival.completed, arrival.held_since = key, now, False, None
        return arrival

    def _held(self, path: Path, st: os.stat_result, arrival: _Arrival, now: float) -> None:
        """A file stays while a writer holds it open; after a long while, say so once.

        A writer that died without closing (a hung process, a stopped job) would
        otherwise hold the file silently for ever.
        """
        if arrival.held_since is None:
            arrival.held_since = now
            self.log.bind(file=escape(path.name)).debug("still open for writing: waiting for its writer")
        if arrival.warned or now - arrival.held_since < self.held_warning:
            return
        arrival.warned = True
        pids = writer_pids(path) or []
        writer = f" by pid {', '.join(map(str, pids))}" if pids else ""
        self.log.bind(file=shown_name(path.name)).warning(
            f"a file in incoming/ (inode {st.st_ino}, {st.st_size} bytes) has been held open "
            f"for writing{writer} for {now - arrival.held_since:.0f}s: it stays there until "
            f"its writer closes it")

    # -- one file --------------------------------------------------------------------

    def process(self, path: Path) -> None:
        """Decide and move one file; log one line; never raise for a file's sake."""
        log = self.log.bind(file=shown_name(path.name))
        try:
            message = self._process(path)
        except FileNotFoundError:
            log.debug("vanished before it could be filtered")
            return
        except OSError as exc:
            if exc.errno not in RETRYABLE_ERRNOS:
                self._internal_error(path, exc, log)
                return
            self._retry_at[path] = time.monotonic() + self.retry_interval
            log.warning(f"disk error, will retry in {self.retry_interval:g}s: {error_text(exc, path)}")
            raise DiskTrouble() from exc
        except Exception as exc:  # the daemon never dies on a file
            self._internal_error(path, exc, log)
            return
        if message:
            log.info(message)

    def _internal_error(self, path: Path, exc: BaseException, log) -> None:
        reason = f"error while filtering: {type(exc).__name__}: {exc}"
        # The exception's text may quote the path (a hand-dropped name): only at DEBUG.
        log.warning(f"error while filtering: {error_text(exc, path)} (traceback at DEBUG)")
        log.opt(exception=exc).debug(escape(reason))
        try:
            log.info(self._quarantine(path, reason))
        except FileNotFoundError:
            pass
        except Exception as again:
            self._retry_at[path] = time.monotonic() + self.retry_interval
            log.error(f"cannot quarantine either, will retry: {error_text(again, path)}")

    def _process(self, path: Path) -> str | None:
        try:
            fd, st = header_module.open_regular(path)
        except QuarantineError as exc:
            return self._quarantine(path, str(exc))
        except PermissionError as exc:
            return self._quarantine(path, f"cannot be opened: {exc.strerror}")
        try:
            try:
                head = header_module.read_header_fd(
                    fd, st.st_size, self.config.router.header_limits, self.wanted,
                    checked=path.parent == self.spool.accepted)  # validated on its way in
            except QuarantineError as exc:
                self._make_durable_and_private(fd, st)  # quarantine/ holds PHI too: 0600
                return self._quarantine(path, str(exc))
            if path.parent != self.spool.accepted:  # there, it was made durable before
                self._make_durable_and_private(fd, st)
            if not _same_file(path, st):
                return None  # replaced while we read it: the next scan takes the new one
            return self._route(path, head)
        finally:
            os.close(fd)

    def _make_durable_and_private(self, fd: int, st: os.stat_result) -> None:
        """A hand-dropped file may be unsynced and world-readable; fix both before it moves."""
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            try:
                os.fchmod(fd, FILE_MODE)
            except PermissionError:
                self.log.warning("cannot set mode 0600 (file owned by another user)")
        os.fsync(fd)

    def _route(self, path: Path, head: Header) -> str | None:
        # A file this spool coerced already (a redo after a crash, a copy dropped back in)
        # passed the global rules on its original values: its endpoints decide alone.
        coerced_before = self.shaper.coerced_here(head.dataset.file_meta)
        routing, ids = (self.decide_endpoints(head.dataset) if coerced_before
                        else self.decide(head))
        name = path.name if path.parent == self.spool.accepted else standard_name(
            path.name, head.sop_instance_uid)
        what = _describe(head)
        if routing.rejected is not None:
            return self._reject(path, name, routing.rejected, head)
        if routing.groups and isinstance(ids, str):
            return self._quarantine(path, ids)
        recovering = path.parent == self.spool.accepted
        accepted = path if recovering else self._accept(path, name, head)
        coerced = None
        if not coerced_before:
            try:  # the endpoints decide on the coerced attributes
                coerced = self.shaper.coerce_global(accepted, self.decide_endpoints)
            except (ShapingError, QuarantineError) as exc:
                return self._quarantine(accepted, f"global [coerce]: {exc}")
        if coerced is not None:
            routing, ids = coerced
            if routing.rejected is not None:
                return self._reject(accepted, accepted.name, routing.rejected, head)
            if routing.groups and isinstance(ids, str):
                return self._quarantine(accepted, f"after the global [coerce]: {ids}")
        targets, notes = self._fan_out(accepted, routing, ids, head, recovering)
        shaped = " (coerced)" if coerced is not None else ""
        line = f"{what}{self._renamed(path, accepted.name)}{shaped} → {targets}{notes}"
        if recovering and self.desk.index.waiting(accepted.name) and targets == NONE_YET:
            self._recovered_waiting += 1  # one summary line, not one per file, after a restart
            self.log.bind(file=shown_name(accepted.name)).debug(line)
            return None
        return line

    def _reject(self, path: Path, name: str, reason: str, head: Header) -> str:
        name = _free_name(self.spool.rejected, name, head.sop_instance_uid)
        target = self.spool.move_with_reason(path, self.spool.rejected, ".reason",
                                             self._reason(reason, path), name=name)
        self.journal.about(REJECTED, target.name, uid=head.sop_instance_uid, reason=reason,
                           **self._journal_ids(head))
        return f"{_describe(head)} rejected{self._renamed(path, name)}: {escape(reason, 500)}"

    def _renamed(self, path: Path, name: str) -> str:
        """`` as NAME`` when a file got a standard name; its original name only at DEBUG.

        Export tools put patient names in file names: a hand-dropped name never reaches
        an INFO line, but the operator can still follow it from the DEBUG log.
        """
        if name == path.name:
            return ""
        self.log.bind(file=escape(path.name)).debug(f"hand-dropped file is now {name}")
        return f" as {name}"

    def decide(self, head: Header) -> tuple[Routing, InstanceIds | str | None]:
        return self._decide(self.config.router.rules, head.dataset)

    def decide_endpoints(self, dataset) -> tuple[Routing, InstanceIds | str | None]:
        """The endpoints' rules alone (the global ones passed before coercion)."""
        return self._decide(RuleSet(), dataset)

    def _decide(self, global_rules: RuleSet, dataset) -> tuple[Routing, InstanceIds | str | None]:
        """Where the file goes; for grouped endpoints also its UIDs (or why it has none)."""
        rules = {name: ep.rules for name, ep in self.config.endpoints.items()}
        policies = {name: ep.study for name, ep in self.config.endpoints.items()}
        routing = decide_routing(global_rules, rules, policies, dataset)
        # also without groups of its own: an MPPS may name it (README, Studies)
        return routing, (instance_ids(dataset) if routing.groups or self.desk.active else None)

    def _accept(self, path: Path, name: str, head: Header) -> Path:
        if self.desk.active and not os.path.lexists(self.spool.accepted / name):
            self.desk.reached.reset(name)  # a name seen before (a copy moved back): its old records go
        try:
            return self.spool.move(path, self.spool.accepted, name)
        except FileExistsError:  # a different file already has this name: give it another
            return self.spool.move(path, self.spool.accepted, str(SpoolName.new(head.sop_instance_uid)))

    def _fan_out(self, accepted: Path, routing: Routing, ids: InstanceIds | str | None,
                 head: Header, recovering: bool) -> tuple[str, str]:
        """One copy per endpoint that takes the file now: a hard link, or the endpoint's
        own shaped file. ``accepted/`` lets go of the file unless a series/study it
        belongs to is still waiting for some endpoint. Returns the endpoints and what
        to add to the log line."""
        verdicts: dict[str, str] = {}
        if isinstance(ids, InstanceIds):
            verdicts = self.desk.arrive(accepted.name, routing.groups, ids, recovering)
        waits = sorted(ep for ep, verdict in verdicts.items() if verdict == WAIT)
        now = [*routing.decision.endpoints, *(ep for ep, v in verdicts.items() if v == SEND)]
        reached = self.desk.reached.of(accepted.name) if recovering else set()
        # recorded before an interruption: not again (its copy may be pruned already)
        now = [endpoint for endpoint in now if endpoint not in reached]
        self.journal.about(ROUTED, accepted.name, uid=head.sop_instance_uid,
                           endpoints=now, waiting=waits, refused=routing.decision.refusals,
                           sop_class=head.sop_class_uid, **self._journal_ids(head))
        failed = []
        for endpoint in now:
            try:
                if not self._copy(accepted, endpoint, head.sop_instance_uid, recovering):
                    failed.append(endpoint)
            except OSError:
                if waits:  # in accepted/ now, and waiting: the retry must look at it there
                    due = time.monotonic() + self.retry_interval
                    self._retry_at[accepted] = due
                    self._accepted_due = min(self._accepted_due, due)  # …when it is due
                raise
            if waits:
                self.desk.reached.add(accepted.name, endpoint)
        notes = f" (not shaped for {', '.join(failed)}: see failed/)" if failed else ""
        if waits:
            if isinstance(ids, InstanceIds):  # complete now, by its MPPS?
                self._release_all(self.desk.check_study(ids.study))
            notes += f"; waits for its {'/'.join(self._levels(waits))} ({', '.join(waits)})"
            return ", ".join(now) or NONE_YET, notes
        if isinstance(ids, InstanceIds) and ids.study in self.desk.index.by_study:
            self._release_all(self.desk.check_study(ids.study))  # an MPPS may name it
        if not now and reached:
            self.spool.unlink(accepted)
            return "(copies made before an interruption)", notes
        if not now:  # decided against by every grouped endpoint, and nobody else wants it
            why = "; ".join(f"{ep}: decided not to send its series/study" for ep in verdicts)
            self._reject(accepted, accepted.name, f"no endpoint takes it ({why})", head)
            return "(none)", " (rejected: its series/study was not sent anywhere)"
        self.spool.unlink(accepted)
        return ", ".join(now), notes

    def _levels(self, endpoints: list[str]) -> list[str]:
        return sorted({self.config.endpoints[ep].study.level for ep in endpoints})

    def _copy(self, accepted: Path, endpoint: str, uid: str, recovering: bool) -> bool:
        """``endpoint``'s copy: a hard link, or its shaped file (False: not shaped, in
        ``failed/<endpoint>/``). A copy made before an interruption is not made again."""
        outbox = self.spool.outbox(endpoint)
        if not outbox.is_dir():
            self.spool.create_endpoint(endpoint)
        if self._already_delivered(accepted, endpoint):
            return True  # recovered after a crash: this copy already went all the way
        if recovering and self._has_copy(accepted.name, endpoint):
            return True  # made before the interruption (a shaped copy is another inode)
        if self.config.endpoints[endpoint].shapes:
            return self._shape_copy(accepted, endpoint)
        try:
            self.spool.link(accepted, outbox)
        except FileExistsError:  # another file owns this name there: never overwrite it
            self.spool.link(accepted, outbox, str(SpoolName.new(uid)))
        return True

    # -- releases of series and studies ------------------------------------------------

    def release_due(self) -> None:
        """Carry out every release that is due (complete groups, operators' requests)."""
        if not self.desk.active and not self.desk.index.groups:
            return
        releases = self.desk.due()
        self._release_all(releases)
        self.desk.write_state(force=bool(releases))
        self.desk.maintain()

    def _release_all(self, releases: list[Release]) -> None:
        for release in releases:
            if self.stopping:
                break
            try:
                self._release(release)
            except Exception as exc:  # the disk, or a bug: the daemon never dies on a study
                self.desk.retry_later(release, self.retry_interval)
                log = self.log.bind(endpoint=release.endpoint)
                log.warning(f"release of study {release.group.study} to {release.endpoint} cut "
                            f"short, will retry in {self.retry_interval:g}s: "
                            f"{error_text(exc, Path(release.members[0].name))}")
                log.opt(exception=exc).debug("release cut short")

    def _release(self, release: Release) -> None:
        """The decision made durable first, then the study list, then the copies in
        order; each file leaves ``accepted/`` once no other group holds it."""
        group, endpoint = release.group, release.endpoint
        log = self.log.bind(endpoint=endpoint)
        failed = 0
        if release.send:  # the list before the decision: a release redone keeps its order
            prefixes = [p for m in release.members if (p := copy_prefix(m.name)) is not None]
            try:
                queue.publish(self.spool, endpoint, group.study, group.series,
                              group.policy.level, prefixes)
            except ValueError as exc:  # beyond what a list may hold: sent in name order
                log.warning(f"study {group.study}: no study list ({exc}); its files go in "
                            f"name order")
        self.desk.decided(release)
        if release.send:
            # A group found in accepted/ after a restart may hold copies of a release cut
            # short (late = reevaluate): those are found by their name prefix.
            saved = self._copies  # a release on arrival may happen during recovery
            self._copies = {} if group.recovered else saved
            try:
                for member in release.members:
                    path = self.spool.accepted / member.name
                    if endpoint in self.desk.reached.of(member.name) or not path.exists():
                        continue
                    self.journal.about(ROUTED, member.name, uid=member.sop_instance_uid,
                                       endpoints=[endpoint], release=group.policy.level,
                                       study=group.study, series=group.series)
                    if not self._copy(path, endpoint, member.sop_instance_uid, group.recovered):
                        failed += 1
                    self.desk.reached.add(member.name, endpoint)
            finally:
                self._copies = saved
            self.desk.reached.sync()
        what = f"{group.policy.level} {group.series or group.study}"
        if group.series:
            what += f" of study {group.study}"
        if release.send:
            extra = f", {failed} not shaped (see failed/{endpoint}/)" if failed else ""
            log.info(f"{what}: {len(release.members)} instance(s) released to {endpoint} "
                     f"({release.why}){extra}")
        else:
            log.info(f"{what}: not sent to {endpoint}: {release.why_not} ({release.why})")
            for member in release.members:
                self.journal.about(ROUTED, member.name, uid=member.sop_instance_uid,
                                   endpoints=[], declined={endpoint: release.why_not},
                                   release=group.policy.level, study=group.study,
                                   series=group.series)
        for name in self.desk.finished(release):
            self._done_waiting(self.spool.accepted / name)

    def _done_waiting(self, path: Path) -> None:
        """A file no group holds any more leaves ``accepted/``: to ``rejected/`` when no
        endpoint at all took it, else it is simply unlinked (its copies are out)."""
        if path in self._retry_at:  # a copy it still owes (a disk error): the retry makes it
            return
        reached = self.desk.reached.of(path.name)
        self.desk.reached.forget(path.name)
        try:
            if reached:
                self.spool.unlink(path)
                return
            why = ("no endpoint takes it: every endpoint deciding per series/study decided "
                   "against its series/study")
            target = self.spool.move_with_reason(
                path, self.spool.rejected, ".reason", self._reason(why, path),
                name=_free_name(self.spool.rejected, path.name, None))
            self.journal.about(REJECTED, target.name, reason=why)
        except FileNotFoundError:
            pass

    def _sync_records(self) -> None:
        """The reached records of this step, made durable once (README, Studies)."""
        if self.desk.active:
            try:
                self.desk.reached.sync()
            except OSError as exc:
                self.log.warning(f"cannot sync the study records: {exc.strerror or exc}")

    def _shape_copy(self, source: Path, endpoint: str) -> bool:
        """The endpoint's shaped copy into its outbox; a file that cannot be shaped goes,
        for this endpoint only, to ``failed/<endpoint>/`` with the reason (False)."""
        log = self.log.bind(file=shown_name(source.name), endpoint=endpoint)
        try:
            copy = self.shaper.endpoint_copy(source, endpoint)
            self._journal_shaped(source, copy, endpoint)
            return True
        except OSError:
            raise  # the disk: the whole file is retried later
        except (ShapingError, QuarantineError) as exc:
            text = str(exc)
        except Exception as exc:  # a bug or a pydicom surprise: this endpoint's copy only
            text = f"internal error while shaping: {type(exc).__name__}: {exc}"
            log.opt(exception=exc).debug(escape(text, 2000))
        target = self.spool.link_with_reason(source, self.spool.failed(endpoint), ".error",
                                             self._failed_reason(text, source, endpoint))
        self.journal.about(FAILED, target.name, endpoint=endpoint,
                           reason=f"cannot be shaped: {text}")
        log.warning(f"cannot be shaped for {endpoint}, its copy is in failed/{endpoint}/: "
                    f"{escape(text, 300)}")
        return False

    def _journal_shaped(self, source: Path, copy: Path, endpoint: str) -> None:
        ep = self.config.endpoints[endpoint]
        parsed = SpoolName.parse(copy.name)
        shaping = (["deidentify"] if ep.deidentify is not None else []) + (
            ["coerce"] if ep.coerce else [])
        original = SpoolName.parse(source.name)
        self.journal.about(SHAPED, copy.name, uid=original.uid if original else None,
                           endpoint=endpoint, copy_uid=parsed.uid if parsed else None,
                           shaping=shaping)

    def _journal_ids(self, head: Header) -> dict[str, str | None]:
        """The study, series (and with ``journal_phi``, patient) keys of an event."""
        ds = head.dataset
        ids = {"study": _text(ds.get("StudyInstanceUID")),
               "series": _text(ds.get("SeriesInstanceUID"))}
        if self.config.router.journal_phi:
            ids["patient_id"] = _text(ds.get("PatientID"))
            ids["accession"] = _text(ds.get("AccessionNumber"))
        return ids

    def _failed_reason(self, text: str, source: Path, endpoint: str) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ep = self.config.endpoints.get(endpoint)
        deidentifies = ep is not None and ep.deidentify is not None
        stage = "[deidentify] and [coerce]" if deidentifies else "[coerce]"
        fix = ("the operations, or allow_burned_in for a file refused for what its pixels may "
               "show" if deidentifies else "the operations")
        return (f"error: cannot be shaped ({stage} of endpoint {endpoint}): {escape(text, 2000)}\n"
                f"endpoint: {endpoint}\ntime: {stamp}\nattempts: 0\nfile: {source.name}\n"
                f"retry: fix {fix}, then dicomflow retry {endpoint} <file>   (the "
                f"original is shaped again)\n")

    def _has_copy(self, name: str, endpoint: str) -> bool:
        """Has ``endpoint`` a copy of this arrival (same name prefix) in its outbox,
        ``sent/`` or ``failed/``? Listed once per recovery pass."""
        prefix = copy_prefix(name)
        if prefix is None or self._copies is None:
            return False
        known = self._copies.get(endpoint)
        if known is None:
            known = self._copies[endpoint] = set().union(*(
                self._prefixes_in(stage) for stage in (
                    self.spool.outbox(endpoint), self.spool.sent(endpoint),
                    self.spool.failed(endpoint))))
        return prefix in known

    def _prefixes_in(self, stage: Path) -> set[str]:
        """The ``<time>-<counter>`` prefixes of the standard names in a stage."""
        return {prefix for path in self.spool.list_stage(stage)
                if (prefix := copy_prefix(path.name)) is not None}

    # -- hand-backs (accepted/<endpoint>/) --------------------------------------------

    def process_handback(self, path: Path, endpoint: str) -> None:
        """Shape for ``endpoint`` alone a file its sender handed back; never raise for it."""
        log = self.log.bind(file=shown_name(path.name), endpoint=endpoint)
        ep = self.config.endpoints.get(endpoint)
        if ep is None:
            if endpoint not in self._unknown_handbacks:
                self._unknown_handbacks.add(endpoint)
                log.warning(f"accepted/{endpoint}/ holds files for an endpoint that is not "
                            f"configured: they stay there")
            return
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a link or folder someone put there
                message = self._quarantine(path, f"not a regular file in accepted/{endpoint}/")
            else:
                message = self._handback(path, endpoint, ep.shapes)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._retry_at[path] = time.monotonic() + self.retry_interval
            log.warning(f"disk error, will retry in {self.retry_interval:g}s: {error_text(exc, path)}")
            return
        except Exception as exc:  # the daemon never dies on a file
            self._retry_at[path] = time.monotonic() + self.retry_interval
            log.warning(f"error with a handed-back file, will retry: {error_text(exc, path)} "
                        f"(traceback at DEBUG)")
            log.opt(exception=exc).debug("handed-back file")
            return
        log.info(message)

    def _handback(self, path: Path, endpoint: str, shapes: bool) -> str:
        outbox = self.spool.outbox(endpoint)
        if not shapes:
            try:
                self.spool.move(path, outbox)
            except FileExistsError:  # another file has that name there: never overwrite it
                self.spool.move(path, outbox, fresh_name_like(path.name))
            return f"handed back, {endpoint} shapes nothing now: back in its outbox"
        prefix = copy_prefix(path.name)
        if prefix is not None and prefix in self._prefixes_in(outbox):
            self.spool.unlink(path)  # shaped before an interruption
            return "handed back: its shaped copy is already in the outbox"
        if not self._shape_copy(path, endpoint):
            self.spool.unlink(path)
            return f"handed back, cannot be shaped: in failed/{endpoint}/"
        self.spool.unlink(path)
        return f"handed back: shaped for {endpoint}, in its outbox"

    def _already_delivered(self, accepted: Path, endpoint: str) -> bool:
        """The same inode already in sent/ or failed/: linking again would send it twice."""
        for stage in (self.spool.sent(endpoint), self.spool.failed(endpoint)):
            try:
                if os.path.samefile(accepted, stage / accepted.name):
                    return True
            except FileNotFoundError:
                continue
        return False

    def _quarantine(self, path: Path, reason: str) -> str:
        name = path.name if is_standard(path.name) else str(SpoolName.new(None))
        name = _free_name(self.spool.quarantine, name, None)
        target = self.spool.move_with_reason(path, self.spool.quarantine, ".reason",
                                             self._reason(reason, path), name=name)
        self.journal.about(QUARANTINED, target.name, reason=reason)
        self._renamed(path, name)
        return f"quarantined as {name}: {escape(reason, 500)}"

    def _reason(self, reason: str, path: Path) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return (f"{escape(reason, 2000)}\noriginal name: {escape(path.name, 300)}\n"
                f"stage: {path.parent.name}\ntime: {stamp}\n")

    # -- configuration ---------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the configuration (SIGHUP); on any error keep the old one."""
        self.reload_requested = False
        try:
            new = config_module.load(self.config.conf_dir)
        except ConfigError as exc:
            self.log.error(f"reload failed, keeping the previous configuration: {exc}")
            return
        if new.spool != self.config.spool:
            self.log.warning("the spool path changed: restart the filter to use it; keeping the old one")
            new = dataclasses.replace(new, router=dataclasses.replace(new.router, spool=self.config.spool))
        for endpoint in new.endpoints:
            self.spool.create_endpoint(endpoint)
        self.config = new
        self.wanted = _wanted(new)
        self.shaper = Shaper(new, self.spool)
        was_active = self.desk.active
        self._reindex |= self.desk.reconfigure({n: ep.rules for n, ep in new.endpoints.items()},
                                               {n: ep.study for n, ep in new.endpoints.items()})
        self._accepted_due = 0.0  # those files are read again at once
        if self.desk.active and not was_active:
            self._open_desk()
        self.log.info(f"configuration reloaded, endpoints: {', '.join(sorted(new.endpoints)) or 'none'}")


def _wanted(config: Config) -> header_scan.Wanted | None:
    """The tags the header read must find for these rules and for the journal's events
    (None: pydicom reads all)."""
    rule_sets = [config.router.rules, *(ep.rules for ep in config.endpoints.values())]
    grouped = any(ep.study.grouped for ep in config.endpoints.values())
    extra = set(STUDY_TAGS if grouped else ())
    if config.router.journal:
        extra |= JOURNAL_TAGS | (JOURNAL_PHI_TAGS if config.router.journal_phi else set())
    return header_scan.plan(rule_sets, extra=frozenset(extra))


def _text(value: object) -> str | None:
    """A header value as the journal keeps it (None when absent or empty)."""
    if value is None:
        return None
    text = str(value).strip()
    return text[:64] or None


def _desk(config: Config, spool: Spool, log) -> StudyDesk:
    """The study side, bound to the endpoints' rules and the receiver's MPPS records."""
    mpps = MppsStore(spool)
    return StudyDesk(spool, {n: ep.rules for n, ep in config.endpoints.items()},
                     {n: ep.study for n, ep in config.endpoints.items()},
                     mpps=lambda: mpps.load_all().values(), prune_mpps=mpps.prune, log=log)


def _free_name(directory: Path, name: str, uid: str | None) -> str:
    """``name``, or a fresh one if a file has it: its sidecar must never overwrite another's.

    A sidecar without its file is the trace of an interrupted move of this very file.
    """
    if not os.path.lexists(directory / name):
        return name
    return str(SpoolName.new(uid))


def error_text(exc: BaseException, path: Path) -> str:
    """An exception for an INFO+ line, without the (possibly patient-named) path it quotes."""
    if isinstance(exc, OSError) and exc.strerror:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return f"{type(exc).__name__}: [{code}] {exc.strerror}"
    text = str(exc)
    for quoted in (str(path), path.name, repr(str(path)), repr(path.name)):
        text = text.replace(quoted, "<file>")
    return escape(f"{type(exc).__name__}: {text}", 500)


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _describe(head: Header) -> str:
    """SOP class and sender for the log line (never patient data at INFO)."""
    meta = head.dataset.file_meta
    calling = str(meta.get("SourceApplicationEntityTitle") or "").strip()
    sender = f" from {escape(calling, 16)!r}" if calling else ""
    sop_class = UID(head.sop_class_uid)
    label = sop_class.keyword or head.sop_class_uid
    return f"{label}{sender}"


def main(config: Config) -> int:
    """Entry point of ``dicomflow filter`` (the configuration is already validated).

    SIGTERM/SIGINT: finish the current file and exit 0; SIGHUP: reload the endpoints.
    """
    router = config.router
    setup_daemon("filter", router)
    header_module.quiet_pydicom()
    daemon = FilterDaemon(config)
    with Signals(daemon.request_stop, daemon.request_reload, name="filter-signals"):
        return daemon.run()
