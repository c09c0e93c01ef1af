#!/usr/bin/env python3
"""Benchmark: the usage store (issue 13).

    python bench/bench_usage.py [--requests 3000] [--rows 1000000] [--rounds 3]

1. Gateway CPU and latency per request with the usage store on and off: an in-process gateway
   (the real server thread) in front of a fast fake upstream, driven by sequential keep-alive
   requests; CPU is this process's (server, writer and client threads together), so the
   difference between the two runs is what the store costs. The hook alone (UsageStore.record on
   the server loop) is timed too.
2. Report queries over ``--rows`` rows spread over 30 days (5 models, 3 channels, 4 tokens): the
   30-day chart (by day), ``usage --by model`` and the per-token counters read at start.
Nothing here asserts a time; it prints the figures and their ratios to the targets
(20 us per request, 200 ms per query).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import aigateway as ag  # noqa: E402

TOKEN = "sk-gw-bench-token-0123456789"
ANSWER = json.dumps({
    "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "ok " * 40}}],
    "usage": {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160,
              "prompt_tokens_details": {"cached_tokens": 64}}}).encode()
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()                       # head and body go out in two writes: no Nagle
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)


def run_gateway(upstream_url: str, usage_db: str, requests: int) -> tuple[float, float]:
    """(CPU seconds per request, median latency seconds) over ``requests`` requests."""
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        json.dump({"settings": {"port": 0, "usage_db": usage_db},
                   "channels": [{"name": "up", "type": "openai", "base_url": upstream_url}],
                   "tokens": [{"name": "bench", "key": TOKEN}]}, f)
    store, _ = ag.ConfigStore.load(path)
    thread = ag.GatewayThread(store, host="127.0.0.1", port=0)
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", thread.server.port, timeout=10)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hdrs = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies = []
    try:
        for _ in range(200):                                  # warm up
            conn.request("POST", "/v1/chat/completions", BODY, hdrs)
            conn.getresponse().read()
        cpu = time.process_time()
        for _ in range(requests):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", BODY, hdrs)
            conn.getresponse().read()
            latencies.append(time.perf_counter() - t0)
        if thread.gateway.usage is not None:
            thread.gateway.usage.close()                      # the writer's share is counted
        cpu = time.process_time() - cpu
    finally:
        conn.close()
        thread.stop()
    latencies.sort()
    return cpu / requests, latencies[len(latencies) // 2]


def hook_cost(rounds: int) -> float:
    """Process CPU per row: UsageStore.record plus the writer thread's insert."""
    folder = tempfile.mkdtemp()
    store = ag.UsageStore(os.path.join(folder, "usage.db"), prices={}, retention_days=400)
    rec = {"time": time.time(), "token": "bench", "dialect": "openai",
           "route": "/v1/chat/completions", "model": "gpt-4o", "channel": "up", "status": 200,
           "error": None, "failures": [], "stream": False, "latency_ms": 3.0, "ttfb_ms": 2.0,
           "bytes_in": 80, "bytes_out": 400, "input_tokens": 120, "output_tokens": 40,
           "cache_read_tokens": 64, "cache_write_tokens": 0, "reasoning_tokens": 0,
           "key_index": 0}
    t0 = time.process_time()
    for _ in range(rounds):
        store.record(rec, 1, "gpt-4o")
    store.close()                                # the writer's share: every row written
    spent = (time.process_time() - t0) / rounds
    assert store.written == rounds and not store.dropped
    return spent


def fill(path: str, rows: int) -> None:
    now = time.time()
    store = ag.UsageStore(path, prices={}, retention_days=400)
    store.close()
    models = ["gpt-4o", "gpt-5", "claude-sonnet-4-6", "claude-opus-4-7", "gemini-2.5-pro"]
    conn = ag.open_usage_db(path)
    batch = []
    for i in range(rows):
        t = now - (i % (30 * 86400))
        batch.append((t, ag.utc_day(t), 1 + i % 4, f"tok{i % 4}", "openai",
                      "/v1/chat/completions", models[i % 5], models[i % 5], f"ch{i % 3}", 0,
                      200 if i % 50 else 502, "" if i % 50 else "upstream", i % 2, 800.0,
                      300.0, 1200, 300, 600, 0, 50, 0.0042, 0))
        if len(batch) == ag.USAGE_BATCH_ROWS:
            store._write(conn, batch)
            batch = []
    if batch:
        store._write(conn, batch)
    conn.close()


def timed(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    runs: dict[str, list[tuple[float, float]]] = {"": [], "usage.db": []}
    for _ in range(args.rounds):               # alternated, so that a busy moment hits both
        for db in runs:
            runs[db].append(run_gateway(url, db, args.requests))
    (off_cpu, off_lat), (on_cpu, on_lat) = [
        (min(r[0] for r in runs[db]), min(r[1] for r in runs[db])) for db in runs]
    extra = (on_cpu - off_cpu) * 1e6
    print(f"gateway CPU per request (best of {args.rounds}): off {off_cpu * 1e6:.0f} us, on "
          f"{on_cpu * 1e6:.0f} us, store adds {extra:.1f} us ({extra / 20:.2f} x the 20 us "
          f"target)")
    print(f"median latency: off {off_lat * 1e3:.3f} ms, on {on_lat * 1e3:.3f} ms "
          f"(ratio {on_lat / off_lat:.3f})")
    hook = hook_cost(ag.USAGE_QUEUE_LIMIT) * 1e6
    print(f"UsageStore.record plus its write: {hook:.1f} us CPU per row "
          f"({hook / 20:.2f} x the 20 us target)")
    server.shutdown()
    path = os.path.join(tempfile.mkdtemp(), "usage.db")
    t0 = time.perf_counter()
    fill(path, args.rows)
    print(f"wrote {args.rows} rows in {time.perf_counter() - t0:.1f} s "
          f"({os.path.getsize(path) / 2**20:.0f} MiB)")
    conn = ag.open_usage_db(path)
    first = ag.utc_day(time.time()) - 29
    for name, fn in (("30-day chart (by day)", lambda: ag.usage_report(conn, first, "day")),
                     ("usage --by model, 30 days",
                      lambda: ag.usage_report(conn, first, "model")),
                     ("per-token counters at start",
                      lambda: ag.token_spend(conn, time.time()))):
        spent = timed(fn) * 1e3
        print(f"{name}: {spent:.1f} ms ({spent / 200:.3f} x the 200 ms target)")
    conn.close()


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
