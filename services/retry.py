"""``dicomflow retry ENDPOINT [--all | FILE…]``: give failed files another go.

Moves files from ``failed/<endpoint>/`` back to ``outbox/<endpoint>/`` (the sender
picks them up at once) and drops their ``.error`` sidecars. This is exactly what an
operator may also do by hand with ``mv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.journal import Journal, for_daemon
from pipeline.journal.events import RETRIED
from pipeline.names import escape, is_valid_endpoint_name
from pipeline.progress import Progress
from pipeline.spool import Spool, is_hidden, is_sidecar


def main(config: Config, endpoint: str, files: list[str], retry_all: bool = False) -> int:
    if not is_valid_endpoint_name(endpoint):
        print(f"dicomflow: invalid endpoint name {endpoint!r}", file=sys.stderr)
        return 1
    spool = Spool(config.spool)
    failed = spool.failed(endpoint)
    if not failed.is_dir():
        print(f"dicomflow: no failed/ folder for endpoint {endpoint} in {spool.root}", file=sys.stderr)
        return 1
    if endpoint not in config.endpoints:
        print(f"dicomflow: warning: {endpoint} has no conf/endpoints/{endpoint}.ini; "
              "the files will wait in its outbox", file=sys.stderr)
    spool.create_endpoint(endpoint)
    selected = spool.list_stage(failed) if retry_all else _named(failed, files)
    if selected is None:
        return 1
    journal = for_daemon(spool.run_dir, "retry", config.router.journal, config.router.journal_phi)
    try:
        moved, refused = _move_back(spool, endpoint, selected, journal, retry_all)
    finally:
        journal.close()
    print(f"dicomflow: {moved} file(s) moved back to outbox/{endpoint}")
    return 1 if refused else 0


def _move_back(spool: Spool, endpoint: str, selected: list[Path], journal: Journal,
               retry_all: bool) -> tuple[int, int]:
    """Move each file back to the outbox (with progress for ``--all``); (moved, refused
    by the disk)."""
    moved = refused = 0
    progress = Progress(f"retry {endpoint}: files", len(selected), every=1000) if retry_all else None
    for path in selected:
        if progress is not None:
            progress.advance()
        try:
            spool.move(path, spool.outbox(endpoint))
        except FileNotFoundError:
            print(f"dicomflow: {escape(path.name)} is no longer in failed/{endpoint}", file=sys.stderr)
            continue
        except FileExistsError:
            print(f"dicomflow: {escape(path.name)} is already in outbox/{endpoint}; left in failed/",
                  file=sys.stderr)
            continue
        except OSError as exc:  # EXDEV (outbox/ on another mount), ENOSPC, EIO: say it, go on
            print(f"dicomflow: cannot move {escape(path.name)} back to outbox/{endpoint}: "
                  f"{escape(exc.strerror or exc)}; left in failed/", file=sys.stderr)
            refused += 1
            continue
        spool.remove_sidecars(path)
        journal.about(RETRIED, path.name, endpoint=endpoint)
        moved += 1
    if progress is not None:
        progress.finish()
    return moved, refused


def _named(failed: Path, files: list[str]) -> list[Path] | None:
    """Files given by name (or by a path inside failed/<endpoint>)."""
    selected = []
    for item in files:
        name = Path(item).name
        path = failed / name
        if Path(item).parent not in (Path("."), failed) and Path(item).resolve().parent != failed.resolve():
            print(f"dicomflow: {item} is not in {failed}", file=sys.stderr)
            return None
        if is_hidden(name) or is_sidecar(name) or not path.is_file():
            print(f"dicomflow: no such failed file: {name}", file=sys.stderr)
            return None
        selected.append(path)
    return selected
