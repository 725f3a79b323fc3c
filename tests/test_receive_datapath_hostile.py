"""Hostile PDU sequences on the receive data path (issue 13, item 6).

Each case negotiates a real association with ``dicomflow receive`` (a subprocess) by hand
— a CT storage context and Verification, our maximum PDU 16 KiB — reads the
A-ASSOCIATE-AC for the accepted context IDs and the receiver's maximum PDU, sends one
hostile sequence (:mod:`tests.rawpdu`), and checks what must hold whichever code reads
the P-DATA-TF PDUs (pynetdicom's, or DicomFlow's own ``store_receive``):

* no success for a broken C-STORE: an A-ABORT, a closed connection or a failure status,
  and it comes at once — the refusal cases run with long network and DIMSE timeouts, so
  a receiver that only gives up by timing out shows as "nothing within 30 s";
* nothing of it visible in ``incoming/`` (temp files live in ``incoming/.tmp``; today's
  path leaves an aborted transfer's temp file there for the periodic sweep);
* one WARNING or ERROR line about it, and no patient name in the log;
* the receiver keeps serving: DCMTK ``storescu`` then stores a file that appears in
  ``incoming/``.

On DicomFlow's own path (switch ``recvpath``, on by default) more holds, and is checked
(``OURS``): every refusal is an A-ABORT with our one ``aborted association from …`` line,
the temp file is gone when the association has ended, a wrong group length and a data set
on another context than its command are refused.

Marked ``e2e``: ``.ci/run`` runs it again with ``DICOMFLOW_FASTPATH=0``.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from pipeline import switches
from pipeline.config import load_router
from tests.helpers import HANG_TIMEOUT, dicom_files, make_dataset, wait_for, write_dataset
from tests.rawpdu import (
    A_ABORT,
    A_RELEASE_RQ,
    CT_CONTEXT,
    ECHO_CONTEXT,
    Accepted,
    Response,
    c_echo_rq,
    data_pdus,
    negotiate,
    outcome,
    p_data_tf,
    pdv,
    read_response,
    tcp_state,
    with_group_length,
)
from tests.reliability import CT, EXPLICIT_LE, RawAssociation, c_store_rq, encode_dataset, storescu_acked
from tests.test_receive_limits import Receiver

pytestmark = pytest.mark.e2e

FAST = os.environ.get("DICOMFLOW_FASTPATH", "1")
#: the receiver reads P-DATA itself (store_receive), as the daemon will decide it
OURS = FAST != "0" and switches.is_on("recvpath", os.environ) and switches.is_on("reactors", os.environ)
OUR_LINE = "aborted association from"
OUR_MAX_PDU = 16384
ANSWER_WITHIN = 30.0  # seconds: far below the refusal cases' network/DIMSE timeouts
PATIENT = "HOSTILE^PATIENT"
COMPLAINT = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) +receive\b", re.MULTILINE)
# Refusal cases: an answer must come from the protocol error itself, not from a timeout.
SLOW_TIMEOUTS = {"network_timeout": "120s", "dimse_timeout": "120s", "acse_timeout": "30s",
                  "max_pdu": "64 KiB", "max_associations": "3"}
# Cases where the timeout is what ends the association: short, so the test is quick.
QUICK_TIMEOUTS = {"network_timeout": "4s", "dimse_timeout": "4s", "acse_timeout": "10s",
                "max_pdu": "64 KiB", "max_associations": "3"}


class Store:
    """One C-STORE's pieces: the data set, its command set and encoded body."""

    def __init__(self, message_id: int = 1) -> None:
        self.ds = make_dataset(patient_name=PATIENT)
        self.uid = str(self.ds.SOPInstanceUID)
        self.command = c_store_rq(CT, self.uid, message_id=message_id)
        self.data = encode_dataset(self.ds)

    def pdus(self, accepted: Accepted, context_id: int = CT_CONTEXT) -> list[bytes]:
        """The whole C-STORE-RQ, fragmented to the receiver's maximum PDU."""
        return [p_data_tf(pdv(context_id, self.command, command=True)),
                *data_pdus(context_id, self.data, accepted.max_pdu)]


def visible(receiver: Receiver) -> list[Path]:
    return dicom_files(receiver.conf.parent / "spool" / "incoming")


def temp_files(receiver: Receiver) -> list[str]:
    tmp = receiver.conf.parent / "spool" / "incoming" / ".tmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


def complete_and_equal(path: Path, sent: Store) -> None:
    """A file in ``incoming/`` is the whole data set that was sent, readable by pydicom."""
    ds = dcmread(path)
    assert str(ds.SOPInstanceUID) == sent.uid, path.name
    assert ds.PixelData == sent.ds.PixelData, f"{path.name}: pixel data differs"
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE


def still_serving(receiver: Receiver, tmp_path: Path) -> None:
    """A normal DCMTK storescu is answered Success and its file appears in incoming/."""
    good = write_dataset(make_dataset(), tmp_path / "src" / f"good-{time.monotonic_ns()}.dcm")
    uid = str(dcmread(good).SOPInstanceUID)
    outputs: list[str] = []

    def stored() -> bool:  # retried: a slot just freed by an abort may still read busy
        acked, result = storescu_acked(receiver.port, [good], timeout=HANG_TIMEOUT)
        outputs.append(result.stdout + result.stderr)
        return acked == [good]

    try:
        wait_for(stored, timeout=HANG_TIMEOUT, interval=0.5, message="storescu answered Success")
    except AssertionError:
        raise AssertionError(f"storescu not served:\n{outputs[-1][-2000:]}") from None
    wait_for(lambda: any(uid in p.name for p in visible(receiver)), message="the good file in incoming/")
    receiver.assert_alive()


def logged_complaint(receiver: Receiver, since: int) -> str:
    """Wait for a WARNING/ERROR line written after offset ``since``; return the new log."""
    def new_lines() -> str:
        text = receiver.daemon.log()[since:]
        return text if COMPLAINT.search(text) else ""

    found = wait_for(new_lines, timeout=HANG_TIMEOUT, message="a WARNING or ERROR line about it")
    return str(found)


def complaints(log: str) -> list[str]:
    """The WARNING/ERROR lines of a log excerpt, shortened (for the printed summary)."""
    return [line[:160] for line in log.splitlines() if COMPLAINT.match(line)]


def refused_case(tmp_path: Path, send: Callable[[RawAssociation, Accepted, Store], None],
                 router: dict[str, str] = SLOW_TIMEOUTS) -> str:
    """Run one refusal case (``max_associations`` times over), then restart the receiver:
    what an abort left in ``incoming/.tmp`` is gone after it. Returns the first answer."""
    receiver = Receiver(tmp_path, FAST, **router)
    with receiver:
        since = len(receiver.daemon.log())
        stores, answers = [], []
        # As many times as there are association slots: one the case leaks shows as busy.
        for _ in range(int(router["max_associations"])):
            conn, accepted = negotiate(receiver.port, max_pdu=OUR_MAX_PDU)
            assert accepted.contexts.keys() == {CT_CONTEXT, ECHO_CONTEXT}, accepted
            assert accepted.max_pdu == load_router(receiver.conf).max_pdu == 64 * 1024, accepted
            store = Store()
            stores.append(store)
            try:
                send(conn, accepted, store)
            except OSError:
                pass  # the receiver may hang up while we are still sending: a refusal
            answer = outcome(conn, ANSWER_WITHIN)
            conn.close()
            answers.append(answer)
            assert answer in ("abort", "closed") or (
                answer.startswith("status") and answer != "status 0x0000"), \
                f"broken C-STORE answered {answer!r}"
            assert visible(receiver) == [], "a broken C-STORE became visible in incoming/"
            if OURS:
                assert answer == "abort", answer
                wait_for(lambda: temp_files(receiver) == [], message="the temp file removed")
        log = logged_complaint(receiver, since)
        if OURS:
            assert len([line for line in complaints(log) if OUR_LINE in line]) == len(answers), log
        assert PATIENT not in receiver.daemon.log(), "patient name in the receive log"
        still_serving(receiver, tmp_path)
        assert [p for p in visible(receiver) for s in stores if s.uid in p.name] == []
        print(f"{answers}; temp files after: {temp_files(receiver)}; log: {complaints(log)}")
    # Today's path leaves an aborted transfer's temp file for the periodic sweep (files
    # older than max(5 min, 2 × network_timeout)); a restart removes them.
    receiver.daemon.start()
    try:
        wait_for(lambda: receiver.daemon.log().count("listening as") >= 2,
                 message="the receiver listening again")
        assert temp_files(receiver) == [], "temp files survived a restart"
    finally:
        assert receiver.daemon.stop() == 0, receiver.daemon.log()[-3000:]
    return answers[0]


# -- (1) a PDV item longer than what is left of its PDU ----------------------------------------

def test_pdv_longer_than_its_pdu_in_the_data_set(tmp_path: Path) -> None:
    def send(conn: RawAssociation, accepted: Accepted, store: Store) -> None:
        conn.send(p_data_tf(pdv(CT_CONTEXT, store.command, command=True)))
        fragment = store.data[:100]
        conn.send(p_data_tf(pdv(CT_CONTEXT, fragment, command=False, last=False, declared=5000)))

    refused_case(tmp_path, send)


def test_pdv_longer_than_its_pdu_in_the_command(tmp_path: Path) -> None:
    def send(conn: RawAssociation, accepted: Accepted, store: Store) -> None:
        conn.send(p_data_tf(pdv(CT_CONTEXT, store.command, command=True,
                                declared=len(store.command) + 2 + 1000)))

    refused_case(tmp_path, send)


# -- (2) a data-set PDV before any command ---------------------------------------------------

def test_data_set_before_any_command(tmp_path: Path) -> None:
    def send(conn: RawAssociation, accepted: Accepted, store: Store) -> None:
        for pdu in data_pdus(CT_CONTEXT, store.data, accepted.max_pdu):
            conn.send(pdu)

    refused_case(tmp_path, send)


# -- (3) a presentation context ID never accepted --------------------------------------------

@pytest.mark.parametrize("context_id", [99, 2], ids=["never-proposed-99", "even-2"])
def test_context_id_never_accepted(tmp_path: Path, context_id: int) -> None:
    def send(conn: RawAssociation, accepted: Accepted, store: Store) -> None:
        assert context_id not in accepted.contexts
        for pdu in store.pdus(accepted, context_id=context_id):
            conn.send(pdu)

    refused_case(tmp_path, send)


@pytest.mark.parametrize("where", ["command-inside-data-set", "data-inside-command"])
def test_pdvs_interleaved_out_of_order(tmp_path: Path, where: str) -> None:
    """A second command before the first data set's last fragment, or a data-set PDV
    before the command's last fragment (one operation at a time, no asynchronous
    window). Today's path waits for more and ends it only by its network timeout, so
    this case runs with short timeouts: no success, nothing visible, the connection ends."""
    def send(conn: RawAssociation, accepted: Accepted, store: Store) -> None:
        if where == "command-inside-data-set":
            conn.send(p_data_tf(pdv(CT_CONTEXT, store.command, command=True)))
            conn.send(p_data_tf(pdv(CT_CONTEXT, store.data[:200], command=False, last=False)))
            conn.send(p_data_tf(pdv(CT_CONTEXT, Store(2).command, command=True)))
        else:
            conn.send(p_data_tf(pdv(CT_CONTEXT, store.command[:40], command=True, last=False)))
            conn.send(p_data_tf(pdv(CT_CONTEXT, store.data[:200], command=False, last=False)))

    refused_case(tmp_path, send, router=QUICK_TIMEOUTS)


# -- (4) a P-DATA-TF of the receiver's maximum + 1 -------------------------------------------

def test_pdu_of_our_maximum_plus_one_is_refused_by_its_header(tmp_path: Path) -> None:
    """Only the header and 64 bytes follow: a receiver that waited for (or allocated)
    the declared body would answer nothing before its 120 s network timeout."""
    def send(conn: RawAssociation, accepted: Accepted, store: Store) -> None:
        conn.send(p_data_tf(pdv(CT_CONTEXT, store.command, command=True)))
        header = p_data_tf(b"", declared=accepted.max_pdu + 1)
        conn.send(header + b"\0" * 64)

    refused_case(tmp_path, send)


# -- (5) a command set whose group length is wrong -------------------------------------------

@pytest.mark.parametrize("delta", [100, -(10 ** 6)], ids=["larger", "too-small"])
def test_command_group_length_wrong(tmp_path: Path, delta: int) -> None:
    """(0000,0000) says more (or less) than the command set holds. The command set ends
    at its last-fragment bit, so the group length is redundant: today's path (pynetdicom)
    takes the message. Either way a success must mean the file is in incoming/, whole;
    a refusal must leave nothing visible."""
    with Receiver(tmp_path, FAST, **SLOW_TIMEOUTS) as receiver:
        conn, accepted = negotiate(receiver.port, max_pdu=OUR_MAX_PDU)
        store = Store()
        length = max(len(store.command) - 12 + delta, 4)
        pdus = store.pdus(accepted)
        pdus[0] = p_data_tf(pdv(CT_CONTEXT, with_group_length(store.command, length), command=True))
        for pdu in pdus:
            conn.send(pdu)
        answer = outcome(conn, ANSWER_WITHIN)
        assert answer != "nothing", "no answer to a C-STORE with a wrong group length"
        if OURS:  # the command set contradicts itself: refused
            assert answer == "abort", answer
            receiver.daemon.wait_log("command set group length")
        if answer == "status 0x0000":
            [path] = visible(receiver)
            complete_and_equal(path, store)
            conn.send(A_RELEASE_RQ)
            assert outcome(conn, ANSWER_WITHIN) == "released"
        else:
            assert visible(receiver) == [], answer
        conn.close()
        print(f"group length {length} (true {len(store.command) - 12}): {answer}")
        assert PATIENT not in receiver.daemon.log()
        still_serving(receiver, tmp_path)


def test_data_set_on_another_context_than_its_command(tmp_path: Path) -> None:
    """PS3.8: a message's data set travels on its command's presentation context. Our path
    refuses it; pynetdicom's takes it (then a success must mean the file is whole)."""
    with Receiver(tmp_path, FAST, **SLOW_TIMEOUTS) as receiver:
        conn, accepted = negotiate(receiver.port, max_pdu=OUR_MAX_PDU)
        store = Store()
        conn.send(p_data_tf(pdv(CT_CONTEXT, store.command, command=True)))
        for pdu in data_pdus(ECHO_CONTEXT, store.data, accepted.max_pdu):
            conn.send(pdu)
        answer = outcome(conn, ANSWER_WITHIN)
        conn.close()
        if OURS:
            assert answer == "abort", answer
            receiver.daemon.wait_log("data-set fragment on presentation context")
            assert visible(receiver) == []
        elif answer == "status 0x0000":
            [path] = visible(receiver)
            complete_and_equal(path, store)
        still_serving(receiver, tmp_path)


# -- (6) A-ABORT after the last fragment, before our response ---------------------------------

def test_abort_after_the_last_fragment_before_the_response(tmp_path: Path) -> None:
    """The receiver may have made the file durable already: if it is visible it is whole."""
    with Receiver(tmp_path, FAST, **QUICK_TIMEOUTS) as receiver:
        stores = []
        for _ in range(5):
            conn, accepted = negotiate(receiver.port, max_pdu=OUR_MAX_PDU)
            store = Store()
            conn.send(b"".join(store.pdus(accepted)) + A_ABORT)
            conn.close()
            stores.append(store)
        still_serving(receiver, tmp_path)
        assert PATIENT not in receiver.daemon.log()
    # Stopped: every association has ended, so whatever the receiver kept is final.
    kept = [(p, s) for p in visible(receiver) for s in stores if s.uid in p.name]
    for path, store in kept:
        complete_and_equal(path, store)
    print(f"{len(kept)} of {len(stores)} aborted stores kept; temp files: {temp_files(receiver)}")


# -- (7) a peer that stops reading while it sends ---------------------------------------------

ECHO_ID = 65000  # message ID of the filler C-ECHOs (stores count 1, 2, …)
ECHOES_PER_STORE = 200


def _max_rounds() -> int:
    """Rounds enough to fill the receiver's send buffer several times over (a C-ECHO-RSP
    is about 80 bytes): bounds the flood if the kernel's buffers never fill."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        wmem_max = 4 * 1024 * 1024
    return max(1000, 4 * wmem_max // (ECHOES_PER_STORE * 80))


MAX_ROUNDS = _max_rounds()
STALL_TIMEOUTS = {**QUICK_TIMEOUTS, "network_timeout": "15s", "dimse_timeout": "15s"}


class Stuffer(threading.Thread):
    """Sends complete C-STOREs, each followed by C-ECHOs, and never reads: the responses
    pile up in the receiver's socket until its send blocks (on loopback the kernel
    grows the send buffer to ``tcp_wmem``'s maximum, ~4 MB, so C-STORE-RSPs alone would
    need some 20,000 files: the echoes fill it cheaply). Stops when one send is blocked
    for 5 s (``stalled``: the receiver has stopped reading) or after ``MAX_ROUNDS``."""

    def __init__(self, conn: RawAssociation, accepted: Accepted) -> None:
        super().__init__(daemon=True)
        self.conn, self.accepted = conn, accepted
        self.sent: list[Store] = []
        self.stalled = threading.Event()
        self.echoes = p_data_tf(pdv(ECHO_CONTEXT, c_echo_rq(ECHO_ID), command=True)) * ECHOES_PER_STORE

    def run(self) -> None:
        self.conn.sock.settimeout(5)
        try:
            for index in range(MAX_ROUNDS):
                store = Store(message_id=index + 1)
                self.conn.send(b"".join(store.pdus(self.accepted)))
                self.sent.append(store)
                self.conn.send(self.echoes)
        except OSError:
            self.stalled.set()


def drain(conn: RawAssociation) -> tuple[list[int], str]:
    """Read what the receiver sent: the message IDs of C-STOREs answered Success, and how
    the connection ended ("abort", "closed", or "nothing" if it stayed open)."""
    acked: list[int] = []
    conn.sock.settimeout(ANSWER_WITHIN)
    while True:
        try:
            answer = read_response(conn)
        except TimeoutError:
            return acked, "nothing"
        except OSError:
            return acked, "closed"
        if not isinstance(answer, Response):
            return acked, answer
        if answer.command_field == 0x8001 and answer.status == 0:
            acked.append(answer.message_id)


def test_peer_that_stops_reading(tmp_path: Path) -> None:
    """A small SO_RCVBUF and no reads. During the stall storescu is served; the receiver
    gives up on the silent reader within its timeouts (the connection ends), and every
    file it acknowledged, like every file it shows, is whole in incoming/."""
    with Receiver(tmp_path, FAST, **STALL_TIMEOUTS) as receiver:
        conn, accepted = negotiate(receiver.port, max_pdu=OUR_MAX_PDU, rcvbuf=1024)
        since = len(receiver.daemon.log())
        stuffer = Stuffer(conn, accepted)
        stuffer.start()
        wait_for(lambda: stuffer.stalled.is_set() or not stuffer.is_alive(), timeout=600,
                 interval=0.2, message="the flood to stall or end")
        assert stuffer.stalled.is_set(), (
            f"{len(stuffer.sent)} rounds sent and the receiver never stopped reading: "
            "the kernel's buffers took every response")
        open_during = tcp_state(conn.sock) == 1
        still_serving(receiver, tmp_path)  # another association, while this one is stuck
        open_after = tcp_state(conn.sock) == 1
        stuffer.join(HANG_TIMEOUT)
        # Not reading, the peer sees the end as a reset (state leaves ESTABLISHED) or, if
        # the receiver closed politely behind queued responses, only in the log.
        wait_for(lambda: tcp_state(conn.sock) != 1 or COMPLAINT.search(receiver.daemon.log()[since:]),
                 timeout=HANG_TIMEOUT, message="the receiver to give up on the silent reader")
        acked, end = drain(conn)
        conn.close()
        assert end in ("abort", "closed"), f"the connection did not end: {end}"
        assert PATIENT not in receiver.daemon.log(), "patient name in the receive log"
        by_message = {index + 1: store for index, store in enumerate(stuffer.sent)}
        files = visible(receiver)
        for message_id in acked:
            store = by_message[message_id]
            [path] = [p for p in files if store.uid in p.name]
            complete_and_equal(path, store)
        for path in files:
            for store in stuffer.sent:
                if store.uid in path.name:
                    complete_and_equal(path, store)
        print(f"{len(stuffer.sent)} stores sent, stall open during/after storescu "
              f"{open_during}/{open_after}; acknowledged {len(acked)} (read), visible {len(files)}, "
              f"end {end}; temp files {len(temp_files(receiver))}; "
              f"log: {complaints(receiver.daemon.log()[since:])}")
        still_serving(receiver, tmp_path)


# -- (8) C-ECHO and A-RELEASE ----------------------------------------------------------------

def test_echo_and_release_are_answered(tmp_path: Path) -> None:
    with Receiver(tmp_path, FAST, **SLOW_TIMEOUTS) as receiver:
        conn, accepted = negotiate(receiver.port, max_pdu=OUR_MAX_PDU)
        for message_id in (1, 2):
            conn.send(p_data_tf(pdv(ECHO_CONTEXT, c_echo_rq(message_id), command=True)))
            conn.sock.settimeout(ANSWER_WITHIN)
            answer = read_response(conn)
            assert isinstance(answer, Response), answer
            assert (answer.command_field, answer.status, answer.message_id) == (0x8030, 0, message_id)
        # A store between, then release: the store is answered and kept, the release too.
        store = Store(message_id=3)
        for pdu in store.pdus(accepted):
            conn.send(pdu)
        answer = read_response(conn)
        assert isinstance(answer, Response) and answer.status == 0, answer
        conn.send(A_RELEASE_RQ)
        assert outcome(conn, ANSWER_WITHIN) == "released"
        conn.close()
        [path] = visible(receiver)
        complete_and_equal(path, store)
        # An association that only releases.
        conn, accepted = negotiate(receiver.port, max_pdu=OUR_MAX_PDU)
        conn.send(A_RELEASE_RQ)
        assert outcome(conn, ANSWER_WITHIN) == "released"
        conn.close()
        receiver.assert_alive()


def test_socket_helpers_see_a_closed_peer() -> None:
    """``tcp_state`` (used by the silent-reader case) tells a reset from an open socket."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    assert tcp_state(client) == 1
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    peer.close()
    wait_for(lambda: tcp_state(client) != 1, timeout=10, message="the reset seen")
    client.close()
    server.close()
