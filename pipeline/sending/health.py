"""Endpoint health, apart from file failure (README, How it works): an unreachable
destination charges no file an attempt; it is probed with a capped backoff until it
answers, by association and C-ECHO (a bare TCP connection kills fragile destinations),
by TCP only for one that does not accept Verification. A destination out of resources
(0xA7xx) is *busy*, the same way.

Mixed into :class:`services.send.Sender`, whose ``__init__`` sets the state
(declared in :mod:`pipeline.sending.state`).
"""

from __future__ import annotations

from pipeline.dicom import scu as net
from pipeline.log import escape
from pipeline.sending.state import SenderState


class HealthMixin(SenderState):
    """Down / up / busy for the sender of one endpoint."""

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

    def _mark_down(self, reason: str, link: net.Link | None = None) -> None:
        """``link``: the association that was lost (else the first one), for its stall."""
        if self.stopping:  # a transfer cut by the shutdown: said once, the state is "stopped"
            self.release(abort=True)
            return
        if link is None and self.current is not None:
            link = self.current.link
        stalled = link.stall_reason if link is not None else None
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

    def _mark_busy(self, text: str) -> None:
        mono = self.clock.monotonic()
        if self.busy_since is None or mono >= self.busy_until:
            # once per round: the other associations' refusals of the same round (with
            # associations = N) must not push the next probe N steps further out
            self.busy_until = mono + self.busy_probes.next_delay()
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
