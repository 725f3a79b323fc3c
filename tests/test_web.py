"""The web daemon's parts, each on its own: ``[web]`` keys, basic auth, the journal
tail, the counters, the HTTP server's bounds, the status page, and the README's metric
table against the real exposition. (End to end with Prometheus and Chromium:
tests/test_web_e2e.py.)"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import config as config_module
from pipeline.errors import ConfigError
from pipeline.http_auth import authorized, load_users
from pipeline.journal import events as kinds
from pipeline.journal import store
from pipeline.journal.reader import Entry
from pipeline.journal.tail import Tail
from pipeline.journal.writer import Journal
from pipeline.spool import Spool
from pipeline.web.metrics import Metrics
from pipeline.web.server import Response, WebServer
from services import status, status_page
from services.web import WebApp
from tests.helpers import REPO, free_port, self_signed, wait_for, write_conf

README = REPO / "README.md"


def conf_with(tmp_path: Path, **web: object) -> Path:
    return write_conf(tmp_path, endpoints={"pacs": {"endpoint": {"host": "127.0.0.1", "port": 104,
                                                                 "ae_title": "PACS"}}},
                      web={"enabled": "true", **web})


# -- [web] -------------------------------------------------------------------------------

def test_web_defaults_are_off_and_on_loopback(tmp_path: Path) -> None:
    web = config_module.load(write_conf(tmp_path)).router.web
    assert (web.enabled, web.bind, web.port, web.refresh, web.scheme) == (
        False, "127.0.0.1", 11180, 10.0, "http")
    assert web.auth_file is None and web.tls_cert is None


def test_web_keys_are_checked_at_start_up(tmp_path: Path) -> None:
    users = tmp_path / "conf" / "users"
    with pytest.raises(ConfigError, match=r"\[web\] auth_file.*No such file"):
        config_module.load(conf_with(tmp_path, auth_file="users"))
    users.write_text("ops:secret\n")
    users.chmod(0o644)
    with pytest.raises(ConfigError, match=r"auth_file.*readable by group or others.*chmod 600"):
        config_module.load(conf_with(tmp_path, auth_file="users"))
    users.chmod(0o600)
    users.write_text("no colon here\n")
    with pytest.raises(ConfigError, match=r"line 1: expected user:password"):
        config_module.load(conf_with(tmp_path, auth_file="users"))
    users.write_text("# operators\nops:secret\n")
    assert config_module.load(conf_with(tmp_path, auth_file="users")).router.web.auth_file == users
    with pytest.raises(ConfigError, match=r"\[web\] tls_key.*go together"):
        config_module.load(conf_with(tmp_path, tls_cert="cert.pem"))
    with pytest.raises(ConfigError, match=r"\[web\] nonsense.*unknown key"):
        config_module.load(conf_with(tmp_path, nonsense="1"))


def test_basic_auth_takes_only_the_right_password() -> None:
    users = {"ops": "s3cret:with:colons"}

    def header(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    assert authorized(header("ops:s3cret:with:colons"), users)
    for wrong in (header("ops:s3cret"), header("other:s3cret:with:colons"), header("ops"),
                  "Basic !!!not-base64", "Bearer abc", "", None, "Basic " + "A" * 5000):
        assert not authorized(wrong, users)


def test_a_users_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "users"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ValueError, match="not a regular file"):
        load_users(fifo)


# -- the journal's tail and the counters ---------------------------------------------------

def write_events(path: Path, *events: tuple[str, dict]) -> None:
    journal = Journal(path, "test")
    for kind, fields in events:
        journal.record(kind, **fields)
    journal.flush()
    journal.close()


def test_the_tail_counts_from_its_start_and_reads_a_new_journal_whole(tmp_path: Path) -> None:
    path = store.journal_path(tmp_path)
    write_events(path, (kinds.RECEIVED, {"uid": "1.2.3.1"}))  # before the start: history
    tail = Tail(path).begin()
    assert tail.read() == []
    write_events(path, (kinds.RECEIVED, {"uid": "1.2.3.2", "size": 10, "duration": 0.5}),
                 (kinds.SENT, {"uid": "1.2.3.2", "endpoint": "pacs", "status": 0}))
    got = tail.read()
    assert [(e.kind, e.size, e.duration, e.endpoint) for e in got] == [
        (kinds.RECEIVED, 10.0, 0.5, None), (kinds.SENT, None, None, "pacs")]
    assert tail.read() == []
    for suffix in ("", "-wal", "-shm"):  # an operator's rm: a new journal, all of it new
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    write_events(path, (kinds.RECEIVED, {"uid": "1.2.3.3"}), (kinds.RECEIVED, {"uid": "1.2.3.4"}))
    assert [e.kind for e in tail.read()] == [kinds.RECEIVED, kinds.RECEIVED]
    tail.close()


def test_a_tail_started_before_the_journal_exists_counts_all_of_it(tmp_path: Path) -> None:
    path = store.journal_path(tmp_path)
    tail = Tail(path).begin()
    assert tail.read() == []
    write_events(path, (kinds.QUARANTINED, {"file": "x"}))
    assert [e.kind for e in tail.read()] == [kinds.QUARANTINED]


def metrics_for(tmp_path: Path, endpoints: tuple[str, ...] = ("pacs",)) -> tuple[Metrics, Path]:
    path = store.journal_path(tmp_path)
    report = {"processes": {}, "stages": {}, "endpoints": {}, "journal": {}}
    return Metrics(Tail(path), lambda: report, lambda: (100, 10), endpoints), path


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_kind_of_event_moves_its_counter(tmp_path: Path) -> None:
    metrics, path = metrics_for(tmp_path)
    assert sample(metrics, "dicomflow_sent_instances_total", endpoint="pacs", outcome="success") == 0
    uid = "1.2.826.0.1.3680043.8.498.424242"
    write_events(path,
                 (kinds.RECEIVED, {"uid": uid, "size": 1000, "duration": 0.02}),
                 (kinds.RECEIVED, {"uid": uid, "size": 500}),
                 (kinds.REJECTED, {"uid": uid}), (kinds.QUARANTINED, {}),
                 (kinds.SENT, {"uid": uid, "endpoint": "pacs", "status": 0, "duration": 0.3}),
                 (kinds.SENT, {"uid": uid, "endpoint": "pacs", "status": 0xB000, "duration": 0.1}),
                 (kinds.ATTEMPT, {"endpoint": "pacs", "status": 0xA700}),
                 (kinds.FAILED, {"endpoint": "ai"}), (kinds.RETRIED, {"endpoint": "ai"}),
                 (kinds.DELETED, {"endpoint": "pacs"}),
                 (kinds.SENT, {"endpoint": "../etc", "status": 0}))  # not an endpoint name
    text = metrics.exposition().decode()
    assert sample(metrics, "dicomflow_received_instances_total") == 2
    assert sample(metrics, "dicomflow_received_bytes_total") == 1500
    assert sample(metrics, "dicomflow_store_duration_seconds_count") == 1
    assert sample(metrics, "dicomflow_rejected_instances_total") == 1
    assert sample(metrics, "dicomflow_quarantined_instances_total") == 1
    assert sample(metrics, "dicomflow_sent_instances_total", endpoint="pacs", outcome="success") == 1
    assert sample(metrics, "dicomflow_sent_instances_total", endpoint="pacs", outcome="warning") == 1
    assert sample(metrics, "dicomflow_send_duration_seconds_sum", endpoint="pacs") == pytest.approx(0.4)
    assert sample(metrics, "dicomflow_send_retries_total", endpoint="pacs") == 1
    assert sample(metrics, "dicomflow_failed_instances_total", endpoint="ai") == 1
    assert sample(metrics, "dicomflow_retried_instances_total", endpoint="ai") == 1
    assert sample(metrics, "dicomflow_deleted_instances_total", endpoint="pacs") == 1
    assert uid not in text and "../etc" not in text
    metrics.exposition()  # a second scrape counts nothing twice
    assert sample(metrics, "dicomflow_received_instances_total") == 2


# -- the README's table ------------------------------------------------------------------

def readme_metrics() -> dict[str, str]:
    """``name -> type`` from the Monitoring section's metric table."""
    section = README.read_text().split("### Metrics", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(dicomflow_[a-z_]+)` \| (counter|gauge|histogram) \|", section, re.M)
    return dict(rows)


def exposed_metrics(text: str) -> dict[str, str]:
    names = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        names[name] = family.type
    return names


def test_the_readme_lists_exactly_the_exposed_metrics(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, endpoints={
        "pacs": {"endpoint": {"host": "127.0.0.1", "port": 104, "ae_title": "PACS"}},
        "ai": {"endpoint": {"host": "127.0.0.1", "port": 105, "ae_title": "AI"},
               "filter": {"level": "study"}}}, web={"enabled": "true"})
    config = config_module.load(conf)
    Spool(config.spool).create(config.endpoints)
    app = WebApp(config)
    exposed = exposed_metrics(app.metrics.exposition().decode())
    documented = readme_metrics()
    assert documented, "no metric table under '### Metrics' in the README"
    assert exposed == documented


# -- the HTTP server ----------------------------------------------------------------------

@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[WebServer]:
    options = getattr(request, "param", {})
    routes = {"/hello": lambda path, query: Response(200, b"hello\n"),
              "/healthz": lambda path, query: Response(200, b"ok\n"),
              "/boom": lambda path, query: 1 / 0}
    web = WebServer(("127.0.0.1", free_port()), routes, **options)  # type: ignore[dict-item]
    thread = threading.Thread(target=web.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield web
    web.shutdown()
    web.server_close()


def get(web: WebServer, path: str, headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None) -> tuple[int, bytes, dict[str, str]]:
    scheme = "https" if context is not None else "http"
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{web.server_address[1]}{path}",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def test_routes_unknown_paths_and_a_failing_route(server: WebServer) -> None:
    assert get(server, "/hello")[:2] == (200, b"hello\n")
    assert get(server, "/hello?x=1")[0] == 200
    assert get(server, "/nothing<script>")[0] == 404
    status, body, _ = get(server, "/boom")
    assert status == 500 and b"ZeroDivision" not in body
    assert get(server, "/hello")[0] == 200  # still serving


@pytest.mark.parametrize("server", [{"users": {"ops": "pw"}, "open_paths": frozenset({"/healthz"})}],
                         indirect=True)
def test_basic_auth_guards_all_but_the_health_check(server: WebServer) -> None:
    status, _, headers = get(server, "/hello")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
    good = {"Authorization": "Basic " + base64.b64encode(b"ops:pw").decode()}
    assert get(server, "/hello", good)[0] == 200
    assert get(server, "/hello", {"Authorization": "Basic " + base64.b64encode(b"ops:no").decode()})[0] == 401
    assert get(server, "/healthz")[0] == 200


@pytest.mark.parametrize("server", [{"max_clients": 2, "client_timeout": 1.0}], indirect=True)
def test_silent_clients_take_a_bounded_number_of_slots_for_a_bounded_time(server: WebServer) -> None:
    address = server.server_address
    silent = [socket.create_connection(address, timeout=30) for _ in range(2)]
    try:
        extra = socket.create_connection(address, timeout=30)
        assert extra.recv(1) == b""  # closed at once: every slot is taken
        extra.close()
        # the silent ones are cut off after client_timeout, and service resumes
        for sock in silent:
            assert sock.recv(1) == b""
        wait_for(lambda: answers(server, "/hello") == 200, message="a slot free again")
    finally:
        for sock in silent:
            sock.close()


def test_tls_handshakes_run_off_the_accept_loop(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    # a silent client keeps its slot for client_timeout (120 s), longer than get() waits
    web = WebServer(("127.0.0.1", free_port()), {"/hello": lambda p, q: Response(200, b"hi")},
                    tls=context, client_timeout=120.0)
    threading.Thread(target=web.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        silent = socket.create_connection(web.server_address, timeout=30)  # never says hello
        client = ssl.create_default_context(cafile=str(cert))
        assert get(web, "/hello", context=client)[:2] == (200, b"hi")
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # still connected, still waited on: not in the way
            silent.recv(1)
        silent.close()
    finally:
        web.shutdown()
        web.server_close()


def test_the_web_config_with_tls_and_auth_loads(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    cert, key = self_signed(conf)
    users = conf / "users"
    users.write_text("ops:pw\n")
    users.chmod(0o600)
    web = config_module.load(conf_with(tmp_path, tls_cert=cert.name, tls_key=key.name,
                                       auth_file="users")).router.web
    assert web.scheme == "https" and web.tls_key == key


# -- the status page ----------------------------------------------------------------------

def test_the_page_escapes_what_came_from_the_network(tmp_path: Path) -> None:
    config = config_module.load(conf_with(tmp_path))
    spool = Spool(config.spool).create(config.endpoints)
    failed = spool.write_bytes(spool.failed("pacs"), "20261204T000000.000000-000001-1.2.3.dcm", b"x")
    spool.write_bytes(failed.parent, failed.name + ".error", b"status 0xC000 <script>alert(1)</script>\n")
    hostile = Entry(1, time.time(), kinds.QUARANTINED, "filter", None, '<img src=x onerror=1>.dcm',
                    None, None, None, None, {"reason": "not DICOM: <b>bold</b>"})
    page = status_page.render(status.collect(config), [hostile], 10.0)
    assert "<script>" not in page and "<img" not in page and "<b>bold" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x" in page
    assert '<meta http-equiv="refresh" content="10">' in page


# -- under supervisord ---------------------------------------------------------------------

def test_up_writes_the_web_program_only_when_enabled(tmp_path: Path) -> None:
    from services.supervise import Supervisor

    conf = conf_with(tmp_path)
    supervisor = Supervisor(config_module.load(conf))
    supervisor.render()
    program = supervisor.programs_dir / "web.conf"
    text = program.read_text()
    assert "[program:web]" in text and f"services.cli web --conf {conf}" in text
    assert "autorestart = true" in text and "web.log" in text
    (conf / "router.ini").write_text((conf / "router.ini").read_text().replace(
        "enabled = true", "enabled = false"))
    Supervisor(config_module.load(conf)).render()
    assert not program.exists()
    assert (supervisor.programs_dir / "send-pacs.conf").exists()


# -- what review found (each of these failed before its fix) --------------------------------

def test_a_read_that_fails_once_does_not_count_the_journal_twice(tmp_path: Path) -> None:
    path = store.journal_path(tmp_path)
    write_events(path, (kinds.RECEIVED, {"uid": "1.2.3.1"}))
    tail = Tail(path).begin()
    write_events(path, (kinds.RECEIVED, {"uid": "1.2.3.2"}))
    assert len(tail.read()) == 1
    # the connection fails under the tail (as a busy or damaged journal makes a query
    # fail): that read gives nothing, and the next one reopens the same file
    assert tail._conn is not None
    tail._conn.close()
    assert tail.read() == []
    write_events(path, (kinds.RECEIVED, {"uid": "1.2.3.3"}))
    assert [e.kind for e in tail.read()] == [kinds.RECEIVED]  # the new one only


def test_ids_restarting_after_retention_emptied_the_journal_are_counted(tmp_path: Path) -> None:
    import sqlite3

    path = store.journal_path(tmp_path)
    tail = Tail(path).begin()
    write_events(path, *[(kinds.RECEIVED, {"uid": f"1.2.3.{n}"}) for n in range(5)])
    assert len(tail.read()) == 5
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM events")
    conn.commit()
    conn.close()
    write_events(path, (kinds.SENT, {"endpoint": "pacs", "status": 0}))  # id 1 again
    assert tail.read() == []  # the first look after the prune finds ids below its place...
    assert [e.kind for e in tail.read()] == [kinds.SENT]  # ...and starts over


def test_a_non_ascii_password_for_an_unknown_user_is_a_plain_refusal() -> None:
    header = "Basic " + base64.b64encode("nobody:pässwörd".encode()).decode()
    assert not authorized(header, {"ops": "pw"})


@pytest.mark.parametrize("server", [{"users": {"ops": "pw"}, "open_paths": frozenset({"/healthz"})}],
                         indirect=True)
def test_only_the_exact_open_path_is_open(server: WebServer) -> None:
    for path in ("/healthz/", "/healthz/../hello", "/HEALTHZ", "/healthz%2F"):
        assert get(server, path)[0] == 401, path


def test_one_request_per_connection(server: WebServer) -> None:
    with socket.create_connection(server.server_address, timeout=30) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):  # the server closes after its answer (no keep-alive)
            data += chunk
    assert data.startswith(b"HTTP/1.0 200") and data.endswith(b"hello\n")


@pytest.mark.parametrize("server", [{"max_clients": 1, "client_timeout": 1.0}], indirect=True)
def test_a_client_sending_a_byte_at_a_time_is_cut_off(server: WebServer) -> None:
    with socket.create_connection(server.server_address, timeout=30) as sock:
        deadline = time.monotonic() + 60  # hang detection only: the cut comes after ~1 s
        cut = False
        while not cut and time.monotonic() < deadline:
            try:
                sock.sendall(b"G")
                sock.settimeout(0.3)
                cut = sock.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                cut = True
        assert cut, "a trickling client kept its slot"
    wait_for(lambda: answers(server, "/hello") == 200, message="the slot free again")


def answers(server: WebServer, path: str) -> int | None:
    """The status of a GET, None while the server closes the connection (no slot yet)."""
    try:
        return get(server, path)[0]
    except OSError:
        return None


def test_check_says_where_the_web_daemon_listens(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    users = tmp_path / "conf" / "users"
    users.parent.mkdir(parents=True)
    users.write_text("ops:pw\n")
    users.chmod(0o600)
    shown = run_cli(conf_with(tmp_path, auth_file="users", bind="0.0.0.0"), "check")
    assert shown.returncode == 0, shown.stderr
    assert f"web: http://0.0.0.0:11180 (basic auth from {users}; /healthz always open)" in shown.stdout


def test_with_the_journal_off_the_counters_stay_at_zero_and_gauges_still_read(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, router={"journal": "false"}, web={"enabled": "true"},
                      endpoints={"pacs": {"endpoint": {"host": "127.0.0.1", "port": 104,
                                                       "ae_title": "PACS"}}})
    config = config_module.load(conf)
    Spool(config.spool).create(config.endpoints)
    app = WebApp(config)
    text = app.metrics.exposition().decode()
    assert "dicomflow_received_instances_total 0.0" in text
    assert 'dicomflow_endpoint_state{endpoint="pacs",state="not_running"} 1.0' in text
    assert 'dicomflow_daemon_up{daemon="web"} 0.0' in text  # (this test is no web daemon)
    failures, note = app.failures()
    assert failures == [] and "journal is off" in note
