"""``dicomflow route --study DIR``: the series/study-level decision over a folder of files.

The filter decides a ``level = series | study`` endpoint once the whole series/study has
arrived; this dry run reads the headers of every file under ``DIR`` (safe, bounded
reads; nothing is moved or written), groups them as the filter would and prints, per
endpoint, each study (or series) with its instance count, the decision and why, and the
order its files would be sent in. Instance-level endpoints get one count line. The
global ``[coerce]`` is not applied here (``dicomflow route FILE --diff`` shows it), which
a line says when one is configured. Exit status: 1 when some file could not be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import QuarantineError
from pipeline.header import quiet_pydicom, read_header
from pipeline.names import escape
from pipeline.studies.desk import InstanceIds, instance_ids
from pipeline.studies.index import sort_order
from pipeline.studies.levels import Aggregate, decide_routing
from pipeline.studies.records import GroupKey

MAX_FILES = 100_000      # a dry run over more is a mistake (a whole archive?)
SHOWN_ORDER = 5          # files named per group in the sending order (then "…")


@dataclass
class _Group:
    aggregate: Aggregate
    files: list[tuple[tuple[int, int, str], Path]] = field(default_factory=list)


def _files(directory: Path) -> list[Path]:
    found = []
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
            found.append(path)
            if len(found) > MAX_FILES:
                raise ValueError(f"more than {MAX_FILES} files under {directory}")
    return found


def explain_study(config: Config, directory: Path) -> tuple[list[str], int]:
    """The lines printed and the exit status."""
    rules = {name: ep.rules for name, ep in config.endpoints.items()}
    policies = {name: ep.study for name, ep in config.endpoints.items()}
    lines: list[str] = []
    status = 0
    groups: dict[GroupKey, _Group] = {}
    instance_counts = {name: 0 for name, p in policies.items() if not p.grouped}
    studies: set[str] = set()
    files = _files(directory)
    for path in files:
        shown = escape(str(path), 300)
        try:
            head = read_header(path, config.router.header_limits)
        except QuarantineError as exc:
            lines.append(f"{shown}: quarantine: {escape(exc, 500)}")
            continue
        except OSError as exc:
            lines.append(f"{shown}: cannot read: {exc.strerror or exc}")
            status = 1
            continue
        routing = decide_routing(config.router.rules, rules, policies, head.dataset)
        if routing.rejected is not None:
            lines.append(f"{shown}: rejected: {escape(routing.rejected, 500)}")
            continue
        for name in routing.decision.endpoints:
            instance_counts[name] += 1
        if not routing.groups:
            continue
        ids = instance_ids(head.dataset)
        if not isinstance(ids, InstanceIds):
            lines.append(f"{shown}: quarantine: {ids}")
            continue
        studies.add(ids.study)
        for name, facts in routing.groups.items():
            key: GroupKey = (name, ids.study, ids.series if policies[name].level == "series" else "")
            group = groups.setdefault(key, _Group(Aggregate.empty(len(facts))))
            group.aggregate.add(facts)
            group.files.append((sort_order(ids.series_number, ids.instance_number, path.name), path))
    head_line = f"{escape(str(directory), 300)}: {len(files)} file(s), {len(studies)} stud(y/ies)"
    lines.insert(0, head_line)
    if config.router.coerce:
        lines.insert(1, "  (the global [coerce] is not applied in this dry run)")
    for name in sorted(config.endpoints):
        policy = policies[name]
        if not policy.grouped:
            lines.append(f"  {name} (instance): {instance_counts[name]} file(s) at once")
            continue
        lines.append(f"  {name} ({policy.level}, {policy.completion}, stable_time "
                     f"{policy.stable_time:g}s):")
        mine = sorted((key, g) for key, g in groups.items() if key[0] == name)
        if not mine:
            lines.append("    nothing (its SOP lists refuse every file)")
        for key, group in mine:
            lines += _group_lines(config, key, group)
    return lines, status


def _group_lines(config: Config, key: GroupKey, group: _Group) -> list[str]:
    name, study, series = key
    what = f"series {series} of study {study}" if series else f"study {study}"
    why_not = group.aggregate.why_not(config.endpoints[name].rules)
    verdict = "yes" if why_not is None else f"no — {why_not}"
    lines = [f"    {what} ({len(group.files)} instance(s)): {verdict}"]
    if why_not is None:
        ordered = [escape(p.name, 100) for _, p in sorted(group.files, key=lambda t: t[0])]
        more = f", … ({len(ordered) - SHOWN_ORDER} more)" if len(ordered) > SHOWN_ORDER else ""
        lines.append(f"      in order: {', '.join(ordered[:SHOWN_ORDER])}{more}")
    return lines


def main(config: Config, directory: Path) -> int:
    quiet_pydicom()
    if not directory.is_dir():
        print(f"{escape(str(directory), 300)}: not a directory")
        return 1
    try:
        lines, status = explain_study(config, directory)
    except ValueError as exc:
        print(str(exc))
        return 1
    print("\n".join(lines), flush=True)
    return status
