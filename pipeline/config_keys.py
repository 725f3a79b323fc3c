"""Every configuration key, declared once: file, section, key, converter, default, meaning.

In the manner of Supervisor's ``Options.add``: pipeline/config.py fills the typed config
objects from this table and rejects any section or key it does not list, and the
reference tables in the README's "Configuration" section are this table printed
(``python -m pipeline.config_keys --markdown``; tests/test_readme.py checks they are
equal). A default is written as an operator would write it in the INI file (``30s``,
``1 MiB``) and goes through the key's converter, so the README shows it as written here
and the typed default cannot drift from it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config_types import (
    ae_title,
    ae_title_list,
    boolean,
    completion,
    conditions,
    deid_options,
    deid_profile,
    duration,
    host,
    integer,
    late_policy,
    log_level,
    networks,
    operations,
    pdu_size,
    port,
    positive_duration,
    positive_int,
    positive_size,
    safe_private_list,
    size,
    size_or_percent,
    sop_list,
    study_level,
    window,
)

ROUTER, ENDPOINT = "router", "endpoint"
#: ``[router] receive_processes``: a 2-core machine gains from 2-4; 16 bounds the lock,
#: log and supervisord program count an operator must follow
MAX_RECEIVE_PROCESSES = 16
MAX_ASSOCIATIONS = 16  # per endpoint: each is a thread and a socket of the one send process


def _one_to(high: int, what: str) -> Callable[[str], int]:
    """A converter for a count from 1 to ``high`` (the error names ``what``)."""
    def convert(value: str) -> int:
        number = integer(value)
        if not 1 <= number <= high:
            raise ValueError(f"{value!r}: {what} are 1 to {high}")
        return number
    return convert


#: ``[router] receive_processes``: 1 to :data:`MAX_RECEIVE_PROCESSES`
receive_processes = _one_to(MAX_RECEIVE_PROCESSES, "receive processes")
#: ``[endpoint] associations``: 1 (one association, strict arrival order) to
#: :data:`MAX_ASSOCIATIONS` — beyond that a destination spends more on associations than
#: a sender gains from them
association_count = _one_to(MAX_ASSOCIATIONS, "associations")

#: the README heading above each file kind's table
HEADINGS = {ROUTER: "### `conf/router.ini`", ENDPOINT: "### `conf/endpoints/<name>.ini`"}


@dataclass(frozen=True)
class Option:
    """One key of one file kind (``router``: conf/router.ini; ``endpoint``: an endpoint file)."""

    kind: str
    section: str
    key: str
    converter: Callable[[str], Any]
    #: the INI text of the default; None: no value (the loader derives one, or it is required)
    default: str | None
    meaning: str
    #: the config object's field, when it is not named like the key
    field: str = ""
    #: the README's default column, when the INI text would read badly or there is none
    shown: str | None = None
    required: bool = False

    @property
    def name(self) -> str:
        return self.field or self.key

    def value(self) -> Any:
        """The typed default (None when there is none)."""
        return None if self.default is None else self.converter(self.default)

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.required:
            return "*(required)*"
        return f"`{self.default}`" if self.default else ""


def _rules(kind: str, whitelist: str, blacklist: str, conditions_: str) -> list[Option]:
    """``[filter]`` rules: the same keys at both levels (RuleSet's fields)."""
    return [
        Option(kind, "filter", "sop_whitelist", sop_list, "", whitelist, shown="*(empty = all)*"),
        Option(kind, "filter", "sop_blacklist", sop_list, "", blacklist),
        Option(kind, "filter", "conditions", conditions, "", conditions_),
    ]


def _tls(kind: str, tls: str, **paths: str) -> list[Option]:
    """``[tls]``: the same keys for the receiver and each sender (TlsConfig's fields).

    ``tls`` has no default of its own: empty means on when a certificate is given
    (pipeline/config.py decides); the paths are relative to the conf directory."""
    return [Option(kind, "tls", "tls", boolean, None, tls, field="enabled", shown="`false`")] + [
        Option(kind, "tls", key, str, None, meaning, field=key.removeprefix("tls_"))
        for key, meaning in paths.items()
    ]


_ROUTER = [
    Option(ROUTER, "router", "ae_title", ae_title, "DICOMFLOW",
           "our AE title; the called AE title senders must use (others are rejected)"),
    Option(ROUTER, "router", "bind", host, "0.0.0.0", "address to listen on"),
    Option(ROUTER, "router", "port", port, "11112",
           "DICOM port (104 needs CAP_NET_BIND_SERVICE, see Security)"),
    Option(ROUTER, "router", "spool", str, "/var/spool/dicomflow",
           "the spool; relative paths are relative to the conf directory; local filesystem only"),
    Option(ROUTER, "router", "allowed_calling_aets", ae_title_list, "",
           "comma-separated calling AE titles allowed to send", shown="*(empty = any)*"),
    Option(ROUTER, "router", "allowed_networks", networks, "",
           "comma-separated source networks allowed to connect, e.g. `10.1.0.0/16`",
           shown="*(empty = any)*"),
    Option(ROUTER, "router", "log_level", log_level, "INFO",
           "`TRACE`, `DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`"),
    Option(ROUTER, "router", "log_json", boolean, "false", "JSON lines instead of text on stderr"),
    Option(ROUTER, "router", "pynetdicom_log_level", log_level, "WARNING",
           "pynetdicom's own messages (its DEBUG dumps patient data)"),
    Option(ROUTER, "router", "receive_processes", receive_processes, "1",
           "receive processes sharing the port (1–16; more than 1 binds it with "
           "`SO_REUSEPORT`, the kernel spreads connections over them); see Performance"),
    Option(ROUTER, "router", "max_associations", positive_int, "10",
           "concurrent associations accepted (per receive process); more are rejected (busy)"),
    Option(ROUTER, "router", "max_pending_connections", positive_int, "32",
           "connections accepted but not yet associated; more are closed at once"),
    Option(ROUTER, "router", "acse_timeout", positive_duration, "30s",
           "association negotiation timeout: from connect to a complete A-ASSOCIATE-RQ "
           "(TLS handshake included)"),
    Option(ROUTER, "router", "dimse_timeout", positive_duration, "60s", "DIMSE message timeout"),
    Option(ROUTER, "router", "network_timeout", positive_duration, "60s",
           "idle connection timeout (frees the slot of a silent client); also the time allowed "
           "for each PDU to arrive whole"),
    Option(ROUTER, "router", "max_pdu", pdu_size, "1 MiB",
           "largest PDU accepted (4 KiB – 64 MiB); bounds memory"),
    # one key, two fields (disk_floor_bytes, disk_floor_fraction); RouterConfig.disk_floor
    # applies the default
    Option(ROUTER, "router", "disk_floor", size_or_percent, None,
           "free space to keep: `sent/` is pruned oldest-first, then C-STOREs get 0xA700; "
           "a size or a percentage", shown="*(min(1 GiB, 5 %))*"),
    Option(ROUTER, "router", "journal", boolean, "true",
           "keep the instance journal `run/journal.sqlite` (what happened to each image; "
           "`dicomflow trace`, `reconcile`); see The journal"),
    Option(ROUTER, "router", "journal_retention", positive_duration, "90d",
           "journal events older than this are deleted (hourly, by the filter)"),
    Option(ROUTER, "router", "journal_phi", boolean, "false",
           "also store Patient ID and Accession Number in the journal (for `trace "
           "--patient-id` / `--accession`); patient data in `run/`!"),
    *_rules(ROUTER, "SOP Class UIDs or keywords (`CTImageStorage`), comma-separated",
            "SOP classes refused (a deny-list wins over an allow-list)",
            "one per line, all must hold: `Keyword=regex` or `Keyword!=regex`"),
    Option(ROUTER, "filter", "settle_time", positive_duration, "3s",
           "a file copied into `incoming/` without a close-write event is taken once unchanged "
           "this long; never while a process has it open for writing (held 20 × this long: "
           "one WARNING)"),
    Option(ROUTER, "filter", "stable_time", positive_duration, "60s",
           "default for endpoints deciding per series or study: complete when no instance of "
           "it arrived for this long (monotonic clock)", field="default_stable_time"),
    Option(ROUTER, "filter", "max_wait", positive_duration, "1h",
           "default for endpoints deciding per series or study: released as it is this long "
           "after its first instance, however it keeps growing", field="default_max_wait"),
    # HeaderLimits' fields (pipeline/header.py takes its defaults from here)
    Option(ROUTER, "filter", "max_header_elements", positive_int, "500000",
           "a file with more elements before its pixel data is quarantined (bounds the "
           "filter's memory)"),
    Option(ROUTER, "filter", "max_header_bytes", positive_size, "64 MiB",
           "likewise for the bytes of the values read before the pixel data (top-level values "
           "over 64 KiB are skipped, not counted)"),
    Option(ROUTER, "filter", "max_inflated_size", positive_size, "1 GiB",
           "a deflated data set inflating to more is quarantined (inflated in chunks, never "
           "whole)"),
    Option(ROUTER, "coerce", "operations", operations, "",
           "attribute coercion for every file, before fan-out: one operation per line (see "
           "Shaping)", field="coerce", shown="*(none)*"),
    *_tls(ROUTER, "TLS for the receiver (on by default when `tls_cert` is set)",
          tls_cert="server certificate (PEM)",
          tls_key="its private key (PEM)",
          tls_ca="CA certificate(s) that verify every client certificate presented (one from "
                 "another CA is refused)"),
    Option(ROUTER, "tls", "tls_require_client_cert", boolean, "false",
           "also refuse clients that present no certificate (needs `tls_ca`)",
           field="require_client_cert"),
    # WebConfig's fields (pipeline/config.py); the daemon: services/web.py
    Option(ROUTER, "web", "enabled", boolean, "false",
           "run `dicomflow web` under supervisord: `/metrics` (Prometheus), `/healthz`, a "
           "read-only status page `/`, `/api/status` (see Monitoring)"),
    Option(ROUTER, "web", "bind", host, "127.0.0.1",
           "address the web daemon listens on (`0.0.0.0`: every interface — set "
           "`auth_file` and TLS then)"),
    Option(ROUTER, "web", "port", port, "11180", "its HTTP(S) port"),
    Option(ROUTER, "web", "refresh", positive_duration, "10s",
           "the status page reloads itself this often"),
    Option(ROUTER, "web", "health_timeout", positive_duration, "5s",
           "how long `/healthz` waits for the receiver's answer to its C-ECHO"),
    Option(ROUTER, "web", "tls_cert", str, None,
           "HTTPS: server certificate (PEM), relative to the conf directory; with `tls_key`"),
    Option(ROUTER, "web", "tls_key", str, None, "its private key (PEM)"),
    Option(ROUTER, "web", "auth_file", str, None,
           "HTTP basic auth: a file of `user:password` lines (mode 0600 or stricter; refused "
           "if group or others can read it); every path but `/healthz` then asks for it",
           shown="*(none: no auth)*"),
]

_ENDPOINT = [
    Option(ENDPOINT, "endpoint", "host", host, None, "destination host name or address",
           required=True),
    Option(ENDPOINT, "endpoint", "port", port, None, "destination DICOM port", required=True),
    Option(ENDPOINT, "endpoint", "ae_title", ae_title, None,
           "the destination's (called) AE title", required=True),
    Option(ENDPOINT, "endpoint", "calling_ae_title", ae_title, None,
           "the calling AE title we present", shown="*(router ae_title)*"),
    Option(ENDPOINT, "endpoint", "pass_calling_ae_title", boolean, "false",
           "present the original sender's AE title (from the file meta) instead"),
    Option(ENDPOINT, "endpoint", "connect_timeout", positive_duration, "10s",
           "TCP connect timeout"),
    Option(ENDPOINT, "endpoint", "acse_timeout", positive_duration, "30s",
           "association negotiation timeout"),
    Option(ENDPOINT, "endpoint", "dimse_timeout", positive_duration, "60s",
           "C-STORE response timeout, plus the file's size / `min_transfer_rate` (which also "
           "bounds the whole transfer); a destination that takes no byte for this long is cut "
           "off and marked down"),
    Option(ENDPOINT, "endpoint", "min_transfer_rate", size, "1 MiB",
           "slowest rate a transfer may take before it counts as stalled (per second)"),
    Option(ENDPOINT, "endpoint", "max_pdu", pdu_size, "1 MiB",
           "largest PDU we accept from the destination"),
    Option(ENDPOINT, "endpoint", "idle_release", positive_duration, "10s",
           "release an idle association after this long"),
    Option(ENDPOINT, "endpoint", "associations", association_count, "1",
           f"associations kept open to the destination at once (1 to {MAX_ASSOCIATIONS}); files "
           "are handed out in arrival order, but with more than 1 they may arrive out of order; "
           "a destination that refuses the extra ones is not down: the sender uses those it has"),
    Option(ENDPOINT, "endpoint", "sent_retention", duration, "7d",
           "delete delivered copies in `sent/<name>/` after this long"),
    Option(ENDPOINT, "endpoint", "log_level", log_level, None, "this sender's log level",
           shown="*(router log_level)*"),
    *_rules(ENDPOINT, "as in router.ini, for this endpoint only",
            "as in router.ini, for this endpoint only", "as in router.ini, for this endpoint "
            "only; at series/study level `=` holds when any instance matches, `!=` when none "
            "does, `all:Keyword=regex` when every one does"),
    Option(ENDPOINT, "filter", "level", study_level, "instance",
           "`instance`: each file is decided and sent on arrival; `series` / `study`: decided "
           "over the whole series/study once it is complete, then sent in order, one study on "
           "one association (see Studies)"),
    Option(ENDPOINT, "filter", "stable_time", positive_duration, None,
           "a series/study is complete when no instance of it arrived for this long",
           shown="*(router.ini `[filter] stable_time`)*"),
    Option(ENDPOINT, "filter", "completion", completion, "stable",
           "`stable`: by `stable_time`; `mpps`: as soon as its MPPS is COMPLETED (or "
           "DISCONTINUED) and every instance it names has arrived, `stable_time` when no MPPS "
           "comes"),
    Option(ENDPOINT, "filter", "max_wait", positive_duration, None,
           "a series/study still growing this long after its first instance is released as it "
           "is", shown="*(router.ini `[filter] max_wait`)*"),
    Option(ENDPOINT, "filter", "late", late_policy, "follow",
           "an instance of a series/study already released: `follow` its decision, or "
           "`reevaluate` the conditions over everything it was released with plus the late ones"),
    Option(ENDPOINT, "coerce", "operations", operations, "",
           "attribute coercion for this endpoint's copy only: one operation per line (see "
           "Shaping); an endpoint with operations gets its own file instead of a hard link",
           field="coerce", shown="*(none)*"),
    Option(ENDPOINT, "deidentify", "profile", deid_profile, None,
           "`basic`: this endpoint's copies are de-identified by PS3.15 Table E.1-1 (see "
           "De-identification); `[coerce]` operations then apply to the de-identified copy",
           shown="*(none)*"),
    Option(ENDPOINT, "deidentify", "options", deid_options, "",
           "the profile's options, comma-separated: `retain_full_dates`, "
           "`retain_modified_dates`, `retain_patient_characteristics`, "
           "`retain_device_identity`, `retain_institution_identity`, `retain_uids`, "
           "`retain_safe_private`, `clean_descriptors`", shown="*(none)*"),
    Option(ENDPOINT, "deidentify", "key_file", str, None,
           "the secret key of the pseudonyms (at least 16 bytes; mode 0600 or stricter, "
           "refused if group or others can read it); relative to the conf directory",
           shown="*(required with a profile)*"),
    Option(ENDPOINT, "deidentify", "allow_burned_in", boolean, "false",
           "also send files that may show identity in their pixels (Burned In Annotation "
           "YES, or an ultrasound, secondary capture, photo, video or PDF without NO)"),
    Option(ENDPOINT, "deidentify", "safe_private", safe_private_list, "",
           "with `retain_safe_private`: the private elements kept, one `CREATOR (gggg,xxee)` "
           "per line", shown="*(none)*"),
    Option(ENDPOINT, "schedule", "window", window, "",
           "delivery window, one entry per line (see below)", shown="*(empty = always)*"),
    Option(ENDPOINT, "retry", "max_attempts", positive_int, "10",
           "attempts charged to a file refused with 0xA7xx (out of resources) or left without a "
           "response; a 0xA7xx is charged only if other files were stored since that file's "
           "last 0xA7xx — a destination refusing everything is *busy* and charges no file"),
    Option(ENDPOINT, "retry", "max_age", positive_duration, "1d",
           "…or this long since its first charged attempt, then `failed/`; it bounds 0xA7xx "
           "refusals too, charged or not: a file still refused this long after its first "
           "0xA7xx goes to `failed/` (the destination may be refusing only that file)"),
    Option(ENDPOINT, "retry", "backoff", positive_duration, "10s",
           "first wait before retrying a file charged an attempt (doubles each time)"),
    Option(ENDPOINT, "retry", "backoff_cap", positive_duration, "10m",
           "longest wait between retries of a file"),
    Option(ENDPOINT, "retry", "probe_backoff", positive_duration, "0.5s",
           "first wait before probing a destination that is down, or busy (0xA7xx: the next "
           "file is tried)"),
    Option(ENDPOINT, "retry", "probe_backoff_cap", positive_duration, "5s",
           "longest wait between probes: a returning or no longer busy destination is noticed "
           "within this"),
    *_tls(ENDPOINT, "TLS to the destination (on by default when `tls_ca` or `tls_cert` is set)",
          tls_ca="CA certificate(s) to verify the destination",
          tls_cert="client certificate (PEM), if the destination requires one",
          tls_key="its private key"),
    Option(ENDPOINT, "transcode", "enabled", boolean, "true",
           "decompress when the destination accepts the SOP class but not the compression",
           field="transcode"),
    Option(ENDPOINT, "transcode", "max_size", size, "512 MiB",
           "larger objects are not transcoded (decoding holds every frame in memory)",
           field="transcode_max_size"),
]

OPTIONS: tuple[Option, ...] = (*_ROUTER, *_ENDPOINT)


def options(kind: str, section: str | None = None) -> tuple[Option, ...]:
    """The options of one file kind (of one section), in the table's order."""
    return tuple(o for o in OPTIONS if o.kind == kind and section in (None, o.section))


def sections(kind: str) -> tuple[str, ...]:
    """The sections a file kind may have, in the table's order."""
    return tuple(dict.fromkeys(o.section for o in options(kind)))


def option(kind: str, section: str, key: str) -> Option:
    for o in options(kind, section):
        if o.key == key:
            return o
    raise KeyError((kind, section, key))


def default(kind: str, section: str, key: str) -> Any:
    """The typed default of one key (for dataclasses that keep a default, e.g. HeaderLimits)."""
    return option(kind, section, key).value()


def markdown(kind: str) -> str:
    """The README's reference table of one file kind."""
    def line(cells: tuple[str, ...]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    rows = [(o.section, o.key, o.shown_default(), o.meaning) for o in options(kind)]
    return "\n".join([line(("section", "key", "default", "meaning")), "|---" * 4 + "|",
                      *map(line, rows)])


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        print("usage: python -m pipeline.config_keys --markdown", file=sys.stderr)
        return 2
    for kind, heading in HEADINGS.items():
        print(f"{heading}\n\n{markdown(kind)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
