#!/usr/bin/env python3
"""The floor: a minimal stdlib asyncio-streams reverse proxy, passthrough only.

    python bench/floor_proxy.py LISTEN_PORT UPSTREAM_PORT

Keep-alive on both sides, a pool of idle upstream connections, bodies framed by Content-Length
or relayed chunk by chunk as they arrive; no routing, no JSON, no auth.  The benchmark runs it
beside the gateway so that every gateway figure reads as a ratio to the best a stdlib asyncio
proxy does on the same machine.  Bench use only: it trusts both peers.

FLOOR_SPIN_US=N makes it spend N microseconds of CPU on each request (a busy loop), so that it
serves at a slower server's rate: what its own work then costs, less the N, is what the same
I/O costs at that rate (the benchmark's "floor at the gateway's rate" rows).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from typing import Awaitable, Callable

MAX_HEAD = 64 * 1024            # bytes of one request or response head
MAX_IDLE = 64                   # idle upstream connections kept in the pool
SPIN = float(os.environ.get("FLOOR_SPIN_US") or 0) / 1e6   # CPU seconds spent on each request


def content_length(head: bytes) -> int:
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        return 0
    j = head.find(b"\r\n", i + 2)
    return int(head[i + 17:j if j > 0 else len(head)])


class Pool:
    def __init__(self, port: int):
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
        return await asyncio.open_connection("127.0.0.1", self.port)

    def put(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        if len(self.idle) < MAX_IDLE:
            self.idle.append(conn)
        else:
            conn[1].close()


async def relay_chunked(up: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
    """Copy a chunked body as it arrives: whatever one read returns is written (and drained)
    at once; the chunk sizes are parsed only to find the body's end."""
    tail = b""                  # an unfinished size line
    skip = 0                    # bytes of chunk data and its CRLF still to pass
    last = False                # the zero-size chunk was seen; its CRLF ends the body
    while True:
        data = await up.read(65536)
        if not data:
            raise ConnectionError("upstream closed mid-body")
        client.write(data)
        buf, i = tail + data, 0
        tail = b""
        while True:
            take = min(skip, len(buf) - i)
            i, skip = i + take, skip - take
            if skip:
                break
            if last:
                await client.drain()
                return
            eol = buf.find(b"\r\n", i)
            if eol < 0:
                tail = buf[i:]
                break
            size = int(buf[i:eol].split(b";", 1)[0], 16)
            i, skip, last = eol + 2, size + 2, size == 0
        await client.drain()


async def handle(pool: Pool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            low = head.lower()
            body = await reader.readexactly(content_length(low))
            if SPIN:
                spin_until = time.thread_time() + SPIN
                while time.thread_time() < spin_until:
                    pass
            up_r, up_w = await pool.get()
            up_w.write(head + body)
            rhead = await up_r.readuntil(b"\r\n\r\n")
            rlow = rhead.lower()
            writer.write(rhead)
            if b"\r\ntransfer-encoding: chunked" in rlow:
                await relay_chunked(up_r, writer)
            else:
                writer.write(await up_r.readexactly(content_length(rlow)))
                await writer.drain()
            if b"\r\nconnection: close" in rlow:
                up_w.close()
            else:
                pool.put((up_r, up_w))
            if b"\r\nconnection: close" in low:
                return
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return
    finally:
        writer.close()


async def serve(listen_port: int, upstream_port: int) -> None:
    pool = Pool(upstream_port)
    server = await asyncio.start_server(lambda r, w: handle(pool, r, w), "127.0.0.1",
                                        listen_port, limit=MAX_HEAD)
    async with server:
        await server.serve_forever()


def run_floor(serve: Callable[[int, int], Awaitable[None]]) -> None:
    """``serve(LISTEN_PORT, UPSTREAM_PORT)`` from the command line, with the garbage collector
    set as the gateway's run command sets it (aigateway.tune_collector)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run_floor(serve)
