"""What the WAN path carries in practice: bulk TCP through the tunnel, before any DICOM.

    tcp_rate.py serve HOST PORT                 discard what arrives (until killed)
    tcp_rate.py send HOST PORT SECONDS STREAMS  send for SECONDS over STREAMS connections,
                                                print the rate in Mbit/s

``run.sh --bench`` prints it beside the nominal rate: the relay, both ``wireguard-go``
processes and the peers share the machine's cores, so the userspace path may carry
less than ``tc``'s cap. The clock stops when the receiver has read every byte of every
stream (it closes each connection at the end of stream). Standard library only.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

CHUNK = bytes(256 * 1024)


def serve(host: str, port: int) -> None:
    with socket.create_server((host, port)) as server:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=_discard, args=(conn,), daemon=True).start()


def _discard(conn: socket.socket) -> None:
    with conn:
        while conn.recv(1 << 20):
            pass


def send(host: str, port: int, seconds: float, streams: int) -> float:
    sent = [0] * streams
    end = time.monotonic() + seconds

    def one(index: int) -> None:
        with socket.create_connection((host, port), timeout=30) as conn:
            while time.monotonic() < end:
                conn.sendall(CHUNK)
                sent[index] += len(CHUNK)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # the server closes once it has read everything

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(sent) * 8 / (time.monotonic() - start) / 1e6


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        serve(argv[1], int(argv[2]))
        return 0
    if len(argv) == 5 and argv[0] == "send":
        print(f"{send(argv[1], int(argv[2]), float(argv[3]), int(argv[4])):.1f}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
