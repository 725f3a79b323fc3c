"""HTTP basic auth for the web daemon: the users file, read once, and the check.

The file holds ``user:password`` lines (``#`` comments and blank lines allowed), like
the password files Prometheus and nginx take, and must be readable by its owner only —
the same guard as a de-identification key file. Passwords are compared in constant
time (:func:`hmac.compare_digest`), and nothing a client sends is logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path

from pipeline.private_files import read_owner_only

MAX_FILE_BYTES = 64 * 1024   # a users file is a few lines
MAX_HEADER_BYTES = 1024      # an Authorization header longer than this is refused unread


def load_users(path: Path) -> dict[str, str]:
    """The users of ``path``; ValueError with a readable reason when it cannot be used."""
    data = read_owner_only(path, MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ValueError(f"{path} line {number}: expected user:password")
        users[user] = password
    if not users:
        raise ValueError(f"{path}: no user:password line")
    return users


def authorized(header: str | None, users: dict[str, str]) -> bool:
    """Whether an ``Authorization`` header names one of ``users`` with its password."""
    if not header or len(header) > MAX_HEADER_BYTES:
        return False
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, colon, password = decoded.partition(":")
    expected = users.get(user)
    if not colon or expected is None:
        hmac.compare_digest(password.encode(), password.encode())  # the same work for an unknown user
        return False
    return hmac.compare_digest(password.encode(), expected.encode())
