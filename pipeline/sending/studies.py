"""The sender's view of its endpoint's study lists (:mod:`pipeline.studies.queue`): the
outbox in list order, which list each file belongs to, and the lists' retirement.

Every endpoint's sender asks, on every scan; for an instance-level endpoint the list
folder does not exist, and that costs one failed ``stat``. The lists are read again only
when the folder's mtime changed — or when it changed so recently that another list
could have been published within the same timestamp tick (file times are coarse, a
few milliseconds), as git does for its "racy" index entries.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.clock import Clock
from pipeline.spool import Spool
from pipeline.studies import queue
from pipeline.studies.queue import StudyList

PREFIX_LEN = len("20261128T060102.123456-000042")
RACY = 1.0  # an mtime this close to the moment the lists were read is not trusted


class StudyLists:
    """One endpoint's study lists, refreshed by :meth:`arrange` on every outbox scan."""

    def __init__(self, spool: Spool, endpoint: str, clock: Clock) -> None:
        self.spool = spool
        self.endpoint = endpoint
        self.clock = clock
        self.directory = queue.list_dir(spool, endpoint, create=False)
        self.lists: list[StudyList] = []
        self.stamp: tuple[int, int] | None = None   # (st_ino, st_mtime_ns) at the last read
        self.read_at = 0.0                           # wall time of that read
        self.group: dict[str, str] = {}              # prefix -> name of the (first) list naming it
        self.unseen: dict[str, set[str]] = {}        # list name -> prefixes not yet in the outbox
        self.members: dict[str, list[Path]] = {}     # list name -> its files at the last scan
        self.split_said: set[str] = set()            # lists said to need several associations
        self.restarted = True                        # no scan with lists yet in this process

    def arrange(self, paths: list[Path]) -> list[Path]:
        """``paths`` (the outbox, in name order) in sending order; retires the lists
        whose files have all left. Without lists, ``paths`` as they are."""
        self._refresh()
        if not self.lists:
            self.members = {}
            return paths
        present: set[str] = set()
        members: dict[str, list[Path]] = {}
        for path in paths:
            prefix = path.name[:PREFIX_LEN]  # only valid prefixes are looked up in it
            present.add(prefix)
            name = self.group.get(prefix)
            if name is not None:
                members.setdefault(name, []).append(path)
        for name, left in self.unseen.items():  # a prefix two lists name counts for both
            if left:
                self.unseen[name] = {p for p in left if p not in present}
        if self.restarted:
            self.restarted = False
            self._left_before_start()
        arrived = {name for name, left in self.unseen.items() if not left}
        kept = queue.retire(self.spool, self.endpoint, self.lists, present,
                            arrived=arrived, now=self.clock.time())
        if len(kept) != len(self.lists):
            self._use(kept)
        self.members = members
        return queue.order(paths, self.lists)

    def _left_before_start(self) -> None:
        """Once, at the first scan of this process with lists: copies of theirs that
        were delivered (or failed) before a restart were never seen by this process;
        those found in ``sent/`` or ``failed/`` have left, so their lists need not wait
        out :data:`queue.NEVER_ARRIVED_AGE`. One listing of each, at start-up only (a
        list published just before its files are linked has none there, and is kept)."""
        if not any(self.unseen.values()):
            return
        gone: set[str] = set()
        for folder in (self.spool.sent(self.endpoint), self.spool.failed(self.endpoint)):
            for path in self.spool.list_stage(folder):
                prefix = queue.prefix_of(path.name)
                if prefix is not None:
                    gone.add(prefix)
        for left in self.unseen.values():
            left -= gone

    def of(self, name: str) -> str | None:
        """The name of the list the outbox file ``name`` belongs to (None: unlisted)."""
        if not self.group:
            return None
        prefix = queue.prefix_of(name)
        return None if prefix is None else self.group.get(prefix)

    def queued(self) -> int:
        return len(self.lists)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            if self.lists or self.stamp is not None:
                self._use([])
                self.stamp = None
            return
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self.stamp and self.read_at - st.st_mtime_ns / 1e9 > RACY:
            return
        self._use(queue.load(self.spool, self.endpoint))
        # the real wall time: mtimes are the kernel's, whatever clock the sender was given
        self.stamp, self.read_at = stamp, time.time()

    def _use(self, lists: list[StudyList]) -> None:
        """Take ``lists`` as the current ones; what was already seen of a list stays seen."""
        self.lists = lists
        group: dict[str, str] = {}
        unseen: dict[str, set[str]] = {}
        for entry in lists:
            for prefix in entry.prefixes:
                group.setdefault(prefix, entry.name)
            old = self.unseen.get(entry.name)
            unseen[entry.name] = set(entry.prefixes) if old is None else old
        self.group, self.unseen = group, unseen
        self.split_said &= set(unseen)
