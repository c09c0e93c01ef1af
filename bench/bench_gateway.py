#!/usr/bin/env python3
"""Benchmark: aigateway against a direct call and against the floor proxy, in the same run.

    python bench/bench_gateway.py [--quick] [--no-hold] [--seconds 3] [--rounds 3]
                                  [--long-streams 1000] [--long-seconds 30]

Starts a fast fake upstream (asyncio, plain HTTP and TLS with a throw-away self-signed
certificate), the gateway (headless, as documented: ``python aigateway.py``) and the floor
(``bench/floor_proxy.py``, a minimal stdlib asyncio reverse proxy), and drives load from separate
processes. The gateway and the floor are pinned to core 0, the upstream and the load to the
others (where the OS allows it); all traffic is on 127.0.0.1. Each throughput figure is the
median of the rounds. It prints every target of issue 15 next to its figure, as ratios to the
floor and to the direct call; nothing here asserts a time. ``--quick`` is a smoke run (one short
round, 100 long streams for 3 s).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# The load generator's and the upstream's socket reads: 64 KiB, not asyncio's 256 KiB. A buffer
# that large is above glibc's mmap threshold, so until the process has freed a larger block
# (which raises the threshold) every read maps and unmaps one: 25-35 us a read here, more than
# the load generator's own work per event. (The gateway and the floor do not pay it: strace
# counts no mmap on their reads, each having freed a larger block as it started.)
asyncio.selector_events._SelectorSocketTransport.max_size = 64 * 1024

HERE = os.path.dirname(os.path.abspath(__file__))
GATEWAY = os.path.join(os.path.dirname(HERE), "aigateway.py")
FLOOR = os.path.join(HERE, "floor_proxy.py")
FLOOR_PROTOCOL = os.path.join(HERE, "floor_protocol.py")
COLUMNS = ("direct", "floor", "protocol", "gateway")     # "protocol": floor_protocol.py
TOKEN = "sk-gw-bench-token-0123456789"
MIB = 1024 * 1024
DELAY_BUCKET_US = 100           # per-event delay histogram resolution
DELAY_BUCKETS = 20_000          # up to 2 s; later events count in the last bucket
LONG_OPEN_BATCH = 100           # long-stream connections opened at once

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "bench-model", "system_fingerprint": "fp_bench",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
        "role": "assistant", "refusal": None,
        "content": "The quick brown fox jumps over the lazy dog. " * 6}}],
    "usage": {"prompt_tokens": 21, "completion_tokens": 60, "total_tokens": 81}}).encode()


def sse(obj: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def openai_chunk(i: int, t: float | None = None) -> bytes:
    """A text chunk shaped as api.openai.com streams it: service tier, fingerprint, logprobs and,
    after the choices, the random "obfuscation" padding every delta carries by default
    (stream_options.include_obfuscation); a paced one (``t``) carries its index and send time."""
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "bench-model", "service_tier": "default", "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None,
                         "finish_reason": None}]}
    if t is not None:
        body["i"], body["t"] = i, t
    else:
        body["obfuscation"] = "Zq8xLw3Rk"[:i % 9 + 1]
    return sse(body)


OPENAI_EVENTS = [openai_chunk(i) for i in range(199)] + [b"data: [DONE]\n\n"]
ANTHROPIC_EVENTS = [
    sse({"type": "message_start", "message": {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-bench",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 21, "output_tokens": 1}}}, "message_start"),
    sse({"type": "content_block_start", "index": 0,
         "content_block": {"type": "text", "text": ""}}, "content_block_start"),
    *[sse({"type": "content_block_delta", "index": 0,
           "delta": {"type": "text_delta", "text": f"tok{i} "}}, "content_block_delta")
      for i in range(196)],
    sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 196}}, "message_delta"),
    sse({"type": "message_stop"}, "message_stop")]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def burst(events: list[bytes]) -> bytes:
    return b"".join(chunk(ev) for ev in events) + b"0\r\n\r\n"


OPENAI_BURST, ANTHROPIC_BURST = burst(OPENAI_EVENTS), burst(ANTHROPIC_EVENTS)
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


# -- fake upstream ----------------------------------------------------------------------------

TICK = 0.001                    # the paced streams' clock: one wake-up per millisecond
# One paced event, as openai_chunk(i, t) writes it, filled in with % (i, i, t): cheap enough
# that the upstream is never the bottleneck at 50,000 events a second.
PACED_EVENT = openai_chunk(0, 0.5).replace(b"tok0 ", b"tok%d ").replace(
    b'"i":0,"t":0.5', b'"i":%d,"t":%.6f')


class Ticker:
    """Every paced stream of one pace on one clock that wakes each millisecond and writes the
    events that are due. A stream's events are due one pace apart from when its request came,
    so independent streams do not send in lockstep, as independent model streams do not; a
    request with ``"sync": true`` joins the lockstep slot instead (every such stream writes in
    the same millisecond: the burst case)."""
    tickers: dict[float, "Ticker"] = {}

    def __init__(self, pace: float):
        self.pace = pace
        self.slots: list[list[PacedStream]] = [[] for _ in range(max(1, round(pace / TICK)))]
        self.now = 0                # index of the slot written at the last wake-up
        self.count = 0
        asyncio.ensure_future(self.run())

    @classmethod
    def add(cls, pace: float, stream: "PacedStream", sync: bool = False) -> None:
        ticker = cls.tickers.get(pace)
        if ticker is None:
            ticker = cls.tickers[pace] = Ticker(pace)
        slot = 0 if sync else (ticker.now + 1) % len(ticker.slots)
        ticker.slots[slot].append(stream)
        ticker.count += 1

    async def run(self):
        due = time.perf_counter()
        while self.count:
            due += TICK
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            self.now = (self.now + 1) % len(self.slots)
            slot = self.slots[self.now]
            if slot:
                kept = [s for s in slot if s.step()]
                self.count -= len(slot) - len(kept)
                self.slots[self.now] = kept
        del Ticker.tickers[self.pace]


class PacedStream:
    def __init__(self, transport, events: int):
        self.t, self.i, self.n = transport, 0, events

    def step(self) -> bool:
        if self.t.is_closing():
            return False
        if self.i < self.n:
            data = PACED_EVENT % (self.i, self.i, time.perf_counter())
            self.t.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.i += 1
            return True
        self.t.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        return False


class UpstreamProtocol(asyncio.Protocol):
    tls_connections = 0

    def __init__(self, tls: bool = False):
        self.tls = tls

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""
        if self.tls:
            UpstreamProtocol.tls_connections += 1

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            j = head.find(b"\r\n", i)
            n = int(head[i + 15:j if j > 0 else len(head)]) if i >= 0 else 0
            if len(self.buf) < end + 4 + n:
                return
            body = self.buf[end + 4:end + 4 + n]
            self.buf = self.buf[end + 4 + n:]
            self.answer(head, body)

    def answer(self, head: bytes, body: bytes) -> None:
        if head.startswith(b"get /stats"):
            out = json.dumps({"tls_connections": UpstreamProtocol.tls_connections}).encode()
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(out), out))
            self.t.close()
        elif b'"stream":true' not in body:
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(COMPLETION), COMPLETION))
        elif b'"pace_ms"' not in body:
            anthropic = head.startswith(b"post /v1/messages")
            self.t.write(STREAM_HEAD + (ANTHROPIC_BURST if anthropic else OPENAI_BURST))
        else:
            req = json.loads(body)
            # "nagle": a server that never sets TCP_NODELAY (asyncio sets it on every
            # transport), whose small writes each wait for the ACK of the one before; set per
            # request, as a pooled connection may carry either kind
            self.t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                                       0 if req.get("nagle") else 1)
            self.t.write(STREAM_HEAD)
            Ticker.add(req["pace_ms"] / 1000, PacedStream(self.t, req["events"]),
                       bool(req.get("sync")))


def run_upstream(port: int, tls_port: int, cert: str, key: str) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        plain = await loop.create_server(UpstreamProtocol, "127.0.0.1", port, backlog=2048)
        tls = await loop.create_server(lambda: UpstreamProtocol(tls=True), "127.0.0.1",
                                       tls_port, ssl=ctx, backlog=2048)
        async with plain, tls:
            await asyncio.gather(plain.serve_forever(), tls.serve_forever())
    asyncio.run(main())


# -- load generator ----------------------------------------------------------------------------

class ClientProtocol(asyncio.Protocol):
    """Sends the same request again and again on one keep-alive connection until the deadline;
    records each latency and, for streams, the time to the first event."""

    def __init__(self, request: bytes, deadline: float, stats: dict, done: asyncio.Future):
        self.request, self.deadline, self.stats, self.done = request, deadline, stats, done
        self.buf = b""

    def connection_made(self, transport):
        self.t = transport
        self.send()

    def send(self):
        self.t0 = time.perf_counter()
        self.first = None
        self.buf = b""
        self.t.write(self.request)

    def data_received(self, data):
        self.buf += data
        if self.first is None and b"data:" in data:
            self.first = time.perf_counter()
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        if b"transfer-encoding: chunked" in head:
            if not self.buf.endswith(b"0\r\n\r\n"):
                return
        else:
            i = head.find(b"content-length:")
            j = head.find(b"\r\n", i)
            n = int(head[i + 15:j if j > 0 else len(head)])
            if len(self.buf) < end + 4 + n:
                return
        if not self.buf.startswith(b"HTTP/1.1 200"):
            if not self.done.done():
                self.done.set_exception(RuntimeError(self.buf[:300].decode("latin-1")))
            self.t.close()
            return
        now = time.perf_counter()
        self.stats["lat"].append(now - self.t0)
        if self.first is not None:
            self.stats["ttfb"].append(self.first - self.t0)
        if now < self.deadline:
            self.send()
        else:
            self.t.close()
            if not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(None)


def request_bytes(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"x-api-key: {TOKEN}\r\nanthropic-version: 2023-06-01\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def run_load(port: int, path: str, body: bytes, concurrency: int, seconds: float) -> dict:
    request = request_bytes(path, body)

    async def main():
        loop = asyncio.get_running_loop()
        stats: dict[str, list[float]] = {"lat": [], "ttfb": []}
        deadline = time.perf_counter() + seconds
        futs = []
        t0 = time.perf_counter()
        for _ in range(concurrency):
            fut = loop.create_future()
            await loop.create_connection(lambda f=fut: ClientProtocol(request, deadline, stats, f),
                                         "127.0.0.1", port)
            futs.append(fut)
        await asyncio.gather(*futs)
        elapsed = time.perf_counter() - t0
        lat = sorted(stats["lat"])
        return {"requests": len(lat), "rps": len(lat) / elapsed,
                "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
                "ttfb_ms": statistics.median(stats["ttfb"]) * 1000 if stats["ttfb"] else None}
    return asyncio.run(main())


_EVENT = re.compile(rb'"i":(\d+),"t":([0-9.e+-]+)')


class LongStream(asyncio.Protocol):
    """One paced stream: de-chunks the body, checks that the events arrive complete and in order
    (0, 1, 2, ... then [DONE]) and records each event's delay since the upstream wrote it; events
    the upstream wrote once every stream had its first event are also counted in ``ramp``'s
    steady histogram (the ramp-up, when the gateway sets up every stream at once, left out)."""

    def __init__(self, events: int, hist: list[int], done: asyncio.Future, request: bytes,
                 ramp: dict):
        self.events, self.hist, self.done, self.request = events, hist, done, request
        self.ramp = ramp
        self.raw = b""
        self.body = b""
        self.head_done = False
        self.next = 0
        self.exact = True
        self.finished = False

    def connection_made(self, transport):
        self.t = transport
        transport.write(self.request)

    def data_received(self, data):
        now = time.perf_counter()
        self.raw += data
        if not self.head_done:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.raw.startswith(b"HTTP/1.1 200"):
                self.exact = False
            self.head_done, self.raw = True, self.raw[end + 4:]
        while True:                                   # de-chunk what is complete
            eol = self.raw.find(b"\r\n")
            if eol < 0:
                break
            size = int(self.raw[:eol].split(b";")[0], 16)
            if len(self.raw) < eol + 2 + size + 2:
                break
            self.body += self.raw[eol + 2:eol + 2 + size]
            self.raw = self.raw[eol + 4 + size:]
            if size == 0:
                self.finished = True
                break
        while True:
            end = self.body.find(b"\n\n")
            if end < 0:
                break
            event, self.body = self.body[:end], self.body[end + 2:]
            m = _EVENT.search(event)
            if m is None:
                if event.strip() == b"data: [DONE]" and self.next != self.events:
                    self.exact = False
                continue
            if int(m.group(1)) != self.next:
                self.exact = False
            if self.next == 0:
                self.ramp["waiting"] -= 1
                if self.ramp["waiting"] == 0:
                    self.ramp["since"] = now
            self.next += 1
            sent = float(m.group(2))
            bucket = min(max(int((now - sent) * 1e6) // DELAY_BUCKET_US, 0), DELAY_BUCKETS - 1)
            self.hist[bucket] += 1
            if sent >= self.ramp["since"]:
                self.ramp["hist"][bucket] += 1
        if self.finished:
            self.t.close()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(self.finished and self.exact and self.next == self.events)


def percentile(hist: list[int], q: float) -> float:
    """The q-quantile in ms of a delay histogram."""
    total, seen = sum(hist), 0
    for i, n in enumerate(hist):
        seen += n
        if total and seen >= q * total:
            return (i + 0.5) * DELAY_BUCKET_US / 1000
    return float("nan")


def run_long(port: int, path: str, streams: int, events: int, pace_ms: int,
             sync: bool = False) -> dict:
    body = json.dumps({"model": "bench-model", "stream": True, "pace_ms": pace_ms,
                       "events": events, "sync": sync,
                       "messages": [{"role": "user", "content": "Long."}]},
                      separators=(",", ":")).encode()
    request = request_bytes(path, body)

    async def main():
        loop = asyncio.get_running_loop()
        hist = [0] * DELAY_BUCKETS
        ramp = {"waiting": streams, "since": float("inf"), "hist": [0] * DELAY_BUCKETS}
        futs, transports = [], []

        async def open_one():
            fut = loop.create_future()
            tr, _ = await loop.create_connection(
                lambda: LongStream(events, hist, fut, request, ramp), "127.0.0.1", port)
            futs.append(fut)
            transports.append(tr)
        t0, c0 = time.perf_counter(), time.process_time()
        # opened LONG_OPEN_BATCH at a time: one after another, a connect waits its turn behind
        # the events of the streams already running, and the ramp-up measures the load generator
        for i in range(0, streams, LONG_OPEN_BATCH):
            await asyncio.gather(*(open_one() for _ in range(min(LONG_OPEN_BATCH, streams - i))))
        # bounded: a stream still open a minute past its length counts as not exact
        await asyncio.wait(futs, timeout=events * pace_ms / 1000 + 60)
        elapsed = time.perf_counter() - t0
        for tr in transports:
            tr.abort()
        ok = [f.done() and f.result() for f in futs]
        return {"streams": streams, "exact": sum(ok), "p50_ms": percentile(hist, 0.5),
                "client_cpu_share": (time.process_time() - c0) / elapsed,
                "p99_ms": percentile(hist, 0.99), "events": sum(hist), "seconds": elapsed,
                "p99_steady_ms": percentile(ramp["hist"], 0.99),
                "ramp_s": ramp["since"] - t0}
    return asyncio.run(main())


# -- orchestration -----------------------------------------------------------------------------

def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_health(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> float:
    """Seconds since now-ish until GET /health answers 200 (or, for the floor and the bare
    interpreter, until the port accepts a connection)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.perf_counter()
        except OSError:
            time.sleep(0.002)
    raise RuntimeError(f"{proc.args} did not start")


def pin(cores: set[int] | None):
    def setup():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
    return setup


def in_subprocess(func: str, args: tuple, cores: set[int] | None) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {HERE!r}); import bench_gateway as b; "
            f"print(json.dumps(b.{func}(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=pin(cores))
    if out.returncode:
        raise RuntimeError(f"{func}{args[:2]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def upstream_stats(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk_ := s.recv(65536):
            data += chunk_
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def gateway_imports() -> str:
    """The gateway's own top-level imports, as one line of code for the bare interpreter."""
    with open(GATEWAY, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names.append(node.module)
    return "import " + ", ".join(dict.fromkeys(names))


def make_cert(tmp: str) -> tuple[str, str]:
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


class Sampler(threading.Thread):
    """Samples a process's RSS every 100 ms until stopped; keeps the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self):
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, rss_mib(self.pid))


class Bench:
    def __init__(self, args):
        self.args = args
        ncpu = os.cpu_count() or 1
        self.ncpu = ncpu
        self.gw_cores = {0} if ncpu > 1 else None
        self.other = set(range(1, ncpu)) if ncpu > 1 else None
        self.tmp = tempfile.mkdtemp(prefix="aigw-bench-")
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], cores, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=pin(cores), env=env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def start_measured(self, argv: list[str], port: int, env: dict | None = None,
                       health: bool = True) -> tuple[subprocess.Popen, float, float]:
        """Starts a server; returns it, its start-up time (to /health 200, or to the first
        accepted connection) and its RSS once idle."""
        t0 = time.perf_counter()
        proc = self.spawn(argv, self.gw_cores, env)
        if health:
            t1 = wait_health(port, proc)
        else:
            t1 = wait_accept(port, proc)
        time.sleep(0.5)
        return proc, t1 - t0, rss_mib(proc.pid)

    def config(self, port: int, up: int, tls: int) -> str:
        cfg = os.path.join(self.tmp, f"config-{port}.json")
        with open(cfg, "w") as f:
            json.dump({"settings": {"port": port,
                                    "empty_answer_fallback": not self.args.no_hold},
                       "channels": [
                           {"name": "bench", "type": "openai", "models": ["bench-model"],
                            "base_url": f"http://127.0.0.1:{up}", "api_key": "sk-upstream"},
                           {"name": "bench-anthropic", "type": "anthropic",
                            "models": ["claude-bench"], "base_url": f"http://127.0.0.1:{up}",
                            "api_key": "sk-ant-upstream"},
                           {"name": "bench-tls", "type": "openai", "models": ["tls-model"],
                            "base_url": f"https://127.0.0.1:{tls}", "api_key": "sk-upstream"}],
                       "tokens": [{"name": "bench", "key": TOKEN}]}, f)
        return cfg

    def load(self, port: int, path: str, body: bytes, conc: int, pid: int,
             seconds: float | None = None) -> dict:
        c0 = cpu_seconds(pid) if pid else 0.0
        res = in_subprocess("run_load", (port, path, body, conc, seconds or self.args.seconds),
                            self.other)
        res["cpu_us"] = ((cpu_seconds(pid) - c0) / res["requests"] * 1e6) if pid else None
        return res

    def run(self) -> None:
        a = self.args
        self.load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        cert, key = make_cert(self.tmp)
        up, up_tls = free_port(), free_port()
        self.spawn([sys.executable, __file__, "--upstream", str(up), str(up_tls), cert, key],
                   self.other)
        env = dict(os.environ, SSL_CERT_FILE=cert, XDG_CACHE_HOME=os.path.join(self.tmp, "xdg"))
        env.pop("AIGATEWAY_NO_CACHE", None)
        fig: dict[str, float] = {}

        # start-up and idle memory: gateway (cold cache, then warm), without the cache, floor,
        # and a bare interpreter that makes the gateway's imports
        gw_port = free_port()
        gw_cmd = [sys.executable, GATEWAY, "--headless", "--quiet", "--config",
                  self.config(gw_port, up, up_tls)]
        proc, fig["start_cold"], _ = self.start_measured(gw_cmd, gw_port, env)
        self.stop(proc)
        starts, rsss = [], []
        for _ in range(3):
            proc, st, rss = self.start_measured(gw_cmd, gw_port, env)
            starts.append(st)
            rsss.append(rss)
            self.stop(proc)
        fig["start"], fig["idle_rss"] = statistics.median(starts), statistics.median(rsss)
        proc, fig["start_nocache"], fig["idle_rss_nocache"] = self.start_measured(
            gw_cmd, gw_port, dict(env, AIGATEWAY_NO_CACHE="1"))
        self.stop(proc)
        bare_port = free_port()
        bare = (f"{gateway_imports()}; import socket as _s; l = _s.socket(); "
                f"l.bind(('127.0.0.1', {bare_port})); l.listen(); import time; "
                f"[l.accept()[0].close() for _ in range(1000)]")
        proc, fig["start_bare"], fig["idle_rss_bare"] = self.start_measured(
            [sys.executable, "-c", bare], bare_port, env, health=False)
        self.stop(proc)
        fl_port = free_port()
        floor, fig["start_floor"], fig["idle_rss_floor"] = self.start_measured(
            [sys.executable, FLOOR, str(fl_port), str(up)], fl_port, env, health=False)
        pr_port = free_port()
        protocol, _, _ = self.start_measured(
            [sys.executable, FLOOR_PROTOCOL, str(pr_port), str(up)], pr_port, env, health=False)

        gw, _, _ = self.start_measured(gw_cmd, gw_port, env)
        targets = {"direct": (up, 0), "floor": (fl_port, floor.pid),
                   "protocol": (pr_port, protocol.pid), "gateway": (gw_port, gw.pid)}
        chat, msgs = "/v1/chat/completions", "/v1/messages"

        def body(model: str, stream: bool, **extra) -> bytes:
            return json.dumps({"model": model, "max_tokens": 1024, "stream": stream, **extra,
                               "messages": [{"role": "user", "content": "Say something."}]},
                              separators=(",", ":")).encode()
        c = a.concurrency
        phases = {
            "nonstream": [(t, chat, body("bench-model", False), c) for t in targets],
            "stream": [(t, chat, body("bench-model", True), c) for t in targets],
            "conv_o2a": [("gateway", msgs, body("bench-model", True), c)],
            "pass_anth": [("gateway", msgs, body("claude-bench", True), c)],
            "conv_a2o": [("gateway", chat, body("claude-bench", True), c)],
            "paced": [(t, chat, body("bench-model", True, pace_ms=2, events=500), 4)
                      for t in targets],
            "paced_nagle": [(t, chat, body("bench-model", True, pace_ms=2, events=500,
                                           nagle=True), 4) for t in targets],
            "tls": [("gateway", chat, body("tls-model", False), c)],
        }
        rounds: dict[tuple[str, str], list[dict]] = {}
        handshakes = []
        # warm-up, not counted: the first seconds of load run slow on this VM (a floor did 2,700
        # requests a second in its first two 3-second rounds, then 10,700-13,200)
        for port, _pid in targets.values():
            in_subprocess("run_load", (port, chat, body("bench-model", False), c, 2.0), self.other)
        for _ in range(a.rounds):
            for phase, runs in phases.items():
                for target, path, b, conc in runs:
                    port, pid = targets[target]
                    h0 = upstream_stats(up)["tls_connections"]
                    # a paced stream lasts 1 s: three times the phase's length gives each round
                    # ~36 first events to take the median of, not ~12
                    res = self.load(port, path, b, conc, pid,
                                    a.seconds * 3 if phase.startswith("paced") else None)
                    if phase == "tls":
                        hs = upstream_stats(up)["tls_connections"] - h0
                        handshakes.append((hs, hs / res["requests"] * 1000))
                    rounds.setdefault((phase, target), []).append(res)
        med = {k: {m: statistics.median(r[m] for r in v) if v[0][m] is not None else None
                   for m in v[0]} for k, v in rounds.items()}
        # per round: the pool's connections are made once, then reused (a round takes longer
        # than POOL_IDLE_TTL, so each round's first requests connect anew)
        most = max(handshakes)
        fig["handshakes_round"], fig["handshakes"] = most
        fig["busy_rss"] = rss_mib(gw.pid)

        # The floor made as slow as the gateway (FLOOR_SPIN_US: a busy loop on each request):
        # a send that wakes an idle peer costs the sender more than one that finds it busy, so
        # the same I/O costs more at a lower rate. Its CPU less the spin is what the floor's
        # work costs at the gateway's rate. The spin starts as the difference in CPU per
        # request and is corrected once by what the slowed floor then spent more or less than
        # the gateway (both keep their core busy, so equal CPU per request is an equal rate).
        for phase in ("nonstream", "stream"):
            gw_cpu = med[(phase, "gateway")]["cpu_us"]
            spin = max(0.0, gw_cpu - med[(phase, "floor")]["cpu_us"])
            b = body("bench-model", phase == "stream")
            for attempt in (0, 1):
                sl_port = free_port()
                slow, _, _ = self.start_measured([sys.executable, FLOOR, str(sl_port), str(up)],
                                                 sl_port, dict(env, FLOOR_SPIN_US=f"{spin:.1f}"),
                                                 health=False)
                in_subprocess("run_load", (sl_port, chat, b, c, 2.0), self.other)  # warm-up
                runs = [self.load(sl_port, chat, b, c, slow.pid) for _ in range(a.rounds)]
                self.stop(slow)
                cpu = statistics.median(r["cpu_us"] for r in runs)
                fig[f"slow_{phase}_rps"] = statistics.median(r["rps"] for r in runs)
                fig[f"slow_{phase}_cpu"], fig[f"slow_{phase}_spin"] = cpu - spin, spin
                if attempt == 0:
                    spin = max(0.0, spin - (cpu - gw_cpu))

        # many long streams, paced: direct (the baseline delay), the floor, then the gateway;
        # at the load and at a quarter of it (a load this machine's cores carry)
        events = int(a.long_seconds * 1000 / 20)
        light = max(1, a.long_streams // 4)
        long: dict[tuple[int, str], dict] = {}
        for streams, n_events in ((a.long_streams, events), (light, max(1, events // 3))):
            for target in COLUMNS:
                port, pid = targets[target]
                sampler = None
                if target == "gateway" and streams == a.long_streams:
                    fig["long_before_rss"] = rss_mib(pid)
                    sampler = Sampler(pid)
                    sampler.start()
                c0 = cpu_seconds(pid) if pid else 0.0
                res = in_subprocess("run_long", (port, chat, streams, n_events, 20,
                                                 a.long_sync), self.other)
                res["cpu_share"] = (cpu_seconds(pid) - c0) / res["seconds"] if pid else None
                res["n_events"] = n_events
                if sampler is not None:
                    sampler.stop.set()
                    sampler.join()
                    fig["long_peak_rss"] = sampler.peak
                long[(streams, target)] = res
        self.stop(floor)
        self.stop(protocol)
        self.stop(gw)
        self.report(fig, med, long, light)

    def report(self, fig, med, long, light) -> None:
        a = self.args
        print(f"aigateway benchmark  (python {sys.version.split()[0]}, {self.ncpu} cores, "
              f"gateway and floors pinned to {'core 0' if self.gw_cores else 'any core'}, "
              f"median of {a.rounds} round(s) of {a.seconds:g} s, {a.concurrency} clients)")
        print(f"{'row':<44}{''.join(f'{c:>10}' for c in COLUMNS)}")

        def row(label, key, metric, fmt="{:>10.0f}"):
            cells = []
            for t in COLUMNS:
                v = med.get((key, t), {}).get(metric)
                cells.append(fmt.format(v) if v is not None else f"{'':>10}")
            print(f"{label:<44}{''.join(cells)}")
        row("non-streaming req/s", "nonstream", "rps")
        row("non-streaming p50 ms", "nonstream", "p50_ms", "{:>10.3f}")
        row("non-streaming CPU us/req", "nonstream", "cpu_us")
        row("200-event SSE passthrough streams/s", "stream", "rps")
        row("200-event SSE passthrough CPU us/stream", "stream", "cpu_us")
        for phase, label in (("nonstream", "non-streaming"), ("stream", "passthrough")):
            rps, cpu = fig["slow_" + phase + "_rps"], fig["slow_" + phase + "_cpu"]
            spun = f"  its CPU us, less {fig['slow_' + phase + '_spin']:.0f} us spun"
            print(f"{label + ', floor at the gateway rate: /s':<44}{'':>10}{rps:>10.0f}")
            print(f"{spun:<44}{'':>10}{cpu:>10.0f}")
        row("paced 500 x 2 ms: time to first event ms", "paced", "ttfb_ms", "{:>10.3f}")
        row("  same, upstream without TCP_NODELAY", "paced_nagle", "ttfb_ms", "{:>10.3f}")
        for key, label in (("conv_o2a", "converted OpenAI -> Anthropic"),
                           ("pass_anth", "Anthropic passthrough"),
                           ("conv_a2o", "converted Anthropic -> OpenAI"),
                           ("tls", "non-streaming, TLS upstream")):
            row(f"{label} /s", key, "rps")
            row(f"{label} CPU us", key, "cpu_us")
        for streams in (a.long_streams, light):
            n_events = long[(streams, "gateway")]["n_events"]
            for label, metric, fmt, scale in (
                    ("delay p50 ms", "p50_ms", "{:>10.2f}", 1),
                    ("delay p99 ms", "p99_ms", "{:>10.2f}", 1),
                    ("CPU busy %", "cpu_share", "{:>10.0f}", 100),
                    ("load generator CPU %", "client_cpu_share", "{:>10.0f}", 100)):
                cells = []
                for t in COLUMNS:
                    v = long[(streams, t)].get(metric)
                    cells.append(fmt.format(v * scale) if v is not None else f"{'':>10}")
                print(f"{f'{streams} x {n_events} paced: {label}':<44}{''.join(cells)}")
        g = lambda k, t="gateway": med[(k, t)]                          # noqa: E731
        ld, lf, lg = (long[(a.long_streams, t)] for t in ("direct", "floor", "gateway"))
        lp = long[(a.long_streams, "protocol")]
        sd, sf, sg = (long[(light, t)] for t in ("direct", "floor", "gateway"))
        events = lg["n_events"]
        peak, before = fig["long_peak_rss"], fig["long_before_rss"]
        per_stream_kib = (peak - before) * 1024 / lg["streams"]
        added, added_floor = lg["p99_ms"] - ld["p99_ms"], lf["p99_ms"] - ld["p99_ms"]
        # Not a figure but a failure: a stream through the gateway lost or changed events.
        self.broken = lg["exact"] != lg["streams"] or lg["events"] != lg["streams"] * events
        light_added, light_floor = sg["p99_ms"] - sd["p99_ms"], sf["p99_ms"] - sd["p99_ms"]
        targets = [
            ("1 idle RSS vs bare interpreter (MiB)", f"{fig['idle_rss']:.1f} vs "
             f"{fig['idle_rss_bare']:.1f}", fig["idle_rss"] - fig["idle_rss_bare"], "<= +3",
             fig["idle_rss"] - fig["idle_rss_bare"] <= 3),
            ("1 start-up to first /health 200 (s)", f"{fig['start']:.3f}", fig["start"],
             "<= 0.15", fig["start"] <= 0.15),
            ("2 converted O->A stream CPU / passthrough", f"{g('conv_o2a')['cpu_us']:.0f} us",
             g("conv_o2a")["cpu_us"] / g("stream")["cpu_us"], "<= 2.5x",
             g("conv_o2a")["cpu_us"] / g("stream")["cpu_us"] <= 2.5),
            ("2 converted A->O stream CPU / passthrough", f"{g('conv_a2o')['cpu_us']:.0f} us",
             g("conv_a2o")["cpu_us"] / g("pass_anth")["cpu_us"], "<= 2.5x",
             g("conv_a2o")["cpu_us"] / g("pass_anth")["cpu_us"] <= 2.5),
            ("3 non-streaming CPU/req vs floor", f"{g('nonstream')['cpu_us']:.0f} us",
             g("nonstream")["cpu_us"] / g("nonstream", "floor")["cpu_us"], "<= 3x",
             g("nonstream")["cpu_us"] / g("nonstream", "floor")["cpu_us"] <= 3),
            ("3 passthrough stream CPU vs floor", f"{g('stream')['cpu_us']:.0f} us",
             g("stream")["cpu_us"] / g("stream", "floor")["cpu_us"], "<= 2x",
             g("stream")["cpu_us"] / g("stream", "floor")["cpu_us"] <= 2),
            ("3 non-streaming vs floor at the gateway's rate",
             f"{fig['slow_nonstream_cpu']:.0f} us",
             g("nonstream")["cpu_us"] / fig["slow_nonstream_cpu"], "(print)", None),
            ("3 passthrough vs floor at the gateway's rate", f"{fig['slow_stream_cpu']:.0f} us",
             g("stream")["cpu_us"] / fig["slow_stream_cpu"], "(print)", None),
        ]
        added_gw = g("paced")["ttfb_ms"] - g("paced", "direct")["ttfb_ms"]
        added_fl = g("paced", "floor")["ttfb_ms"] - g("paced", "direct")["ttfb_ms"]
        targets.append(("3 added first-byte time vs floor's", f"{added_gw:+.3f} ms vs "
                        f"{added_fl:+.3f}", added_gw / added_fl if added_fl > 0 else
                        float("nan"), "<= 2x", added_gw <= 2 * added_fl if added_fl > 0 else
                        None))
        targets += [
            (f"4 long streams exact ({lg['streams']} x {events} events)",
             f"{lg['exact']}/{lg['streams']}", lg["exact"] / lg["streams"], "all",
             lg["exact"] == lg["streams"]),
            ("4 events delivered; gateway CPU busy", f"{lg['events']}; "
             f"{lg['cpu_share'] * 100:.0f}%", lg["events"] / (lg["streams"] * events),
             f"{lg['streams'] * events}", lg["events"] == lg["streams"] * events),
            ("4 direct: streams exact; events delivered", f"{ld['exact']}; {ld['events']}",
             ld["events"] / (ld["streams"] * events), "(baseline)", None),
            ("4 per-event delay p99 added (ms)", f"{added:+.1f}", added, "<= 5 ms added",
             added <= 5),
            ("4 the floor's, at the same load (ms)", f"{added_floor:+.1f}", added_floor,
             "(the floor)", None),
            ("4 the Protocol floor's (ms)", f"{lp['p99_ms'] - ld['p99_ms']:+.1f}",
             lp["p99_ms"] - ld["p99_ms"], "(print)", None),
            (f"4 {light} streams: delay p99 added (ms)", f"{light_added:+.1f} vs "
             f"{light_floor:+.1f}", light_added, "(print)", None),
            ("4 RSS at peak (MiB)", f"{peak:.1f}", peak, "<= 90", peak <= 90),
            ("4 memory per concurrent stream (KiB)", f"{per_stream_kib:.1f}", per_stream_kib,
             "(print)", True),
            ("5 TLS handshakes per 1,000 requests (a round)",
             f"{fig['handshakes']:.1f} ({fig['handshakes_round']:.0f})",
             fig["handshakes"], "a round <= 32", fig["handshakes_round"] <= 32),
            ("5 TLS CPU/req vs plain HTTP", f"{g('tls')['cpu_us']:.0f} us",
             g("tls")["cpu_us"] / g("nonstream")["cpu_us"], "(print)", True),
        ]
        print()
        print(f"{'target':<46}{'figure':>20}{'ratio':>9}  {'target':<15}met")
        for label, figure, ratio, goal, met in targets:
            verdict = "-" if met is None else "yes" if met else "NO"
            print(f"{label:<46}{figure:>20}{ratio:>9.2f}  {goal:<15}{verdict}")
        print()
        if self.load_before is not None:
            print(f"load average (1 min) at the start {self.load_before[0]:.1f}, at the end "
                  f"{os.getloadavg()[0]:.1f}, on {self.ncpu} cores: other work on the machine "
                  f"skews every figure")
        print(f"start-up: cold cache {fig['start_cold']:.3f} s, warm {fig['start']:.3f} s, "
              f"AIGATEWAY_NO_CACHE=1 {fig['start_nocache']:.3f} s, floor "
              f"{fig['start_floor']:.3f} s, bare interpreter {fig['start_bare']:.3f} s")
        print(f"idle RSS: gateway {fig['idle_rss']:.1f} MiB, AIGATEWAY_NO_CACHE=1 "
              f"{fig['idle_rss_nocache']:.1f} MiB, floor {fig['idle_rss_floor']:.1f} MiB, "
              f"bare interpreter {fig['idle_rss_bare']:.1f} MiB; after the load phases "
              f"{fig['busy_rss']:.1f} MiB, before the long streams {before:.1f} MiB")
        print(f"long streams: ramp-up to every stream's first event, direct {ld['ramp_s']:.1f} s, "
              f"floor {lf['ramp_s']:.1f} s, gateway {lg['ramp_s']:.1f} s; delay p99 once every "
              f"stream runs: direct {ld['p99_steady_ms']:.1f}, floor {lf['p99_steady_ms']:.1f}, "
              f"gateway {lg['p99_steady_ms']:.1f} ms; floor exact {lf['exact']}/{lf['streams']}; "
              f"events {'in lockstep' if a.long_sync else 'each stream on its own clock'}")


def wait_accept(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return time.perf_counter()
        except OSError:
            time.sleep(0.002)
    raise RuntimeError(f"{proc.args} did not start")


@contextlib.contextmanager
def fake_upstream(tmp: str):
    """The fake upstream in a subprocess, unpinned, for the tools beside the benchmark
    (profile_gateway.py, count_instructions.py): yields (plain port, TLS port, certificate)."""
    cert, key = make_cert(tmp)
    up, tls = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--upstream", str(up), str(tls), cert, key])
    try:
        wait_accept(up, proc)
        yield up, tls, cert
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke run: short, one round")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per load phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--long-streams", type=int, default=1000)
    ap.add_argument("--long-seconds", type=float, default=30.0)
    ap.add_argument("--long-sync", action="store_true",
                    help="every long stream writes its events in the same millisecond")
    ap.add_argument("--no-hold", action="store_true",
                    help="empty_answer_fallback off: streams are not decoded to find content")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.long_streams, args.long_seconds = 1.0, 1, 100, 3.0
    bench = Bench(args)
    try:
        bench.run()
        if getattr(bench, "broken", False):
            sys.exit("the gateway's long streams were not all complete and exact")
    finally:
        for proc in bench.procs:
            if proc.poll() is None:
                bench.stop(proc)
        shutil.rmtree(bench.tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--upstream":
        run_upstream(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
