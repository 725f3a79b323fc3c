"""The benchmark's delay proxy (tests/bench/delay_proxy.py): bytes pass unchanged both
ways, and each direction is late by at least the set delay (a lower bound only)."""

from __future__ import annotations

import asyncio
import os
import time

from tests.bench.delay_proxy import serve
from tests.helpers import free_port

DELAY = 0.05
TIMEOUT = 60


async def _exchange(payload: bytes, reply: bytes) -> tuple[bytes, bytes, float, float]:
    """Client → proxy → server gets ``payload``; server answers ``reply`` after reading it all."""
    got_at_server = bytearray()
    server_done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got_at_server.extend(await reader.readexactly(len(payload)))
        server_done.set()
        writer.write(reply)
        await writer.drain()
        writer.write_eof()
        await reader.read()  # until the client's half-close arrives
        writer.close()

    target = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    listen, ready = free_port(), asyncio.Event()
    proxy = asyncio.create_task(serve(listen, "127.0.0.1", port, DELAY, ready))
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        start = time.monotonic()
        writer.write(payload)
        await writer.drain()
        await asyncio.wait_for(server_done.wait(), TIMEOUT)
        one_way = time.monotonic() - start
        back = await asyncio.wait_for(reader.readexactly(len(reply)), TIMEOUT)
        round_trip = time.monotonic() - start
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        return bytes(got_at_server), back, one_way, round_trip
    finally:
        proxy.cancel()
        target.close()


def test_bytes_unchanged_both_ways_and_delayed() -> None:
    payload, reply = os.urandom(3 * 1024 * 1024 + 17), os.urandom(200_001)
    at_server, at_client, one_way, round_trip = asyncio.run(_exchange(payload, reply))
    assert at_server == payload
    assert at_client == reply
    assert one_way >= DELAY
    assert round_trip >= 2 * DELAY
