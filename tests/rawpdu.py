"""Raw DICOM upper-layer pieces for the receive data path's hostile tests (issue 13, item 6).

Builds on :mod:`tests.reliability`'s raw client (``RawAssociation``, ``associate_rq``,
``p_data``, ``c_store_rq``), adding what those cases need and a normal SCU never sends:
PDV items and P-DATA-TF PDUs whose declared lengths lie, a command set with a wrong group
length, A-ABORT, C-ECHO-RQ, and the reading of the A-ASSOCIATE-AC (accepted contexts and
the receiver's maximum PDU), so a test knows exactly what was negotiated instead of
assuming it. Everything is bytes on a real socket: nothing here touches pynetdicom, so the
same bytes exercise pynetdicom's path and DicomFlow's own receive path alike.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.filereader import read_dataset

from tests.reliability import CT, EXPLICIT_LE, IMPLICIT_LE, RawAssociation, associate_rq

VERIFICATION = "1.2.840.10008.1.1"
CT_CONTEXT = 1
ECHO_CONTEXT = 3
# A CT storage context and Verification: the receiver accepts both (the even-numbered or
# never-proposed IDs a test uses for "never accepted" are not among them).
CONTEXTS = ((CT_CONTEXT, CT, (EXPLICIT_LE,)), (ECHO_CONTEXT, VERIFICATION, (IMPLICIT_LE,)))
A_ABORT = struct.pack(">BBI", 0x07, 0, 4) + b"\0\0\0\0"
A_RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0"


@dataclass
class Accepted:
    """What an A-ASSOCIATE-AC says: accepted context ID → transfer syntax, and the
    receiver's maximum PDU length (0 = unlimited)."""

    contexts: dict[int, str] = field(default_factory=dict)
    max_pdu: int = 0


def parse_ac(body: bytes) -> Accepted:
    """Read an A-ASSOCIATE-AC body (the PDU without its 6-byte header): presentation
    context items (0x21) with result 0, and the user-information maximum length (0x51)."""
    accepted = Accepted()
    offset = 68  # protocol version, reserved, called/calling AE echoes, reserved
    while offset + 4 <= len(body):
        kind, _, length = struct.unpack_from(">BBH", body, offset)
        item = body[offset + 4: offset + 4 + length]
        if kind == 0x21 and item[2] == 0:
            syntax = item[4:]  # one transfer-syntax sub-item (0x40)
            accepted.contexts[item[0]] = syntax[4:].rstrip(b"\0").decode("ascii")
        elif kind == 0x50:
            sub = 0
            while sub + 4 <= len(item):
                sub_kind, _, sub_length = struct.unpack_from(">BBH", item, sub)
                if sub_kind == 0x51:
                    accepted.max_pdu = struct.unpack_from(">I", item, sub + 4)[0]
                sub += 4 + sub_length
        offset += 4 + length
    return accepted


def negotiate(port: int, max_pdu: int = 16384, timeout: float = 30.0,
              rcvbuf: int | None = None, tls: ssl.SSLContext | None = None,
              ) -> tuple[RawAssociation, Accepted]:
    """A raw association with CT storage and Verification, advertising ``max_pdu``;
    ``rcvbuf`` sets SO_RCVBUF before connecting (a peer that reads slowly); ``tls`` wraps
    the connection in TLS first. Fails the test unless the receiver answers
    A-ASSOCIATE-AC."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    if tls is not None:
        sock = tls.wrap_socket(sock)
    conn = RawAssociation.__new__(RawAssociation)
    conn.sock = sock
    conn.send(associate_rq(contexts=CONTEXTS, max_pdu=max_pdu))
    answer = conn.read_pdu()
    assert answer is not None and answer[0] == 0x02, f"association not accepted: {answer!r}"
    return conn, parse_ac(answer[1])


def pdv(context_id: int, data: bytes, command: bool, last: bool = True,
        declared: int | None = None) -> bytes:
    """One PDV item; ``declared`` replaces its true item length (context + control + data)."""
    length = len(data) + 2 if declared is None else declared
    return struct.pack(">IBB", length, context_id, (1 if command else 0) | (2 if last else 0)) + data


def p_data_tf(*items: bytes, declared: int | None = None) -> bytes:
    """A P-DATA-TF PDU holding ``items``; ``declared`` replaces its true length."""
    body = b"".join(items)
    return struct.pack(">BBI", 0x04, 0, len(body) if declared is None else declared) + body


def data_pdus(context_id: int, data: bytes, max_pdu: int) -> list[bytes]:
    """A data set as P-DATA-TF PDUs of one PDV each, each PDU at most ``max_pdu`` long
    (the PDU's body: PDV header 6 bytes + fragment), the last one flagged last."""
    size = max(max_pdu - 6, 1) if max_pdu else max(len(data), 1)
    chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    return [p_data_tf(pdv(context_id, chunk, command=False, last=index == len(chunks) - 1))
            for index, chunk in enumerate(chunks)]


def with_group_length(command: bytes, group_length: int) -> bytes:
    """A command set from :func:`tests.reliability.c_store_rq` with its (0000,0000)
    Command Group Length replaced by ``group_length``."""
    tag, vr_length = struct.unpack_from("<II", command, 0)
    assert tag == 0 and vr_length == 4, "the command set must start with (0000,0000)"
    return command[:8] + struct.pack("<I", group_length) + command[12:]


def c_echo_rq(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set (implicit VR little endian)."""
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, tag, len(value)) + value

    uid = VERIFICATION.encode() + (b"\0" if len(VERIFICATION) % 2 else b"")
    body = element(0x0002, uid) + element(0x0100, struct.pack("<H", 0x0030))
    body += element(0x0110, struct.pack("<H", message_id)) + element(0x0800, struct.pack("<H", 0x0101))
    return element(0x0000, struct.pack("<I", len(body))) + body


@dataclass
class Response:
    """A DIMSE response command: its command field, status and the answered message ID."""

    command_field: int
    status: int
    message_id: int


def read_response(conn: RawAssociation) -> Response | str:
    """The next DIMSE response command set, or ``"abort"`` / ``"closed"`` /
    ``"released"`` (an A-RELEASE-RP); ``TimeoutError`` if nothing comes within the
    socket's timeout. Command PDVs may be fragmented over several PDUs."""
    command = b""
    while True:
        try:
            answer = conn.read_pdu()
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
        if answer is None:
            return "closed"
        kind, body = answer
        if kind == 0x07:
            return "abort"
        if kind == 0x06:
            return "released"
        if kind != 0x04:
            continue
        offset, last = 0, False
        while offset + 6 <= len(body):
            length, _, control = struct.unpack_from(">IBB", body, offset)
            if control & 1:
                command += body[offset + 6: offset + 4 + length]
                last = bool(control & 2)
            offset += 4 + length
        if last:
            ds = read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)
            return Response(int(ds[0x00000100].value), int(ds[0x00000900].value),
                            int(ds[0x00000120].value))


def outcome(conn: RawAssociation, timeout: float) -> str:
    """What the receiver does next, within ``timeout``: ``"abort"``, ``"closed"``,
    ``"status 0x...."`` (a DIMSE response), ``"released"`` or ``"nothing"`` (a hang)."""
    conn.sock.settimeout(timeout)
    try:
        answer = read_response(conn)
    except TimeoutError:
        return "nothing"
    except OSError:
        return "closed"
    if isinstance(answer, Response):
        return f"status 0x{answer.status:04X}"
    return answer


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (1 established, 7 closed, 8 close-wait…), the
    first byte of ``TCP_INFO``: how a peer that does not read learns the other end gave up."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
