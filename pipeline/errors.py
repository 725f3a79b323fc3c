"""Exception types shared by the daemons.

Retryable and permanent failures are separate types so that every caller decides
by ``except`` clause, never by parsing a message.
"""

from __future__ import annotations


class DicomFlowError(Exception):
    """Base class of every error DicomFlow raises on purpose."""


class ConfigError(DicomFlowError):
    """A configuration value is wrong; the message names file, section and key."""

    def __init__(self, file: str, section: str | None, key: str | None, message: str) -> None:
        self.file, self.section, self.key = file, section, key
        where = file
        if section:
            where += f": [{section}]"
        if key:
            where += f" {key}"
        super().__init__(f"{where}: {message}")


class SpoolError(DicomFlowError):
    """The spool cannot be used (missing, wrong permissions, wrong format version)."""


class AlreadyRunning(DicomFlowError):
    """Another instance of the same daemon holds the lock on this spool."""


class QuarantineError(DicomFlowError):
    """A file is unreadable, not DICOM or unsafe; the message is the quarantine reason."""


class RetryableError(DicomFlowError):
    """Something failed that may succeed later (out of resources, timeout)."""


class EndpointDown(RetryableError):
    """The destination cannot be reached at all: no file is charged an attempt."""


class PermanentError(DicomFlowError):
    """The destination refused this file for good; it goes to ``failed/``."""


class EndpointTrouble(RetryableError):
    """The association broke (abort, timeout, peer gone): the endpoint, not the file."""


class StopBatch(DicomFlowError):
    """The endpoint is busy, or a delivered file could not be moved to ``sent/``: send
    nothing more for now; every file stays in the outbox."""
