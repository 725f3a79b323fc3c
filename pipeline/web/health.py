"""``/healthz``: can this node take images now? — for load balancers.

A node can take images when its receiver answers (a C-ECHO to it, as a modality
would associate), its filter runs (else ``incoming/`` only fills), and free space is
above the disk floor (else every C-STORE gets 0xA700). A sender being down does not
take the node out of a pool: the images wait in its outbox, which is what ``/metrics``
and alerts are for. ``?full`` adds the senders — each running, its destination not
down — for a check that wants the whole router.

The checks read the same status report as ``dicomflow status`` (the daemons' locks, the
senders' state files) and ask the receiver once per call, bounded by
``[web] health_timeout``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.config_types import format_size
from pipeline.spool import Spool

#: the C-ECHO of the receiver: None when it answered, else why not
Echo = Callable[[], str | None]
#: a receiver bound to every address is asked on loopback, of its own family
LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class Check:
    """One line of the answer: what was checked, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def status(self) -> int:
        return 200 if self.ok else 503

    def text(self) -> str:
        """The body: ``ok`` or ``unavailable``, then one line per check."""
        head = "ok" if self.ok else "unavailable: " + "; ".join(
            c.detail for c in self.checks if not c.ok)
        lines = [head] + [f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines) + "\n"


def receiver_address(config: Config) -> tuple[str, int]:
    """Where to reach our own receiver: its bind address, loopback when it binds all."""
    bind = config.router.bind
    return LOOPBACK.get(bind, bind), config.router.port


def disk_space(config: Config) -> tuple[int, int]:
    """(free bytes, the disk floor) of the spool's filesystem."""
    spool = Spool(config.spool)
    return spool.free_bytes(), config.router.disk_floor(spool.total_bytes())


def check(config: Config, report: dict, echo: Echo, full: bool = False) -> Health:
    checks = [_receiver(report, echo), _filter(report), _disk(config)]
    if full:
        checks += [_sender(name, info) for name, info in report["endpoints"].items()
                   if info["configured"]]
    return Health(tuple(checks))


def _receiver(report: dict, echo: Echo) -> Check:
    processes = report["processes"]
    down = [name for name, info in processes.items()
            if name.startswith("receive") and not info["running"]]
    if down:
        return Check("receiver", False, f"{', '.join(down)} not running")
    reason = echo()
    if reason is not None:
        return Check("receiver", False, reason)
    return Check("receiver", True, "answers C-ECHO")


def _filter(report: dict) -> Check:
    info = report["processes"].get("filter", {"running": False, "pid": None})
    if not info["running"]:
        return Check("filter", False, "filter not running (incoming/ is not routed)")
    return Check("filter", True, f"running, pid {info['pid']}")


def _disk(config: Config) -> Check:
    try:
        free, floor = disk_space(config)
    except OSError as exc:
        return Check("disk", False, f"cannot read the spool's free space: {exc.strerror or exc}")
    text = f"{format_size(free)} free, floor {format_size(floor)}"
    if free <= floor:
        return Check("disk", False, f"free space at the disk floor ({text}): C-STOREs get 0xA700")
    return Check("disk", True, text)


def _sender(name: str, info: dict) -> Check:
    label = f"send-{name}"
    if not info["sender_running"]:
        return Check(label, False, "sender not running")
    if info["state"] == "down":
        since = info.get("down_since") or info.get("since") or "?"
        return Check(label, False, f"destination down since {since}")
    return Check(label, True, str(info["state"]).replace("_", " "))
