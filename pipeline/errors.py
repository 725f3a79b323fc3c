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


class MetaError(DicomFlowError):
    """The file meta group cannot be read as plain explicit VR little endian; the
    message says why."""


class MetaCutShort(MetaError):
    """The file meta group runs past the end of the file."""


class MetaOverLimit(MetaError):
    """The file meta group alone holds more ``elements`` or ``bytes`` (``what``) than the
    caller's limit (``limit``)."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"file meta holds more than {limit} {what}")
        self.what, self.limit = what, limit


class InflateError(DicomFlowError):
    """A deflated data set that cannot be inflated (corrupt, cut short) or is too big;
    the message is the reason."""


class InflateLimit(InflateError):
    """More than the cap came out of a deflated data set."""


class Refusal(DicomFlowError):
    """A received data set that must not be acknowledged: status and Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(status, comment)
        self.status = status
        self.comment = comment

    def __str__(self) -> str:
        return f"0x{self.status:04X} {self.comment}"


class RuleSyntaxError(DicomFlowError, ValueError):
    """A rule that cannot be parsed; the message says what was expected."""


class WindowSyntaxError(DicomFlowError, ValueError):
    """A window entry that is neither a cron expression, a time range nor ``mN < K``."""


class ShapingError(DicomFlowError):
    """A file that cannot be shaped (coerced) for an endpoint: a value too long for its
    VR, not writable in the file's character set, a template over a multi-valued
    attribute… The message is the reason written beside that endpoint's copy in
    ``failed/<endpoint>/``; other endpoints are unaffected."""


class OperationSyntaxError(DicomFlowError, ValueError):
    """A ``[coerce] operations`` line that cannot be parsed: ``line N 'text': what is
    wrong`` (the loader adds the file, section and key)."""
