"""Configuration: ``conf/router.ini`` and ``conf/endpoints/<name>.ini``, validated once.

Every key is declared once, in pipeline/config_keys.py (converter, default, meaning);
this module reads the INI files, fills the typed objects below from that table, and
stops at the first mistake with one line naming the file, section and key
(``ConfigError``). Sections and keys the table does not list are errors too, so a typo
never passes silently. Endpoint files also accept the older DicomFlowRouter layout
(``[ENDPOINT] hostname/port/ae_title/whitelist/blacklist``, ``[SCHEDULE] scheduled``,
``[DEBUG] loglevel/logname``; README "Configuration", "Coming from DicomFlowRouter").
"""

from __future__ import annotations

import configparser
import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.config_keys import ENDPOINT, ROUTER, Option, options, sections
from pipeline.config_types import EMPTY_OK, GiB
from pipeline.errors import ConfigError
from pipeline.header import HeaderLimits
from pipeline.http_auth import load_users
from pipeline.names import is_valid_endpoint_name
from pipeline.private_files import read_owner_only
from pipeline.rules import RuleSet
from pipeline.schedule import Window
from pipeline.shaping.deidentify import DeidentifyConfig
from pipeline.shaping.operations import Operations
from pipeline.studies.levels import INSTANCE_POLICY, StudyPolicy

# -- typed configuration (no defaults here: the loader takes each from config_keys) --

@dataclass(frozen=True)
class TlsConfig:
    """TLS settings; ``enabled`` False means plain TCP."""

    enabled: bool
    cert: Path | None
    key: Path | None
    ca: Path | None
    require_client_cert: bool

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
class WebConfig:
    """``[web]``: the HTTP daemon (services/web.py) — metrics, health, status page."""

    enabled: bool
    bind: str
    port: int
    refresh: float
    health_timeout: float
    tls_cert: Path | None
    tls_key: Path | None
    auth_file: Path | None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"


@dataclass(frozen=True)
class RouterConfig:
    conf_file: Path
    ae_title: str
    bind: str
    port: int
    spool: Path
    allowed_calling_aets: tuple[str, ...]
    allowed_networks: tuple
    log_level: str
    log_json: bool
    pynetdicom_log_level: str
    #: receive daemons sharing ``port`` with SO_REUSEPORT (1 = one, bound exclusively)
    receive_processes: int
    max_associations: int
    max_pending_connections: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_pdu: int
    disk_floor_bytes: int | None
    disk_floor_fraction: float | None
    #: the instance journal (pipeline/journal): on/off, how long events are kept, and
    #: whether Patient ID and Accession Number are stored with them
    journal: bool
    journal_retention: float
    journal_phi: bool
    tls: TlsConfig
    rules: RuleSet
    #: [filter] settle_time: how long a hand-copied file without a close-write event
    #: must stay unchanged (and unopened for writing) before the filter takes it
    settle_time: float
    #: [filter] stable_time / max_wait: the defaults of series/study-level endpoints
    default_stable_time: float
    default_max_wait: float
    header_limits: HeaderLimits
    #: [coerce] operations: applied to every file before fan-out (pipeline/shaping)
    coerce: Operations
    web: WebConfig

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

    max_attempts: int
    max_age: float
    backoff: float
    backoff_cap: float
    probe_backoff: float
    probe_backoff_cap: float


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    conf_file: Path
    host: str
    port: int
    ae_title: str
    calling_ae_title: str
    pass_calling_ae_title: bool
    connect_timeout: float
    acse_timeout: float
    dimse_timeout: float
    min_transfer_rate: int
    max_pdu: int
    idle_release: float
    associations: int
    sent_retention: float
    log_level: str | None
    transcode: bool
    transcode_max_size: int
    tls: TlsConfig
    retry: RetryPolicy
    rules: RuleSet
    window: Window
    #: [coerce] operations: this endpoint's copy is shaped (its own file, not a link)
    coerce: Operations
    #: [deidentify]: this endpoint's copy is de-identified (None: it is not)
    deidentify: DeidentifyConfig | None = None
    #: [filter] level and its companions: per instance, or per series/study
    study: StudyPolicy = INSTANCE_POLICY

    @property
    def shapes(self) -> bool:
        """Does this endpoint get its own shaped file (and send only those)?"""
        return bool(self.coerce) or self.deidentify is not None

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
    """The keys of one section; ``take`` converts one, ``finish`` rejects leftovers.

    ``origins`` maps a key folded in from a legacy section to where it was written, so
    that errors name the line the operator wrote."""

    def __init__(self, file: Path, kind: str, name: str, values: dict[str, str],
                 origins: dict[str, tuple[str, str]] | None = None) -> None:
        self.file, self.kind, self.name, self.values = file, kind, name, dict(values)
        self.origins = origins or {}

    def take(self, opt: Option) -> Any:
        raw = self.values.pop(opt.key, None)
        if raw is None or (raw.strip() == "" and opt.converter not in EMPTY_OK):
            if opt.required:
                raise self.error(opt.key, "is required")
            return opt.value()
        try:
            return opt.converter(raw.strip())
        except ValueError as exc:
            raise self.error(opt.key, str(exc)) from None

    def take_all(self) -> dict[str, Any]:
        """Every key the table lists for this section, by field name, in the table's order."""
        return {opt.name: self.take(opt) for opt in options(self.kind, self.name)}

    def error(self, key: str | None, message: str) -> ConfigError:
        section, real_key = self.origins.get(key or "", (self.name, key))
        return ConfigError(str(self.file), section, real_key, message)

    def finish(self) -> None:
        for key in self.values:
            raise self.error(key, "unknown key")


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


def _tls(section: _Section, conf_dir: Path) -> TlsConfig:
    """TLS keys; ``tls_require_client_cert`` exists only for the receiver (server side).

    Settings that cannot work are refused here, so that ``check`` refuses them: a
    receiver needs its own certificate and key (``tls_ca`` alone verifies clients, it
    cannot serve TLS), files must load as what they claim to be, and a certificate
    must match its key."""
    server = section.kind == ROUTER
    values = section.take_all()
    cert, key, ca = (None if values[name] is None else _resolve(conf_dir, values[name])
                     for name in ("cert", "key", "ca"))
    enabled = values["enabled"]
    require = values.get("require_client_cert", False)
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


def _whole(section: _Section) -> dict[str, Any]:
    """All of a section's keys; any other key is an error."""
    values = section.take_all()
    section.finish()
    return values


def _pick(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """Take out of ``values`` the fields of ``cls`` (one section fills several objects)."""
    return {f.name: values.pop(f.name) for f in fields(cls) if f.name in values}


def load_router(conf_dir: Path) -> RouterConfig:
    path = conf_dir / "router.ini"
    data = _read_ini(path)
    _known_sections(path, data, sections(ROUTER))
    if "router" not in data:
        raise ConfigError(str(path), "router", None, "section is missing")

    def section(name: str) -> _Section:
        return _Section(path, ROUTER, name, data.get(name, {}))

    values = _whole(section("router"))
    values["spool"] = _resolve(conf_dir, values["spool"])
    values["disk_floor_bytes"], values["disk_floor_fraction"] = (
        values.pop("disk_floor") or (None, None))
    tls_section = section("tls")
    values["tls"] = _tls(tls_section, conf_dir)
    tls_section.finish()
    filter_values = _whole(section("filter"))
    values["rules"] = RuleSet(**_pick(filter_values, RuleSet))
    values["header_limits"] = HeaderLimits(**_pick(filter_values, HeaderLimits))
    values.update(filter_values)  # settle_time
    values.update(_whole(section("coerce")))  # coerce
    values["web"] = _web(section("web"), conf_dir)
    return RouterConfig(conf_file=path, **values)


def _web(section: _Section, conf_dir: Path) -> WebConfig:
    """``[web]``: HTTPS files loaded and the users file read as the daemon will, so that
    ``dicomflow check`` refuses what the web daemon could not use."""
    values = _whole(section)
    for key in ("tls_cert", "tls_key", "auth_file"):
        if values[key] is not None:
            values[key] = _resolve(conf_dir, values[key])
    cert, key = values["tls_cert"], values["tls_key"]
    if (cert is None) != (key is None):
        raise section.error("tls_key" if key is None else "tls_cert",
                            "tls_cert and tls_key go together")
    for name in ("tls_cert", "tls_key"):
        if values[name] is not None and not values[name].is_file():
            raise section.error(name, f"file {values[name]} not found")
    if cert is not None:
        _check_tls_files(section, cert, key, None, server=True)
    if values["auth_file"] is not None:
        try:
            load_users(values["auth_file"])
        except ValueError as exc:
            raise section.error("auth_file", str(exc)) from None
    return WebConfig(**values)


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
ENDPOINT_SECTIONS = sections(ENDPOINT)
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
            if section is None or new_key is None:
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
        return _Section(path, ENDPOINT, name_, merged[name_], origins[name_])

    values = _whole(section("endpoint"))
    values["calling_ae_title"] = values["calling_ae_title"] or router.ae_title
    tls_section = section("tls")
    values["tls"] = _tls(tls_section, conf_dir)
    tls_section.finish()
    values["retry"] = _retry(section("retry"))
    values.update(_whole(section("transcode")))  # transcode, transcode_max_size
    filter_section = section("filter")
    filter_values = _whole(filter_section)
    values["rules"] = RuleSet(**_pick(filter_values, RuleSet))
    values["study"] = _study_policy(filter_section, filter_values, router, values["associations"])
    values.update(_whole(section("schedule")))  # window
    values.update(_whole(section("coerce")))  # coerce
    values["deidentify"] = _deidentify(section("deidentify"), conf_dir, section("coerce"),
                                       values["coerce"])
    return EndpointConfig(name=name, conf_file=path, **values)


def _study_policy(section: _Section, values: dict[str, Any], router: RouterConfig,
                  associations: int) -> StudyPolicy:
    """``[filter] level`` and its companions, checked together (each names its key)."""
    level = values["level"]
    if level == "instance":
        for key, unset in (("stable_time", None), ("max_wait", None), ("completion", "stable"),
                           ("late", "follow")):
            if values[key] != unset:
                raise section.error(key, "applies only with level = series or study")
        return INSTANCE_POLICY
    if associations > 1:
        raise ConfigError(str(section.file), "endpoint", "associations",
                          f"must be 1 with [filter] level = {level}: a study is sent in order "
                          f"on one association")
    stable = values["stable_time"] or router.default_stable_time
    max_wait = values["max_wait"] or router.default_max_wait
    if max_wait < stable:
        raise section.error("max_wait", f"is shorter than stable_time ({stable:g}s)")
    return StudyPolicy(level, stable, values["completion"], max_wait, values["late"])


#: the shortest key accepted for pseudonyms (128 bits)
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096


#: what de-identification sets and the filter reads to know a copy is de-identified
#: (Patient Identity Removed, De-identification Method and its Code Sequence,
#: Longitudinal Temporal Information Modified): an endpoint's [coerce] may not touch them
DEID_MARKERS = {0x00120062: "PatientIdentityRemoved", 0x00120063: "DeidentificationMethod",
                0x00120064: "DeidentificationMethodCodeSequence",
                0x00280303: "LongitudinalTemporalInformationModified"}


def _deidentify(section: _Section, conf_dir: Path, coerce_section: _Section | None = None,
                coerce: Operations | None = None) -> DeidentifyConfig | None:
    """``[deidentify]``: every key checked together, the key file read and guarded; the
    endpoint's ``[coerce]`` may not change the attributes de-identification marks a
    copy with (such a copy would not be known as de-identified: it would loop between
    sender and filter forever)."""
    values = _whole(section)
    if values["profile"] is None:
        for key in ("options", "key_file", "safe_private"):
            if values[key]:
                raise section.error(key, "needs profile = basic")
        return None
    if values["key_file"] is None:
        raise section.error("key_file", "is required with a profile (the pseudonyms' secret key)")
    if values["safe_private"] and "retain_safe_private" not in values["options"]:
        raise section.error("safe_private", "needs the option retain_safe_private")
    if coerce and coerce_section is not None:
        for tag, line in coerce.top_tags().items():
            if tag in DEID_MARKERS:
                raise coerce_section.error(
                    "operations", f"line {line} changes {DEID_MARKERS[tag]}, which "
                    f"[deidentify] sets on every copy: not allowed with a profile")
    secret = _read_key(section, _resolve(conf_dir, values["key_file"]))
    return DeidentifyConfig(values["options"], secret, values["allow_burned_in"],
                            values["safe_private"])


def _read_key(section: _Section, path: Path) -> bytes:
    """The key file's bytes; refused unless only its owner can read it."""
    try:
        key = read_owner_only(path, MAX_KEY_BYTES + 1).strip()
    except ValueError as exc:
        raise section.error("key_file", str(exc)) from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise section.error("key_file", f"{path}: a key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} "
                            f"bytes (e.g. head -c 32 /dev/urandom | base64 > FILE)")
    return key


def _retry(sec: _Section) -> RetryPolicy:
    policy = RetryPolicy(**sec.take_all())
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
