#!/usr/bin/env python3
"""The floor below the floor: the same passthrough proxy as floor_proxy.py on asyncio.Protocol
callbacks instead of asyncio streams.

    python bench/floor_protocol.py LISTEN_PORT UPSTREAM_PORT

Keep-alive on both sides, a pool of idle upstream connections, bodies framed by Content-Length
or relayed chunk by chunk as they arrive (each upstream read is written to the client from the
read callback itself, with no task, future or await in between); no routing, no JSON, no auth.
The gateway's design is fixed on asyncio streams, so this is not a design it could take: the
benchmark runs it to show what a stdlib asyncio proxy could do at all on the machine. Bench use
only: it trusts both peers and has no flow control (a client that stops reading grows its
transport's buffer).
"""

from __future__ import annotations

import asyncio

from floor_proxy import MAX_HEAD, MAX_IDLE, content_length, run_floor  # the same rules


class Upstream(asyncio.Protocol):
    """One pooled upstream connection; relays one response at a time to ``client``."""

    def __init__(self, pool: list["Upstream"]):
        self.pool, self.t, self.client = pool, None, None
        self.buf, self.head_done, self.chunked = b"", False, False
        self.left = 0               # Content-Length bytes still to relay
        self.skip, self.last = 0, False     # chunk data (and CRLF) still to pass; zero chunk seen

    def connection_made(self, transport):
        self.t = transport

    def start(self, client: "Client", request: bytes) -> None:
        self.client, self.buf, self.head_done = client, b"", False
        self.skip, self.last = 0, False
        self.t.write(request)

    def data_received(self, data):
        client = self.client
        if client is None:
            return
        if not self.head_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.t.close()
                return
            low = self.buf[:end + 4].lower()
            self.head_done = True
            self.chunked = b"\r\ntransfer-encoding: chunked" in low
            self.left = 0 if self.chunked else content_length(low)
            data, self.buf = self.buf, b""
            body = data[end + 4:]
        else:
            body = data
        client.t.write(data)
        if self.chunked:
            if self._chunks_end(body):
                self._done()
        else:
            self.left -= len(body)
            if self.left <= 0:
                self._done()

    def _chunks_end(self, data: bytes) -> bool:
        """Walks the chunk sizes of what one read brought; True at the body's end."""
        buf, i = self.buf + data, 0
        self.buf = b""
        while True:
            take = min(self.skip, len(buf) - i)
            i, self.skip = i + take, self.skip - take
            if self.skip:
                return False
            if self.last:
                return True
            eol = buf.find(b"\r\n", i)
            if eol < 0:
                self.buf = buf[i:]
                return False
            size = int(buf[i:eol].split(b";", 1)[0], 16)
            i, self.skip, self.last = eol + 2, size + 2, size == 0

    def _done(self) -> None:
        client, self.client = self.client, None
        if len(self.pool) < MAX_IDLE:
            self.pool.append(self)
        else:
            self.t.close()
        client.next()

    def connection_lost(self, exc):
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.t.close()


class Client(asyncio.Protocol):
    """One client connection: reads a request (head and Content-Length body), hands it to a
    pooled upstream, reads the next once the answer has been relayed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int, pool: list[Upstream]):
        self.loop, self.port, self.pool = loop, port, pool
        self.buf, self.busy, self.t = b"", False, None

    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self.next()

    def next(self) -> None:
        self.busy = False
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        n = end + 4 + content_length(self.buf[:end + 4].lower())
        if len(self.buf) < n:
            return
        request, self.buf = self.buf[:n], self.buf[n:]
        self.busy = True
        while self.pool:
            up = self.pool.pop()
            if not up.t.is_closing():
                up.start(self, request)
                return
        self.loop.create_task(self._connect(request))

    async def _connect(self, request: bytes) -> None:
        try:
            _, up = await self.loop.create_connection(lambda: Upstream(self.pool), "127.0.0.1",
                                                      self.port)
        except OSError:
            self.t.close()
            return
        up.start(self, request)


async def serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    pool: list[Upstream] = []
    server = await loop.create_server(lambda: Client(loop, upstream_port, pool), "127.0.0.1",
                                      listen_port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    run_floor(serve)
