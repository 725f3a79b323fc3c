"""Logging: loguru to stderr, one line per event, context bound per daemon.

supervisord captures stderr and rotates it. pynetdicom logs through the standard
library; those records are routed into loguru at their own (lower by default)
level, because pynetdicom's DEBUG output contains patient data. Untrusted strings
must pass through :func:`pipeline.names.escape` before they are logged.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import TYPE_CHECKING

from loguru import logger

from pipeline.names import escape
from pipeline.spool_names import is_standard

if TYPE_CHECKING:
    from loguru import Record

    from pipeline.config import RouterConfig

__all__ = ["logger", "setup", "escape", "shown_name"]

HAND_DROPPED = "(hand-dropped)"

_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[daemon]}"
    "{extra[ctx]} | {message}"
)


class _InterceptHandler(logging.Handler):
    """Forward standard-library records (pynetdicom's) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        message = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            # A traceback quotes untrusted values (e.g. an AE title with a newline in a
            # ValueError): keep it, but escaped on the same line — no forged log lines.
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        logger.opt(depth=0).bind(source=record.name).log(level, escape(message, limit=4000))


def shown_name(name: str) -> str:
    """A file name as INFO+ lines may show it: a standard name, never a hand-dropped one.

    Export tools put patient names in file names (``DOE^JOHN_12345.dcm``); such a name is
    logged at DEBUG only, and INFO lines name the file by the standard name it gets.
    """
    return escape(name) if is_standard(name) else HAND_DROPPED


def _context(record: Record) -> None:
    extra = record["extra"]
    extra.setdefault("daemon", "dicomflow")
    parts = [f" {k}={v}" for k, v in extra.items() if k in ("endpoint", "file", "peer")]
    extra["ctx"] = "".join(parts)


def setup_daemon(daemon: str, router: RouterConfig, level: str | None = None) -> None:
    """:func:`setup` from the router's logging keys (``level`` overrides ``log_level``:
    an endpoint's own). The daemons call this, so that the wire library's logger level
    is a concern of this module, not theirs."""
    setup(daemon, level or router.log_level, router.log_json, router.pynetdicom_log_level)


def setup(daemon: str, level: str = "INFO", json: bool = False,
          pynetdicom_level: str = "WARNING") -> None:
    """Configure logging once per process."""
    logger.remove()
    logger.configure(extra={"daemon": daemon}, patcher=_context)
    if json:
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=_FORMAT, colorize=False,
                   backtrace=False, diagnose=False)
    pynetdicom_logger = logging.getLogger("pynetdicom")
    pynetdicom_logger.handlers[:] = [_InterceptHandler()]
    pynetdicom_logger.setLevel(getattr(logging, pynetdicom_level, logging.WARNING))
    pynetdicom_logger.propagate = False
    # watchdog warns about harmless shutdown races through the standard library's
    # last-resort handler (an unformatted line): route it, errors only.
    watchdog_logger = logging.getLogger("watchdog")
    watchdog_logger.handlers[:] = [_InterceptHandler()]
    watchdog_logger.setLevel(logging.ERROR)
    watchdog_logger.propagate = False
