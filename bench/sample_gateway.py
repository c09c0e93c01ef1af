#!/usr/bin/env python3
"""Where the running gateway's CPU goes, sampled instead of traced: py-spy on the real process.

    pip install py-spy
    python bench/sample_gateway.py [--seconds 8] [--rate 997] [--top 25] [SCENARIO ...]

Scenarios: profile_gateway.py's (nonstream, stream, o2a, a2o), and ``long``: 500 concurrent
passed-through streams paced one event every 20 ms (the benchmark's long streams, half as
many: one event a read, where the per-event path is all there is). For each, the gateway runs as
documented (``python aigateway.py --headless --quiet``), pinned to core 0 with the benchmark's
fake upstream and load on the others, as bench_gateway.py runs it; after 2 s of uncounted load
py-spy samples it (``--nonblocking``: the process is never stopped, so it runs at full speed;
``--native`` is not used, so time in C code, system calls included, is the Python frame that
called it) while the load runs for ``--seconds``. Printed: the requests a second it served while
sampled, each stage of the request path's share (callees included), the functions with the most
samples of their own, and the samples by kind (system calls, the event loop, the gateway's code,
the usage database's writer thread). cProfile (profile_gateway.py) counts each call, so it
inflates code that makes many small calls; sampling does not, so read the shares here.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gateway as bg              # noqa: E402
from profile_gateway import SCENARIOS, STAGES   # noqa: E402

# Frames that are a system call: where py-spy's sample is in C code below them, the kernel's
# work (and the C library's) is counted there.
SYSCALL_FRAMES = {
    ("_SelectorSocketTransport.write", "selector_events.py"): "send() to a socket",
    ("_SelectorSocketTransport._read_ready__data_received", "selector_events.py"):
        "recv() from a socket",
    ("EpollSelector.select", "selectors.py"): "epoll_wait()",
    ("_Conn.ack_at_once", "aigateway.py"): "setsockopt(TCP_QUICKACK)",
}
_FRAME = re.compile(r"^(.*) \(([^()]*?):(\d+)\)$")


def parse_frame(text: str) -> tuple[str, str, int]:
    m = _FRAME.match(text)
    if not m:
        return text, "", 0
    return m.group(1), os.path.basename(m.group(2)), int(m.group(3))


def kind_of(stack: list[tuple[str, str, int]]) -> str:
    func, file, _ = stack[-1]
    if any(f == "UsageStore._writer" for f, _, _ in stack):
        return "the usage database's writer thread (SQLite inserts)"
    if (func, file) in SYSCALL_FRAMES:
        return "system call: " + SYSCALL_FRAMES[(func, file)]
    if file == "aigateway.py":
        return "the gateway's own code (and the C functions it calls)"
    if file in ("base_events.py", "events.py", "selector_events.py", "streams.py",
                "selectors.py", "futures.py", "tasks.py", "timeouts.py"):
        return "asyncio: loop, transports, streams"
    return "other Python (stdlib)"


LONG_STREAMS, LONG_PACE_MS = 500, 20


def sample(name: str, args: argparse.Namespace, up: int, tls: int, tmp: str) -> None:
    path, model, stream, _events = SCENARIOS.get(name) or ("/v1/chat/completions",
                                                           "bench-model", True, 0)
    ncpu = os.cpu_count() or 1
    gw_cores, other = ({0}, set(range(1, ncpu))) if ncpu > 1 else (None, None)
    port = bg.free_port()
    bench = bg.Bench.__new__(bg.Bench)
    bench.tmp, bench.args = tmp, types.SimpleNamespace(no_hold=False)
    cfg = bench.config(port, up, tls)
    env = dict(os.environ, XDG_CACHE_HOME=os.path.join(tmp, "xdg"))
    proc = subprocess.Popen([sys.executable, bg.GATEWAY, "--headless", "--quiet", "--config",
                             cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=bg.pin(gw_cores), env=env)
    out = os.path.join(tmp, f"{name}.txt")
    try:
        bg.wait_health(port, proc)
        body = json.dumps({"model": model, "max_tokens": 1024, "stream": stream,
                           "messages": [{"role": "user", "content": "Say something."}]},
                          separators=(",", ":")).encode()
        bg.in_subprocess("run_load", (port, path, body, 16, 2.0), other)      # warm-up
        spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "-r", str(args.rate),
                                "-d", str(int(args.seconds) + 2), "-f", "raw", "-o", out,
                                "-p", str(proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)                                # py-spy attaches before the load
        if name == "long":
            events = int(args.seconds * 1000 / LONG_PACE_MS)
            res = bg.in_subprocess("run_long", (port, path, LONG_STREAMS, events, LONG_PACE_MS),
                                   other)
            res["rps"] = res["events"] / res["seconds"]
        else:
            res = bg.in_subprocess("run_load", (port, path, body, 16, args.seconds), other)
        _, err = spy.communicate(timeout=60)
        if spy.returncode or not os.path.exists(out):
            raise RuntimeError(f"py-spy failed: {err[-1000:]}")
    finally:
        proc.terminate()
        proc.wait(10)
    report(name, path, model, stream, res, out, args.top)


def report(name: str, path: str, model: str, stream: bool, res: dict, out: str,
           top: int) -> None:
    incl: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    total = 0
    with open(out) as f:
        for line in f:
            text, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            stack = [parse_frame(t) for t in text.split(";") if t]
            if not stack:
                continue
            total += n
            for func in {f for f, _, _ in stack}:
                incl[func] += n
            func, file, lineno = stack[-1]
            own[f"{func} ({file}:{lineno})"] += n
            kinds[kind_of(stack)] += n
    total = total or 1
    unit = "events/s" if name == "long" else "requests/s"
    print(f"\n== {name}: {path} model={model} stream={stream}: {res['rps']:.0f} {unit} "
          f"while sampled, {total} samples")
    print("   stages (callees included), share of all samples:")
    for func, label in STAGES:
        print(f"   {incl.get(func, 0) / total * 100:5.1f}%  {label} [{func}]")
    print("   by kind:")
    for kind, n in kinds.most_common():
        print(f"   {n / total * 100:5.1f}%  {kind}")
    print(f"   the {top} lines with the most samples of their own:")
    for where, n in own.most_common(top):
        print(f"   {n / total * 100:5.1f}%  {where}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=997, help="samples a second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("scenarios", nargs="*", default=["nonstream", "stream"],
                    help=", ".join([*SCENARIOS, "long"]))
    args = ap.parse_args()
    names = [*SCENARIOS, "long"]
    unknown = [name for name in args.scenarios if name not in names]
    if unknown:
        ap.error(f"unknown scenario {unknown[0]!r}: choose from {', '.join(names)}")
    if shutil.which("py-spy") is None:
        sys.exit("needs py-spy: pip install py-spy")
    tmp = tempfile.mkdtemp(prefix="aigw-sample-")
    try:
        with bg.fake_upstream(tmp) as (up, tls, _cert):
            for name in args.scenarios:
                sample(name, args, up, tls, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
