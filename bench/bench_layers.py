#!/usr/bin/env python3
"""What the gateway's two HTTP layers cost on their own, against the least that does the same.

    python bench/bench_layers.py [--requests 5000] [--rounds 7] [--ablate]

One process, one core, no gateway logic: sequential keep-alive requests of the benchmark's
non-streaming chat (its request body, its 1 KB answer) between an ``asyncio.Protocol`` peer and

- **server**: the gateway's ``HTTPServer`` with a handler that returns the answer at once, against
  a minimal asyncio-streams server (``readuntil`` the head, a dict of its fields, ``readexactly``
  the body, one write of the answer);
- **client**: the gateway's ``UpstreamClient`` (``request`` and ``read``, pooled), against a
  minimal asyncio-streams client on one kept connection (one write, ``readuntil``, a dict of the
  head's fields, ``readexactly``).

The peer's own work is the same in both columns of a row, so the difference is what the layer
adds: its limits, timeouts, framing checks and objects. CPU per request (``process_time``) is the
median of the rounds, each the two columns alternately; the figures are for reading the
non-streaming row of bench_gateway.py: how much of the gateway's CPU per request a rewrite of its
HTTP layers could take away at most, and how much is the gateway's own work in between.

``--ablate`` then splits that work: the gateway row again with one feature stubbed out in the
running gateway at a time (and all of them at once), each round the stubbed run next to an
unstubbed one, printing what each stub saves a request. A stub only shows what a feature costs; the
stubbed gateway does not do its job (no token checked, no record kept, a non-strict parse).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import json
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import aigateway as ag                  # noqa: E402
import bench_gateway as bg              # noqa: E402

ANSWER = bg.COMPLETION
BODY = b'{"model":"bench-model","max_tokens":1024,"stream":false,' \
       b'"messages":[{"role":"user","content":"Say something."}]}'
FIELDS = [("Authorization", f"Bearer {bg.TOKEN}"), ("Content-Type", "application/json"),
          ("User-Agent", "OpenAI/Python 1.99"), ("Accept", "application/json")]
REQUEST = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           + "".join(f"{n}: {v}\r\n" for n, v in FIELDS)
           + f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
RESPONSE = (b"HTTP/1.1 200 OK\r\nDate: Wed, 02 Dec 2026 00:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(ANSWER), ANSWER))


def _framed(buf: bytes) -> int:
    """Bytes of the first whole message (head and Content-Length body) in ``buf``, or 0."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    at = buf.lower().find(b"content-length:", 0, end)
    size = int(buf[at + 15:buf.index(b"\r\n", at)]) if at >= 0 else 0
    return end + 4 + size if len(buf) >= end + 4 + size else 0


class Load(asyncio.Protocol):
    """The client peer of the server row: the next request once the answer is whole."""

    def __init__(self, n: int, done: asyncio.Future):
        self.n, self.done, self.buf = n, done, b""

    def connection_made(self, transport):
        self.transport = transport
        transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (size := _framed(self.buf)):
            self.buf = self.buf[size:]
            self.n -= 1
            if self.n:
                self.transport.write(REQUEST)
            else:
                self.transport.close()
                self.done.set_result(None)


class Upstream(asyncio.Protocol):
    """The upstream peer of the client row: the answer to each whole request."""

    def connection_made(self, transport):
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (size := _framed(self.buf)):
            self.buf = self.buf[size:]
            self.transport.write(RESPONSE)


def head_fields(head: bytes) -> dict[str, str]:
    fields = {}
    for line in head[:-4].decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        fields[name.lower()] = value.strip()
    return fields


async def minimal_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            fields = head_fields(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(int(fields.get("content-length") or 0))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def minimal_proxy(up_port: int, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    """The two minimal layers joined: each request forwarded on this connection's own
    upstream connection, the answer read whole and written back (the floor's shape)."""
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", up_port)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(int(head_fields(head).get("content-length") or 0))
            up_writer.write(head + body)
            await up_writer.drain()
            up_head = await up_reader.readuntil(b"\r\n\r\n")
            answer = await up_reader.readexactly(int(head_fields(up_head)["content-length"]))
            writer.write(up_head + answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        up_writer.close()


def gateway_config(tmp: str, up_port: int) -> str:
    path = os.path.join(tmp, "config.json")
    with open(path, "w") as f:
        json.dump({"channels": [{"name": "bench", "type": "openai", "models": ["bench-model"],
                                 "base_url": f"http://127.0.0.1:{up_port}",
                                 "api_key": "sk-upstream"}],
                   "tokens": [{"name": "bench", "key": bg.TOKEN}]}, f)
    return path


async def answer(req: ag.Request) -> ag.Response:
    return ag.Response(200, [("Content-Type", "application/json")], ANSWER)


async def run_load(port: int, n: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    await loop.create_connection(lambda: Load(n, done), "127.0.0.1", port)
    await done


async def gateway_client(port: int, n: int, state: dict) -> None:
    client = state.setdefault("client", ag.UpstreamClient())
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    for _ in range(n):
        up = await client.request("POST", url, list(FIELDS), BODY)
        await up.read()


async def minimal_client(port: int, n: int, state: dict) -> None:
    if "conn" not in state:
        state["conn"] = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = state["conn"]
    head = "".join(f"{name}: {value}\r\n" for name, value in FIELDS)
    for _ in range(n):
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}"
                     f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        await writer.drain()
        fields = head_fields(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(int(fields["content-length"]))


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    server = ag.HTTPServer(answer, lambda head, exc: ag.Response(500),
                           max_body=lambda: ag.DEFAULT_MAX_BODY_MB * 1024 * 1024)
    await server.start("127.0.0.1", 0)
    minimal = await asyncio.start_server(minimal_server, "127.0.0.1", 0)
    upstream = await loop.create_server(Upstream, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    tmp = tempfile.mkdtemp()
    store, _ = ag.ConfigStore.load(gateway_config(tmp, up_port))
    stop, ready = asyncio.Event(), loop.create_future()
    gateway = asyncio.create_task(ag.run_gateway(
        store, stop, host="127.0.0.1", port=0,
        on_ready=lambda gw, srv: ready.set_result((gw, srv.port))))
    gw, gw_port = await ready
    proxy = await asyncio.start_server(lambda r, w: minimal_proxy(up_port, r, w), "127.0.0.1", 0)
    gw_state: dict = {}
    min_state: dict = {}
    runs = {
        "server: HTTPServer": lambda n: run_load(server.port, n),
        "server: minimal": lambda n: run_load(minimal.sockets[0].getsockname()[1], n),
        "client: UpstreamClient": lambda n: gateway_client(up_port, n, gw_state),
        "client: minimal": lambda n: minimal_client(up_port, n, min_state),
        "proxy: gateway": lambda n: run_load(gw_port, n),
        "proxy: minimal": lambda n: run_load(proxy.sockets[0].getsockname()[1], n),
    }
    out: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():                  # warm-up, not counted
        await run(200)
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.process_time()
            await run(args.requests)
            out[name].append((time.process_time() - t0) / args.requests * 1e6)
    if args.ablate:
        out.update(await ablate(gw, lambda n: run_load(gw_port, n), args))
    await server.stop(0.1)
    stop.set()
    await gateway
    proxy.close()
    minimal.close()
    upstream.close()
    return out


def _stubs(gw) -> dict[str, dict[tuple[object, str], object]]:
    """Each feature's stubs: {(object, attribute): stand-in}, for ``--ablate``."""
    def finish(rec):
        gw.limits.release_slot(rec)
        rec.finished = True
    stubs = {
        "host and origin checks": {(gw.access, "check_host"): lambda req: None,
                                   (gw.access, "check_origin"): lambda req: None},
        "authentication (and the token's checks)": {(gw.access, "authenticate"): lambda req: None},
        "limits (rate, cooldowns)": {(gw.limits, "check_rpm"): lambda token: None,
                                     (gw.limits, "ready"): lambda ordered, rec=None: ordered},
        "strict JSON parse (plain json.loads)": {(ag, "json_loads"): lambda data, *a, **k:
                                                 json.loads(data)},
        "usage database (check and row)": {(gw, "usage"): None},
        "record's escaping": {(ag, "escape_record"): lambda rec: rec},
        "the whole record (_finish)": {(gw, "_finish"): finish},
    }
    stubs["all of the above"] = {k: v for group in list(stubs.values()) for k, v in group.items()}
    return stubs


async def ablate(gw, run, args: argparse.Namespace) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for name, stub in _stubs(gw).items():
        saved = {key: getattr(*key) for key in stub}
        for _ in range(args.rounds):
            for stubbed in (False, True):
                for (obj, attr), value in (stub if stubbed else saved).items():
                    setattr(obj, attr, value)
                t0 = time.process_time()
                await run(args.requests)
                out.setdefault((name, stubbed), []).append(
                    (time.process_time() - t0) / args.requests * 1e6)
        for (obj, attr), value in saved.items():
            setattr(obj, attr, value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ablate", action="store_true", help="split the gateway's own work")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    ag.tune_collector()
    out = asyncio.run(measure(args))
    med = {name: statistics.median(v) for name, v in out.items() if isinstance(name, str)}
    print(f"CPU per sequential request, one process on one core, median of {args.rounds} "
          f"rounds of {args.requests} (the peer's work included, the same in both columns)")
    print(f"{'layer':10s} {'gateway us':>11s} {'minimal us':>11s} {'added us':>9s} {'ratio':>6s}"
          f"   rounds (gateway)")
    rows = (("server", "server: HTTPServer", "server: minimal"),
            ("client", "client: UpstreamClient", "client: minimal"),
            ("proxy", "proxy: gateway", "proxy: minimal"))
    for layer, ours, least in rows:
        print(f"{layer:10s} {med[ours]:11.1f} {med[least]:11.1f} {med[ours] - med[least]:9.1f} "
              f"{med[ours] / med[least]:6.2f}   "
              + " ".join(f"{v:.0f}" for v in out[ours]))

    added = {layer: med[ours] - med[least] for layer, ours, least in rows}
    own = added["proxy"] - added["server"] - added["client"]
    print(f"of the {added['proxy']:.1f} us the gateway adds to a request: the server layer "
          f"{added['server']:.1f}, the client layer {added['client']:.1f}, the gateway's own "
          f"work between them (auth, routing, limits, the upstream request, the answer's "
          f"checks, the record) {own:.1f} us ({own / added['proxy'] * 100:.0f}%)")
    if args.ablate:
        print(f"\nthe gateway row with one feature stubbed out, median of {args.rounds} pairs "
              f"of rounds (each stubbed next to unstubbed)")
        print(f"{'stubbed out':42s} {'saves us':>9s} {'of own':>7s}   saved in each pair")
        for name in dict.fromkeys(key[0] for key in out if isinstance(key, tuple)):
            pairs = [a - b for a, b in zip(out[(name, False)], out[(name, True)])]
            print(f"{name:42s} {statistics.median(pairs):9.1f} "
                  f"{statistics.median(pairs) / own * 100:6.0f}%   "
                  + " ".join(f"{v:.0f}" for v in pairs))


if __name__ == "__main__":
    main()
