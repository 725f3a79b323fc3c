"""A UDP relay between two fixed peers that delays each direction by a set time.

    udp_delay.py --delay 0.02 198.18.100.2:51820=198.18.100.1:51820 198.18.100.5:51820=198.18.100.6:51820

The WAN of example 03: WireGuard's UDP between the two gateways goes through it, so the
tunnel sees a round trip of twice ``--delay``. The kernel's ``netem`` would do this, but
it is not available here (the bandwidth cap is ``tc … tbf`` on the WAN veths). Each side
is ``LISTEN=PEER``: a datagram arriving on side 1's socket is sent from side 2's socket
to side 2's peer once it is due, and the other way round — the peers are fixed, so each
gateway's WireGuard endpoint is simply the relay's address on its side.

The delay is a queue, not a stop-and-wait: each datagram is stamped on arrival and sent
when due, so the link keeps its bandwidth. The queue is bounded (``--queue`` datagrams
per direction, by default well above the bandwidth × delay of a 1 Gbit/s link at 40 ms);
a datagram arriving at a full queue is dropped, as a router's full buffer drops it, and
a send the network refuses (link down, qdisc full) drops that datagram — UDP promises no
more, and WireGuard and the TCP inside it recover. Standard library only, one thread.
"""

from __future__ import annotations

import argparse
import collections
import selectors
import signal
import socket
import sys
import time

MAX_DATAGRAM = 65535


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Side:
    """One end of the relay: the socket the near peer talks to, and that peer."""

    def __init__(self, listen: tuple[str, int], peer: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.bind(listen)
        self.sock.setblocking(False)
        self.peer = peer
        # datagrams to send to this side's peer: (due, payload), in arrival order
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.dropped = 0


def relay(one: Side, two: Side, delay: float, limit: int, stop: list[bool]) -> None:
    """Move datagrams between the sides until ``stop[0]``; a constant delay keeps each
    queue in due order, so only its head is ever looked at."""
    selector = selectors.DefaultSelector()
    selector.register(one.sock, selectors.EVENT_READ, two)   # from one's peer -> two's peer
    selector.register(two.sock, selectors.EVENT_READ, one)
    while not stop[0]:
        now = time.monotonic()
        for side in (one, two):
            while side.queue and side.queue[0][0] <= now:
                _, payload = side.queue.popleft()
                try:
                    side.sock.sendto(payload, side.peer)
                except OSError:  # link down, or the qdisc full: the datagram is lost
                    side.dropped += 1
        heads = [side.queue[0][0] for side in (one, two) if side.queue]
        timeout = max(0.0, min(heads) - time.monotonic()) if heads else 0.5
        for key, _ in selector.select(timeout):
            target: Side = key.data
            source: socket.socket = key.fileobj  # type: ignore[assignment]
            due = time.monotonic() + delay
            for _ in range(64):  # drain a burst, but let due datagrams out in between
                try:
                    payload, _sender = source.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if len(target.queue) >= limit:
                    target.dropped += 1
                    continue
                target.queue.append((due, payload))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay", type=float, required=True, help="seconds added to each direction")
    parser.add_argument("--queue", type=int, default=20000, help="datagrams queued per direction at most")
    parser.add_argument("side1", help="LISTEN=PEER, e.g. 198.18.100.2:51820=198.18.100.1:51820")
    parser.add_argument("side2", help="LISTEN=PEER for the other side")
    args = parser.parse_args(argv)
    sides = []
    for text in (args.side1, args.side2):
        listen, _, peer = text.partition("=")
        sides.append(Side(address(listen), address(peer)))
    stop = [False]

    def request_stop(_signum: int, _frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print(f"udp_delay: {args.side1} <-> {args.side2}, {args.delay * 1000:.0f} ms each way", flush=True)
    relay(sides[0], sides[1], args.delay, args.queue, stop)
    print(f"udp_delay: stopped; dropped {sides[1].dropped} towards side 2, "
          f"{sides[0].dropped} towards side 1", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
