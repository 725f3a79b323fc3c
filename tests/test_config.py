"""Configuration: typed values, legacy endpoint files, and one clear line per mistake."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from pipeline import config
from pipeline.errors import ConfigError
from tests.helpers import REPO, run_cli

GOOD_ROUTER = "[router]\nae_title = ROUTER\nport = 11112\nspool = spool\n"
GOOD_ENDPOINT = "[endpoint]\nhost = 127.0.0.1\nport = 104\nae_title = PACS\n"


def make_conf(tmp_path: Path, router: str = GOOD_ROUTER, endpoints: dict[str, str] | None = None) -> Path:
    conf = tmp_path / "conf"
    (conf / "endpoints").mkdir(parents=True)
    (conf / "router.ini").write_text(router)
    for name, text in (endpoints if endpoints is not None else {"pacs": GOOD_ENDPOINT}).items():
        (conf / "endpoints" / f"{name}.ini").write_text(text)
    return conf


def test_shipped_conf_is_valid() -> None:
    loaded = config.load(REPO / "conf")
    assert loaded.router.ae_title == "DICOMFLOW"
    assert loaded.router.port == 11112
    assert "pacs" in loaded.endpoints


def test_defaults_and_relative_spool(tmp_path: Path) -> None:
    loaded = config.load(make_conf(tmp_path))
    router = loaded.router
    assert router.spool == (tmp_path / "conf" / "spool").resolve()
    assert router.max_pdu == 1024 * 1024
    assert router.disk_floor(100 * 1024**3) == 1024**3
    assert router.disk_floor(10 * 1024**3) == int(10 * 1024**3 * 0.05)
    ep = loaded.endpoints["pacs"]
    assert ep.calling_ae_title == "ROUTER"
    assert ep.retry.probe_backoff_cap == 5.0
    assert ep.idle_release == 10.0
    assert ep.sent_retention == 7 * 86400
    assert ep.window.always_open


def test_values_with_units_lists_and_rules(tmp_path: Path) -> None:
    router = GOOD_ROUTER + (
        "allowed_calling_aets = CT1, MR_2\nallowed_networks = 10.0.0.0/8, ::1\n"
        "network_timeout = 2m\nmax_pdu = 64 KiB\ndisk_floor = 5%\n"
        "[filter]\nsop_blacklist = BasicTextSRStorage\n"
    )
    endpoint = GOOD_ENDPOINT + (
        "[filter]\nsop_whitelist = CTImageStorage, 1.2.840.10008.5.1.4.1.1.4\n"
        "conditions = Modality=CT|MR\n    CallingAETitle!=TEST.*\n"
        "[schedule]\nwindow = 19:00 - 07:00\n    */5 * * * 6,0\n"
        "[retry]\nmax_attempts = 3\nprobe_backoff_cap = 2s\n"
    )
    loaded = config.load(make_conf(tmp_path, router, {"ct": endpoint}))
    assert loaded.router.allowed_calling_aets == ("CT1", "MR_2")
    assert loaded.router.network_timeout == 120
    assert loaded.router.max_pdu == 65536
    assert loaded.router.disk_floor(1000) == 50
    assert "1.2.840.10008.5.1.4.1.1.88.11" in loaded.router.rules.sop_blacklist
    ep = loaded.endpoints["ct"]
    assert ep.rules.sop_whitelist == {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"}
    assert [c.source for c in ep.rules.conditions] == ["Modality=CT|MR", "CallingAETitle!=TEST.*"]
    assert ep.window.is_open(datetime(2026, 11, 25, 23, 0))
    assert not ep.window.is_open(datetime(2026, 11, 25, 12, 0))
    assert ep.window.is_open(datetime(2026, 11, 28, 12, 5))  # a Saturday, */5
    assert ep.retry.max_attempts == 3


def test_legacy_dicomflowrouter_endpoint_file(tmp_path: Path) -> None:
    legacy = (
        "[ENDPOINT]\nhostname = pacs.site-b\nport = 4242\nae_title = TARGET_PACS\n"
        "# This endpoint might not want Ultrasound images\n"
        "blacklist = 1.2.840.10008.5.1.4.1.1.6.1\n"
        "[SCHEDULE]\nscheduled = m10 < 2\n"
        "[DEBUG]\nlogname = Endpoint-remote\nloglevel = INFO\n"
    )
    loaded = config.load(make_conf(tmp_path, endpoints={"remote": legacy}))
    ep = loaded.endpoints["remote"]
    assert (ep.host, ep.port, ep.ae_title) == ("pacs.site-b", 4242, "TARGET_PACS")
    assert ep.rules.sop_blacklist == {"1.2.840.10008.5.1.4.1.1.6.1"}
    assert ep.window.is_open(datetime(2026, 1, 1, 10, 11))
    assert not ep.window.is_open(datetime(2026, 1, 1, 10, 12))
    assert ep.log_level == "INFO"


def test_legacy_comma_separated_ranges(tmp_path: Path) -> None:
    legacy = ("[ENDPOINT]\nhostname = h\nport = 1\nae_title = A\n"
              "[SCHEDULE]\nscheduled = 18:00-22:00, 22:30-6:00\n")
    ep = config.load(make_conf(tmp_path, endpoints={"x": legacy})).endpoints["x"]
    assert ep.window.is_open(datetime(2026, 1, 1, 5, 59))
    assert not ep.window.is_open(datetime(2026, 1, 1, 22, 15))
    assert not ep.window.is_open(datetime(2026, 1, 1, 6, 0))


BAD_CASES = [
    # (router.ini, endpoint text or None, fragments expected in the one-line message)
    ("[router]\nport = 70000\n", None, ["router.ini", "[router] port", "TCP port"]),
    ("[router]\nport = abc\n", None, ["[router] port", "whole number"]),
    ("[router]\nae_title = WAY_TOO_LONG_AE_TITLE\n", None, ["ae_title", "AE title"]),
    ("[router]\nae_title = BAD\\AE\n", None, ["ae_title"]),
    ("[router]\nprot = 104\n", None, ["[router] prot", "unknown key"]),
    ("[routr]\nport = 104\n", None, ["[routr]", "unknown section"]),
    ("[filter]\nsop_whitelist = CTImageStorage\n", None, ["[router]", "missing"]),
    ("[router]\nlog_level = LOUD\n", None, ["log_level", "log level"]),
    ("[router]\nmax_pdu = 12 parsecs\n", None, ["max_pdu", "size"]),
    ("[router]\nmax_pdu = 100\n", None, ["max_pdu", "4 KiB"]),
    ("[router]\nmax_pdu = 0\n", None, ["max_pdu", "unlimited"]),
    ("[router]\nacse_timeout = soon\n", None, ["acse_timeout", "duration"]),
    ("[router]\nmax_associations = 0\n", None, ["max_associations", "at least 1"]),
    ("[router]\nallowed_networks = 10.0.0.0/33\n", None, ["allowed_networks", "IP network"]),
    ("[router]\nallowed_calling_aets = OK, ÄÖÜ\n", None, ["allowed_calling_aets"]),
    ("[router]\ndisk_floor = 150%\n", None, ["disk_floor"]),
    ("[router]\nport = 1\nport = 2\n", None, ["port", "twice"]),
    ("port = 104\n", None, ["router.ini", "before any [section]"]),
    ("[router]\n[router]\n", None, ["[router]", "twice"]),
    ("[router]\n[tls]\ntls_cert = /nonexistent.pem\ntls_key = /nonexistent.key\n", None,
     ["tls_cert", "not found"]),
    ("[router]\n[tls]\ntls_require_client_cert = yes\n", None, ["tls_require_client_cert", "tls_ca"]),
    ("[router]\n[filter]\nsop_whitelist = NotASopClass\n", None, ["sop_whitelist", "NotASopClass"]),
    ("[router]\n[filter]\nconditions = Modality~CT\n", None, ["conditions", "Keyword=regex"]),
    ("[router]\n[filter]\nconditions = NoSuchKeyword=CT\n", None, ["conditions", "NoSuchKeyword"]),
    ("[router]\n[filter]\nconditions = Modality=CT(\n", None, ["conditions", "regular expression"]),
    (GOOD_ROUTER, "[endpoint]\nport = 104\nae_title = PACS\n", ["pacs.ini", "[endpoint] host", "required"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "colour = blue\n", ["pacs.ini", "colour", "unknown key"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "[schedule]\nwindow = sometimes\n", ["[schedule] window", "cron"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "[schedule]\nwindow = 25:00 - 07:00\n", ["window", "time of day"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "[schedule]\nwindow = 07:00 - 07:00\n", ["window", "empty"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "[schedule]\nwindow = 61 * * * *\n", ["window"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "[schedule]\nwindow = m10 < 11\n", ["window", "mN < K"]),
    (GOOD_ROUTER, "[ENDPOINT]\nhostname = h\nport = 1\nae_title = A\n[SCHEDULE]\nscheduled = never\n",
     ["[SCHEDULE] scheduled", "cron"]),
    (GOOD_ROUTER, "[ENDPOINT]\nhostname = h\nport = x\nae_title = A\n", ["[ENDPOINT] port"]),
    (GOOD_ROUTER, "[ENDPOINT]\nhostname = h\nport = 1\nae_title = A\n[endpoint]\nhost = h2\n",
     ["[ENDPOINT] hostname", "keep one"]),
    (GOOD_ROUTER, "[ENDPOINT]\nhostname = h\nport = 1\nae_title = A\nfoo = 1\n", ["[ENDPOINT] foo"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "[retry]\nbackoff = 1h\nbackoff_cap = 1m\n", ["backoff", "backoff_cap"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "[retry]\nmax_attempts = -1\n", ["max_attempts"]),
    (GOOD_ROUTER, GOOD_ENDPOINT + "[transcode]\nenabled = maybe\n", ["[transcode] enabled", "boolean"]),
    (GOOD_ROUTER, "[endpoint]\nhost = bad host\nport = 1\nae_title = A\n", ["host"]),
    (GOOD_ROUTER.replace("11112", "4242"),
     "[endpoint]\nhost = 127.0.0.1\nport = 4242\nae_title = A\n", ["routing loop"]),
    (GOOD_ROUTER, "\xff\xfe garbage", ["pacs.ini"]),
]


@pytest.mark.parametrize("router,endpoint,fragments", BAD_CASES)
def test_every_mistake_is_one_clear_line_naming_file_section_key(
    tmp_path: Path, router: str, endpoint: str | None, fragments: list[str]
) -> None:
    conf = make_conf(tmp_path, router, {"pacs": endpoint} if endpoint is not None else {})
    with pytest.raises(ConfigError) as info:
        config.load(conf)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_endpoint_file_name(tmp_path: Path) -> None:
    conf = make_conf(tmp_path, endpoints={"bad name": GOOD_ENDPOINT})
    with pytest.raises(ConfigError, match=r"\[A-Za-z0-9_-\]"):
        config.load(conf)


def test_missing_conf_dir_and_router_ini(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="router.ini: file not found"):
        config.load(tmp_path / "empty")


def test_check_command_exits_1_with_one_line(tmp_path: Path) -> None:
    conf = make_conf(tmp_path, "[router]\nport = 70000\n")
    result = run_cli(conf, "check")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[router] port" in lines[0], result.stderr


def test_check_command_accepts_good_conf_and_conf_before_command(tmp_path: Path) -> None:
    conf = make_conf(tmp_path)
    result = run_cli(conf, "check")
    assert result.returncode == 0, result.stderr
    assert "endpoint pacs" in result.stdout


def test_check_warns_about_no_endpoints(tmp_path: Path) -> None:
    result = run_cli(make_conf(tmp_path, endpoints={}), "check")
    assert result.returncode == 0
    assert "no endpoints" in result.stdout


def test_every_default_in_the_table_converts() -> None:
    """A default is INI text put through its key's converter, like an operator's value."""
    from pipeline import config_keys

    for opt in config_keys.OPTIONS:
        assert not (opt.required and opt.default is not None), opt
        opt.value()  # raises if the text does not convert
        assert opt.meaning and "|" not in opt.meaning, opt


def test_unset_keys_take_the_table_defaults(tmp_path: Path) -> None:
    from dataclasses import asdict

    from pipeline import config_keys
    from pipeline.header import HeaderLimits

    loaded = config.load(make_conf(tmp_path))
    ep = loaded.endpoints["pacs"]
    objects = {
        (config_keys.ROUTER, "router"): asdict(loaded.router),
        (config_keys.ROUTER, "filter"): asdict(loaded.router) | asdict(loaded.router.rules)
        | asdict(loaded.router.header_limits),
        (config_keys.ROUTER, "tls"): asdict(loaded.router.tls),
        (config_keys.ENDPOINT, "endpoint"): asdict(ep),
        # unset stable_time / max_wait: the router's defaults (checked below)
        (config_keys.ENDPOINT, "filter"): asdict(ep.rules) | {
            "level": ep.study.level, "completion": ep.study.completion, "late": ep.study.late,
            "stable_time": None, "max_wait": None},
        (config_keys.ENDPOINT, "schedule"): {"window": ep.window},
        (config_keys.ENDPOINT, "retry"): asdict(ep.retry),
        (config_keys.ENDPOINT, "transcode"): asdict(ep),
        (config_keys.ENDPOINT, "tls"): asdict(ep.tls),
        (config_keys.ROUTER, "coerce"): {"coerce": loaded.router.coerce},
        (config_keys.ROUTER, "web"): asdict(loaded.router.web),
        (config_keys.ENDPOINT, "coerce"): {"coerce": ep.coerce},
        # no profile: no de-identification at all, and what the keys are when unset
        (config_keys.ENDPOINT, "deidentify"): {"profile": None, "options": frozenset(),
                                               "key_file": None, "allow_burned_in": False,
                                               "safe_private": ()},
    }
    assert ep.deidentify is None
    assert (ep.study.stable_time, ep.study.max_wait) == (loaded.router.default_stable_time,
                                                         loaded.router.default_max_wait)
    given = {"ae_title", "port", "spool", "host", "calling_ae_title", "enabled", "disk_floor"}
    for opt in config_keys.OPTIONS:
        if opt.name not in given:
            assert objects[opt.kind, opt.section][opt.name] == opt.value(), opt
    assert HeaderLimits() == loaded.router.header_limits


def test_legacy_keys_map_to_keys_of_the_table() -> None:
    from pipeline import config_keys

    for (legacy, key), (section, new_key) in config._LEGACY.items():
        if section is not None:
            assert config_keys.option(config_keys.ENDPOINT, section, new_key), (legacy, key)
