"""The spool: DicomFlow's on-disk queue, and the only module that moves files.

Every hand-off follows CPython's ``mailbox.Maildir``: write under a hidden temp name
in the target filesystem, fsync the file, publish it with an atomic rename that never
overwrites, fsync the directory. A failed write therefore leaves nothing visible, and
a file that is visible is complete. Daemons call these functions and never
``os.rename`` themselves (README, The spool).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import SpoolError
from pipeline.lock import pid_alive
from pipeline.names import is_valid_endpoint_name
from pipeline.spool_names import SUFFIX, SpoolName

FORMAT_VERSION = "1"
DIR_MODE = 0o700
FILE_MODE = 0o600
TMP = ".tmp"
SIDECAR_SUFFIXES = (".error", ".reason")
DICOM_SUFFIX = SUFFIX  #: what a DICOM file in a stage ends with (the sender lists by it)
STAGES = ("incoming", "accepted", "outbox", "sent", "failed", "rejected", "quarantine")
PER_ENDPOINT_STAGES = ("outbox", "sent", "failed")
SHARED_STAGES = tuple(s for s in STAGES if s not in PER_ENDPOINT_STAGES)

_tmp_counter = itertools.count()

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2: Callable[..., int] | None
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError):  # pragma: no cover - very old libc
    _renameat2 = None


def fsync_dir(directory: Path) -> None:
    """Make a directory entry change (create, rename, unlink) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk even if another handle wrote it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Atomically rename ``src`` to ``dst``; raise FileExistsError instead of overwriting.

    Uses Linux ``renameat2(RENAME_NOREPLACE)``; on filesystems without it, falls back
    to a check-then-rename (the spool's names are unique, so the window is theoretical).
    """
    if _renameat2 is not None:
        result = _renameat2(
            _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def fresh_name_like(name: str) -> str:
    """A fresh standard name keeping the UID of ``name`` — a standard name's, or the
    last ``-``-separated part of a hand-made ``…-<UID>.dcm`` if that is a valid UID —
    for a file whose name is already taken where it goes."""
    parsed = SpoolName.parse(name)
    if parsed is not None:
        return str(SpoolName.new(parsed.uid))
    stem = name.removesuffix(DICOM_SUFFIX)
    last = stem.rsplit("-", 1)[-1] if stem != name and "-" in stem else None
    return str(SpoolName.new(last))  # SpoolName.new takes only a valid UID


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_sidecar(name: str) -> bool:
    return name.endswith(SIDECAR_SUFFIXES)


def sidecar_path(dicom_path: Path, suffix: str) -> Path:
    """The sidecar of a spool file: its full name plus ``.error`` or ``.reason``."""
    return dicom_path.with_name(dicom_path.name + suffix)


@dataclass
class TempFile:
    """A file being written under ``<stage>/.tmp/``; invisible until published."""

    path: Path
    file: BinaryIO


class Spool:
    """Paths of one spool and the atomic operations between its stages."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.stage("incoming")
        self.accepted = self.stage("accepted")
        self.rejected = self.stage("rejected")
        self.quarantine = self.stage("quarantine")
        self.run_dir = self.root / "run"
        self.log_dir = self.root / "log"

    # -- layout -----------------------------------------------------------------

    def stage(self, stage: str) -> Path:
        """A stage's folder (for ``outbox``/``sent``/``failed``: the one above the endpoints')."""
        if stage not in STAGES:
            raise SpoolError(f"no stage {stage!r} in a spool")
        return self.root / stage

    def endpoint_stage(self, stage: str, endpoint: str) -> Path:
        """``<stage>/<endpoint>/`` of a per-endpoint stage; the endpoint name is checked."""
        if stage not in PER_ENDPOINT_STAGES:
            raise SpoolError(f"{stage!r} is not a per-endpoint stage")
        return self.root / stage / _checked_endpoint(endpoint)

    @staticmethod
    def tmp_dir(directory: Path) -> Path:
        """Where files for ``directory`` are written before they are published there."""
        return directory / TMP

    def handback(self, endpoint: str) -> Path:
        """``accepted/<endpoint>/``: files the sender of a shaping endpoint found unshaped
        in its outbox (a retried or hand-moved original) and handed back to the filter,
        which shapes them for that endpoint alone (README, Shaping). Created."""
        path = self.accepted / _checked_endpoint(endpoint)
        make_private_dir(path)
        make_private_dir(self.tmp_dir(path))
        return path

    def handbacks(self) -> list[str]:
        """Endpoints with a hand-back folder in ``accepted/``, sorted."""
        return _endpoint_folders(self.accepted)

    def outbox(self, endpoint: str) -> Path:
        return self.endpoint_stage("outbox", endpoint)

    def sent(self, endpoint: str) -> Path:
        return self.endpoint_stage("sent", endpoint)

    def failed(self, endpoint: str) -> Path:
        return self.endpoint_stage("failed", endpoint)

    def create(self, endpoints: Iterable[str] = ()) -> Spool:
        """Create (or check) the stage tree; idempotent, safe to call from every daemon."""
        try:
            make_private_dir(self.root)
            for stage in STAGES:
                make_private_dir(self.stage(stage))
            for stage in SHARED_STAGES:
                make_private_dir(self.tmp_dir(self.stage(stage)))
            make_private_dir(self.run_dir)
            make_private_dir(self.log_dir)
            self._check_version()
            for endpoint in endpoints:
                self.create_endpoint(endpoint)
            self._check_one_filesystem(endpoints)
        except OSError as exc:
            raise SpoolError(f"cannot create spool {self.root}: {exc.strerror or exc}") from exc
        return self

    def _check_one_filesystem(self, endpoints: Iterable[str]) -> None:
        """Refuse a spool whose stages are not all on one mount: files change stage by
        rename, which fails (EXDEV) across filesystems — a delivered file could then
        never reach ``sent/``. A configuration error, said at start-up, not a crash later."""
        stages = [self.stage(stage) for stage in STAGES]
        for endpoint in endpoints:
            stages += [self.endpoint_stage(stage, endpoint) for stage in PER_ENDPOINT_STAGES]
        stages += [self.tmp_dir(d) for d in stages if self.tmp_dir(d).is_dir()]  # renamed from too
        root_dev = os.stat(self.root).st_dev
        mounts = _mount_points_under(self.root)
        for directory in stages:
            inside = [m for m in mounts if m == directory or m in directory.parents]
            if inside or os.stat(directory).st_dev != root_dev:
                where = inside[0] if inside else directory
                raise SpoolError(
                    f"spool {self.root}: {where} is another filesystem (a mount point); every "
                    f"stage must be on the spool's one filesystem, because files move between "
                    f"stages by rename")

    def create_endpoint(self, endpoint: str) -> None:
        for stage in PER_ENDPOINT_STAGES:
            directory = self.endpoint_stage(stage, endpoint)
            make_private_dir(directory)
            make_private_dir(self.tmp_dir(directory))

    def endpoints(self, stage: str = "outbox") -> list[str]:
        """Endpoints that have a folder in ``stage`` (configured now or in the past), sorted.

        The outbox is made with the endpoint, so the default lists every endpoint the
        spool has known; names that are not valid endpoint names are not endpoints.
        """
        if stage not in PER_ENDPOINT_STAGES:
            raise SpoolError(f"{stage!r} is not a per-endpoint stage")
        return _endpoint_folders(self.stage(stage))

    def instance_id(self, create: bool = True) -> str:
        """This spool's own random id (``run/spool-id``, made once): what the global
        ``[coerce]`` marks its files with, so that no file from elsewhere carries it.
        ``create=False`` (a dry run): "" when there is none yet."""
        path = self.run_dir / "spool-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            if not create:
                return ""
        try:
            self.write_bytes(self.run_dir, "spool-id", (os.urandom(8).hex() + "\n").encode())
        except FileExistsError:  # another daemon made it meanwhile
            pass
        return path.read_text().strip()

    def _check_version(self) -> None:
        version_file = self.run_dir / "VERSION"
        if version_file.exists():
            found = version_file.read_text().strip()
            if found != FORMAT_VERSION:
                raise SpoolError(
                    f"spool {self.root} has format version {found!r}, "
                    f"this DicomFlow uses {FORMAT_VERSION!r}"
                )
            return
        self.write_bytes(self.run_dir, "VERSION", (FORMAT_VERSION + "\n").encode(), replace=True)

    # -- writing ----------------------------------------------------------------

    @contextmanager
    def temp_file(self, directory: Path, tmp_dir: Path | None = None) -> Iterator[TempFile]:
        """Open a new hidden temp file for ``directory`` (in ``tmp_dir``, by default its
        ``.tmp/``); removed again if the block fails."""
        tmp_dir = tmp_dir or self.tmp_dir(directory)
        make_private_dir(tmp_dir)
        path = tmp_dir / f"{os.getpid()}.{next(_tmp_counter)}.{os.urandom(4).hex()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        file = os.fdopen(fd, "wb")
        try:
            yield TempFile(path, file)
        except BaseException:
            file.close()
            with suppress(FileNotFoundError):
                path.unlink()
            raise
        else:
            file.close()

    def publish(self, tmp_path: Path, directory: Path, name: str) -> Path:
        """fsync ``tmp_path``, rename it to ``directory/name`` (never overwriting), fsync dir."""
        fsync_path(tmp_path)
        target = directory / name
        rename_noreplace(tmp_path, target)
        fsync_dir(directory)
        return target

    def replace(self, tmp_path: Path, target: Path) -> Path:
        """fsync ``tmp_path`` and rename it over ``target`` (the one overwrite in the spool).

        Only the global ``[coerce]`` uses it: the coerced version of a file in
        ``accepted/`` takes the received one's place in one atomic step, so exactly one
        of the two is ever visible, and the received file is never edited in place."""
        fsync_path(tmp_path)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
        return target

    def publish_new(self, tmp_path: Path, directory: Path, sop_instance_uid: str | None) -> Path:
        """Publish under a fresh standard name, picking another on the (rare) clash."""
        fsync_path(tmp_path)
        for _ in range(100):
            target = directory / str(SpoolName.new(sop_instance_uid))
            try:
                rename_noreplace(tmp_path, target)
            except FileExistsError:
                continue
            fsync_dir(directory)
            return target
        raise SpoolError(f"could not find a free name in {directory}")

    def write_bytes(self, directory: Path, name: str, data: bytes, replace: bool = False) -> Path:
        """Write a small file atomically (state files, sidecars, tests)."""
        with self.temp_file(directory) as tmp:
            tmp.file.write(data)
            tmp.file.flush()
            os.fsync(tmp.file.fileno())
        target = directory / name
        try:
            if replace:
                os.replace(tmp.path, target)
            else:
                rename_noreplace(tmp.path, target)
        except BaseException:
            with suppress(FileNotFoundError):
                tmp.path.unlink()
            raise
        fsync_dir(directory)
        return target

    def write_sidecar(self, dicom_path: Path, suffix: str, text: str) -> Path:
        """Write ``<name><suffix>`` beside where ``dicom_path`` is (or is about to be)."""
        target = sidecar_path(dicom_path, suffix)
        if not text.endswith("\n"):
            text += "\n"
        return self.write_bytes(target.parent, target.name, text.encode("utf-8"), replace=True)

    # -- moving -----------------------------------------------------------------

    def move(self, src: Path, directory: Path, name: str | None = None) -> Path:
        """Atomically move a file between stages (same filesystem), never overwriting."""
        target = directory / (name or src.name)
        rename_noreplace(src, target)
        fsync_dir(directory)
        if src.parent != directory:
            fsync_dir(src.parent)
        return target

    def move_final(self, src: Path, directory: Path) -> Path:
        """Move a copy into a final stage (``sent/``), tolerating a duplicate already there.

        After a crash the filter may fan a file out again that was delivered meanwhile,
        so the same name (the same inode, even) can already be in ``sent/``: then the
        source is simply dropped. Another file with that name keeps its place and this
        one gets a fresh name. Never overwrites; a name clash never stops a daemon.
        """
        try:
            return self.move(src, directory)
        except FileExistsError:
            target = directory / src.name
            if _same_inode(src, target):
                self.unlink(src)
                return target
            return self.move(src, directory, fresh_name_like(src.name))

    def move_with_reason(
        self, src: Path, directory: Path, suffix: str, reason: str, name: str | None = None
    ) -> Path:
        """Move a file into ``rejected/``, ``quarantine/`` or ``failed/`` with its sidecar.

        The sidecar is written first, so a file is never visible there without its reason.
        A name already taken there is handled as in :meth:`move_final`.
        """
        return self._with_reason(src, directory, suffix, reason, name, keep_source=False)

    def link_with_reason(self, src: Path, directory: Path, suffix: str, reason: str,
                         name: str | None = None) -> Path:
        """Hard-link ``src`` into ``failed/<endpoint>/`` (or another stage) with its
        sidecar, written first: an endpoint's copy that could not be shaped. A name taken
        there by another file gets a fresh one; the same file there already is kept."""
        return self._with_reason(src, directory, suffix, reason, name, keep_source=True)

    def _with_reason(self, src: Path, directory: Path, suffix: str, reason: str,
                     name: str | None, keep_source: bool) -> Path:
        """Publish ``src`` (moved, or linked with ``keep_source``) beside its sidecar."""
        name = name or src.name
        existing = directory / name
        if os.path.lexists(existing):
            if _same_inode(src, existing):
                self.write_sidecar(existing, suffix, reason)
                if not keep_source:
                    self.unlink(src)
                return existing
            name = fresh_name_like(name)
        sidecar = self.write_sidecar(directory / name, suffix, reason)
        try:
            if keep_source:
                return self.link(src, directory, name)
            return self.move(src, directory, name)
        except OSError as exc:
            if isinstance(exc, FileExistsError) and not keep_source:
                raise  # a move that lost a race for the name: the sidecar stays, as before
            with suppress(OSError):  # nothing published: no reason without its file
                sidecar.unlink()
            raise

    def link(self, src: Path, directory: Path, name: str | None = None) -> Path:
        """Hard-link ``src`` into ``directory``; idempotent if the same file is already there."""
        target = directory / (name or src.name)
        try:
            os.link(src, target, follow_symlinks=False)
        except FileExistsError:
            if not os.path.samefile(src, target):
                raise
            return target
        fsync_dir(directory)
        return target

    def unlink(self, path: Path) -> None:
        """Remove a published file durably (tolerates it being gone already)."""
        with suppress(FileNotFoundError):
            path.unlink()
        fsync_dir(path.parent)

    def remove_sidecars(self, dicom_path: Path) -> None:
        for suffix in SIDECAR_SUFFIXES:
            with suppress(FileNotFoundError):
                sidecar_path(dicom_path, suffix).unlink()

    # -- reading ----------------------------------------------------------------

    def list_stage(self, directory: Path) -> list[Path]:
        """Entries waiting in a stage, in arrival (name) order, without opening any.

        Hidden names and sidecars are skipped; anything else is returned, including
        symlinks and FIFOs in ``incoming/`` so that the filter can quarantine them.
        """
        try:
            names = [
                e.name
                for e in os.scandir(directory)
                if not is_hidden(e.name) and not is_sidecar(e.name)
            ]
        except FileNotFoundError:
            return []
        names.sort()
        return [directory / n for n in names]

    @classmethod
    def process_tmp_dir(cls, directory: Path, process: str) -> Path:
        """``<stage>/.tmp/<process>/``: the temp files of one of several processes of a
        program writing to one stage (``[router] receive_processes`` > 1), so that one
        process's start-up clean never removes another's transfer in flight. Created."""
        path = cls.tmp_dir(directory) / process
        make_private_dir(path)
        return path

    def clean_tmp(self, directory: Path, older_than: float = 0.0,
                  process: str | None = None) -> int:
        """Remove stale temp files of a stage (at daemon start-up). Returns the count.

        ``process``: only those in ``.tmp/<process>/`` (:meth:`process_tmp_dir`). Folders
        are never removed, nor anything in them (other processes' temp dirs)."""
        tmp_dir = self.tmp_dir(directory)
        return _remove_files(tmp_dir if process is None else tmp_dir / process,
                             time.time() - older_than)

    def sweep_tmp(self, directory: Path, older_than: float) -> int:
        """Remove temp files older than ``older_than`` seconds in a stage's ``.tmp`` and
        in every process's folder in it (transfers that died long ago, a process index
        no longer configured). A transfer in flight writes, so its mtime stays young."""
        tmp_dir = self.tmp_dir(directory)
        cutoff = time.time() - older_than
        removed = _remove_files(tmp_dir, cutoff)
        try:
            folders = [e.path for e in os.scandir(tmp_dir) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return removed
        return removed + sum(_remove_files(Path(folder), cutoff) for folder in folders)

    def clean_dead_tmp(self, directory: Path) -> int:
        """Remove temp files left by processes that no longer exist, in a ``.tmp`` that
        several daemons share (``run/``: state and retry files of every sender).

        Temp names start with the writer's pid (:meth:`temp_file`), so a live writer's
        file is never touched. Returns the count.
        """
        removed = 0
        try:
            entries = list(os.scandir(self.tmp_dir(directory)))
        except FileNotFoundError:
            return 0
        for entry in entries:
            pid = entry.name.split(".", 1)[0]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            with suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        return removed

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def total_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_blocks * stats.f_frsize

    def sent_oldest_first(self, endpoint: str | None = None) -> list[Path]:
        """Delivered files of ``endpoint`` (default: every endpoint), oldest name first."""
        endpoints = self.endpoints("sent") if endpoint is None else [endpoint]
        files: list[Path] = []
        for name in endpoints:
            files.extend(self.list_stage(self.sent(name)))
        files.sort(key=lambda p: p.name)
        return files

    def prune_sent(self, *, older_than: float | None = None, until_free: int | None = None,
                   endpoint: str | None = None, now: float | None = None,
                   on_delete: Callable[[Path], None] | None = None) -> int:
        """Delete delivered copies in ``sent/``: the sender's retention and the receiver's
        disk floor (README, The spool). Returns the number deleted.

        ``older_than``: only files that reached ``sent/`` more than that many seconds
        before ``now`` (see :func:`arrived_at`). ``until_free``: oldest name first, stop
        as soon as that many bytes are free. ``endpoint``: that endpoint's ``sent/`` only
        (default: all). Only regular files are deleted: nothing else frees space, and a
        folder someone made there must not stop a daemon. ``on_delete`` is told each
        deleted path (the journal's ``deleted`` event).
        """
        cutoff = None
        if older_than is not None:
            cutoff = (time.time() if now is None else now) - older_than
        deleted = 0
        for path in self.sent_oldest_first(endpoint):
            if until_free is not None and self.free_bytes() >= until_free:
                break
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if cutoff is not None and arrived_at(st) >= cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            deleted += 1
            if on_delete is not None:
                on_delete(path)
        return deleted


def arrived_at(st: os.stat_result) -> float:
    """When a file reached its stage, from its ``lstat``: ``max(ctime, mtime)``.

    Files change stage by rename, which updates the inode's ctime and nothing else, so
    ctime is the time of the last hand-off; mtime is still the time the file was written
    (the receiver's, or an export tool's, possibly long ago). The max also covers a
    file whose mtime is in the future (a clock set back), which is then kept longer,
    never deleted early.
    """
    return max(st.st_ctime, st.st_mtime)


def _remove_files(tmp_dir: Path, cutoff: float) -> int:
    """Unlink the entries of ``tmp_dir`` (not folders) last modified at or before
    ``cutoff`` (a wall-clock time); the count."""
    removed = 0
    try:
        entries = list(os.scandir(tmp_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        with suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                os.unlink(entry.path)
                removed += 1
    return removed


def _mount_points_under(root: Path) -> list[Path]:
    """Mount points strictly inside ``root`` (``/proc/self/mountinfo``; bind mounts of
    the same filesystem included, which ``st_dev`` cannot tell apart)."""
    base = os.path.realpath(root)
    found = []
    try:
        with open("/proc/self/mountinfo", "rb") as info:
            lines = info.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        point = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4]))
        if point != base and point.startswith(base.rstrip("/") + "/"):
            found.append(Path(root) / os.path.relpath(point, base))
    return found


def _endpoint_folders(directory: Path) -> list[str]:
    """The sub-folders of ``directory`` named like endpoints, sorted (no symlinks)."""
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries
                          if e.is_dir(follow_symlinks=False) and is_valid_endpoint_name(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _checked_endpoint(endpoint: str) -> str:
    if not is_valid_endpoint_name(endpoint):
        raise SpoolError(f"invalid endpoint name {endpoint!r}")
    return endpoint


def make_private_dir(path: Path) -> None:
    """Create a directory with mode 0700 (and tighten it if we created it looser); the
    stages' and the runtime folders' (``run/studies/``, ``run/mpps/``) one way."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, DIR_MODE)
