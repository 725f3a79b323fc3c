"""Whole-PDU socket reads (README, Performance: switch ``recv``).

``AssociationSocket.recv`` read a PDU 4 KiB at a time and appended each piece (128
calls and copies for a 0.5 MB PDU); it now reads straight into one buffer of the PDU's
size, grown in steps as bytes actually arrive.
"""

from __future__ import annotations

from pynetdicom.transport import AssociationSocket

RECV_STEP = 4 * 1024 * 1024  # buffer growth step: memory follows the bytes that arrive


def _socket_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` with few large reads (pynetdicom reads 4 KiB pieces and appends).

    The length comes from the peer's PDU header: the buffer grows in steps as data
    actually arrives, so a client that merely *declares* a 2 GiB PDU costs nothing.
    """
    sock = self.socket
    assert sock is not None
    buffer = bytearray(min(nr_bytes, RECV_STEP))
    got = 0
    while got < nr_bytes:
        if got == len(buffer):
            buffer.extend(bytes(min(nr_bytes - got, RECV_STEP)))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[got:], len(buffer) - got)
        if not count:
            break
        got += count
    if got < len(buffer):
        del buffer[got:]
    return buffer


def install() -> None:
    AssociationSocket.recv = _socket_recv  # type: ignore[method-assign]
