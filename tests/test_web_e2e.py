"""``dicomflow web`` end to end: real daemons, a real Prometheus, a real browser.

One router (receive, filter, a sender per endpoint, web) as subprocesses: ``pacs``
delivers to DCMTK ``storescp``, ``archive`` points at a port where nothing listens
(its destination is down for the whole file). A known study of :data:`STUDY_SIZE`
images goes in with DCMTK ``storescu``; then

- Debian's ``prometheus`` scrapes ``/metrics`` every second and its query API must
  return the counts of that study (received, delivered to ``pacs``) and the gauges of
  ``archive`` (down, its outbox holding the study);
- ``promtool check metrics`` finds nothing to say about our exposition;
- Debian's ``chromium`` (headless) loads the status page: its content is checked (the
  endpoints, the down state, no patient data) and a screenshot saved (to
  ``$DICOMFLOW_SCREENSHOT`` when set — the README's picture is made that way);
- ``/healthz`` is 200 while ``archive`` is down, ``?full`` is 503 naming it, and
  ``/healthz`` turns 503 when the receiver is stopped, 200 again once it is back.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    HANG_TIMEOUT,
    Daemon,
    dicom_files,
    free_port,
    make_files,
    require_binary,
    router_port,
    run_cli,
    self_signed,
    wait_for,
    write_conf,
)
from tests.peers import StoreSCP, storescu, terminate

pytestmark = pytest.mark.e2e

STUDY_SIZE = 7
PATIENT_ID = "WEB-PID-4711"
PATIENT_NAME = "WEBTEST^PATIENT"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


class Router:
    """The daemons of one conf dir, the web daemon's port, and its destination."""

    def __init__(self, base: Path) -> None:
        self.dest = StoreSCP(base / "pacs-dest").start()
        self.web_port = free_port()
        down_port = free_port()  # nothing will listen here
        self.conf = write_conf(
            base, router={"log_level": "INFO"},
            endpoints={"pacs": {"endpoint": {"host": "127.0.0.1", "port": self.dest.port,
                                             "ae_title": self.dest.ae_title}},
                       "archive": {"endpoint": {"host": "127.0.0.1", "port": down_port,
                                                "ae_title": "ARCHIVE"}}},
            web={"enabled": "true", "port": self.web_port, "refresh": "2s"})
        self.spool = base / "spool"
        self.port = router_port(self.conf)
        self.daemons = {"receive": Daemon(self.conf, "receive"), "filter": Daemon(self.conf, "filter"),
                        "send-pacs": Daemon(self.conf, "send", "pacs"),
                        "send-archive": Daemon(self.conf, "send", "archive"),
                        "web": Daemon(self.conf, "web")}

    def start(self) -> Router:
        for daemon in self.daemons.values():
            daemon.start()
        for name, ready in (("receive", "listening as"), ("filter", "filter ready"),
                            ("send-pacs", "sender started"), ("send-archive", "sender started"),
                            ("web", "web listening")):
            self.daemons[name].wait_log(ready)
        return self

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
        self.dest.stop()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=HANG_TIMEOUT) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{d.log()[-3000:]}" for name, d in self.daemons.items())


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    base = tmp_path_factory.mktemp("web")
    running = Router(base).start()
    try:
        files = make_files(base / "study", STUDY_SIZE, patient_id=PATIENT_ID,
                           patient_name=PATIENT_NAME)
        sent = storescu(running.port, files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: len(dicom_files(running.spool / "sent" / "pacs")) == STUDY_SIZE,
                 message="the study in sent/pacs")
        wait_for(lambda: len(dicom_files(running.spool / "outbox" / "archive")) == STUDY_SIZE,
                 message="the study in outbox/archive")
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        running.stop()


class Prometheus:
    """Debian's Prometheus server, scraping the web daemon every second."""

    def __init__(self, base: Path, target: int) -> None:
        self.base = base
        self.port = free_port()
        self.config = base / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: dicomflow\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target}']\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        binary = require_binary("/usr/bin/prometheus")
        self.log = open(self.base / "prometheus.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.base / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log,
            stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        terminate(self.proc, self.log, grace=20)

    def value(self, query: str) -> float | None:
        """The query's one value now (None: no such series yet, or not up)."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": query}))
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                data = json.load(answer)
        except (OSError, ValueError):
            return None
        result = data.get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.fixture(scope="module")
def prometheus(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), router.web_port).start()
    try:
        yield server
    finally:
        server.stop()


def wait_value(prometheus: Prometheus, query: str, expected: float) -> None:
    wait_for(lambda: prometheus.value(query) == expected, timeout=120,
             message=f"Prometheus: {query} == {expected} (last {prometheus.value(query)})")


def test_prometheus_scrapes_the_study(router: Router, prometheus: Prometheus) -> None:
    wait_value(prometheus, 'up{job="dicomflow"}', 1)
    wait_value(prometheus, "dicomflow_received_instances_total", STUDY_SIZE)
    wait_value(prometheus, 'dicomflow_sent_instances_total{endpoint="pacs",outcome="success"}',
               STUDY_SIZE)
    wait_value(prometheus, 'dicomflow_send_duration_seconds_count{endpoint="pacs"}', STUDY_SIZE)
    wait_value(prometheus, "dicomflow_store_duration_seconds_count", STUDY_SIZE)
    wait_value(prometheus, 'dicomflow_endpoint_state{endpoint="archive",state="down"}', 1)
    wait_value(prometheus, 'dicomflow_endpoint_state{endpoint="pacs",state="up"}', 1)
    wait_value(prometheus, 'dicomflow_endpoint_files{endpoint="archive",stage="outbox"}', STUDY_SIZE)
    wait_value(prometheus, 'dicomflow_endpoint_files{endpoint="pacs",stage="sent"}', STUDY_SIZE)
    wait_value(prometheus, 'dicomflow_daemon_up{daemon="send-archive"}', 1)
    received = prometheus.value("dicomflow_received_bytes_total")
    assert received is not None and received >= sum(
        p.stat().st_size for p in dicom_files(router.spool / "sent" / "pacs")) * 0.9
    assert prometheus.value('dicomflow_failed_instances_total{endpoint="pacs"}') == 0


def test_promtool_finds_nothing_in_the_exposition(router: Router) -> None:
    status, body = router.get("/metrics")
    assert status == 200
    check = subprocess.run([require_binary("/usr/bin/promtool"), "check", "metrics"], input=body,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout == "" and check.stderr == "", \
        check.stdout + check.stderr
    for secret in (PATIENT_ID, PATIENT_NAME, ".dcm"):
        assert secret not in body
    uids = [p.name.split("-", 2)[2].removesuffix(".dcm")
            for p in dicom_files(router.spool / "sent" / "pacs")]
    assert not any(uid in body for uid in uids)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = require_binary("/usr/bin/chromium")
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)


def test_status_page_in_chromium(router: Router, tmp_path: Path) -> None:
    wait_for(lambda: "down" in router.get("/")[1], message="the page shows archive down")
    dom = chromium("--dump-dom", router.url("/"), profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "<title>DicomFlow status</title>" in page
    for shown in ("Daemons", "Stages", "Endpoints", "Studies waiting", "Last failures",
                  "send-archive", "ARCHIVE@127.0.0.1", "down since",
                  f"STORESCP@127.0.0.1:{router.dest.port}"):
        assert shown in page, shown
    assert 'http-equiv="refresh" content="2"' in page
    for secret in (PATIENT_ID, PATIENT_NAME):
        assert secret not in page
    shot = Path(os.environ.get("DICOMFLOW_SCREENSHOT") or tmp_path / "status-page.png")
    done = chromium(f"--screenshot={shot}", "--window-size=1280,880", router.url("/"),
                    profile=tmp_path / "profile-shot")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_api_status_is_status_json(router: Router) -> None:
    status, body = router.get("/api/status")
    assert status == 200
    report = json.loads(body)
    assert report["endpoints"]["archive"]["state"] == "down"
    assert report["endpoints"]["pacs"]["sent"]["count"] == STUDY_SIZE
    assert report["processes"]["web"]["running"] is True


def test_healthz_follows_the_receiver_not_the_senders(router: Router) -> None:
    status, body = router.get("/healthz")
    assert status == 200 and body.startswith("ok"), body  # archive is down: still 200
    status, body = router.get("/healthz?full")
    assert status == 503 and "send-archive: destination down" in body, body
    receiver = router.daemons["receive"]
    receiver.stop()
    # an answer is reused for a second: the next fresh one must say why
    wait_for(lambda: router.get("/healthz")[0] == 503, message="/healthz 503, the receiver stopped")
    status, body = router.get("/healthz")
    assert status == 503 and body.startswith("unavailable: receive not running"), body
    receiver.start().wait_log("listening as")
    wait_for(lambda: router.get("/healthz")[0] == 200, message="/healthz back to 200")


def test_the_web_daemon_is_no_dependency_of_routing(router: Router, tmp_path: Path) -> None:
    """Stopping the web daemon changes nothing for the images."""
    router.daemons["web"].stop()
    more = make_files(tmp_path / "more", 2)
    sent = storescu(router.port, more)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: len(dicom_files(router.spool / "sent" / "pacs")) == STUDY_SIZE + 2,
             message="two more in sent/pacs with the web daemon stopped")


def test_up_runs_the_web_daemon_under_supervisord() -> None:
    """``[web] enabled = true``: ``up`` starts it, ``status`` counts it, ``down`` stops it.
    (A short /tmp folder: the supervisor socket's path must stay under 108 bytes.)"""
    base = Path(tempfile.mkdtemp(prefix="dfw-", dir="/tmp"))
    dest = StoreSCP(base / "dest").start()
    web_port = free_port()
    conf = write_conf(base, router={"log_level": "INFO"},
                      endpoints={"pacs": {"endpoint": {"host": "127.0.0.1", "port": dest.port,
                                                       "ae_title": dest.ae_title}}},
                      web={"enabled": "true", "port": web_port})
    try:
        up = run_cli(conf, "up", timeout=120)
        assert up.returncode == 0 and "web" in up.stdout, up.stdout + up.stderr
        url = f"http://127.0.0.1:{web_port}/healthz"
        wait_for(lambda: _status_of(url) == 200, message="/healthz 200 under supervisord")
        shown = run_cli(conf, "status", "--json")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert json.loads(shown.stdout)["processes"]["web"]["running"] is True
    finally:
        down = run_cli(conf, "down", timeout=120)
        dest.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _status_of(url) is None  # nobody listens any more


def _status_of(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def test_the_daemon_over_https_with_basic_auth(tmp_path: Path) -> None:
    """``tls_cert``/``tls_key`` and ``auth_file`` from the conf: HTTPS, every path but
    ``/healthz`` behind the password (the probe stays open, and says the router is down)."""
    conf = write_conf(tmp_path)
    cert, key = self_signed(conf)
    users = conf / "web-users"
    users.write_text("prometheus:scrape-me\n")
    users.chmod(0o600)
    port = free_port()
    conf = write_conf(tmp_path, web={"enabled": "true", "port": port, "tls_cert": cert.name,
                                     "tls_key": key.name, "auth_file": users.name})
    web = Daemon(conf, "web").start()
    try:
        web.wait_log("web listening on https://")
        context = ssl.create_default_context(cafile=str(cert))

        def fetch(path: str, password: str | None = None) -> int:
            request = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
            if password is not None:
                token = base64.b64encode(f"prometheus:{password}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            try:
                with urllib.request.urlopen(request, timeout=HANG_TIMEOUT, context=context) as answer:
                    return answer.status
            except urllib.error.HTTPError as error:
                return error.code

        assert fetch("/metrics") == 401 and fetch("/metrics", "wrong") == 401
        assert fetch("/metrics", "scrape-me") == 200 and fetch("/", "scrape-me") == 200
        assert fetch("/healthz") == 503  # open, and nothing runs but the web daemon
        with pytest.raises(OSError):  # plain HTTP on the HTTPS port: no answer
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=HANG_TIMEOUT)
    finally:
        web.stop()
