#!/usr/bin/env python3
"""Where the gateway's CPU goes: cProfile and tracemalloc summaries per scenario.

    python bench/profile_gateway.py [--seconds 3] [--top 15] [--no-hold] [--dump PREFIX] [SCENARIO ...]

Scenarios: nonstream (OpenAI passthrough), stream (200-event SSE passthrough), o2a (an OpenAI
stream converted for an Anthropic client), a2o (an Anthropic stream converted for an OpenAI
client). Each runs the gateway in this process under cProfile (the profiler roughly doubles
the costs; read the shares, not the absolute times) against the benchmark's fake upstream,
with the load from bench_gateway.py in a subprocess, then prints the top functions by own time
and the profiled microseconds per request and per event; then the pure converter cost per event
without a server, and the allocations per converted stream (tracemalloc).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import signal
import sys
import tempfile
import threading
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import aigateway as ag                  # noqa: E402
import bench_gateway as bg              # noqa: E402

SCENARIOS = {   # name: (client path, model, stream, events per request)
    "nonstream": ("/v1/chat/completions", "bench-model", False, 1),
    "stream": ("/v1/chat/completions", "bench-model", True, len(bg.OPENAI_EVENTS)),
    "o2a": ("/v1/messages", "bench-model", True, len(bg.OPENAI_EVENTS)),
    "a2o": ("/v1/chat/completions", "claude-bench", True, len(bg.ANTHROPIC_EVENTS)),
}


def profile_scenario(name: str, up: int, tls: int, args: argparse.Namespace, tmp: str) -> None:
    path, model, stream, events = SCENARIOS[name]
    seconds, top = args.seconds, args.top
    port = bg.free_port()
    bench = bg.Bench.__new__(bg.Bench)
    bench.tmp, bench.args = tmp, args
    cfg = bench.config(port, up, tls)
    body = json.dumps({"model": model, "max_tokens": 1024, "stream": stream,
                       "messages": [{"role": "user", "content": "Say something."}]},
                      separators=(",", ":")).encode()
    result: dict = {}

    def drive():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                bg.socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.01)
        try:
            result.update(bg.in_subprocess("run_load", (port, path, body, 16, seconds), None))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=drive, daemon=True).start()
    prof = cProfile.Profile()
    prof.runcall(ag.main, ["--headless", "--quiet", "--config", cfg])
    stats = pstats.Stats(prof)
    if args.dump:
        stats.dump_stats(f"{args.dump}.{name}")
    total = stats.total_tt
    n = result.get("requests", 0) or 1
    print(f"\n== {name}: {path} model={model} stream={stream}: {n} requests, "
          f"{total / n * 1e6:.0f} us profiled per request, "
          f"{total / (n * events) * 1e6:.2f} us per event")
    stats.sort_stats("tottime").print_stats(top)
    print_stages(stats, n, total)


# The request path's stages, outermost first: what each costs per request, callees included
# (cProfile counts a coroutine's time between its resumptions, so awaited I/O is not in them).
# cProfile names functions without their class: where two share a name, the costlier is shown.
STAGES = [
    ("HTTPServer._serve", "the connection loop (everything below, and waiting for heads)"),
    ("read_head", "  read the client's request head"),
    ("parse_request_head", "  parse it"),
    ("read_body", "  read the body"),
    ("Gateway.handle", "  the gateway's handler (below)"),
    ("Gateway._route", "    auth, JSON parse, model, limits, channels, session affinity"),
    ("Relay.build", "    the upstream request"),
    ("Relay.send", "    send it, wait for and parse the upstream head"),
    ("Relay.answer", "    read the answer, check it, its usage"),
    ("Gateway._finish", "    the record: escaping, usage row, events"),
    ("HTTPServer._send", "  write the answer to the client"),
]


def print_stages(stats: pstats.Stats, n: int, total: float) -> None:
    by_name: dict[str, float] = {}
    for (path, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        if os.path.basename(path) == "aigateway.py":
            by_name[func] = max(by_name.get(func, 0.0), ct)
    print(f"   stages, profiled us per request (callees included), of {total / n * 1e6:.0f}:")
    for func, label in STAGES:
        name = func.rsplit(".", 1)[-1]
        ct = by_name.get(name)
        if ct is not None:
            print(f"   {ct / n * 1e6:8.0f} {ct / total * 100:5.1f}%  {label} [{func}]")


def converter_micro(rounds: int = 200) -> None:
    """Pure per-event conversion cost (no server): decode each upstream event, encode it."""
    cases = {
        "OpenAI -> Anthropic": (bg.OPENAI_EVENTS, ag.OpenAIStreamDecoder,
                                lambda: ag.AnthropicStreamEncoder("m", 10)),
        "Anthropic -> OpenAI": (bg.ANTHROPIC_EVENTS, ag.AnthropicStreamDecoder,
                                lambda: ag.OpenAIStreamEncoder("m", False)),
    }
    print("\n== pure converters, one feed per event (as when paced)")
    for label, (events, dec_cls, enc_new) in cases.items():
        def one():
            dec, enc = dec_cls(), enc_new()
            for ev in events:
                enc.encode(dec.feed(ev))
            enc.encode(dec.close())
        one()
        t0 = time.process_time()
        for _ in range(rounds):
            one()
        per = (time.process_time() - t0) / rounds
        tracemalloc.start()
        one()
        size, peak = tracemalloc.get_traced_memory()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        print(f"{label}: {per * 1e6:.0f} us per stream, {per / len(events) * 1e6:.2f} us per "
              f"event; peak {peak / 1024:.1f} KiB traced per stream")
        for stat in snap.statistics("lineno")[:5]:
            print(f"    {stat}")
        prof = cProfile.Profile()
        prof.runcall(lambda: [one() for _ in range(20)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-hold", action="store_true",
                    help="empty_answer_fallback off: streams are not decoded to find content")
    ap.add_argument("--dump", metavar="PREFIX",
                    help="also write each scenario's stats to PREFIX.SCENARIO (pstats format)")
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="aigw-prof-")
    with bg.fake_upstream(tmp) as (up, tls, _cert):
        for name in args.scenarios:
            profile_scenario(name, up, tls, args, tmp)
        converter_micro()


if __name__ == "__main__":
    main()
