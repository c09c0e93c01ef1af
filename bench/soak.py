#!/usr/bin/env python3
"""Soak and load: many concurrent clients, mixed streaming and non-streaming, for a long time,
against two fake upstreams that inject faults. Not part of CI.

    python bench/soak.py [--clients 1000] [--seconds 600]

Faults (per upstream, independently): 5% answer 500, 2% answer 429, 1% reset mid-stream,
1% hang past the channel timeout. The gateway has both upstreams as channels of one model with
fallback on. Prints requests served, errors by cause, p50/p99 latency, and the gateway's RSS
at the start (after warm-up) and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_gateway import GATEWAY, TOKEN, free_port, rss_mib, wait_health  # noqa: E402

CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",' \
        b'"choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n'
DONE = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":' \
       b'[],"usage":{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60}}\n\n' \
       b"data: [DONE]\n\n"
ANSWER = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                         "role": "assistant", "content": "hello " * 20}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 20,
                               "total_tokens": 30}}).encode()


async def upstream_main(port: int, seed: int) -> None:
    rnd = random.Random(seed)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                body = await reader.readexactly(n)
                roll = rnd.random()
                await asyncio.sleep(rnd.uniform(0.02, 0.2))
                if roll < 0.05:
                    err = b'{"error":{"message":"injected 500"}}'
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(err), err))
                    continue
                if roll < 0.07:
                    err = b'{"error":{"message":"injected 429"}}'
                    writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(err), err))
                    continue
                if roll < 0.08:
                    await asyncio.sleep(30)                    # past the channel timeout
                    writer.close()
                    return
                if b'"stream":true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    reset = roll < 0.09
                    for i in range(50):
                        if reset and i == 25:
                            writer.transport.abort()
                            return
                        writer.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                        await writer.drain()
                        await asyncio.sleep(0.01)
                    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


async def client_main(port: int, clients: int, seconds: float, out: str) -> None:
    stats: collections.Counter[str] = collections.Counter()
    lat: list[float] = []
    deadline = time.monotonic() + seconds

    async def one(i: int) -> None:
        rnd = random.Random(i)
        reader = writer = None
        while time.monotonic() < deadline:
            stream = rnd.random() < 0.5
            body = json.dumps({"model": "soak", "stream": stream, "messages": [
                {"role": "user", "content": "hi"}]}, separators=(",", ":")).encode()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                t0 = time.monotonic()
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                             b"Authorization: Bearer " + TOKEN.encode() +
                             b"\r\nContent-Type: application/"
                             b"json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
                status = int(head.split(b" ")[1])
                if b"chunked" in head.lower():
                    data = b""
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        data += chunk[:-2]
                else:
                    n = int([ln for ln in head.split(b"\r\n")
                             if ln.lower().startswith(b"content-length")][0].split(b":")[1])
                    data = await reader.readexactly(n)
                lat.append(time.monotonic() - t0)
                if status != 200:
                    stats[f"http {status}"] += 1
                elif b'"error"' in data:
                    stats["in-band stream error (upstream reset)"] += 1
                else:
                    stats["ok stream" if stream else "ok"] += 1
                if b"connection: close" in head.lower():
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) \
                    as exc:
                stats[f"client-side {type(exc).__name__}"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one(i) for i in range(clients)))
    lat.sort()
    with open(out, "w") as f:
        json.dump({"stats": stats, "n": len(lat),
                   "p50": lat[len(lat) // 2] if lat else 0,
                   "p99": lat[int(len(lat) * 0.99)] if lat else 0}, f)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=600)
    args = ap.parse_args()
    raise_fd_limit()
    ports = [free_port(), free_port()]
    ups = [subprocess.Popen([sys.executable, __file__, "--upstream", str(p), str(i)])
           for i, p in enumerate(ports)]
    gw_port = free_port()
    cfg = os.path.join(tempfile.mkdtemp(), "config.json")
    with open(cfg, "w") as f:
        json.dump({"settings": {"port": gw_port, "max_connections": 4096},
                   "channels": [{"name": f"up{i}", "type": "openai", "priority": i,
                                 "base_url": f"http://127.0.0.1:{p}", "timeout": 5}
                                for i, p in enumerate(ports)],
                   "tokens": [{"name": "soak", "key": TOKEN}]}, f)
    gw = subprocess.Popen([sys.executable, GATEWAY, "--headless", "--quiet", "--config", cfg],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          preexec_fn=raise_fd_limit)
    try:
        wait_health(gw_port, gw)
        out = os.path.join(tempfile.mkdtemp(), "result.json")
        # Warm up with the full number of clients, so that the start figure already holds the
        # working set of that many connections and the difference shows growth over time.
        subprocess.run([sys.executable, __file__, "--client", str(gw_port), str(args.clients),
                        "30", out], check=True, preexec_fn=raise_fd_limit)
        rss_start = rss_mib(gw.pid)
        t0 = time.monotonic()
        subprocess.run([sys.executable, __file__, "--client", str(gw_port), str(args.clients),
                        str(args.seconds), out], check=True, preexec_fn=raise_fd_limit)
        elapsed = time.monotonic() - t0
        time.sleep(2)
        rss_end = rss_mib(gw.pid)
        with open(out) as f:
            res = json.load(f)
    finally:
        gw.terminate()
        for u in ups:
            u.terminate()
    print(f"soak: {args.clients} clients, {elapsed:.0f} s, half streaming, faults injected")
    print(f"requests completed: {res['n']} ({res['n'] / elapsed:.0f}/s)")
    for cause, n in sorted(res["stats"].items(), key=lambda kv: -kv[1]):
        print(f"  {cause:<45}{n:>9}")
    print(f"latency p50 {res['p50'] * 1000:.0f} ms, p99 {res['p99'] * 1000:.0f} ms")
    print(f"gateway RSS: {rss_start:.1f} MiB after a 30 s warm-up with all clients, "
          f"{rss_end:.1f} MiB at the end "
          f"({rss_end - rss_start:+.1f} MiB)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--upstream":
        asyncio.run(upstream_main(int(sys.argv[2]), int(sys.argv[3])))
    elif len(sys.argv) == 6 and sys.argv[1] == "--client":
        asyncio.run(client_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                sys.argv[5]))
    else:
        main()
