"""``dicomflow route FILE…``: the filter's decision for each file, without moving anything.

Uses the very code the filter uses (safe header read, ``pipeline.rules.decide``, the
shaping writer), so an operator can test rules, coercions and de-identification on real
files. With ``--diff``, each endpoint's line is followed by what its copy would get:
every attribute added, changed, removed or skipped by the global ``[coerce]``, the
endpoint's ``[deidentify]`` and its ``[coerce]`` (names only: values are patient data,
shown with ``--show-values``; de-identification's new values — pseudonyms, dummies —
are shown always); ``--write DIR``
writes the shaped copies to ``DIR/<endpoint>/`` for inspection (e.g. with ``dciodvfy``).
Exit status: 0 when every file got a decision (a quarantine verdict is a decision too);
1 when some file could not be read at all (missing, permission denied).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID

from pipeline.config import Config
from pipeline.errors import QuarantineError, ShapingError
from pipeline.header import quiet_pydicom, read_header
from pipeline.names import escape
from pipeline.rules import Decision, RuleSet, decide
from pipeline.shaping import provenance
from pipeline.shaping.copies import plan_endpoint_copy
from pipeline.shaping.rewrite import Plan, ShapingSource
from pipeline.spool import Spool
from pipeline.studies.levels import decide_routing


@dataclass(frozen=True)
class Options:
    """What to show besides the decision."""

    diff: bool = False
    show_values: bool = False
    write: Path | None = None

    @property
    def shaping(self) -> bool:
        return self.diff or self.write is not None


def explain(config: Config, path: Path, options: Options = Options()) -> list[str]:
    """The lines printed for one file; raises OSError if it cannot be read at all."""
    shown = escape(str(path), 500)
    try:
        head = read_header(path, config.router.header_limits)
    except QuarantineError as exc:
        return [f"{shown}: quarantine: {escape(exc, 2000)}"]
    rules = {name: ep.rules for name, ep in config.endpoints.items()}
    decision = decide(config.router.rules, rules, head.dataset)
    global_lines: list[str] = []
    if decision.rejected is None and config.router.coerce:
        decision, global_lines = _after_global(config, path, decision, rules, options)
    label = UID(head.sop_class_uid).keyword or head.sop_class_uid
    policies = {name: ep.study for name, ep in config.endpoints.items()}
    grouped = decide_routing(config.router.rules, rules, policies, head.dataset).groups
    lines = [f"{shown}: {_verdict(decision, grouped)}",
             f"  {label} {escape(head.sop_instance_uid, 80)}"]
    lines += global_lines
    if decision.rejected is None or decision.refusals or grouped:
        for name in sorted(config.endpoints):
            why = decision.refusals.get(name)
            if policies[name].grouped:
                lines.append(f"  {name}: " + _grouped_line(policies[name].level, name in grouped,
                                                          why))
                continue
            lines.append(f"  {name}: " + ("yes" if why is None else f"no — {why}"))
            if why is None and name in decision.endpoints and options.shaping:
                lines += _endpoint_shaping(config, path, name, options)
    return lines


def _after_global(config: Config, path: Path, decision: Decision, rules: dict[str, RuleSet],
                  options: Options) -> tuple[Decision, list[str]]:
    """The global ``[coerce]``: the endpoints decide on the coerced header, as in the filter."""
    system = provenance.modifying_system(config.router.ae_title, None)
    try:
        with ShapingSource.open(path, config.router.header_limits, _scratch()) as source:
            if _coerced_here(config, source):
                return decision, ["    global [coerce]: already applied to this file (not again)"]
            plan = source.plan(config.router.coerce, system)
            lines = _records("global [coerce]", plan, options) if options.diff else []
            if plan.changed:
                decision = decide(RuleSet(), rules, source.dataset)
            return decision, lines
    except (ShapingError, QuarantineError) as exc:
        return Decision((), f"quarantine: global [coerce]: {exc}", {}), []
    except OSError:
        raise
    except Exception as exc:  # a bug or a pydicom surprise: its message may hold PHI
        return Decision((), f"quarantine: global [coerce]: unexpected {type(exc).__name__}", {}), []


def _coerced_here(config: Config, source: ShapingSource) -> bool:
    spool_id = Spool(config.spool).instance_id(create=False)  # a dry run writes nothing
    return bool(spool_id) and provenance.coerced_here(provenance.meta_values(source.meta), spool_id)


def _endpoint_shaping(config: Config, path: Path, endpoint: str, options: Options) -> list[str]:
    """What ``endpoint``'s copy would get (global, then its own operations)."""
    ep = config.endpoints[endpoint]
    if not ep.shapes and not config.router.coerce:
        return ["    a hard link of the received file (no shaping)"] if options.diff else []
    ae = config.router.ae_title
    try:
        with ShapingSource.open(path, config.router.header_limits, _scratch()) as source:
            global_ops = None if _coerced_here(config, source) else config.router.coerce or None
            first = source.plan(global_ops, provenance.modifying_system(ae, None))
            plan = plan_endpoint_copy(source, ep, provenance.modifying_system(ae, endpoint))
            title = "[deidentify] then [coerce]" if ep.deidentify is not None else "[coerce]"
            lines = _records(title, plan, options) if options.diff and ep.shapes else []
            if options.write is not None:
                mark = provenance.shaped_mark(endpoint) if ep.shapes else None
                plan.dirty |= first.dirty
                target = _write(plan, options.write, endpoint, path, mark)
                lines.append(f"    written to {escape(str(target), 500)}")
            return lines
    except (ShapingError, QuarantineError) as exc:
        return [f"    cannot be shaped, its copy would go to failed/{endpoint}/: "
                f"{escape(str(exc), 500)}"]
    except OSError:
        raise
    except Exception as exc:  # a bug or a pydicom surprise: its message may hold PHI
        return [f"    cannot be shaped, its copy would go to failed/{endpoint}/: "
                f"unexpected {type(exc).__name__}"]


def _records(title: str, plan, options: Options) -> list[str]:
    records = list(plan.changes.records) if plan.changes is not None else []
    if not records:
        return [f"    {title}: no change"]
    lines = [f"    {title}:"]
    for change in records:
        text = f"      {change.action} {escape(change.path, 200)}"
        if change.action in ("added", "changed", "removed"):
            old = "—" if change.old is None else repr(escape(change.old, 200))
            new = "—" if change.new is None else repr(escape(change.new, 200))
            if options.show_values:
                text += f": {old} → {new}"
            elif change.new_shown and change.new is not None:
                text += f": → {new}"  # a pseudonym or dummy: no patient data
        if change.note:
            text += f" ({escape(change.note, 200)})"
        lines.append(text)
    return lines


def _write(plan: Plan, directory: Path, endpoint: str, path: Path, mark: bytes | None) -> Path:
    folder = directory / endpoint
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        plan.write(fd, mark)
    finally:
        os.close(fd)
    return target


def _scratch() -> Path:
    return Path(tempfile.gettempdir())


def _grouped_line(level: str, joins: bool, why: str | None) -> str:
    """A series/study-level endpoint decides over the group, not over this file."""
    if not joins:
        return f"no — {why} (its SOP lists are per instance)"
    alone = "yes" if why is None else f"no ({why})"
    return (f"decided over its whole {level} (level = {level}); this file alone: {alone} — "
            f"dicomflow route --study DIR decides the {level}")


def _verdict(decision: Decision, grouped: dict | None = None) -> str:
    if grouped and (decision.rejected is None or not decision.rejected.startswith("global")):
        now = f"route to {', '.join(decision.endpoints)}; " if decision.endpoints else ""
        return f"{now}waits for its series/study ({', '.join(sorted(grouped))})"
    if decision.rejected is not None:
        return f"rejected: {decision.rejected}" if not decision.rejected.startswith(
            "quarantine:") else decision.rejected
    return "route to " + ", ".join(decision.endpoints)


def main(config: Config, files: list[Path], *, diff: bool = False, show_values: bool = False,
         write: Path | None = None) -> int:
    quiet_pydicom()
    options = Options(diff, show_values, write)
    status = 0
    for path in files:
        try:
            lines = explain(config, Path(path), options)
        except OSError as exc:
            lines = [f"{escape(str(path), 500)}: cannot read: {exc.strerror or exc}"]
            status = 1
        print("\n".join(lines), flush=True)
    return status
