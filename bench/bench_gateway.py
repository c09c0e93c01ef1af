#!/usr/bin/env python3
"""Benchmark: aigateway against a direct call to the same upstream, in the same run.

    python bench/bench_gateway.py [--seconds 5] [--concurrency 16]

Starts a fast fake upstream (asyncio, one process), the gateway (headless, pinned to one core
where the OS allows it) and drives load from a separate process. Prints req/s, p50/p99 latency
and gateway CPU per request for the gateway and for the direct path, the gateway's idle RSS and
start-up time, and the gateway CPU for passing through a 200-chunk SSE stream. Figures are
printed as ratios against the direct call; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GATEWAY = os.path.join(os.path.dirname(HERE), "aigateway.py")
TOKEN = "sk-gw-bench-token-0123456789"

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "bench-model", "system_fingerprint": "fp_bench",
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
        "role": "assistant", "refusal": None,
        "content": "The quick brown fox jumps over the lazy dog. " * 6}}],
    "usage": {"prompt_tokens": 21, "completion_tokens": 60, "total_tokens": 81}}).encode()
STREAM_EVENTS = [b"data: " + json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
    "model": "bench-model", "choices": [{"index": 0, "delta": {"content": f"tok{i} "},
                                         "finish_reason": None}]}).encode() + b"\n\n"
    for i in range(199)] + [b"data: [DONE]\n\n"]
STREAM_BURST = b"".join(b"%x\r\n%s\r\n" % (len(ev), ev) for ev in STREAM_EVENTS) + b"0\r\n\r\n"


# -- fake upstream ----------------------------------------------------------------------------

class UpstreamProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0
                         else len(head)]) if i >= 0 else 0
            if len(self.buf) < end + 4 + n:
                return
            body = self.buf[end + 4:end + 4 + n]
            self.buf = self.buf[end + 4 + n:]
            if b'"stream":true' in body:
                asyncio.ensure_future(self.stream(paced=b'"paced":true' in body))
            else:
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(COMPLETION), COMPLETION))

    async def stream(self, paced: bool):
        """200 events, each its own chunk: all in one write (burst) or 1 ms apart (paced, as a
        model streams: every event is then a separate read and write for the gateway)."""
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        if not paced:
            self.t.write(head + STREAM_BURST)
            return
        self.t.write(head)
        for ev in STREAM_EVENTS:
            self.t.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            await asyncio.sleep(0.001)
        self.t.write(b"0\r\n\r\n")


def run_upstream(port: int) -> None:
    async def main():
        server = await asyncio.get_running_loop().create_server(UpstreamProtocol, "127.0.0.1",
                                                                port)
        await server.serve_forever()
    asyncio.run(main())


# -- load generator ----------------------------------------------------------------------------

class ClientProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, deadline: float, latencies: list, done: asyncio.Future):
        self.request, self.deadline, self.lat, self.done = request, deadline, latencies, done
        self.buf = b""

    def connection_made(self, transport):
        self.t = transport
        self.send()

    def send(self):
        self.t0 = time.perf_counter()
        self.buf = b""
        self.t.write(self.request)

    def data_received(self, data):
        self.buf += data
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
            self.done.set_exception(RuntimeError(self.buf[:300].decode("latin-1")))
            self.t.close()
            return
        now = time.perf_counter()
        self.lat.append(now - self.t0)
        if now < self.deadline:
            self.send()
        else:
            self.t.close()
            if not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(None)


def run_load(port: int, path: str, body: bytes, concurrency: int, seconds: float) -> dict:
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body

    async def main():
        loop = asyncio.get_running_loop()
        lat: list[float] = []
        deadline = time.perf_counter() + seconds
        futs = []
        t0 = time.perf_counter()
        for _ in range(concurrency):
            fut = loop.create_future()
            await loop.create_connection(lambda f=fut: ClientProtocol(request, deadline, lat, f),
                                         "127.0.0.1", port)
            futs.append(fut)
        await asyncio.gather(*futs)
        elapsed = time.perf_counter() - t0
        lat.sort()
        return {"requests": len(lat), "rps": len(lat) / elapsed,
                "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000}
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


def wait_health(port: int, timeout: float = 10.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.perf_counter()
        except OSError:
            time.sleep(0.002)
    raise RuntimeError("gateway did not start")


def load_in_subprocess(port: int, path: str, body: bytes, concurrency: int, seconds: float,
                       cores: set[int] | None) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {HERE!r}); import bench_gateway as b; "
            f"print(json.dumps(b.run_load({port}, {path!r}, {body!r}, {concurrency}, "
            f"{seconds})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=pin(cores), check=True)
    return json.loads(out.stdout)


def pin(cores: set[int] | None):
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, cores)


def converter_micro(rounds: int = 300) -> tuple[float, float]:
    """Pure conversion CPU, in this process: an Anthropic request to OpenAI and the OpenAI
    answer back; and a 200-chunk OpenAI stream decoded and re-encoded as Anthropic events."""
    sys.path.insert(0, os.path.dirname(GATEWAY))
    import aigateway as ag
    req = {"model": "m", "max_tokens": 1024, "system": "Be brief.", "messages": [
        {"role": "user", "content": "Say something about foxes."}]}
    answer = json.loads(COMPLETION)
    t0 = time.process_time()
    for _ in range(rounds):
        ir = ag.anthropic_request_to_ir(req)
        ag.json_dumps(ag.ir_to_openai_request(ir, "m", stream=False))
        ag.json_dumps(ag.ir_to_anthropic_response(ag.openai_response_to_ir(answer), "m"))
    whole = (time.process_time() - t0) / rounds
    raw = b"".join(STREAM_EVENTS)
    t0 = time.process_time()
    for _ in range(rounds // 10):
        dec, enc = ag.OpenAIStreamDecoder(), ag.AnthropicStreamEncoder("m", 10)
        for ev in STREAM_EVENTS:                      # one read per event, as when paced
            enc.encode(dec.feed(ev))
        enc.encode(dec.close())
    stream = (time.process_time() - t0) / (rounds // 10)
    del raw
    return whole, stream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    gw_cores = {0} if ncpu > 1 else None
    other = set(range(1, ncpu)) if ncpu > 1 else None

    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)],
                                preexec_fn=pin(other))
    tmp = tempfile.mkdtemp()
    cfg = os.path.join(tmp, "config.json")
    with open(cfg, "w") as f:
        json.dump({"settings": {"port": gw_port},
                   "channels": [{"name": "bench", "type": "openai",
                                 "base_url": f"http://127.0.0.1:{up_port}",
                                 "api_key": "sk-upstream"}],
                   "tokens": [{"name": "bench", "key": TOKEN}]}, f)
    t0 = time.perf_counter()
    gw = subprocess.Popen([sys.executable, GATEWAY, "--headless", "--quiet", "--config", cfg],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          preexec_fn=pin(gw_cores))
    try:
        startup = wait_health(gw_port) - t0
        time.sleep(0.5)
        idle_rss = rss_mib(gw.pid)
        body = json.dumps({"model": "bench-model", "messages": [
            {"role": "user", "content": "Say something about foxes."}]},
            separators=(",", ":")).encode()
        path = "/v1/chat/completions"
        results = {}
        for label, conc in (("1 client", 1), (f"{args.concurrency} clients", args.concurrency)):
            direct = load_in_subprocess(up_port, path, body, conc, args.seconds, other)
            c0 = cpu_seconds(gw.pid)
            via = load_in_subprocess(gw_port, path, body, conc, args.seconds, other)
            cpu = (cpu_seconds(gw.pid) - c0) / via["requests"]
            results[label] = (direct, via, cpu)
        streams = {}
        for label, paced in (("burst", False), ("paced 1 ms", True)):
            sbody = json.dumps({"model": "bench-model", "stream": True, "paced": paced,
                                "messages": [{"role": "user", "content": "Stream please."}]},
                               separators=(",", ":")).encode()
            sdirect = load_in_subprocess(up_port, path, sbody, 4, args.seconds, other)
            c0 = cpu_seconds(gw.pid)
            svia = load_in_subprocess(gw_port, path, sbody, 4, args.seconds, other)
            streams[label] = (sdirect, svia, (cpu_seconds(gw.pid) - c0) / svia["requests"])
        conv = {}
        for label, stream in (("non-stream", False), ("200-chunk stream", True)):
            abody = json.dumps({"model": "bench-model", "max_tokens": 1024, "stream": stream,
                                "messages": [{"role": "user", "content": "Say something."}]},
                               separators=(",", ":")).encode()
            c0 = cpu_seconds(gw.pid)
            via = load_in_subprocess(gw_port, "/v1/messages", abody, 4, args.seconds, other)
            conv[label] = (via, (cpu_seconds(gw.pid) - c0) / via["requests"])
        busy_rss = rss_mib(gw.pid)
    finally:
        gw.terminate()
        upstream.terminate()
        gw.wait(10)
        upstream.wait(10)

    print(f"aigateway benchmark  (python {sys.version.split()[0]}, {ncpu} cores, gateway "
          f"pinned to {'core 0' if gw_cores else 'any core'}, {args.seconds:g} s per phase)")
    print(f"{'phase':<28}{'direct':>14}{'gateway':>14}{'ratio':>10}")
    for label, (direct, via, cpu) in results.items():
        print(f"{label + ' req/s':<28}{direct['rps']:>14.0f}{via['rps']:>14.0f}"
              f"{via['rps'] / direct['rps']:>10.2f}")
        print(f"{label + ' p50 ms':<28}{direct['p50_ms']:>14.3f}{via['p50_ms']:>14.3f}"
              f"{via['p50_ms'] / direct['p50_ms']:>10.2f}")
        print(f"{label + ' p99 ms':<28}{direct['p99_ms']:>14.3f}{via['p99_ms']:>14.3f}"
              f"{via['p99_ms'] / direct['p99_ms']:>10.2f}")
        print(f"{label + ' gateway CPU/req':<28}{'':>14}{cpu * 1e6:>12.0f}us")
    one = results["1 client"]
    print(f"{'added p50 at 1 client':<28}{'':>14}{(one[1]['p50_ms'] - one[0]['p50_ms']):>12.3f}ms")
    for label, (sdirect, svia, scpu) in streams.items():
        print(f"{'SSE ' + label + ' streams/s':<28}{sdirect['rps']:>14.1f}{svia['rps']:>14.1f}"
              f"{svia['rps'] / sdirect['rps']:>10.2f}")
        print(f"{'SSE ' + label + ' CPU/stream':<28}{'':>14}{scpu * 1e3:>12.3f}ms")
    for label, (via, cpu) in conv.items():
        print(f"{'Anthropic->OpenAI ' + label:<36}{via['rps']:>6.0f}/s CPU/req "
              f"{cpu * 1e6:>8.0f}us")
    micro = converter_micro()
    print(f"{'converter only, non-stream':<36}{micro[0] * 1e6:>8.0f}us CPU per exchange")
    print(f"{'converter only, 200-chunk stream':<36}{micro[1] * 1e3:>8.3f}ms CPU per stream")
    print(f"{'start to first /health 200':<28}{'':>14}{startup:>13.3f}s")
    print(f"{'idle RSS':<28}{'':>14}{idle_rss:>10.1f} MiB")
    print(f"{'RSS after load':<28}{'':>14}{busy_rss:>10.1f} MiB")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream":
        run_upstream(int(sys.argv[2]))
    else:
        main()
