#!/usr/bin/env python3
"""A yardstick, not a gateway: the floor proxy plus only the work every gateway request needs.

    python bench/floor_gateway.py LISTEN_PORT UPSTREAM_PORT

Per request, on the floor's streams, pool and relay (floor_proxy.py): the request head parsed
into a dict of headers, the gateway token checked in constant time, the JSON body parsed for its
model, the channel looked up by model, the upstream request written with the channel's key in
place of the token, the answer's head parsed, a whole answer parsed for its usage, and one usage
row queued for an SQLite writer thread that inserts in batches. No limits, fallback, affinity,
conversion, record escaping, strictness checks or error handling: what it costs is what the
gateway's request path could cost at least, measured the same way (count_instructions.py server
bench/floor_gateway.py). Bench use only: it trusts both peers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import sqlite3
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gateway import TOKEN                           # noqa: E402
from floor_proxy import MAX_HEAD, Pool, relay_chunked, run_floor   # noqa: E402

CHANNELS = {"bench-model": "sk-upstream"}                 # model -> the channel's key
ROWS: queue.SimpleQueue = queue.SimpleQueue()


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head[:-4].decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.lower()] = value.strip()
    return lines[0], fields


def writer_thread() -> None:
    db = sqlite3.connect(os.path.join(tempfile.mkdtemp(), "usage.db"))
    db.execute("CREATE TABLE requests (time REAL, model TEXT, input INTEGER, output INTEGER)")
    while True:
        rows = [ROWS.get()]
        time.sleep(0.5)                   # a batch of what came meanwhile, as the gateway does
        while not ROWS.empty():
            rows.append(ROWS.get())
        db.executemany("INSERT INTO requests VALUES (?, ?, ?, ?)", rows)
        db.commit()


async def handle(pool: Pool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    token = TOKEN.encode()
    try:
        while True:                     # a client that closes between requests ends it below
            line, fields = parse_head(await reader.readuntil(b"\r\n\r\n"))
            body = await reader.readexactly(int(fields.get("content-length") or 0))
            given = fields.get("authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, token):
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                continue
            obj = json.loads(body)
            key = CHANNELS[obj["model"]]
            method, target, _ = line.split(" ", 2)
            up_r, up_w = await pool.get()
            up_w.write(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            rhead = await up_r.readuntil(b"\r\n\r\n")
            status, rfields = parse_head(rhead)
            usage: dict = {}
            if rfields.get("transfer-encoding") == "chunked":
                writer.write(rhead)
                await relay_chunked(up_r, writer)
            else:
                answer = await up_r.readexactly(int(rfields.get("content-length") or 0))
                usage = json.loads(answer).get("usage") or {}
                writer.write(f"{status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)
                await writer.drain()
            pool.put((up_r, up_w))
            ROWS.put((time.time(), obj["model"], usage.get("prompt_tokens"),
                      usage.get("completion_tokens")))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return
    finally:
        writer.close()


async def serve(listen_port: int, upstream_port: int) -> None:
    threading.Thread(target=writer_thread, daemon=True).start()
    pool = Pool(upstream_port)
    server = await asyncio.start_server(lambda r, w: handle(pool, r, w), "127.0.0.1",
                                        listen_port, limit=MAX_HEAD)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    run_floor(serve)
