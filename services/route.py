"""``dicomflow route FILE…``: the filter's decision for each file, without moving anything.

Uses the very code the filter uses (safe header read, ``pipeline.rules.decide``), so an
operator can test rules on real files. Exit status: 0 when every file got a decision
(a quarantine verdict is a decision too); 1 when some file could not be read at all
(missing, permission denied).
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import UID

from pipeline.config import Config
from pipeline.errors import QuarantineError
from pipeline.header import quiet_pydicom, read_header
from pipeline.names import escape
from pipeline.rules import Decision, decide


def explain(config: Config, path: Path) -> list[str]:
    """The lines printed for one file; raises OSError if it cannot be read at all."""
    shown = escape(str(path), 500)
    try:
        head = read_header(path, config.router.header_limits)
    except QuarantineError as exc:
        return [f"{shown}: quarantine: {escape(exc, 2000)}"]
    rules = {name: ep.rules for name, ep in config.endpoints.items()}
    decision = decide(config.router.rules, rules, head.dataset)
    label = UID(head.sop_class_uid).keyword or head.sop_class_uid
    first = f"{shown}: {_verdict(decision)}"
    lines = [first, f"  {label} {escape(head.sop_instance_uid, 80)}"]
    if decision.rejected is None or decision.refusals:
        for name in sorted(config.endpoints):
            why = decision.refusals.get(name)
            lines.append(f"  {name}: " + ("yes" if why is None else f"no — {why}"))
    return lines


def _verdict(decision: Decision) -> str:
    if decision.rejected is not None:
        return f"rejected: {decision.rejected}"
    return "route to " + ", ".join(decision.endpoints)


def main(config: Config, files: list[Path]) -> int:
    quiet_pydicom()
    status = 0
    for path in files:
        try:
            lines = explain(config, Path(path))
        except OSError as exc:
            lines = [f"{escape(str(path), 500)}: cannot read: {exc.strerror or exc}"]
            status = 1
        print("\n".join(lines), flush=True)
    return status
