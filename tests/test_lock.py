"""One daemon of a kind per spool; the lock dies with its process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import AlreadyRunning
from pipeline.lock import DaemonLock
from tests.helpers import REPO


def test_second_holder_is_refused_with_the_pid(tmp_path: Path) -> None:
    with DaemonLock(tmp_path, "filter"):
        with pytest.raises(AlreadyRunning, match=r"already running.*pid \d+"):
            DaemonLock(tmp_path, "filter").acquire()
        DaemonLock(tmp_path, "receive").acquire().release()
    DaemonLock(tmp_path, "filter").acquire().release()


def test_lock_of_a_killed_process_is_free(tmp_path: Path) -> None:
    code = ("import os, sys; from pipeline.lock import DaemonLock; "
            f"DaemonLock({str(tmp_path)!r}, 'send-x').acquire(); os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60)
    DaemonLock(tmp_path, "send-x").acquire().release()
