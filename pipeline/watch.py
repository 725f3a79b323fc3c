"""Filesystem-event triggers for the daemon loops (watchdog, one directory each).

inotify is a trigger, not a ledger (DESIGN.md §10): the kernel's queue overflows on
big bursts without watchdog telling anyone, so a daemon never trusts events to list
its work. It rescans its directory after every wake-up, and wakes up by itself after
``rescan_interval`` even if no event came. Events only make that wake-up immediate.

The watcher also remembers which names were *completed* — moved in (an atomic
``mv``/rename) or closed after writing (``cp`` finished) — so the filter can route a
hand-copied file only once it is whole.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
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

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._completed: set[str] = set()
        self._observer: Observer | None = None
        self._inotify: _Inotify | None = None

    def start(self) -> DirectoryWatcher:
        """Watch with the kernel's inotify directly; fall back to watchdog's observer.

        Raw inotify (issue 7): watchdog turned every file into ~9 events through three
        Python threads (emitter, move grouper, dispatcher), about a quarter of the
        filter's CPU; here a single thread reads only the events that matter (create,
        close-after-write, moved-in) in batches.
        """
        inotify = _Inotify.open(self)
        if inotify is not None:
            self._inotify = inotify
            return self
        try:
            # Full events: a rename from outside the watched directory (the receiver's
            # .tmp/, an operator's `mv`) is then a FileMovedEvent, i.e. completed, and
            # not a plain FileCreatedEvent that would have to wait to settle.
            observer = Observer(generate_full_events=True)
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


# -- raw inotify ----------------------------------------------------------------------

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ISDIR = 0x4000, 0x8000, 0x40000000
_IN_CLOEXEC, _IN_NONBLOCK = 0o2000000, 0o4000
_EVENT = struct.Struct("iIII")
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _inotify_init1 = _libc.inotify_init1
    _inotify_add_watch = _libc.inotify_add_watch
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _inotify_init1 = _inotify_add_watch = None


class _Inotify:
    """One inotify descriptor on one directory, read by one daemon thread."""

    MASK = _IN_CREATE | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_MODIFY

    def __init__(self, watcher: DirectoryWatcher, fd: int) -> None:
        self.watcher, self.fd = watcher, fd
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name=f"inotify:{watcher.directory.name}",
                                       daemon=True)
        self.thread.start()

    @classmethod
    def open(cls, watcher: DirectoryWatcher) -> _Inotify | None:
        if _inotify_init1 is None:
            return None
        fd = _inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK)
        if fd < 0:
            return None  # e.g. EMFILE (fs.inotify.max_user_instances): watchdog may still work
        if _inotify_add_watch(fd, os.fsencode(watcher.directory), cls.MASK) < 0:
            os.close(fd)
            return None  # watchdog reports the problem as it always did
        return cls(watcher, fd)

    def _run(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd, self.stop_r], [], [])
            except (OSError, ValueError):
                return
            if self.stop_r in ready:
                return
            try:
                data = os.read(self.fd, 256 * 1024)
            except BlockingIOError:
                continue
            except OSError:
                return
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        names: list[str] = []
        completed: list[str] = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW:
                names.append("")  # lost events: wake the loop, its rescan finds everything
                continue
            if mask & (_IN_ISDIR | _IN_IGNORED) or not raw:
                continue
            name = os.fsdecode(raw)
            if name.startswith("."):
                continue
            if mask & (_IN_CLOSE_WRITE | _IN_MOVED_TO):
                completed.append(name)
            else:
                names.append(name)
        self.watcher._note_names(names, completed)

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(timeout=5)
        for fd in (self.fd, self.stop_r, self.stop_w):
            os.close(fd)
