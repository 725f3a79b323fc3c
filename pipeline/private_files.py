"""Files only their owner may read: the pseudonyms' key file, the web daemon's users file.

Read once at start-up with the same guard for both: opened without following a symlink
and without blocking (a FIFO must not hang ``dicomflow check``), refused unless it is a
regular file that group and others cannot read, and never read past ``limit`` bytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def read_owner_only(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path``; ValueError with a readable reason otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise ValueError(f"{path} is readable by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it")
        return os.read(fd, limit)
    finally:
        os.close(fd)
