"""Sending the planned files over the associations: one C-STORE per file, streamed
from the spool — or, when the destination took the SOP class but not its transfer
syntax, a decompressed copy (the spool file is never changed). An empty answer is the
endpoint's trouble unless the association is still up (README, How it works).

Mixed into :class:`services.send.Sender`, whose ``__init__`` sets the state
(declared in :mod:`pipeline.sending.state`).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from functools import partial
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from pipeline.dicom import scu as net
from pipeline.dicom.filemeta import FileMeta
from pipeline.errors import EndpointTrouble, PermanentError, StopBatch
from pipeline.log import escape
from pipeline.sending.lanes import Lane
from pipeline.sending.planning import Current
from pipeline.sending.state import SenderState
from pipeline.statuses import Outcome, classify, describe
from pipeline.transcode import UNCOMPRESSED, decoded_size, load_uncompressed

SUSPECT_LIMIT = 3            # associations lost while sending the same file → charge it


class DeliveryMixin(SenderState):
    """One round of delivery over the endpoint's associations (:mod:`lanes`)."""

    def _deliver(self, due: list[Path]) -> None:
        if self.busy_since is not None:  # probe with the file refused longest ago
            due = sorted(due, key=lambda p: self.refused.get(p.name, (0, -1))[1])
        self._harvest()
        plan = self._plan(due)
        if not plan.batch:
            return
        if self.current is None:
            self.current = self._associate(plan.calling, plan.pairs, plan.study)
            if self.current is None:
                return
        self._mark_up()
        self.state.set("busy" if self.busy_since is not None else "delivering")
        if plan.study is None:  # a study goes over lane 0 alone, one study at a time
            self._open_extras(len(plan.batch))
        self._run(deque(plan.batch), (self.current.calling_ae, self.current.pairs,
                                      self.current.study))
        self.last_activity = self.clock.monotonic()
        if self.current is not None and not self.current.alive:
            # all contexts rejected, or the peer left after its answer: closed, not just
            # forgotten (on the send data path its descriptors are ours to close)
            self._close_lane(self.lanes[0], abort=False)

    def _run(self, queue: deque[tuple[Path, FileMeta]],
             key: tuple[str, frozenset[tuple[str, str]], str | None]) -> None:
        """Hand the batch out in order, one file per free lane, and apply each outcome
        here, on the loop's thread, as its lane finishes. Only lanes negotiated like the
        first (``key``: calling AE title, contexts, which cover the batch, and study
        list) take files: an extra opened for an earlier batch may come in during this one. A
        signal, the window's close, a busy destination or a disk refusing a move stops
        the handing out; the files in flight finish first either way. An association
        lost while others are up is one lane fewer; the endpoint is down when the last
        one is lost."""
        halted = False
        trouble: tuple[str, net.Link] | None = None
        while True:
            while queue and not halted:
                if self.stopping or not self.ep.window.is_open(self.clock.now()):
                    halted = True
                    break
                lane = next((one for one in self._usable_lanes() if one.free and one.current
                             is not None and (one.current.calling_ae, one.current.pairs,
                                              one.current.study) == key), None)
                if lane is None:
                    break
                path, meta = queue.popleft()
                assert lane.current is not None
                lane.submit(partial(self._c_store, path, meta, lane.current), (path, meta))
            sending = [lane for lane in self.lanes if lane.file is not None]
            opening = [lane for lane in self.lanes if lane.opening]
            if not sending and (halted or not queue or not opening):
                break
            wait([lane.job for lane in sending + opening if lane.job is not None],
                 return_when=FIRST_COMPLETED)
            for lane in opening:
                if lane.job is not None and lane.job.done():
                    self._opened(lane)
            for lane in sending:
                if lane.job is None or not lane.job.done():
                    continue
                current = lane.current
                job, file = lane.take()
                assert file is not None and current is not None
                try:
                    self._settle(file[0], file[1], current, job)
                except StopBatch:
                    halted = True
                except EndpointTrouble as exc:
                    if any(other is not lane and other.current is not None and other.current.alive
                           for other in self.lanes):
                        if not self.stopping:  # else: cut by the shutdown, said by the cutter
                            self.log.warning("one of the associations was lost ({}); going on "
                                             "with the others", escape(str(exc), limit=300))
                        self._close_lane(lane, abort=True)
                    else:
                        halted, trouble = True, (str(exc), current.link)
        if trouble is not None:
            self._mark_down(*trouble)

    def _usable_lanes(self) -> list[Lane]:
        """All lanes — but only the first while the endpoint is busy (0xA7xx): one file
        at a time probes whether it takes files again."""
        return self.lanes[:1] if self.busy_since is not None else self.lanes

    def _settle(self, path: Path, meta: FileMeta, current: Current, job: Future[Any]) -> None:
        """Apply the outcome of one file's C-STORE (its lane's finished ``job``)."""
        log = self._file_log(path)
        try:
            outcome = job.result()
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
            self._no_response(path, meta, current, log)
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

    def _c_store(self, path: Path, meta: FileMeta, current: Current) -> net.StoreOutcome:
        """:meth:`_store`, timed for the journal (on the lane's thread)."""
        started = time.monotonic()
        try:
            return self._store(path, meta, current)
        finally:
            self.store_times[path.name] = time.monotonic() - started

    def _store(self, path: Path, meta: FileMeta, current: Current) -> net.StoreOutcome:
        """Send by streaming the file, or — if the destination took the SOP class but not
        its transfer syntax — a decompressed copy (the spool file is never changed). Runs
        on the lane's thread: network work only, no bookkeeping."""
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

    def _no_response(self, path: Path, meta: FileMeta, current: Current, log) -> None:
        """An empty response: a timeout or abort (the endpoint) unless the association is
        still up (then the file). A file during which the association keeps dying is
        charged after a few times, so a poison file cannot stall the queue forever."""
        if current.alive:
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
