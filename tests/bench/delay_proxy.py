"""A TCP proxy that delays each direction by a set time, without limiting throughput.

    .venv/bin/python -m tests.bench.delay_proxy --delay 0.02 --target 127.0.0.1:11112 11113

A stand-in for a wide-area link in the benchmark (``--wan-delay``): each chunk read is
stamped on arrival and written when its time is due, so a chunk is late by the delay but
the next chunk is read at once (a queue, not a stop-and-wait) — the link has latency,
not a bandwidth cap. The kernel's ``netem`` would do this, but it is not available here;
bandwidth caps, where wanted, come from ``tc … tbf`` (README "Performance").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

CHUNK = 256 * 1024


async def _read(reader: asyncio.StreamReader, queue: asyncio.Queue, delay: float) -> None:
    """Stamp each chunk with the time it is due; ``b""`` (end of stream) is due too."""
    while True:
        try:
            data = await reader.read(CHUNK)
        except (ConnectionError, OSError):
            data = b""
        queue.put_nowait((time.monotonic() + delay, data))
        if not data:
            return


async def _write(writer: asyncio.StreamWriter, queue: asyncio.Queue) -> None:
    """Write each chunk when due; at the end of stream half-close, as the sender did."""
    try:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        return


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    await asyncio.gather(_read(reader, queue, delay), _write(writer, queue))


async def _connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                      host: str, port: int, delay: float) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_pipe(client_r, server_w, delay), _pipe(server_r, client_w, delay))
    finally:
        for w in (client_w, server_w):
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()


async def serve(listen_port: int, host: str, port: int, delay: float,
                ready: asyncio.Event | None = None) -> None:
    """Accept on 127.0.0.1:``listen_port`` and relay each connection to ``host:port``."""
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, host, port, delay), "127.0.0.1", listen_port)
    async with server:
        if ready is not None:
            ready.set()
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.delay_proxy",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--delay", type=float, required=True, help="seconds added to each direction")
    parser.add_argument("--target", required=True, help="host:port to relay to")
    parser.add_argument("port", type=int, help="port to listen on (127.0.0.1)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, host, int(port), args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
