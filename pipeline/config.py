"""Configuration: ``conf/router.ini`` and ``conf/endpoints/<name>.ini``, validated once.

In the manner of Supervisor's ``datatypes.py``: every key has one named converter,
every value is checked at start-up, and the first mistake stops everything with one
line naming the file, section and key (``ConfigError``). Unknown sections and keys are
errors too, so a typo never passes silently. Endpoint files also accept the older
DicomFlowRouter layout (``[ENDPOINT] hostname/port/ae_title/whitelist/blacklist``,
``[SCHEDULE] scheduled``, ``[DEBUG] loglevel/logname``).
"""

from __future__ import annotations

import configparser
import ipaddress
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.header import HeaderLimits
from pipeline.names import is_valid_ae_title, is_valid_endpoint_name
from pipeline.rules import RuleSet, RuleSyntaxError, parse_conditions, parse_sop_list
from pipeline.schedule import ALWAYS, Window, WindowSyntaxError, parse_window

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
KiB, MiB, GiB = 1024, 1024**2, 1024**3
_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
               "g": GiB, "gb": GiB, "gib": GiB, "t": 1024**4, "tib": 1024**4, "tb": 1024**4}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}


# -- converters (one per kind of value) ------------------------------------------

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


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\n]", value) if v.strip()]


# -- typed configuration -----------------------------------------------------------

@dataclass(frozen=True)
class TlsConfig:
    """TLS settings; ``enabled`` False means plain TCP."""

    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    def describe(self, server: bool) -> str:
        """What these settings do, in one line (``dicomflow check`` prints it)."""
        if not self.enabled:
            return "off (plain DICOM)"
        if server:
            if self.ca is None:
                clients = "client certificates not requested"
            elif self.require_client_cert:
                clients = f"client certificate required, verified against {self.ca}"
            else:
                clients = (f"client certificate optional; one presented is verified against "
                           f"{self.ca}")
            return f"on, certificate {self.cert}; {clients}"
        trust = self.ca if self.ca is not None else "the system CAs"
        own = f"; our certificate {self.cert}" if self.cert is not None else ""
        return f"on, destination verified against {trust} (host name checked){own}"


@dataclass(frozen=True)
class RouterConfig:
    conf_file: Path
    ae_title: str = "DICOMFLOW"
    bind: str = "0.0.0.0"
    port: int = 11112
    spool: Path = Path("/var/spool/dicomflow")
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_networks: tuple = ()
    log_level: str = "INFO"
    log_json: bool = False
    pynetdicom_log_level: str = "WARNING"
    max_associations: int = 10
    max_pending_connections: int = 32
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = MiB
    disk_floor_bytes: int | None = None
    disk_floor_fraction: float | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    rules: RuleSet = field(default_factory=RuleSet)
    #: [filter] settle_time: how long a hand-copied file without a close-write event
    #: must stay unchanged (and unopened for writing) before the filter takes it
    settle_time: float = 3.0
    header_limits: HeaderLimits = field(default_factory=HeaderLimits)

    def disk_floor(self, total_bytes: int) -> int:
        """Free bytes to keep: the configured value, else min(1 GiB, 5 % of the disk)."""
        if self.disk_floor_bytes is not None:
            return self.disk_floor_bytes
        if self.disk_floor_fraction is not None:
            return int(total_bytes * self.disk_floor_fraction)
        return min(GiB, int(total_bytes * 0.05))


@dataclass(frozen=True)
class RetryPolicy:
    """How a sender retries: per file (transient statuses) and per endpoint (down)."""

    max_attempts: int = 10
    max_age: float = 86400.0
    backoff: float = 10.0
    backoff_cap: float = 600.0
    probe_backoff: float = 0.5
    probe_backoff_cap: float = 5.0


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    conf_file: Path
    host: str
    port: int
    ae_title: str
    calling_ae_title: str
    pass_calling_ae_title: bool = False
    connect_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    min_transfer_rate: int = MiB
    max_pdu: int = MiB
    idle_release: float = 10.0
    sent_retention: float = 7 * 86400.0
    log_level: str | None = None
    transcode: bool = True
    transcode_max_size: int = 512 * MiB
    tls: TlsConfig = field(default_factory=TlsConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rules: RuleSet = field(default_factory=RuleSet)
    window: Window = ALWAYS

    def dimse_timeout_for(self, file_size: int) -> float:
        """A C-STORE's timeout includes transmitting the file (P-DATA is queued before the wait)."""
        return self.dimse_timeout + file_size / max(self.min_transfer_rate, 1)


@dataclass(frozen=True)
class Config:
    conf_dir: Path
    router: RouterConfig
    endpoints: dict[str, EndpointConfig]
    warnings: tuple[str, ...] = ()

    @property
    def spool(self) -> Path:
        return self.router.spool


# -- reading INI files -------------------------------------------------------------

class _Section:
    """The keys of one section; ``take`` converts one, ``finish`` rejects leftovers."""

    def __init__(self, file: Path, name: str, values: dict[str, str],
                 origins: dict[str, tuple[str, str]] | None = None) -> None:
        self.file, self.name, self.values = file, name, dict(values)
        self.origins = origins or {}

    def take(self, key: str, converter: Callable[[str], Any], default: Any = None,
             required: bool = False) -> Any:
        raw = self.values.pop(key, None)
        if raw is None or (raw.strip() == "" and converter not in _EMPTY_OK):
            if required:
                raise self.error(key, "is required")
            return default
        try:
            return converter(raw.strip())
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def error(self, key: str | None, message: str) -> ConfigError:
        section, real_key = self.origins.get(key or "", (self.name, key))
        return ConfigError(str(self.file), section, real_key, message)

    def finish(self) -> None:
        for key in self.values:
            raise self.error(key, "unknown key")


_EMPTY_OK: tuple = (sop_list, conditions, window, ae_title_list, networks)


def _read_ini(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        strict=True,
        default_section="\x00no default section",
    )
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), None, None, "file not found") from None
    except PermissionError:
        raise ConfigError(str(path), None, None, "permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), None, None, "not UTF-8 text") from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(str(path), None, None,
                          f"line {exc.lineno}: a key before any [section]") from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(str(path), exc.section, None,
                          f"line {exc.lineno}: section appears twice") from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(str(path), exc.section, exc.option,
                          f"line {exc.lineno}: key appears twice") from None
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(str(path), None, None, f"cannot parse: {message}") from None
    return {name: dict(parser[name]) for name in parser.sections()}


def _known_sections(path: Path, data: dict[str, dict[str, str]], allowed: tuple[str, ...]) -> None:
    for name in data:
        if name not in allowed:
            raise ConfigError(str(path), name, None,
                              f"unknown section (expected one of: {', '.join(allowed)})")


def _tls(section: _Section, conf_dir: Path, server: bool) -> TlsConfig:
    """TLS keys; ``tls_require_client_cert`` exists only for the receiver (server side).

    Settings that cannot work are refused here, so that ``check`` refuses them: a
    receiver needs its own certificate and key (``tls_ca`` alone verifies clients, it
    cannot serve TLS), files must load as what they claim to be, and a certificate
    must match its key."""
    def path_value(value: str) -> Path:
        return _resolve(conf_dir, value)

    cert = section.take("tls_cert", path_value)
    key = section.take("tls_key", path_value)
    ca = section.take("tls_ca", path_value)
    enabled = section.take("tls", boolean, default=None)
    require = section.take("tls_require_client_cert", boolean, False) if server else False
    if enabled is None:
        enabled = bool(cert or ca)
    for name, value in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
        if value is not None and not value.is_file():
            raise section.error(name, f"file {value} not found")
    if (cert is None) != (key is None):
        raise section.error("tls_key" if key is None else "tls_cert",
                            "tls_cert and tls_key go together")
    if require and ca is None:
        raise section.error("tls_require_client_cert", "needs tls_ca to verify clients")
    if require and not enabled:
        raise section.error("tls_require_client_cert", "needs TLS (tls = false here)")
    if server and enabled and cert is None:
        raise section.error("tls_cert", "the receiver's TLS needs tls_cert and tls_key "
                            "(tls_ca only verifies client certificates)")
    if enabled:
        _check_tls_files(section, cert, key, ca, server)
    return TlsConfig(enabled, cert, key, ca, require)


def _check_tls_files(section: _Section, cert: Path | None, key: Path | None, ca: Path | None,
                     server: bool) -> None:
    """Load the files the way the daemons will, so that a wrong one fails at start-up."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            raise section.error("tls_cert", f"{cert} with {key} cannot be used "
                                f"(not PEM, encrypted, or not a matching pair): "
                                f"{getattr(exc, 'reason', None) or exc}") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise section.error("tls_ca", f"{ca} holds no usable CA certificate: "
                                f"{getattr(exc, 'reason', None) or exc}") from None


def _resolve(conf_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (conf_dir / path).resolve()


def _rules(section: _Section | None) -> RuleSet:
    if section is None:
        return RuleSet()
    rules = RuleSet(
        sop_whitelist=section.take("sop_whitelist", sop_list, frozenset()),
        sop_blacklist=section.take("sop_blacklist", sop_list, frozenset()),
        conditions=section.take("conditions", conditions, ()),
    )
    section.finish()
    return rules


def load_router(conf_dir: Path) -> RouterConfig:
    path = conf_dir / "router.ini"
    data = _read_ini(path)
    _known_sections(path, data, ("router", "filter", "tls"))
    if "router" not in data:
        raise ConfigError(str(path), "router", None, "section is missing")
    sec = _Section(path, "router", data["router"])
    floor = sec.take("disk_floor", size_or_percent, (None, None))
    values = dict(
        conf_file=path,
        ae_title=sec.take("ae_title", ae_title, "DICOMFLOW"),
        bind=sec.take("bind", host, "0.0.0.0"),
        port=sec.take("port", port, 11112),
        spool=_resolve(conf_dir, sec.take("spool", str, "/var/spool/dicomflow")),
        allowed_calling_aets=sec.take("allowed_calling_aets", ae_title_list, ()),
        allowed_networks=sec.take("allowed_networks", networks, ()),
        log_level=sec.take("log_level", log_level, "INFO"),
        log_json=sec.take("log_json", boolean, False),
        pynetdicom_log_level=sec.take("pynetdicom_log_level", log_level, "WARNING"),
        max_associations=sec.take("max_associations", positive_int, 10),
        max_pending_connections=sec.take("max_pending_connections", positive_int, 32),
        acse_timeout=sec.take("acse_timeout", positive_duration, 30.0),
        dimse_timeout=sec.take("dimse_timeout", positive_duration, 60.0),
        network_timeout=sec.take("network_timeout", positive_duration, 60.0),
        max_pdu=sec.take("max_pdu", pdu_size, MiB),
        disk_floor_bytes=floor[0],
        disk_floor_fraction=floor[1],
    )
    sec.finish()
    tls_section = _Section(path, "tls", data.get("tls", {}))
    values["tls"] = _tls(tls_section, conf_dir, server=True)
    tls_section.finish()
    filter_section = _Section(path, "filter", data["filter"]) if "filter" in data else None
    if filter_section is not None:
        values["settle_time"] = filter_section.take("settle_time", positive_duration, 3.0)
    values["header_limits"] = _header_limits(filter_section)
    values["rules"] = _rules(filter_section)
    return RouterConfig(**values)


def _header_limits(section: _Section | None) -> HeaderLimits:
    """[filter] bounds on reading one file's header (the rest of the section is rules)."""
    default = HeaderLimits()
    if section is None:
        return default
    return HeaderLimits(
        max_header_elements=section.take("max_header_elements", positive_int,
                                         default.max_header_elements),
        max_header_bytes=section.take("max_header_bytes", positive_size, default.max_header_bytes),
        max_inflated_size=section.take("max_inflated_size", positive_size, default.max_inflated_size),
    )


_LEGACY = {
    # (legacy section, legacy key) -> (section, key)
    ("ENDPOINT", "hostname"): ("endpoint", "host"),
    ("ENDPOINT", "host"): ("endpoint", "host"),
    ("ENDPOINT", "port"): ("endpoint", "port"),
    ("ENDPOINT", "ae_title"): ("endpoint", "ae_title"),
    ("ENDPOINT", "whitelist"): ("filter", "sop_whitelist"),
    ("ENDPOINT", "blacklist"): ("filter", "sop_blacklist"),
    ("SCHEDULE", "scheduled"): ("schedule", "window"),
    ("DEBUG", "loglevel"): ("endpoint", "log_level"),
    ("DEBUG", "logname"): (None, None),  # accepted; supervisord names the program
}
ENDPOINT_SECTIONS = ("endpoint", "filter", "schedule", "retry", "tls", "transcode")
LEGACY_SECTIONS = ("ENDPOINT", "SCHEDULE", "DEBUG")


def _normalise_endpoint(path: Path, data: dict[str, dict[str, str]]):
    """Fold the older DicomFlowRouter sections into ours; remember where keys came from."""
    _known_sections(path, data, ENDPOINT_SECTIONS + LEGACY_SECTIONS)
    merged: dict[str, dict[str, str]] = {s: dict(data.get(s, {})) for s in ENDPOINT_SECTIONS}
    origins: dict[str, dict[str, tuple[str, str]]] = {s: {} for s in ENDPOINT_SECTIONS}
    for legacy in LEGACY_SECTIONS:
        for key, value in data.get(legacy, {}).items():
            target = _LEGACY.get((legacy, key))
            if target is None:
                raise ConfigError(str(path), legacy, key, "unknown key")
            section, new_key = target
            if section is None:
                continue
            if new_key in merged[section]:
                raise ConfigError(str(path), legacy, key,
                                  f"also given as [{section}] {new_key}; keep one")
            merged[section][new_key] = value
            origins[section][new_key] = (legacy, key)
    return merged, origins


def load_endpoint(path: Path, router: RouterConfig) -> EndpointConfig:
    name = path.stem
    if not is_valid_endpoint_name(name):
        raise ConfigError(str(path), None, None,
                          "endpoint file names must be [A-Za-z0-9_-]+.ini")
    conf_dir = path.parent.parent
    merged, origins = _normalise_endpoint(path, _read_ini(path))
    if not merged["endpoint"] and not origins["endpoint"]:
        raise ConfigError(str(path), "endpoint", None, "section is missing")

    def section(name_: str) -> _Section:
        return _Section(path, name_, merged[name_], origins[name_])

    ep = section("endpoint")
    values = dict(
        name=name,
        conf_file=path,
        host=ep.take("host", host, required=True),
        port=ep.take("port", port, required=True),
        ae_title=ep.take("ae_title", ae_title, required=True),
        calling_ae_title=ep.take("calling_ae_title", ae_title, router.ae_title),
        pass_calling_ae_title=ep.take("pass_calling_ae_title", boolean, False),
        connect_timeout=ep.take("connect_timeout", positive_duration, 10.0),
        acse_timeout=ep.take("acse_timeout", positive_duration, 30.0),
        dimse_timeout=ep.take("dimse_timeout", positive_duration, 60.0),
        min_transfer_rate=ep.take("min_transfer_rate", size, MiB),
        max_pdu=ep.take("max_pdu", pdu_size, MiB),
        idle_release=ep.take("idle_release", positive_duration, 10.0),
        sent_retention=ep.take("sent_retention", duration, 7 * 86400.0),
        log_level=ep.take("log_level", log_level, None),
    )
    ep.finish()
    tls_section = section("tls")
    values["tls"] = _tls(tls_section, conf_dir, server=False)
    tls_section.finish()
    values["retry"] = _retry(section("retry"))
    tc = section("transcode")
    values["transcode"] = tc.take("enabled", boolean, True)
    values["transcode_max_size"] = tc.take("max_size", size, 512 * MiB)
    tc.finish()
    values["rules"] = _rules(section("filter"))
    sched = section("schedule")
    values["window"] = sched.take("window", window, ALWAYS)
    sched.finish()
    return EndpointConfig(**values)


def _retry(sec: _Section) -> RetryPolicy:
    policy = RetryPolicy(
        max_attempts=sec.take("max_attempts", positive_int, 10),
        max_age=sec.take("max_age", positive_duration, 86400.0),
        backoff=sec.take("backoff", positive_duration, 10.0),
        backoff_cap=sec.take("backoff_cap", positive_duration, 600.0),
        probe_backoff=sec.take("probe_backoff", positive_duration, 0.5),
        probe_backoff_cap=sec.take("probe_backoff_cap", positive_duration, 5.0),
    )
    sec.finish()
    if policy.backoff > policy.backoff_cap:
        raise sec.error("backoff", "is larger than backoff_cap")
    if policy.probe_backoff > policy.probe_backoff_cap:
        raise sec.error("probe_backoff", "is larger than probe_backoff_cap")
    return policy


def endpoint_files(conf_dir: Path) -> list[Path]:
    directory = conf_dir / "endpoints"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.ini") if not p.name.startswith("."))


def load(conf_dir: Path | str) -> Config:
    """Load and validate the whole configuration; raise ConfigError on the first mistake."""
    conf_dir = Path(conf_dir).resolve()
    if not conf_dir.is_dir():
        raise ConfigError(str(conf_dir), None, None, "configuration directory not found")
    router = load_router(conf_dir)
    endpoints = {p.stem: load_endpoint(p, router) for p in endpoint_files(conf_dir)}
    warnings = []
    for ep in endpoints.values():
        if ep.host in ("127.0.0.1", "localhost", "::1") and ep.port == router.port:
            raise ConfigError(str(ep.conf_file), "endpoint", "port",
                              f"{ep.host}:{ep.port} is this router itself (a routing loop)")
    if not endpoints:
        warnings.append(f"no endpoints in {conf_dir / 'endpoints'}: everything will be rejected")
    return Config(conf_dir, router, endpoints, tuple(warnings))
