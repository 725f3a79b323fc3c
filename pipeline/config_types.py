"""Converters for configuration values: one named function per kind of value.

In the manner of Supervisor's ``datatypes.py``: each takes the INI text (stripped) and
returns the typed value or raises ``ValueError`` with a message fit for one line of
``dicomflow check`` (the loader adds the file, section and key). pipeline/config_keys.py
names one for every key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from pipeline.errors import OperationSyntaxError, RuleSyntaxError, WindowSyntaxError
from pipeline.names import is_valid_ae_title
from pipeline.rules import parse_conditions, parse_sop_list
from pipeline.schedule import Window, parse_window
from pipeline.shaping.deidentify import OPTION_CODES, SafePrivate
from pipeline.shaping.operations import Operations, parse_operations
from pipeline.studies.levels import COMPLETIONS, LATE_POLICIES, LEVELS

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
KiB, MiB, GiB = 1024, 1024**2, 1024**3
_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
               "g": GiB, "gb": GiB, "gib": GiB, "t": 1024**4, "tib": 1024**4, "tb": 1024**4}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}


def ae_title(value: str) -> str:
    if not is_valid_ae_title(value):
        raise ValueError(
            f"{value!r} is not an AE title (1-16 printable ASCII characters, no backslash)"
        )
    return value.strip()


def ae_title_list(value: str) -> tuple[str, ...]:
    return tuple(ae_title(v) for v in _split_list(value))


def port(value: str) -> int:
    number = integer(value)
    if not 1 <= number <= 65535:
        raise ValueError(f"{value!r} is not a TCP port (1-65535)")
    return number


def host(value: str) -> str:
    if not value or any(ch.isspace() for ch in value) or not re.fullmatch(r"[\w.:\-\[\]]+", value):
        raise ValueError(f"{value!r} is not a host name or IP address")
    return value


def integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def positive_int(value: str) -> int:
    number = integer(value)
    if number < 1:
        raise ValueError(f"{value!r} must be at least 1")
    return number


def boolean(value: str) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, on/off)") from None


def duration(value: str) -> float:
    """``30``, ``30s``, ``5m``, ``2h``, ``7d`` → seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", value.strip().lower())
    if not match:
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 5m, 2h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def positive_duration(value: str) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than zero")
    return seconds


def size(value: str) -> int:
    """``4096``, ``64 KiB``, ``1 MiB``, ``2 GiB`` → bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip().lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (e.g. 4096, 64 KiB, 1 MiB, 2 GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_size(count: int) -> str:
    """Bytes as people read them (``1.5 GiB``): the other way from :func:`size`, for
    ``status`` and ``/healthz``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def positive_size(value: str) -> int:
    number = size(value)
    if number < 1:
        raise ValueError(f"{value!r} must be at least 1 byte")
    return number


def pdu_size(value: str) -> int:
    number = size(value)
    if number != 0 and not 4096 <= number <= 64 * MiB:
        raise ValueError(f"{value!r}: a maximum PDU is 4 KiB to 64 MiB (0 = unlimited)")
    if number == 0:
        raise ValueError("0 (unlimited) would hold whole datasets in memory; use e.g. 1 MiB")
    return number


def size_or_percent(value: str) -> tuple[int | None, float | None]:
    """``2 GiB`` → (bytes, None); ``5%`` → (None, 0.05)."""
    text = value.strip()
    if text.endswith("%"):
        try:
            fraction = float(text[:-1]) / 100
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage") from None
        if not 0 <= fraction < 1:
            raise ValueError(f"{value!r} must be between 0% and 100%")
        return None, fraction
    return size(text), None


def log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a log level ({', '.join(LOG_LEVELS)})")
    return level


def networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    result = []
    for item in _split_list(value):
        try:
            result.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return tuple(result)


def sop_list(value: str) -> frozenset[str]:
    try:
        return parse_sop_list(value)
    except RuleSyntaxError as exc:
        raise ValueError(str(exc)) from None


def conditions(value: str) -> tuple:
    try:
        return parse_conditions(value)
    except RuleSyntaxError as exc:
        raise ValueError(str(exc)) from None


def window(value: str) -> Window:
    try:
        return parse_window(value)
    except WindowSyntaxError as exc:
        raise ValueError(str(exc)) from None


def operations(value: str) -> Operations:
    """``[coerce] operations``: one operation per line (pipeline/shaping/operations.py)."""
    try:
        return parse_operations(value)
    except OperationSyntaxError as exc:
        raise ValueError(str(exc)) from None


#: options of PS3.15 Annex E that DicomFlow does not offer, and why
UNSUPPORTED_DEID_OPTIONS = {
    "clean_pixel_data": "pixel data is never decoded here (use allow_burned_in = false, "
                        "the default, to keep burned-in text away)",
    "clean_recognizable_visual_features": "pixel data is never decoded here",
    "clean_graphics": "graphics are not inspected (overlays and curves are removed, as in "
                      "the Basic Profile)",
    "clean_structured_content": "SR content is not inspected (content sequences follow "
                                "the Basic Profile)",
}


def deid_profile(value: str) -> str:
    """``[deidentify] profile``: ``basic`` (PS3.15 Table E.1-1) or empty (none)."""
    if value.lower() != "basic":
        raise ValueError(f"{value!r}: the profile is basic (PS3.15 Annex E, Table E.1-1), or "
                         f"leave it empty for no de-identification")
    return "basic"


def deid_options(value: str) -> frozenset[str]:
    """``[deidentify] options``: a comma-separated list of the profile's options."""
    chosen = frozenset(v.lower().replace("-", "_").replace(" ", "_") for v in _split_list(value))
    for option in sorted(chosen):
        if option in UNSUPPORTED_DEID_OPTIONS:
            raise ValueError(f"{option}: not offered: {UNSUPPORTED_DEID_OPTIONS[option]}")
        if option not in OPTION_CODES:
            raise ValueError(f"{option!r} is not an option (one of: {', '.join(OPTION_CODES)})")
    if {"retain_full_dates", "retain_modified_dates"} <= chosen:
        raise ValueError("retain_full_dates and retain_modified_dates exclude each other")
    return chosen


_SAFE_PRIVATE_RE = re.compile(
    r"(?P<creator>.+?)\s*\(\s*(?P<group>[0-9A-Fa-f]{4})\s*,\s*[xX]{2}(?P<element>[0-9A-Fa-f]{2})\s*\)")


def safe_private_list(value: str) -> tuple[SafePrivate, ...]:
    """``[deidentify] safe_private``: one ``CREATOR (gggg,xxee)`` per line."""
    kept = []
    for line in (v.strip() for v in value.splitlines() if v.strip()):
        match = _SAFE_PRIVATE_RE.fullmatch(line)
        if match is None:
            raise ValueError(f"{line!r}: write CREATOR (gggg,xxee), e.g. GEMS_PARM_01 (0043,xx39)")
        group = int(match["group"], 16)
        if group % 2 == 0 or group < 0x0009:
            raise ValueError(f"{line!r}: ({match['group']},…) is not a private group")
        kept.append(SafePrivate(match["creator"].strip(), group, int(match["element"], 16)))
    return tuple(kept)


def _choice(*allowed: str) -> Callable[[str], str]:
    """A converter for one word out of ``allowed`` (any case)."""
    def convert(value: str) -> str:
        word = value.strip().lower()
        if word not in allowed:
            raise ValueError(f"{value!r}: expected {' or '.join(allowed)}")
        return word
    return convert


#: ``[filter] level``: where an endpoint decides (pipeline/studies/levels.py)
study_level = _choice(*LEVELS)
#: ``[filter] completion``: when a series/study is complete
completion = _choice(*COMPLETIONS)
#: ``[filter] late``: an instance of a series/study already released
late_policy = _choice(*LATE_POLICIES)


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\n]", value) if v.strip()]


#: Converters whose empty value is a value (no list entries, "always open"); for every
#: other converter an empty value means "not given", i.e. the key's default.
EMPTY_OK: tuple = (sop_list, conditions, window, ae_title_list, networks, operations, deid_options,
                   safe_private_list)
