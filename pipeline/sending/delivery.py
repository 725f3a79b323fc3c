"""Sending the planned files over the association: one C-STORE per file, streamed
from the spool — or, when the destination took the SOP class but not its transfer
syntax, a decompressed copy (the spool file is never changed). An empty answer is the
endpoint's trouble unless the association is still up (README, How it works).

Mixed into :class:`services.send.Sender`, whose ``__init__`` sets the state
(declared in :mod:`pipeline.sending.state`).
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import UID

from pipeline.dicom import scu as net
from pipeline.dicom.filemeta import FileMeta
from pipeline.errors import EndpointTrouble, PermanentError, StopBatch
from pipeline.log import escape
from pipeline.sending.state import SenderState
from pipeline.statuses import Outcome, classify, describe
from pipeline.transcode import UNCOMPRESSED, decoded_size, load_uncompressed

SUSPECT_LIMIT = 3            # associations lost while sending the same file → charge it


class DeliveryMixin(SenderState):
    """One round of delivery over one association."""

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
