"""``dicomflow send ENDPOINT``: deliver ``outbox/<endpoint>/`` to one destination.

One process per endpoint (README, How it works). The loop, in the manner of rq's worker:
filesystem events only *trigger* a rescan of the outbox (inotify is not a ledger);
files go out in arrival (name) order over a reused association whose presentation
contexts come from the files at hand; each file ends in ``sent/`` or ``failed/`` (with
its reason) or stays for a later retry. Endpoint health is separate from file
failure: an unreachable destination charges no file an attempt, it is probed with a
capped backoff until it answers; a destination out of resources (0xA7xx) is *busy*,
the same way. The sender's own bookkeeping never stops it: a delivered file whose
move to ``sent/`` fails is never sent again (see :class:`_Pending`). Outside its
delivery window the sender sleeps until the next opening. A signal only sets a flag:
the file in flight finishes, the association is released, the process exits 0 — but a
transfer blocked on a destination that stopped reading (or answering) is cut, so a
shutdown never waits on a peer.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from pipeline import log as logsetup
from pipeline.backoff import Backoff, delay
from pipeline.clock import SystemClock
from pipeline.config import Config, EndpointConfig
from pipeline.dicom import filemeta, patches
from pipeline.dicom import scu as net
from pipeline.dicom.scu import FileMeta
from pipeline.errors import EndpointTrouble, PermanentError, StopBatch
from pipeline.lock import DaemonLock
from pipeline.log import escape, logger
from pipeline.names import is_valid_ae_title, is_valid_uid
from pipeline.sender_state import RetryBook, StateReporter, iso_utc
from pipeline.spool import DICOM_SUFFIX, Spool, is_hidden
from pipeline.statuses import Outcome, classify, describe
from pipeline.transcode import UNCOMPRESSED, decoded_size, load_uncompressed
from pipeline.watch import DirectoryWatcher

RESCAN_INTERVAL = 5.0        # idle rescan: inotify overflows silently on big bursts
PRUNE_INTERVAL = 3600.0      # sent/ retention is enforced hourly
MAX_WINDOW_SLEEP = 900.0     # recompute the next opening now and then (clock jumps, DST)
BATCH_LIMIT = 1000           # files planned per association round (bounds each rescan)
SUSPECT_LIMIT = 3            # associations lost while sending the same file → charge it
MOVE_RETRY = 1.0             # first wait before retrying a move the disk refused
MOVE_RETRY_CAP = 60.0        # longest wait between such retries
SHUTDOWN_STALL = 2.0         # on SIGTERM, a send blocked this long on the peer is cut
SHUTDOWN_ANSWER_WAIT = 15.0  # …and an answer is awaited at most this long (or dimse_timeout)


@dataclass
class _Pending:
    """A file whose fate is decided — acknowledged by the destination, or failed with
    its reason — but whose move out of the outbox the disk refused (``sent/`` on
    another filesystem, ENOSPC writing the ``.error`` sidecar, EIO …). It stays in
    the outbox, where it is safe and visible, is never sent again while the sender
    runs, and the move is retried with backoff. A delivered one is also recorded in
    the retry state, so that a restart moves it instead of sending it again."""

    path: Path
    meta: FileMeta | None
    text: str                 # why it failed ("" when delivered)
    reason: str | None        # its ``.error`` sidecar; None when delivered
    backoff: Backoff
    due: float = 0.0
    tries: int = 0

    @property
    def stage(self) -> str:
        return "sent" if self.reason is None else "failed"


@dataclass
class _Current:
    """The association in use and what it was negotiated for."""

    link: net.Link
    calling_ae: str
    pairs: frozenset[tuple[str, str]]

    @property
    def alive(self) -> bool:
        return self.link.alive


class Sender:
    """The delivery daemon of one endpoint; every dependency is injectable for tests."""

    def __init__(self, config: Config, endpoint: str, clock=None, rng: random.Random | None = None,
                 install_signals: bool = True, rescan_interval: float = RESCAN_INTERVAL) -> None:
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
        self.lock = DaemonLock(self.spool.run_dir, f"send-{endpoint}")
        self.stopping = False
        self.closed = False
        self.current: _Current | None = None
        self.last_activity = self.clock.monotonic()
        self.down_reason: str | None = None
        self.down_at = 0.0
        self.next_probe = 0.0
        self.last_probe: float | None = None
        self.verification = True  # False once the destination refused Verification
        self.next_prune = 0.0
        self.metas: dict[str, FileMeta] = {}
        self.suspects: dict[str, int] = {}
        self.pending: dict[str, _Pending] = {}
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

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        self.spool.create([self.name])
        self.lock.acquire()
        for directory in (self.outbox, self.spool.sent(self.name), self.spool.failed(self.name)):
            self.spool.clean_tmp(directory)
        self.spool.clean_dead_tmp(self.spool.run_dir)  # a state file cut short by a kill -9
        self.retry.load()
        self.watcher.start()
        if self.install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self.log.info("sender started for {}@{}:{} (window: {})", escape(self.ep.ae_title),
                      self.ep.host, self.ep.port, escape(self.ep.window.describe()))

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only set the flag; wake the watcher from another thread, because the main
        # thread may be inside the watcher's own lock right now.
        self.stopping = True
        threading.Thread(target=self.watcher.wake, daemon=True).start()
        threading.Thread(target=self._cut_stalled_send, name="dicomflow-stop", daemon=True).start()

    def _cut_stalled_send(self) -> None:
        """While stopping: the file in flight may finish — unless its send is blocked on
        a destination that stopped reading, or the destination has kept it waiting for
        its answer longer than ``SHUTDOWN_ANSWER_WAIT`` (or ``dimse_timeout``, if
        shorter); that association is cut, so a shutdown never waits on a peer beyond
        supervisord's stop timeout (the file stays in the outbox and is sent again)."""
        answer_wait = min(self.ep.dimse_timeout, SHUTDOWN_ANSWER_WAIT)
        while not self.closed:
            current = self.current
            if current is not None and (
                    current.link.send_blocked_for() >= SHUTDOWN_STALL
                    or current.link.exchange_quiet_for() >= answer_wait):
                current.link.cut("stopping: the destination stopped reading or answering")
                self.log.warning("stopping: the destination stopped reading or answering; "
                                 "transfer cut, the file stays in the outbox")
                return
            threading.Event().wait(0.1)

    def stop(self) -> None:
        """Ask the loop to finish the file in flight and exit (signal-safe)."""
        self.stopping = True
        self.watcher.wake()

    def close(self) -> None:
        self.closed = True
        self.release()
        self.state.set("stopped")
        self.state.flush()
        self.watcher.stop()
        self.lock.release()
        self.log.info("sender stopped")

    def run(self, once: bool = False) -> int:
        """Deliver until stopped. With ``once``, return as soon as nothing is deliverable
        without new files or the endpoint coming back (outbox empty, endpoint down, or a
        move to ``sent/`` the disk refuses); waits for retries, a busy endpoint and
        windows still happen, through the injected clock."""
        self.start()
        try:
            while not self.stopping:
                wait, blocked = self.step()
                if wait is None:
                    continue
                if once and blocked:
                    break
                self._wait(wait)
        finally:
            self.close()
        return 0

    # -- one turn of the loop ----------------------------------------------------------

    def step(self) -> tuple[float | None, bool]:
        """Do the next thing. Returns (seconds to wait or None to go on at once, whether
        the sender is blocked on something outside it: new files or the endpoint)."""
        self._maybe_prune()
        self._bookkeeping()
        now = self.clock.now()
        if not self.ep.window.is_open(now):
            return self._outside_window(now), False
        mono = self.clock.monotonic()
        if self.down_reason is not None and mono < self.next_probe:
            self.state.set("down")
            return self.next_probe - mono, True
        stalled = self._stalled_until()
        if stalled is not None:
            self.state.flush()
            return self._idle_timeout(stalled), True
        if self.busy_since is not None and mono < self.busy_until:
            self.state.set("busy")
            return self._idle_timeout(self.busy_until), False
        due, next_due = self._scan()
        if not due:
            self.busy_since = None  # nothing left to try: whatever comes next goes out at once
            self.busy_probes.reset()
            self.state.set("down" if self.down_reason else "idle")
            self.state.flush()
            return self._idle_timeout(next_due), next_due is None
        if self.down_reason is not None and not self._probe():
            return None, False
        self._deliver(due)
        return None, False

    def _scan(self) -> tuple[list[Path], float | None]:
        """Files waiting in the outbox (``.dcm``, visible), split into due now and the
        earliest monotonic time a backed-off file becomes due."""
        paths = [p for p in self.spool.list_stage(self.outbox)
                 if p.name.endswith(DICOM_SUFFIX) and not is_hidden(p.name)]
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

    def _wait(self, seconds: float) -> None:
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

    # -- endpoint health ----------------------------------------------------------------

    def _probe(self) -> bool:
        """Check before trying a real association: an association and C-ECHO (a bare TCP
        connection kills fragile destinations), a TCP connection only for a destination
        that does not accept Verification. Never more often than ``probe_backoff``."""
        mono = self.clock.monotonic()
        if self.last_probe is not None and mono - self.last_probe < self.ep.retry.probe_backoff:
            self.next_probe = self.last_probe + self.ep.retry.probe_backoff
            return False
        self.last_probe = mono
        result = net.probe(self.ep, self.ep.calling_ae_title, self.verification)
        if self.verification and not result.verification:
            self.log.info("the destination does not accept Verification; probing it with TCP "
                          "connections from now on")
        self.verification = result.verification
        if result.reason:
            self._mark_down(result.reason)
            return False
        return True

    def _mark_down(self, reason: str) -> None:
        if self.stopping:  # a transfer cut by the shutdown: said once, the state is "stopped"
            self.release(abort=True)
            return
        stalled = self.current.link.stall_reason if self.current is not None else None
        if stalled:
            reason = f"{stalled} ({self.ep.host}:{self.ep.port}): {reason}"
        self.release(abort=True)
        if self.down_reason is None:
            self.down_at = self.clock.monotonic()
            self.log.warning("endpoint down: {}", escape(reason, limit=500))
            self.state.error(reason)
        self.down_reason = reason
        self.state.set("down")
        self.next_probe = self.clock.monotonic() + self.probes.next_delay()

    def _mark_up(self) -> None:
        if self.down_reason is not None:
            self.log.info("endpoint back up after {:.1f}s", self.clock.monotonic() - self.down_at)
        self.down_reason = None
        self.probes.reset()

    # -- associations -------------------------------------------------------------------

    def release(self, abort: bool = False) -> None:
        current, self.current = self.current, None
        if current is None:
            return
        try:
            was_alive = current.alive
            current.link.close(abort=abort)
            if was_alive and not abort:
                self.log.debug("association released")
        except Exception as exc:  # noqa: BLE001 - a dying peer must not kill the sender
            self.log.debug("error releasing association: {}", exc)

    def _associate(self, calling_ae: str, pairs: frozenset[tuple[str, str]]) -> _Current | None:
        link = net.associate(self.ep, calling_ae, pairs, fallback=self.ep.transcode)
        if isinstance(link, net.AssociationFailure):
            self._mark_down(link.reason)
            return None
        if link.established:
            self.associations += 1
            self.log.info("association established ({} contexts proposed, {} accepted, calling {})",
                          link.proposed, link.accepted, escape(calling_ae))
        return _Current(link, calling_ae, pairs)  # else answered: the files are refused

    def _calling_ae(self, meta: FileMeta) -> str:
        if self.ep.pass_calling_ae_title and meta.source_ae and is_valid_ae_title(meta.source_ae):
            return meta.source_ae.strip()
        return self.ep.calling_ae_title

    def _plan(self, due: list[Path]) -> tuple[str, list[tuple[Path, FileMeta]]]:
        """The leading files that fit one association: the current one if it covers them,
        else a new one with ≤128 contexts and one calling AE title."""
        batch: list[tuple[Path, FileMeta]] = []
        calling: str | None = None
        pairs: set[tuple[str, str]] = set()
        current = self.current if self.current and self.current.alive else None
        for path in due[:BATCH_LIMIT]:
            meta = self._meta(path)
            if meta is None:
                continue
            ae = self._calling_ae(meta)
            pair = (str(meta.sop_class), str(meta.transfer_syntax))
            if not self._proposable(path, meta, pair):
                continue
            if calling is None:
                calling = ae
                if current and (ae != current.calling_ae or pair not in current.pairs):
                    current = None
            if ae != calling:
                break
            if current:
                if pair not in current.pairs:
                    break
            elif pair not in pairs:
                if net.context_count(pairs | {pair}, self.ep.transcode) > net.MAX_CONTEXTS:
                    break
                pairs.add(pair)
            batch.append((path, meta))
        if current is None and self.current is not None:
            self.release()
        return calling or self.ep.calling_ae_title, batch

    # -- delivery -----------------------------------------------------------------------

    def _deliver(self, due: list[Path]) -> None:
        if self.busy_since is not None:  # probe with the file refused longest ago
            due = sorted(due, key=lambda p: self.refused.get(p.name, (0, -1))[1])
        calling, batch = self._plan(due)
        if not batch:
            return
        if self.current is None:
            pairs = frozenset((str(m.sop_class), str(m.transfer_syntax)) for _, m in batch)
            self.current = self._associate(calling, pairs)
            if self.current is None:
                return
        self._mark_up()
        self.state.set("busy" if self.busy_since is not None else "delivering")
        for path, meta in batch:
            if self.stopping or not self.ep.window.is_open(self.clock.now()):
                break
            try:
                self._send_one(path, meta)
            except EndpointTrouble as exc:
                self._mark_down(str(exc))
                break
            except StopBatch:
                break
        self.last_activity = self.clock.monotonic()
        if self.current is not None and not self.current.alive:
            self.current = None  # all contexts rejected, or the peer left after its answer

    def _send_one(self, path: Path, meta: FileMeta) -> None:
        log = self._file_log(path)
        assert self.current is not None
        try:
            outcome = self._c_store(path, meta)
        except FileNotFoundError:
            log.info("file left the outbox before it was sent (moved by hand?)")
            return
        except PermanentError as exc:
            self._fail(path, meta, str(exc), log)
            return
        except EndpointTrouble:
            raise
        except Exception as exc:  # noqa: BLE001 - no single file may ever stop a sender
            self._fail(path, meta, f"cannot send the file: {type(exc).__name__}: {exc}", log)
            return
        status = outcome.status
        if status is None:
            self._no_response(path, meta, log)
            return
        self.suspects.pop(path.name, None)
        kind = classify(status)
        text = describe(status)
        if outcome.comment:
            text += f"; destination says: {escape(outcome.comment)}"
        if kind is Outcome.DELIVERED:
            self._delivered(path, text, status, log)
        elif kind is Outcome.TRANSIENT:
            self._out_of_resources(path, meta, f"status {text}", log)
        else:
            self._fail(path, meta, f"status {text}", log)

    def _c_store(self, path: Path, meta: FileMeta) -> net.StoreOutcome:
        """Send by streaming the file, or — if the destination took the SOP class but not
        its transfer syntax — a decompressed copy (the spool file is never changed)."""
        current = self.current
        assert current is not None
        link = current.link
        if not link.alive:
            if link.refused_all:
                hint = "" if self.ep.transcode else "; transcoding is disabled, so no uncompressed " \
                    "alternative was proposed"
                raise PermanentError(
                    f"the destination accepts none of the proposed presentation contexts "
                    f"(SOP class {meta.sop_class.name} with {meta.transfer_syntax.name}){hint}")
            raise EndpointTrouble(f"association with {self.ep.host}:{self.ep.port} was lost")
        accepted = link.accepted_syntaxes(meta.sop_class)
        if meta.transfer_syntax in accepted:
            return link.store(path, self.ep.dimse_timeout_for(meta.size))
        if not accepted:
            raise PermanentError(f"the destination does not accept SOP class {meta.sop_class.name} "
                                 f"({meta.sop_class})")
        target = next((ts for ts in UNCOMPRESSED if ts in accepted), None)
        names = ", ".join(UID(ts).name for ts in accepted)
        if not self.ep.transcode or target is None:
            why = "transcoding is disabled" if not self.ep.transcode else "no uncompressed option"
            raise PermanentError(f"the destination accepts {meta.sop_class.name} only as {names}, not "
                                 f"{meta.transfer_syntax.name}, and {why}")
        dataset = load_uncompressed(path, target, self.ep.transcode_max_size)
        self._file_log(path).info(
            "transcoding {} to {}", meta.transfer_syntax.name, target.name)
        return link.store(dataset, self.ep.dimse_timeout_for(max(meta.size, decoded_size(dataset))))

    def _no_response(self, path: Path, meta: FileMeta, log) -> None:
        """An empty response: a timeout or abort (the endpoint) unless the association is
        still up (then the file). A file during which the association keeps dying is
        charged after a few times, so a poison file cannot stall the queue forever."""
        current = self.current
        if current is not None and current.alive:
            self._transient(path, meta, "no valid C-STORE response from the destination", log)
            return
        count = self.suspects.get(path.name, 0) + 1
        self.suspects[path.name] = count
        reason = f"association lost while sending {path.name} (timeout or abort)"
        if count >= SUSPECT_LIMIT:
            self.suspects.pop(path.name, None)
            self._transient(path, meta, f"the association was lost {count} times while sending it",
                            log)
        raise EndpointTrouble(reason)

    # -- outcomes -----------------------------------------------------------------------

    def _delivered(self, path: Path, text: str, status: int, log) -> None:
        self.stored += 1
        self._end_busy()
        if status:
            log.warning("delivered with warning {}", text)
        else:
            log.info("delivered")
        if not self._to_sent(path, log):
            raise StopBatch  # the disk refuses the move: deliver nothing more until it works

    def _to_sent(self, path: Path, log) -> bool:
        """Move an acknowledged file to ``sent/``; False if the move is postponed."""
        try:
            self.spool.move_final(path, self.spool.sent(self.name))
        except FileNotFoundError:
            if path.name not in self.pending:  # else: renamed, then the directory fsync failed
                log.warning("delivered, but the file left the outbox meanwhile")
        except OSError as exc:
            self._postpone(path, None, "", None, exc, log)
            return False
        self._settled(path, log)
        self.retry.clear_delivered(path.name)
        self.state.count(sent=1)
        return True

    def _transient(self, path: Path, meta: FileMeta, text: str, log) -> None:
        """Charge the file an attempt (kept in memory if the disk refuses to save it, so
        that ``max_attempts`` ends the retries even then)."""
        attempt = self.retry.attempts(path.name) + 1
        wait = delay(attempt, self.ep.retry.backoff, self.ep.retry.backoff_cap, self.rng)
        entry = self.retry.record(path.name, text, wait)
        self.state.error(f"{path.name}: {text}")
        if self.retry.exhausted(entry, self.ep.retry):
            age = self.clock.time() - entry.first_failure
            self._fail(path, meta, f"{text}; gave up after {entry.attempts} attempts over {age:.0f}s "
                                   f"(retry max_attempts={self.ep.retry.max_attempts}, "
                                   f"max_age={self.ep.retry.max_age:g}s)", log)
            return
        log.warning("transient failure ({}), attempt {}, retry in {:.1f}s", text, entry.attempts, wait)

    def _out_of_resources(self, path: Path, meta: FileMeta, text: str, log) -> None:
        """0xA7xx: the destination is full or busy — the endpoint's condition. The file
        is charged an attempt only if another file was stored since its last such
        refusal (then it is this file the destination cannot take); otherwise the
        endpoint is *busy* and nothing more is sent until the next probe."""
        last = self.refused.get(path.name)
        self.refusals += 1
        self.refused[path.name] = (self.stored, self.refusals)
        if last is not None and self.stored > last[0]:
            self._transient(path, meta, f"{text}; other files were stored meanwhile", log)
            return
        log.debug("refused ({}); endpoint busy, no attempt charged", text)
        self._mark_busy(text)
        raise StopBatch

    def _mark_busy(self, text: str) -> None:
        mono = self.clock.monotonic()
        wait = self.busy_probes.next_delay()
        self.busy_until = mono + wait
        if self.busy_since is None:
            self.busy_since = mono
            self.log.warning("endpoint busy: {}; no file is charged, the queue is kept, sending "
                             "is tried again with backoff (at most every {:g}s)", text,
                             self.ep.retry.probe_backoff_cap)
            self.state.error(text)
        self.state.set("busy")

    def _end_busy(self) -> None:
        if self.busy_since is None:
            return
        self.log.info("endpoint no longer busy after {:.1f}s", self.clock.monotonic() - self.busy_since)
        self.busy_since = None
        self.busy_probes.reset()
        self.state.set("delivering")

    def _fail(self, path: Path, meta: FileMeta | None, text: str, log) -> None:
        attempts = max(self.retry.attempts(path.name), 1)
        reason = self._reason(path, meta, text, attempts)
        self.state.error(f"{path.name}: {text}")
        self._to_failed(path, meta, text, reason, log)

    def _to_failed(self, path: Path, meta: FileMeta | None, text: str, reason: str, log) -> bool:
        """Move a file to ``failed/`` with its ``.error``; False if the move is postponed."""
        try:
            self.spool.move_with_reason(path, self.spool.failed(self.name), ".error", reason)
        except FileNotFoundError:
            log.warning("failed ({}), but the file left the outbox meanwhile", escape(text, limit=500))
            self._settled(path, log)
            return True
        except OSError as exc:
            self._postpone(path, meta, text, reason, exc, log)
            return False
        said = path.name in self.pending  # the failure was logged when the move was postponed
        self._settled(path, log)
        self.state.count(failed=1)
        if not said:
            log.error("failed: {}", escape(text, limit=500))
        return True

    def _settled(self, path: Path, log) -> None:
        """Forget a file that has left the outbox (nothing here may raise)."""
        done = self.pending.pop(path.name, None)
        if done is not None and done.tries:
            log.info("moved to {}/{} after {} retries", done.stage, self.name, done.tries)
        try:
            self.spool.remove_sidecars(path)
        except OSError as exc:
            log.debug("cannot remove a stale sidecar: {}", exc)
        self.retry.forget(path.name)
        for cache in (self.metas, self.refused, self.suspects):
            cache.pop(path.name, None)

    def _postpone(self, path: Path, meta: FileMeta | None, text: str, reason: str | None,
                  exc: OSError, log) -> None:
        """The disk refused a move whose outcome is decided: keep the file where it is,
        say so once, retry with backoff (:class:`_Pending`)."""
        item = self.pending.get(path.name)
        if item is None:
            item = _Pending(path, meta, text, reason, Backoff(MOVE_RETRY, MOVE_RETRY_CAP, self.rng))
            self.pending[path.name] = item
        wait = item.backoff.next_delay()
        item.due = self.clock.monotonic() + wait
        item.tries += 1
        why = escape(exc.strerror or exc, limit=300)
        if item.tries > 1:
            log.debug("still cannot move it to {}/{}: {}", item.stage, self.name, why)
            return
        if reason is None:
            saved = self.retry.mark_delivered(path.name)
            what = "delivered, but"
            after = "is not sent again" + ("" if saved else " while the sender runs")
        else:
            what, after = f"failed ({escape(text, limit=300)}), but", "is not sent again"
        message = (f"{what} cannot move it to {item.stage}/{self.name}: {why}; it stays in "
                   f"outbox/{self.name}, {after}, and the move is retried with backoff")
        log.error("{}", message)
        self.state.error(f"{path.name}: {message}")

    def _bookkeeping(self) -> None:
        """Retry what the disk refused earlier: the retry state, postponed moves, and
        delivered files a previous run recorded but could not move."""
        self.retry.flush()
        for name in self.retry.delivered:
            if name not in self.pending:
                self.pending[name] = _Pending(self.outbox / name, None, "", None,
                                              Backoff(MOVE_RETRY, MOVE_RETRY_CAP, self.rng))
                self.log.bind(file=logsetup.shown_name(name)).info(
                    "delivered before the restart; moving it to sent/{} (not sent again)", self.name)
        mono = self.clock.monotonic()
        for item in [i for i in self.pending.values() if i.due <= mono]:
            log = self.log.bind(file=logsetup.shown_name(item.path.name))
            if item.reason is None:
                self._to_sent(item.path, log)
            else:
                self._to_failed(item.path, item.meta, item.text, item.reason, log)

    def _stalled_until(self) -> float | None:
        """While an acknowledged file cannot be moved to ``sent/``, deliver nothing more:
        the spool is not usable as it is, and each further file would be one more that
        a restart might send twice."""
        return min((i.due for i in self.pending.values() if i.reason is None), default=None)

    def _reason(self, path: Path, meta: FileMeta | None, text: str, attempts: int) -> str:
        ep = self.ep
        lines = [
            f"error: {text}",
            f"endpoint: {self.name} ({ep.ae_title}@{ep.host}:{ep.port})",
            f"time: {iso_utc(self.clock.time())}",
            f"attempts: {attempts}",
            f"file: {path.name}",
        ]
        if meta is not None:
            lines.append(f"sop_class: {meta.sop_class} ({meta.sop_class.name})")
            lines.append(f"transfer_syntax: {meta.transfer_syntax} ({meta.transfer_syntax.name})")
        lines.append(f"retry: dicomflow retry {self.name} {path.name}   (or mv it back to "
                     f"outbox/{self.name}/)")
        return "\n".join(lines) + "\n"

    # -- file meta ----------------------------------------------------------------------

    def _meta(self, path: Path) -> FileMeta | None:
        """The file's meta (cached); an unreadable file goes to failed/ at once so it
        never blocks the queue. None for files to skip."""
        cached = self.metas.get(path.name)
        if cached is not None:
            return cached
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                return None
            meta = _read_meta(path, st.st_size)
        except FileNotFoundError:
            return None
        except PermanentError as exc:
            self._fail(path, None, str(exc), self._file_log(path))
            return None
        except OSError as exc:  # unreadable (permissions, I/O error): the file, not the sender
            self._fail(path, None, f"cannot read the file: {exc.strerror or exc}",
                       self._file_log(path))
            return None
        self.metas[path.name] = meta
        return meta

    def _file_log(self, path: Path):
        """The logger for one file: a standard name as is, a hand-made one hidden at
        INFO (export tools put patient names in file names)."""
        return self.log.bind(file=logsetup.shown_name(path.name))

    def _proposable(self, path: Path, meta: FileMeta, pair: tuple[str, str]) -> bool:
        """Can this file's (SOP class, transfer syntax) go into a presentation context?
        A file the network layer refuses would otherwise break the whole association, on every
        start: it goes to failed/ alone."""
        if pair in self.good_pairs:
            return True
        problem = net.proposal_problem(pair)
        if problem is not None:
            self._fail(path, meta, f"cannot propose a presentation context for it: {problem}",
                       self._file_log(path))
            return False
        self.good_pairs.add(pair)
        return True

    # -- sent/ retention ------------------------------------------------------------------

    def _maybe_prune(self) -> None:
        mono = self.clock.monotonic()
        if mono < self.next_prune:
            return
        self.next_prune = mono + PRUNE_INTERVAL
        try:
            removed = prune_sent(self.spool, self.name, self.ep.sent_retention, self.clock.time())
        except OSError as exc:  # bookkeeping: never worth stopping delivery for
            self.log.warning("cannot prune sent/{}: {}; trying again in {:g}s", self.name,
                             exc.strerror or exc, PRUNE_INTERVAL)
            return
        if removed:
            self.log.info("pruned {} delivered files older than {:g}s from sent/{}", removed,
                          self.ep.sent_retention, self.name)


def _read_meta(path: Path, size: int) -> FileMeta:
    fast = _read_meta_fast(path, size)
    if fast is not None:
        return _checked(fast)
    try:
        fm = read_file_meta_info(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, it is the file
        raise PermanentError(f"cannot read the DICOM file meta information: {exc}") from exc
    missing = [k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                           "TransferSyntaxUID") if not fm.get(k)]
    if missing:
        raise PermanentError(f"file meta information lacks {', '.join(missing)}")
    source = fm.get("SourceApplicationEntityTitle")
    return _checked(FileMeta(UID(str(fm.MediaStorageSOPClassUID)),
                             UID(str(fm.MediaStorageSOPInstanceUID)),
                             UID(str(fm.TransferSyntaxUID)), str(source) if source else None, size))


def _checked(meta: FileMeta) -> FileMeta:
    """The UIDs that go into a presentation context must be UIDs (digits and dots, at
    most 64 characters): pynetdicom refuses anything else for the whole association."""
    for label, uid in (("Media Storage SOP Class UID", meta.sop_class),
                       ("Transfer Syntax UID", meta.transfer_syntax)):
        if not is_valid_uid(str(uid)):
            raise PermanentError(f"the file meta {label} {escape(str(uid), limit=80)!r} is not a "
                                 f"valid UID ({len(str(uid))} characters; a UID is digits and "
                                 f"dots, at most 64)")
    return meta


def _read_meta_fast(path: Path, size: int) -> FileMeta | None:
    """The common case without pydicom (one ``pread``; issue 7): a plain explicit-VR
    file meta with the three UIDs. None sends anything unusual to pydicom's reader."""
    values = filemeta.read_meta_elements(path)
    if values is None:
        return None
    uids = [values.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")
            for tag in (0x00020002, 0x00020003, 0x00020010)]
    if not all(uids):
        return None
    source = values.get(0x00020016, b"").strip(b"\0 ").decode("ascii", "replace")
    return FileMeta(UID(uids[0]), UID(uids[1]), UID(uids[2]), source or None, size)


def prune_sent(spool: Spool, endpoint: str, retention: float, now: float) -> int:
    """Delete this endpoint's delivered copies moved to sent/ more than ``retention``
    seconds ago (by ctime: the move into sent/ is the last change of the inode)."""
    removed = 0
    cutoff = now - retention
    for path in spool.list_stage(spool.sent(endpoint)):
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and max(st.st_ctime, st.st_mtime) < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def main(config: Config, endpoint: str) -> int:
    if endpoint not in config.endpoints:
        known = ", ".join(sorted(config.endpoints)) or "none"
        print(f"dicomflow: unknown endpoint {endpoint!r} (configured: {known}; "
              f"add {config.conf_dir / 'endpoints' / (endpoint + '.ini')})", file=sys.stderr)
        return 1
    ep = config.endpoints[endpoint]
    router = config.router
    logsetup.setup(f"send-{endpoint}", ep.log_level or router.log_level, router.log_json,
                   router.pynetdicom_log_level)
    patches.install("send")
    return Sender(config, endpoint).run()
