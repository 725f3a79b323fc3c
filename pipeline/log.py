"""Logging: loguru to stderr, one line per event, context bound per daemon.

supervisord captures stderr and rotates it. pynetdicom logs through the standard
library; those records are routed into loguru at their own (lower by default)
level, because pynetdicom's DEBUG output contains patient data. Untrusted strings
must pass through :func:`pipeline.names.escape` before they are logged.
"""

from __future__ import annotations

import logging
import sys

from loguru import logger

from pipeline.names import escape

__all__ = ["logger", "setup", "escape"]

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
        message = escape(record.getMessage(), limit=2000)
        logger.opt(depth=0, exception=record.exc_info).bind(source=record.name).log(
            level, message
        )


def _context(record: dict) -> None:
    extra = record["extra"]
    extra.setdefault("daemon", "dicomflow")
    parts = [f" {k}={v}" for k, v in extra.items() if k in ("endpoint", "file", "peer")]
    extra["ctx"] = "".join(parts)


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
