#!/usr/bin/env python3
"""Instructions, not seconds: what a request or a converted stream costs, counted by valgrind's
callgrind, which gives the same count from run to run (within 1-3% for the server, whose timers
and thread wake-ups vary) however busy the machine is. For comparing two versions of a change on
a VM whose speed drifts by more than the change.

    python bench/count_instructions.py server [--requests 200] [--stream] FILE ...
    python bench/count_instructions.py convert [--streams 20] FILE ...

``server`` runs each FILE (the gateway, or bench/floor_proxy.py / floor_protocol.py, told apart
by name) under callgrind against the benchmark's fake upstream, sends 20 warm-up requests and
then N sequential keep-alive ones, stops it with SIGINT and prints (count with N - count with 0)
/ N. ``convert`` imports each FILE (a gateway) and converts the benchmark's 200-event streams,
OpenAI -> Anthropic and Anthropic -> OpenAI, fed whole and one event per read (each read's
events joined by ``coalesced_text`` first, as the converted relay does, in a version that has
it). Needs valgrind
(Debian's package); takes about a minute per figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gateway as bg              # noqa: E402

WARMUP = 20


def callgrind(argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    # The interpreter itself, not a wrapper script such as pyenv's shim, which valgrind would
    # trace instead of the interpreter it starts.
    return subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                             os.path.realpath(sys.executable)] + argv, env=env,
                            stderr=subprocess.PIPE, text=True, **kw)


def collected(stderr: str) -> int:
    m = re.search(r"Collected : (\d+)", stderr)
    if m is None:
        raise SystemExit(f"valgrind printed no count:\n{stderr[-2000:]}")
    return int(m.group(1))


def server_count(path: str, requests: int, stream: bool, up: int, tls: int, tmp: str,
                 cert: str) -> int:
    port = bg.free_port()
    bench = bg.Bench.__new__(bg.Bench)
    bench.tmp, bench.args = tmp, argparse.Namespace(no_hold=False)
    cfg = bench.config(port, up, tls)
    floor = "floor" in os.path.basename(path)
    argv = [path, str(port), str(up)] if floor else [path, "--headless", "--quiet", "--config", cfg]
    env = dict(os.environ, SSL_CERT_FILE=cert, XDG_CACHE_HOME=os.path.join(tmp, "xdg"),
               AIGATEWAY_NO_CACHE="1")     # one interpreter: no exec into the start-up cache
    proc = callgrind(argv, env, stdout=subprocess.DEVNULL)
    bg.wait_accept(port, proc, timeout=300)
    body = json.dumps({"model": "bench-model", "max_tokens": 1024, "stream": stream,
                       "messages": [{"role": "user", "content": "Say something."}]},
                      separators=(",", ":")).encode()    # the fake upstream looks for this form
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {bg.TOKEN}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(WARMUP + requests):
        conn.request("POST", "/v1/chat/completions", body, headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise SystemExit(f"{path}: {resp.status} {data[:200]!r}")
    conn.close()
    proc.send_signal(signal.SIGINT)
    return collected(proc.communicate(timeout=300)[1])


CONVERT = r"""
import importlib.util, sys
sys.path.insert(0, sys.argv[1])
import bench_gateway as bg
spec = importlib.util.spec_from_file_location("ag", sys.argv[2])
ag = importlib.util.module_from_spec(spec); sys.modules["ag"] = ag; spec.loader.exec_module(ag)
case, whole, n = sys.argv[3], sys.argv[4] == "whole", int(sys.argv[5])
events, dec, enc = (
    (bg.OPENAI_EVENTS, ag.OpenAIStreamDecoder, lambda: ag.AnthropicStreamEncoder("m", 10))
    if case == "o2a" else
    (bg.ANTHROPIC_EVENTS, ag.AnthropicStreamDecoder, lambda: ag.OpenAIStreamEncoder("m", False)))
blob = b"".join(events)
joined = getattr(ag, "coalesced_text", lambda events: events)   # as the relay does, where it can
for _ in range(n):
    d, e = dec(), enc()
    for piece in ([blob] if whole else events):
        e.encode(joined(d.feed(piece)))
    e.encode(d.close())
"""


def convert_count(path: str, case: str, mode: str, streams: int) -> int:
    proc = callgrind(["-c", CONVERT, HERE, path, case, mode, str(streams)],
                     stdout=subprocess.DEVNULL)
    return collected(proc.communicate(timeout=600)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("server", "convert"))
    ap.add_argument("files", nargs="+")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--stream", action="store_true",
                    help="server: the 200-event SSE passthrough instead of non-streaming chat "
                         "(a stream's count depends on how its reads fall, so on timing)")
    args = ap.parse_args()
    if args.what == "convert":
        for path in args.files:
            for case in ("o2a", "a2o"):
                for mode in ("whole", "each"):
                    base = convert_count(path, case, mode, 0)
                    per = (convert_count(path, case, mode, args.streams) - base) / args.streams
                    print(f"{path}: {case} fed {mode}: {per:,.0f} instructions per stream",
                          flush=True)
        return
    tmp = tempfile.mkdtemp(prefix="aigw-count-")
    with bg.fake_upstream(tmp) as (up, tls, cert):
        for path in args.files:
            base = server_count(path, 0, args.stream, up, tls, tmp, cert)
            total = server_count(path, args.requests, args.stream, up, tls, tmp, cert)
            kind = "stream" if args.stream else "non-streaming request"
            print(f"{path}: {(total - base) / args.requests:,.0f} instructions per {kind}",
                  flush=True)


if __name__ == "__main__":
    main()
