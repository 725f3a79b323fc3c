"""What becomes of a file once its fate is decided: ``sent/``, ``failed/`` with its
``.error`` reason, or a retry with backoff; and the sender's own bookkeeping, which
never stops it — a delivered file whose move to ``sent/`` fails is never sent again
(:class:`Pending`).

Mixed into :class:`services.send.Sender`, whose ``__init__`` sets the state
(declared in :mod:`pipeline.sending.state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import log as logsetup
from pipeline.backoff import Backoff, delay
from pipeline.dicom.filemeta import FileMeta
from pipeline.errors import StopBatch
from pipeline.journal.events import ATTEMPT, FAILED, SENT
from pipeline.log import escape
from pipeline.sender_state import iso_utc
from pipeline.sending.state import SenderState

MOVE_RETRY = 1.0             # first wait before retrying a move the disk refused
MOVE_RETRY_CAP = 60.0        # longest wait between such retries


def status_of(text: str) -> int | None:
    """The DIMSE status a failure text starts with (``status 0xA700 …``), if any."""
    if text.startswith("status 0x"):
        try:
            return int(text[7:13], 16)
        except ValueError:
            return None
    return None


@dataclass
class Pending:
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


class OutcomesMixin(SenderState):
    """Delivered, transient, out of resources, failed — and postponed moves."""

    def _delivered(self, path: Path, text: str, status: int, log) -> None:
        self.stored += 1
        self._end_busy()
        self.journal.about(SENT, path.name, endpoint=self.name, status=status,
                           duration=self._store_time(path), association=self._association(),
                           **({"comment": text} if status else {}))
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
        self.journal.about(ATTEMPT, path.name, endpoint=self.name, status=status_of(text),
                           reason=text, attempt=entry.attempts, retry_in=round(wait, 3),
                           duration=self._store_time(path))
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
        endpoint is *busy* and nothing more is sent until the next probe.

        Either way ``max_age`` bounds it, counted from the file's first 0xA7xx (saved
        across restarts): a destination that refuses only this file (Orthanc's 0xA700
        for an instance it cannot index) looks busy whenever nothing else is queued, and
        the file would otherwise stay in the outbox for ever. Failing it does not stop
        the batch: if the destination is really full, the next file's refusal says so."""
        since = self.retry.refused_at(path.name)
        last = self.refused.get(path.name)
        self.refusals += 1
        self.refused[path.name] = (self.stored, self.refusals)
        if self.clock.time() - since >= self.ep.retry.max_age:
            self._fail(path, meta, f"{text}; refused with 0xA7xx (out of resources) since "
                                   f"{iso_utc(since)}, for more than max_age="
                                   f"{self.ep.retry.max_age:g}s; the destination may be "
                                   f"refusing only this file", log)
            return
        if last is not None and self.stored > last[0]:
            self._transient(path, meta, f"{text}; other files were stored meanwhile", log)
            return
        log.debug("refused ({}); endpoint busy, no attempt charged", text)
        self._mark_busy(text)
        raise StopBatch

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
        self.journal.about(FAILED, path.name, endpoint=self.name, reason=text)
        if not said:
            log.error("failed: {}", escape(text, limit=500))
        return True

    def _store_time(self, path: Path) -> float | None:
        """How long the file's last C-STORE took (measured on its lane's thread)."""
        seconds = self.store_times.pop(path.name, None)
        return None if seconds is None else round(seconds, 4)

    def _association(self) -> str:
        """The association as the journal shows it: calling → called at host:port."""
        calling = self.current.calling_ae if self.current is not None else self.ep.calling_ae_title
        return f"{calling}→{self.ep.ae_title}@{self.ep.host}:{self.ep.port}"

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
        self.store_times.pop(path.name, None)  # a failure's C-STORE time, never journaled

    def _postpone(self, path: Path, meta: FileMeta | None, text: str, reason: str | None,
                  exc: OSError, log) -> None:
        """The disk refused a move whose outcome is decided: keep the file where it is,
        say so once, retry with backoff (:class:`Pending`)."""
        item = self.pending.get(path.name)
        if item is None:
            item = Pending(path, meta, text, reason, Backoff(MOVE_RETRY, MOVE_RETRY_CAP, self.rng))
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
                self.pending[name] = Pending(self.outbox / name, None, "", None,
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
