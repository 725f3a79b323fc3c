"""Security (issue 6, scenario 4): who may send, TLS, file modes, no patient data in
the logs at INFO."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.helpers import (
    Daemon,
    make_dataset,
    make_files,
    router_port,
    run_cli,
    wait_for,
    write_conf,
    write_dataset,
)
from tests.reliability import Pipeline, record, storescu_acked
from tests.tls import make_certificates

PATIENT_NAME = "ZQXWV^JOBLOGGSPHI"
PATIENT_ID = "PHI-7734-ZQX"


def test_unknown_calling_and_wrong_called_ae_are_refused(tmp_path: Path) -> None:
    pipeline = Pipeline(tmp_path, router={"allowed_calling_aets": "CT1, MR1"}).start()
    try:
        files = make_files(tmp_path / "src", 2)
        intruder, result = storescu_acked(pipeline.port, files, calling="INTRUDER")
        assert intruder == [] and "Association Rejected" in result.stdout + result.stderr
        wrong, result = storescu_acked(pipeline.port, files, calling="CT1", called="NOT_US")
        assert wrong == [] and "Association Rejected" in result.stdout + result.stderr
        allowed, result = storescu_acked(pipeline.port, files, calling="CT1")
        assert allowed == files, result.stdout + result.stderr
        wait_for(lambda: len(pipeline.delivered()) == 2 and pipeline.drained(), message="delivered")
        record("security: AE titles", sent=6, acknowledged=2, delivered=2, refused=4)
        pipeline.assert_alive()
    finally:
        pipeline.stop()


def test_tls_required_refuses_plain_and_accepts_tls(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    pipeline = Pipeline(tmp_path, tls={"tls": "true", "tls_cert": certs.server_cert,
                                       "tls_key": certs.server_key}).start()
    try:
        files = make_files(tmp_path / "src", 3)
        plain, result = storescu_acked(pipeline.port, files)
        assert plain == [] and result.returncode != 0
        secure, result = storescu_acked(pipeline.port, files, extra=("+tla", "+cf", str(certs.ca)))
        assert secure == files, result.stdout + result.stderr
        wait_for(lambda: len(pipeline.delivered()) == 3 and pipeline.drained(), message="TLS delivered")
        record("security: TLS", sent=6, acknowledged=3, delivered=3, refused=3)
        pipeline.assert_alive()
    finally:
        pipeline.stop()


def test_modes_and_no_patient_data_in_logs(tmp_path: Path) -> None:
    """A run with a distinctive patient through delivered, rejected, quarantined and
    hand-dropped files. Stage folders are 0700, files 0600, and no log says who."""
    pipeline = Pipeline(tmp_path, filter_={"sop_blacklist": "MRImageStorage"}).start()
    try:
        phi = {"patient_name": PATIENT_NAME, "patient_id": PATIENT_ID}
        src = tmp_path / "src"
        ct = [write_dataset(make_dataset(**phi), src / f"ct{i}.dcm") for i in range(3)]
        mr = write_dataset(make_dataset("1.2.840.10008.5.1.4.1.1.4", modality="MR", **phi), src / "mr.dcm")
        acked, result = storescu_acked(pipeline.port, [*ct, mr])
        assert len(acked) == 4, result.stdout + result.stderr
        # a hand-dropped, world-readable copy and a truncated one (quarantined)
        dropped = write_dataset(make_dataset(**phi), src / "dropped.dcm")
        os.chmod(dropped, 0o644)
        os.rename(dropped, pipeline.spool / "incoming" / "dropped.dcm")
        broken = src / "broken.dcm"
        broken.write_bytes(write_dataset(make_dataset(**phi), src / "whole.dcm").read_bytes()[:700])
        os.rename(broken, pipeline.spool / "incoming" / "broken.dcm")
        wait_for(lambda: len(pipeline.delivered()) == 4 and pipeline.drained()
                 and pipeline.stage("rejected") and pipeline.stage("quarantine"), message="all routed")
        for root, dirs, files in os.walk(pipeline.spool):
            for name in dirs:
                mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
                assert mode == 0o700, f"{os.path.join(root, name)} has mode {oct(mode)}"
            if Path(root).relative_to(pipeline.spool).parts[:1] in (("run",), ("log",)):
                continue
            for name in files:
                mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
                assert mode == 0o600, f"{os.path.join(root, name)} has mode {oct(mode)}"
        pipeline.stop()
        logs = pipeline.logs()
        assert "stored from" in logs and "delivered" in logs and "quarantined" in logs
        for secret in (PATIENT_NAME, PATIENT_ID, "JOBLOGGS", "ZQXWV"):
            assert secret not in logs, f"{secret!r} appears in a log at INFO"
        record("security: PHI and modes", sent=6, acknowledged=4, delivered=4, quarantined=1)
    finally:
        pipeline.stop()


# -- defect 12 (issue 10): TLS settings say what they do; what cannot work is refused ------

def _check(base: Path, tls: dict | None = None, endpoint_tls: dict | None = None):
    endpoint = {"endpoint": {"host": "127.0.0.1", "port": 1104, "ae_title": "PACS"}}
    if endpoint_tls:
        endpoint["tls"] = endpoint_tls
    conf = write_conf(base, tls=tls, endpoints={"pacs": endpoint})
    return run_cli(conf, "check")


def test_defect12_check_refuses_tls_that_cannot_work(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    garbage = tmp_path / "certs" / "garbage.pem"
    garbage.write_text("not a certificate\n")
    server = {"tls_cert": certs.server_cert, "tls_key": certs.server_key}
    refused = {
        "server TLS with only tls_ca": ({"tls_ca": certs.ca}, None, "tls_cert"),
        "server tls = true without a certificate": ({"tls": "true"}, None, "tls_cert"),
        "server certificate with another key": (
            {"tls_cert": certs.server_cert, "tls_key": certs.client_key}, None, "tls_cert"),
        "server tls_ca that is no certificate": ({**server, "tls_ca": garbage}, None, "tls_ca"),
        "client certificates required with TLS off": (
            {"tls": "false", "tls_ca": certs.ca, "tls_require_client_cert": "true"}, None,
            "tls_require_client_cert"),
        "endpoint certificate with another key": (
            None, {"tls_cert": certs.client_cert, "tls_key": certs.server_key}, "tls_cert"),
        "endpoint tls_ca that is no certificate": (None, {"tls_ca": garbage}, "tls_ca"),
    }
    for n, (case, (tls, endpoint_tls, key)) in enumerate(refused.items()):
        result = _check(tmp_path / f"case{n}", tls, endpoint_tls)
        assert result.returncode == 1, f"{case}: check passed:\n{result.stdout}"
        assert key in result.stderr and "[tls]" in result.stderr, f"{case}: {result.stderr}"
    result = _check(tmp_path / "good", {**server, "tls_ca": certs.ca},
                    {"tls_ca": certs.ca, "tls_cert": certs.client_cert, "tls_key": certs.client_key})
    assert result.returncode == 0, result.stderr
    assert "client certificate optional; one presented is verified against" in result.stdout
    assert "destination verified against" in result.stdout


def _tls_associate(port: int, trust: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """A-ASSOCIATE over TLS with an optional client certificate: "accepted" or "refused"."""
    import socket
    import ssl

    from tests.reliability import associate_rq

    context = ssl.create_default_context(cafile=str(trust))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(associate_rq())
            answer = sock.recv(1)
    except (ssl.SSLError, OSError):
        return "refused"
    return "accepted" if answer == b"\x02" else "refused"


@pytest.mark.parametrize("fast", ["1", "0"], ids=["fastpath", "no-fastpath"])
def test_defect12_tls_ca_verifies_client_certificates(tmp_path: Path, fast: str) -> None:
    """A configured tls_ca always verifies: a client certificate from another CA fails;
    tls_require_client_cert decides whether a client without one is accepted."""
    certs = make_certificates(tmp_path / "certs")
    other = make_certificates(tmp_path / "other-ca")
    outcomes = {}
    for require in ("false", "true"):
        conf = write_conf(tmp_path / f"require-{require}", tls={
            "tls_cert": certs.server_cert, "tls_key": certs.server_key, "tls_ca": certs.ca,
            "tls_require_client_cert": require})
        daemon = Daemon(conf, "receive", env={"DICOMFLOW_FASTPATH": fast}).start()
        try:
            daemon.wait_log("listening as")
            port = router_port(conf)
            outcomes[require] = {
                "our CA": _tls_associate(port, certs.ca, certs.client_cert, certs.client_key),
                "other CA": _tls_associate(port, certs.ca, other.client_cert, other.client_key),
                "no certificate": _tls_associate(port, certs.ca),
            }
            assert daemon.alive(), daemon.log()[-3000:]
        finally:
            assert daemon.stop() == 0
    assert outcomes == {
        "false": {"our CA": "accepted", "other CA": "refused", "no certificate": "accepted"},
        "true": {"our CA": "accepted", "other CA": "refused", "no certificate": "refused"},
    }, outcomes
