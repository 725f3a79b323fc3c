"""``dicomflow echo ENDPOINT`` against real peers: success, refused, wrong AE, silence, TLS."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.helpers import free_port, run_cli
from tests.peers import StoreSCP
from tests.sendkit import StatusSCP, endpoint_conf


def test_echo_success_with_storescp(tmp_path: Path) -> None:
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS").start()
    try:
        conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
        result = run_cli(conf, "echo", "pacs")
    finally:
        peer.stop()
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout


def test_echo_connection_refused(tmp_path: Path) -> None:
    conf = endpoint_conf(tmp_path, {"pacs": {"port": free_port(), "ae_title": "PACS"}})
    result = run_cli(conf, "echo", "pacs")
    assert result.returncode == 1
    assert "connection refused" in result.stderr


def test_echo_wrong_called_ae_title_is_rejected_with_the_reason(tmp_path: Path) -> None:
    server = StatusSCP(ae_title="PACS").start()
    try:
        conf = endpoint_conf(tmp_path, {"pacs": {"port": server.port, "ae_title": "NOTPACS"}})
        result = run_cli(conf, "echo", "pacs")
    finally:
        server.stop()
    assert result.returncode == 1
    assert "association rejected" in result.stderr
    assert "Called AE title not recognised" in result.stderr


def test_echo_silent_peer_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) but never speaks DICOM
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        conf = endpoint_conf(tmp_path, {"pacs": {"port": port, "ae_title": "PACS", "acse_timeout": "1s"}})
        result = run_cli(conf, "echo", "pacs")
    assert result.returncode == 1
    assert "timeout" in result.stderr.lower()


def test_echo_unknown_endpoint(tmp_path: Path) -> None:
    conf = endpoint_conf(tmp_path, {"pacs": {"port": free_port(), "ae_title": "PACS"}})
    result = run_cli(conf, "echo", "nope")
    assert result.returncode == 1 and "unknown endpoint 'nope'" in result.stderr


def _tls_server(tmp_path: Path):
    import ssl

    from tests.tls import make_certificates

    certs = make_certificates(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    return certs, StatusSCP(ae_title="PACS", ssl_context=context).start()


def test_echo_and_send_over_tls(tmp_path: Path) -> None:
    from tests.helpers import Daemon, dicom_files, make_files, wait_for
    from tests.sendkit import put_in_outbox

    certs, server = _tls_server(tmp_path)
    try:
        conf = endpoint_conf(tmp_path, {"pacs": {"port": server.port, "ae_title": "PACS",
                                                 "tls": {"tls": "true", "tls_ca": str(certs.ca)}}})
        result = run_cli(conf, "echo", "pacs")
        assert result.returncode == 0, result.stderr
        put_in_outbox(tmp_path / "spool", "pacs", make_files(tmp_path / "src", 3))
        sender = Daemon(conf, "send", "pacs").start()
        try:
            wait_for(lambda: len(dicom_files(tmp_path / "spool/sent/pacs")) == 3, message="sent over TLS")
        finally:
            assert sender.stop() == 0
        assert len(server.received) == 3
    finally:
        server.stop()


def test_echo_tls_failure_is_named(tmp_path: Path) -> None:
    certs, server = _tls_server(tmp_path)
    other_ca = tmp_path / "other"
    from tests.tls import make_certificates

    wrong = make_certificates(other_ca)
    try:
        conf = endpoint_conf(tmp_path, {"pacs": {"port": server.port, "ae_title": "PACS",
                                                 "tls": {"tls": "true", "tls_ca": str(wrong.ca)}}})
        result = run_cli(conf, "echo", "pacs")
    finally:
        server.stop()
    assert result.returncode == 1
    assert "TLS handshake" in result.stderr and "certificate verify failed" in result.stderr
