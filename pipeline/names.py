"""Validation of identifiers that come from the network or from operators.

Anything that will become part of a path, a log line or an association must pass
through here first: a UID is digits and dots (PS3.5 §9.1), an AE title is at most
16 printable characters without a backslash (PS3.5 §6.2).
"""

from __future__ import annotations

import re

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_ENDPOINT_RE = re.compile(r"[A-Za-z0-9_-]+")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID: digits and dots, at most 64 characters.

    Leading zeros in a component are tolerated on the wire by many devices, so only
    the charset, the length and empty components are checked strictly.
    """
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return False
    return all(part.isdigit() and part.isascii() for part in value.split("."))


def is_strict_uid(value: str) -> bool:
    """True when the UID also has no leading zeros (full PS3.5 §9.1 conformance)."""
    return is_valid_uid(value) and _UID_RE.fullmatch(value) is not None


def is_valid_ae_title(value: object) -> bool:
    """True for an AE title: 1-16 printable ASCII characters, no backslash, not all spaces."""
    if not isinstance(value, str) or not 0 < len(value) <= 16:
        return False
    if not value.strip():
        return False
    return all(0x20 <= ord(ch) < 0x7F and ch != "\\" for ch in value)


def is_valid_endpoint_name(value: str) -> bool:
    """Endpoint names become folder and program names: ``[A-Za-z0-9_-]+``."""
    return _ENDPOINT_RE.fullmatch(value) is not None


def escape(value: object, limit: int = 200) -> str:
    """Render untrusted text for a log line, a sidecar or JSON: printable, valid UTF-8, bounded.

    Newlines and other control characters are shown as ``\\xNN`` escapes so that a
    hostile AE title or file name can never forge a log line. Names from disk are bytes
    (a ``str`` of them carries undecodable bytes as lone surrogates, PEP 383): bytes that
    are not UTF-8 are shown as ``\\xNN`` too, so that the result can always be written
    as UTF-8 (a surrogate kept as such made every write of a ``.reason`` fail).
    """
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape (issue 7: a loop per character)
    return "".join(_escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a name from disk (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
        return f"\\x{code:02x}"
    if ch == "\\":
        return "\\\\"
    if ch == " " or ch.isprintable():
        return ch
    # other surrogates, line/paragraph separators, bidi overrides, unassigned code points
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
