"""Filesystem-event triggers for the daemon loops (watchdog, one directory each).

inotify is a trigger, not a ledger (README, Design notes): the kernel's queue overflows on
big bursts without watchdog telling anyone, so a daemon never trusts events to list
its work. It rescans its directory after every wake-up, and wakes up by itself after
``rescan_interval`` even if no event came. Events only make that wake-up immediate.

The watcher also remembers which names were *completed* — moved in (an atomic
``mv``/rename) or closed after writing (``cp`` finished) — so the filter can route a
hand-copied file only once it is whole.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: DirectoryWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self.watcher._note(os.fsdecode(event.dest_path), completed=True)
        elif isinstance(event, FileClosedEvent):
            self.watcher._note(os.fsdecode(event.src_path), completed=True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self.watcher._note(os.fsdecode(event.src_path), completed=False)


class DirectoryWatcher:
    """Wake a daemon loop when something lands in one directory (not recursive)."""

    def __init__(self, directory: Path, event: threading.Event | None = None) -> None:
        """``event``: share another watcher's, so one loop waits on several directories."""
        self.directory = Path(directory)
        self._event = event or threading.Event()
        self._lock = threading.Lock()
        self._completed: set[str] = set()
        self._observer: BaseObserver | None = None
        self._inotify: _Inotify | None = None

    def start(self) -> DirectoryWatcher:
        """Watch with watchdog's inotify reader; fall back to watchdog's observer.

        watchdog's observer turns every file into ~9 events through three Python threads
        (emitter, move grouper, dispatcher): about a quarter of the filter's CPU (issue
        7). watchdog's own ``InotifyFD`` — one thread calling us back per kernel event —
        gives the events that matter (create, close-after-write, moved-in) without that.
        """
        inotify = _Inotify.open(self)
        if inotify is not None:
            self._inotify = inotify
            return self
        try:
            # Full events: a rename from outside the watched directory (the receiver's
            # .tmp/, an operator's `mv`) is then a FileMovedEvent, i.e. completed, and
            # not a plain FileCreatedEvent that would have to wait to settle. Only the
            # inotify observer takes the keyword, hence the looser type of the factory.
            factory: Callable[..., BaseObserver] = Observer
            observer = factory(generate_full_events=True)
        except TypeError:  # pragma: no cover - observers other than inotify
            observer = Observer()
        observer.schedule(_Handler(self), str(self.directory), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        return self

    def stop(self) -> None:
        inotify, self._inotify = self._inotify, None
        if inotify is not None:
            inotify.close()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _note_names(self, names: list[str], completed: list[str]) -> None:
        """A batch of events of this directory (names relative to it)."""
        if completed:
            with self._lock:
                self._completed.update(completed)
        if names or completed:
            self._event.set()

    def _note(self, path: str, completed: bool) -> None:
        name = os.path.basename(path)
        if os.path.dirname(path) != str(self.directory) or name.startswith("."):
            return
        if completed:
            with self._lock:
                self._completed.add(name)
        self._event.set()

    @property
    def event(self) -> threading.Event:
        """The event this watcher sets (to share with another watcher)."""
        return self._event

    def wake(self) -> None:
        """Wake the loop now (signal handlers, shutdown, tests)."""
        self._event.set()

    def wait(self, timeout: float | None) -> bool:
        """Sleep until an event or ``timeout``; True if woken by an event."""
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken

    def take_completed(self, name: str) -> bool:
        """True (once) if ``name`` was seen moved in or closed after writing."""
        with self._lock:
            if name in self._completed:
                self._completed.discard(name)
                return True
            return False

    def forget(self, name: str) -> None:
        with self._lock:
            self._completed.discard(name)

    def __enter__(self) -> DirectoryWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- watchdog's inotify reader, without the observer ----------------------------------

try:
    from watchdog.observers.inotify_c import CallbackId, InotifyConstants, InotifyEvent, InotifyFD, Mask
except ImportError:  # pragma: no cover - not Linux, or another watchdog layout
    _HAVE_INOTIFY = False
else:
    _HAVE_INOTIFY = True


class _Inotify:
    """A private ``InotifyFD`` (one reader thread) watching one directory."""

    def __init__(self, watcher: DirectoryWatcher, reader: InotifyFD) -> None:
        self.watcher, self.reader = watcher, reader

    @classmethod
    def open(cls, watcher: DirectoryWatcher) -> _Inotify | None:
        if not _HAVE_INOTIFY:
            return None
        mask = Mask(InotifyConstants.IN_CREATE | InotifyConstants.IN_CLOSE_WRITE
                    | InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_MODIFY)
        try:
            reader = InotifyFD()
        except OSError:
            return None  # e.g. EMFILE (fs.inotify.max_user_instances): the observer may still work
        inotify = cls(watcher, reader)
        reader.start()
        try:
            # The reader is ours alone and holds this one callback: any id will do.
            reader.add_callback(os.fsencode(watcher.directory), mask, inotify, CallbackId(1))
        except OSError:
            reader.stop()
            return None
        return inotify

    def on_event(self, event: InotifyEvent) -> None:
        if event.is_directory or not event.name:
            return
        name = os.fsdecode(event.name)
        if name.startswith("."):
            return
        if event.is_close_write or event.is_moved_to:
            self.watcher._note_names([], [name])
        else:
            self.watcher._note_names([name], [])

    def on_queue_overflow(self) -> None:
        """Events were lost: wake the loop, its rescan finds everything."""
        self.watcher.wake()

    def on_events_lost(self) -> None:
        """Newer watchdog releases (7.1.1 here) call this after every callback's
        ``on_queue_overflow``: the loop is already awake."""

    def on_watch_deleted(self, _wd: object) -> None:
        self.watcher.wake()

    def close(self) -> None:
        self.reader.stop()
        self.reader.join(timeout=5)


# -- is a file still being written? -----------------------------------------------------

_O_ACCMODE = 0o3


def open_for_writing(path: Path) -> bool | None:
    """True while some process has ``path`` open for writing; None if that cannot be told.

    Size and mtime stability cannot tell a stalled ``cp`` (network source, spun-down
    disk) from a finished one, and an mtime can lie after a clock step. The kernel knows:
    a read lease (``F_SETLEASE, F_RDLCK``) on an ``O_RDONLY`` descriptor is refused with
    EAGAIN while any writer has the file open. A lease needs the file's owner (or
    CAP_LEASE) and a filesystem that grants leases; otherwise ``/proc/*/fd`` is scanned.
    """
    held = _lease_probe(path)
    if held is None:
        pids = writer_pids(path)
        held = None if pids is None else bool(pids)
    return held


def _lease_probe(path: Path) -> bool | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not take_read_lease(fd):
            return True
    except OSError:
        return None  # EACCES/EPERM (not the owner), EINVAL (no leases here)
    finally:
        os.close(fd)  # releases the lease at once: a writer opening meanwhile waits for this only
    return False


def take_read_lease(fd: int) -> bool:
    """Take a read lease on ``fd``; False if a writer has the file open (EAGAIN).

    A writer that opens the file while we hold the lease makes the kernel signal us,
    SIGIO by default — whose default action kills the process. The break is signalled
    with SIGURG instead, which is ignored by default.
    """
    fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return False
        raise
    return True


def writer_pids(path: Path, proc: Path = Path("/proc")) -> list[int] | None:
    """Processes (that we may inspect) holding ``path`` open for writing; None without /proc.

    Processes of other users cannot be inspected without privileges and are not seen.
    """
    try:
        st = os.stat(path, follow_symlinks=False)
        entries = os.listdir(proc)
    except OSError:
        return None
    own = os.getpid()
    pids = []
    for entry in entries:
        if entry.isdigit() and int(entry) != own and _writes(proc / entry, st):
            pids.append(int(entry))
    return pids


def _writes(process: Path, st: os.stat_result) -> bool:
    """Does this process have a descriptor on (st_dev, st_ino) open for writing?"""
    try:
        fds = os.listdir(process / "fd")
    except OSError:
        return False  # gone, or another user's
    for fd in fds:
        try:
            target = os.stat(process / "fd" / fd)
            if (target.st_ino, target.st_dev) != (st.st_ino, st.st_dev):
                continue
            info = (process / "fdinfo" / fd).read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("flags:") and int(line.split()[1], 8) & _O_ACCMODE:
                return True
    return False
