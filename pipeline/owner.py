"""A spool has one owner: the conf directory that routes through it.

Two conf directories on one spool are two routers fighting over the same queues: the
second ``dicomflow up`` used to rewrite ``run/supervisord.conf``, stop the first
router's senders and restart receive/filter on its own port, orphaning the first
router's outboxes — and exit 0. So the first conf directory that uses a spool records
itself in ``<spool>/run/owner``; ``up``/``down``, the daemons and the commands that change
the spool refuse any other conf directory, and ``dicomflow up --force`` hands the spool
over deliberately.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import SpoolError
from pipeline.spool import Spool

OWNER_FILE = "owner"
#: how a spool rendered before owner files existed names its conf directory
_RENDERED_CONF = re.compile(rb"-m services\.cli receive --conf (.+)$", re.MULTILINE)


def owner(spool: Spool) -> Path | None:
    """The conf directory that owns ``spool``, or None for a spool nobody claimed yet."""
    try:
        data = (spool.run_dir / OWNER_FILE).read_bytes().rstrip(b"\n")
    except FileNotFoundError:
        return _rendered_owner(spool)
    return Path(os.fsdecode(data)) if data else None


def _rendered_owner(spool: Spool) -> Path | None:
    """A spool brought up before owner files existed: its supervisord.conf names the owner."""
    try:
        match = _RENDERED_CONF.search((spool.run_dir / "supervisord.conf").read_bytes())
    except FileNotFoundError:
        return None
    return Path(os.fsdecode(match.group(1).strip())).resolve() if match else None


def check(spool: Spool, conf_dir: Path) -> None:
    """Raise SpoolError if another conf directory owns ``spool`` (claims nothing)."""
    found = owner(spool)
    conf = Path(conf_dir).resolve()
    if found is not None and found != conf:
        raise SpoolError(refusal(spool, found, conf))


def claim(spool: Spool, conf_dir: Path, force: bool = False) -> Path | None:
    """Make ``conf_dir`` the owner of ``spool``; return the previous owner if it was taken over.

    Without ``force`` another owner is refused (SpoolError). The first claim is atomic
    (a rename that never overwrites): of two conf directories starting at once, one wins.
    """
    conf = Path(conf_dir).resolve()
    data = os.fsencode(conf) + b"\n"
    found = owner(spool)
    if found is None:
        try:
            spool.write_bytes(spool.run_dir, OWNER_FILE, data)
            return None
        except FileExistsError:  # another process claimed it meanwhile
            found = owner(spool)
    if found == conf:
        if not (spool.run_dir / OWNER_FILE).exists():  # inferred from an older spool
            spool.write_bytes(spool.run_dir, OWNER_FILE, data, replace=True)
        return None
    if found is not None and not force:
        raise SpoolError(refusal(spool, found, conf))
    spool.write_bytes(spool.run_dir, OWNER_FILE, data, replace=True)
    return found


def refusal(spool: Spool, found: Path, conf: Path) -> str:
    return (f"spool {spool.root} belongs to the router configured in {found}, not to {conf}: "
            f"use --conf {found}, give this conf directory a spool of its own, or take the "
            f"spool over deliberately with `dicomflow up --force --conf {conf}`")
