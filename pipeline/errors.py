"""Exception types of DicomFlow, all in this one module.

Each failure a caller must tell apart is its own type, so that every caller decides
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


class DiskTrouble(DicomFlowError):
    """A retryable OS error (disk full, read-only, I/O error) while moving a file: the
    filter leaves everything where it is and tries that file again later."""


class PermanentError(DicomFlowError):
    """The destination refused this file for good; it goes to ``failed/``."""


class EndpointTrouble(DicomFlowError):
    """The association broke (abort, timeout, peer gone): the endpoint, not the file."""


class StopBatch(DicomFlowError):
    """The endpoint is busy, or a delivered file could not be moved to ``sent/``: send
    nothing more for now; every file stays in the outbox."""
