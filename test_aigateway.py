"""Tests for aigateway.py. Sections mirror the module's sections (test_05_... tests section 5).

Fake upstreams run on stdlib http.server, record what they received and misbehave on demand.
End-to-end clients are the official openai and anthropic SDKs and stdlib http.client / sockets.
Every network test has a hard timeout (pytest-timeout, set in the README's test command).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import copy
import gc
import gzip
import http.client
import http.server
import importlib
import io
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

import pytest

import aigateway as ag


def _import_for_good(name: str):
    """``import name``, then, the first time, out of the cyclic garbage collector's sight
    (gc.freeze): modules live to the end of the run, and the SDKs' hundreds of thousands of
    objects made each full collection (a few a minute, five more as pytest ends) walk them
    again, ~0.3 s each."""
    fresh = name not in sys.modules
    module = importlib.import_module(name)
    if fresh:
        gc.freeze()
    return module


gc.freeze()                                 # pytest's and aigateway's objects too


class _Lazy:
    """A module imported on first use. The SDKs take seconds to import; collecting the suite,
    or running a few tests with -k, need not pay for the ones it does not use."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):            # pytest's collection probes; the SDKs' API is public
            raise AttributeError(attr)
        return getattr(_import_for_good(self._name), attr)


anthropic = _Lazy("anthropic")
openai = _Lazy("openai")

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "sk-gw-test-token-0123456789"
TOKEN2 = "sk-gw-second-token-9876543210"


# =================================================================================================
# Fakes and fixtures
# =================================================================================================

class Reply:
    """What a fake upstream answers. ``chunks`` are written one by one with ``delay`` between
    them (chunked encoding unless ``close_delimited``); ``reset_after`` cuts the connection after
    that many chunks; ``hang`` sleeps before answering; ``gate`` (an Event) holds the answer
    until the test sets it (10 s at most)."""

    def __init__(self, status=200, body=b"", headers=None, chunks=None, delay=0.0, hang=0.0,
                 reset_after=None, close_delimited=False, content_type="application/json",
                 gate=None):
        self.status, self.body, self.chunks, self.delay = status, body, chunks, delay
        self.headers = dict(headers or {})
        self.headers.setdefault("Content-Type", content_type)
        self.hang, self.reset_after, self.close_delimited = hang, reset_after, close_delimited
        self.gate: threading.Event | None = gate


def openai_chat_reply(model="m", text="hello", usage=(5, 2)):
    return Reply(body=json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": sum(usage)}}).encode())


def openai_stream_chunks(model="m", pieces=("Hel", "lo"), usage=(9, 2)):
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model}
    out = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None}])]
    out += [dict(base, choices=[{"index": 0, "delta": {"content": p}, "finish_reason": None}])
            for p in pieces]
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    out.append(dict(base, choices=[], usage={"prompt_tokens": usage[0],
                                             "completion_tokens": usage[1],
                                             "total_tokens": sum(usage)}))
    return [f"data: {json.dumps(c)}\n\n".encode() for c in out] + [b"data: [DONE]\n\n"]


def openai_stream_reply(**kw):
    return Reply(chunks=openai_stream_chunks(**kw), content_type="text/event-stream")


def anthropic_message(model="claude-x", text="hi there"):
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 3,
                                             "cache_creation_input_tokens": 0,
                                             "cache_read_input_tokens": 4}}


def anthropic_stream_chunks(model="claude-x", pieces=("Hi", " there")):
    def ev(name, data):
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    start = anthropic_message(model)
    start.update(content=[], stop_reason=None)
    start["usage"] = {"input_tokens": 12, "output_tokens": 1, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0}
    out = [ev("message_start", {"type": "message_start", "message": start}),
           ev("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
           ev("ping", {"type": "ping"})]
    out += [ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": p}})
            for p in pieces]
    out += [ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": 7}}),
            ev("message_stop", {"type": "message_stop"})]
    return out


class _FakeServer(http.server.ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a burst of the gateway's connections overflows
    # it and each dropped SYN costs the gateway a 1 s retransmission before it is accepted.
    request_queue_size = 128


class FakeUpstream:
    """A stdlib ThreadingHTTPServer that records requests and answers from ``self.replies``
    (a list consumed in order; the last one repeats) or ``self.responder(record)``. With
    ``nagle`` its sockets keep Nagle's algorithm on, as servers that never set TCP_NODELAY do."""

    def __init__(self, replies=None, tls_context=None, nagle=False):
        self.requests: list[dict] = []
        self.replies = list(replies or [openai_chat_reply()])
        self.responder = None
        self.lock = threading.Lock()
        self.broken = threading.Event()         # the gateway hung up on us mid-answer
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The head and the body are two writes: with Nagle's algorithm the body waits for
            # the ACK of the head (see test_07_an_upstream_with_nagle_on_is_not_held_by_acks).
            disable_nagle_algorithm = not nagle

            def log_message(self, *args):
                pass

            def _body(self):
                if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self):
                rec = {"method": self.command, "path": self.path, "body": self._body(),
                       "headers": {k.lower(): v for k, v in self.headers.items()},
                       "header_list": [(k.lower(), v) for k, v in self.headers.items()],
                       "client_port": self.client_address[1]}
                with fake.lock:
                    fake.requests.append(rec)
                    if fake.responder is not None:
                        reply = fake.responder(rec)
                    else:
                        reply = fake.replies.pop(0) if len(fake.replies) > 1 else fake.replies[0]
                try:
                    self._write(reply)
                except OSError:
                    fake.broken.set()
                    raise

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def _pause(self, seconds: float):
                """Wait ``seconds``, or less when the gateway hangs up meanwhile (a real server
                learns it on its next write): the fake's thread and socket then go at once,
                not after the whole scripted pause."""
                conn, left = self.connection, seconds
                deadline = time.monotonic() + seconds
                while left > 0 and not isinstance(conn, ssl.SSLSocket):
                    if not select.select([conn], [], [], left)[0]:
                        return
                    if conn.recv(1, socket.MSG_PEEK) == b"":
                        raise ConnectionResetError("the gateway hung up")
                    break                           # bytes of a next request: sit it out
                time.sleep(max(0.0, deadline - time.monotonic()))

            def _write(self, r: Reply):
                if r.gate is not None:
                    r.gate.wait(10)
                if r.hang:
                    self._pause(r.hang)
                self.send_response(r.status)
                for k, v in r.headers.items():
                    self.send_header(k, v)
                if r.chunks is None:
                    self.send_header("Content-Length", str(len(r.body)))
                    self.end_headers()
                    self.wfile.write(r.body)
                    return
                if r.close_delimited:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, c in enumerate(r.chunks):
                    if r.reset_after is not None and i >= r.reset_after:
                        self.wfile.flush()
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
                        self.close_connection = True
                        return
                    self.wfile.write(c if r.close_delimited else b"%x\r\n%s\r\n" % (len(c), c))
                    self.wfile.flush()
                    if r.delay:
                        self._pause(r.delay)
                if not r.close_delimited:
                    self.wfile.write(b"0\r\n\r\n")

        self.server = _FakeServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None   # clients that leave early
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if tls_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        # A 10 ms poll: shutdown() returns in milliseconds, not serve_forever's default 0.5 s.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,),
                                       daemon=True)
        self.thread.start()

    def last(self) -> dict:
        return self.requests[-1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    servers = []

    def make(replies=None, **kw):
        s = FakeUpstream(replies, **kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class GW:
    """A running gateway on an ephemeral port, through the real bridge (section 12)."""

    def __init__(self, path, settings=None, channels=(), tokens=None):
        config = {"settings": dict({"port": 0}, **(settings or {})),
                  "channels": list(channels),
                  "tokens": tokens if tokens is not None else [{"name": "main", "key": TOKEN}]}
        with open(path, "w") as f:
            json.dump(config, f)
        self.store, _ = ag.ConfigStore.load(str(path))
        self._seen: list = []
        self.thread = ag.GatewayThread(self.store, host="127.0.0.1", port=0)
        self.thread.start()
        self.url = self.thread.url
        self.port = self.thread.server.port

    @property
    def gateway(self) -> ag.Gateway:
        return self.thread.gateway

    def records(self, count=1, timeout=5.0):
        """The request records, once at least ``count`` exist (a stream's record is written
        when the gateway has sent its last byte, which the client may see first)."""
        deadline = time.monotonic() + timeout
        while len(self.gateway.records) < count and time.monotonic() < deadline:
            try:
                self._seen.append(self.thread.events.get(timeout=deadline - time.monotonic()))
            except (queue.Empty, ValueError):
                break
        return list(self.gateway.records)

    def events(self):
        while True:
            try:
                self._seen.append(self.thread.events.get_nowait())
            except queue.Empty:
                return list(self._seen)

    def openai(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", TOKEN),
                             max_retries=0, timeout=kw.pop("timeout", 15),
                             http_client=openai.DefaultHttpxClient(verify=sdk_tls()), **kw)

    def anthropic(self, **kw):
        return anthropic.Anthropic(base_url=self.url, api_key=kw.pop("api_key", TOKEN),
                                   max_retries=0, timeout=kw.pop("timeout", 15),
                                   http_client=anthropic.DefaultHttpxClient(verify=sdk_tls()),
                                   **kw)

    def request(self, method, path, body=None, headers=None, timeout=15):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = {"Authorization": f"Bearer {TOKEN}"}
        hdrs.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers={k: v for k, v in hdrs.items()
                                                       if v is not None})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def stop(self):
        self.thread.stop()


def sdk_tls() -> ssl.SSLContext:
    """One TLS context for every SDK client the tests make: each SDK would otherwise load the
    system's CA certificates again for each client (about 0.1 s, hundreds of times)."""
    if not _SDK_TLS:
        _SDK_TLS.append(ssl.create_default_context())
    return _SDK_TLS[0]


_SDK_TLS: list[ssl.SSLContext] = []


@pytest.fixture
def gw(tmp_path):
    made = []

    def make(channels=(), settings=None, tokens=None):
        g = GW(tmp_path / f"config{len(made)}.json", settings, channels, tokens)
        made.append(g)
        return g
    yield make
    for g in made:
        g.stop()


def chan(up_or_url, **kw):
    url = up_or_url if isinstance(up_or_url, str) else up_or_url.url
    c = {"name": kw.pop("name", f"ch-{url.rsplit(':', 1)[-1]}"), "type": "openai",
         "base_url": url, "api_key": "sk-upstream-secret"}
    c.update(kw)
    return c


def raw_exchange(port, data: bytes, *, read_until_close=True, timeout=10.0, pause=None):
    """Send raw bytes, return everything the server sent until it closed (or timeout)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if pause is None:
            s.sendall(data)
        else:
            for part in data:
                s.sendall(part)
                time.sleep(pause)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
            if not read_until_close and b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                m = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")]
                if m and len(rest) >= int(m[0].split(b":")[1]):
                    break
        return out
    finally:
        s.close()


def sse_parse(data: bytes) -> list[tuple[str | None, str]]:
    """(event name or None, data) of each event in an SSE body, by the WHATWG rules
    (html.spec.whatwg.org/multipage/server-sent-events.html, "Interpreting an event stream"),
    written apart from the gateway's SSEDecoder so end-to-end tests do not read the wire with
    the code under test. Lines end in CRLF, LF or CR; a line that starts with ':' is a comment;
    ``field: value`` loses one leading space of the value, a line without ':' is a field with
    an empty value; data lines are joined with LF; a blank line dispatches the event unless it
    has no data; the unfinished event at the end of the body is dropped."""
    text = data.decode("utf-8").removeprefix("\ufeff")
    events, name, lines = [], None, []
    for line in re.split("\r\n|\r|\n", text)[:-1]:     # the text after the last end: unfinished
        if not line:
            if lines:
                events.append((name, "\n".join(lines)))
            name, lines = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            lines.append(value)
    return events


def test_sse_parser_of_the_tests_follows_the_whatwg_rules():
    body = (b"\xef\xbb\xbf: a comment\r\nevent: one\r\ndata:  two spaces\r\ndata\r\n"
            b"id: 7\r\n\r\ndata: {\"a\":\ndata: 1}\n\n\revent: no-data\r\rdata:x\rdata: y\r\r"
            b"data: unfinished\n")
    assert sse_parse(body) == [("one", " two spaces\n"), (None, '{"a":\n1}'), (None, "x\ny")]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


# --- AWS event-stream decoder (Bedrock streams) ----------------------------------------------
# An encoder written here from the framing layout (prelude, headers, payload, CRCs); botocore's
# own parser (botocore.eventstream.EventStreamBuffer; botocore has no encoder) checks it.

_ES_FORMATS = {2: "!b", 3: "!h", 4: "!i", 5: "!q", 8: "!q"}


def es_message(headers, payload=b"", *, total=None, bad_prelude=False, bad_crc=False):
    """One event-stream message; ``headers`` are (name, type, value) triples."""
    raw = b""
    for name, kind, value in headers:
        raw += bytes([len(name.encode())]) + name.encode() + bytes([kind])
        if kind in _ES_FORMATS:
            raw += struct.pack(_ES_FORMATS[kind], value)
        elif kind in (6, 7):
            data = value.encode() if kind == 7 else value
            raw += struct.pack("!H", len(data)) + data
        elif kind == 9:
            raw += value
    size = total if total is not None else 16 + len(raw) + len(payload)
    prelude = struct.pack("!II", size, len(raw))
    prelude += struct.pack("!I", zlib.crc32(prelude) ^ (1 if bad_prelude else 0))
    body = prelude + raw + payload
    return body + struct.pack("!I", zlib.crc32(body) ^ (1 if bad_crc else 0))


def es_event(event_type, obj):
    return es_message([(":event-type", 7, event_type), (":content-type", 7, "application/json"),
                       (":message-type", 7, "event")], json.dumps(obj).encode())


def es_exception(kind, message):
    return es_message([(":exception-type", 7, kind), (":content-type", 7, "application/json"),
                       (":message-type", 7, "exception")],
                      json.dumps({"message": message}).encode())


def bedrock_chunk(event):
    """An InvokeModelWithResponseStream ``chunk`` event: {"bytes": base64 of the model's JSON}
    (Amazon Bedrock API reference, PayloadPart)."""
    return es_event("chunk", {"bytes": ag.base64.b64encode(json.dumps(event).encode()).decode()})


# -- bounded reads from upstreams (issue 9) ------------------------------------------------------

def gzip_bomb(gib: float = 1.0):
    """``gib`` GiB of zeros, gzip-compressed as it is sent (about 1 KiB per MiB): each 1 MiB
    segment ends in a full flush, which resets the compressor, so all but the first are the
    same bytes and the bomb costs nothing to make."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    yield first
    for _ in range(int(gib * 1024) - 1):
        yield again


@pytest.fixture(scope="session")
def cert_files(tmp_path_factory):
    """A self-signed certificate for localhost and its key (paths), made once: an EC P-256
    key is made in milliseconds where RSA-2048 takes a second."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def server_context(cert_files) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*map(str, cert_files))
    return ctx


class _ProxyBase(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list = []
        threading.Thread(target=self.serve_forever, args=(0.01,), daemon=True).start()


def _pipe(a: socket.socket, b: socket.socket):
    def one(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
    t = threading.Thread(target=one, args=(b, a), daemon=True)
    t.start()
    one(a, b)
    t.join(5)


class HTTPProxyHandler(socketserver.BaseRequestHandler):
    def handle(self):
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.request.recv(1)
        line = data.split(b"\r\n")[0].decode()
        self.server.seen.append(data.decode())
        method, target, _ = line.split(" ")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream_sock = socket.create_connection((host, int(port)))
            self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:                                   # absolute-form: forward as is
            u = target.split("/", 3)
            host, port = u[2].rsplit(":", 1)
            upstream_sock = socket.create_connection((host, int(port)))
            upstream_sock.sendall(data)
        _pipe(self.request, upstream_sock)


class Socks5Handler(socketserver.BaseRequestHandler):
    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            buf += self.request.recv(n - len(buf))
        return buf

    def handle(self):
        ver, n = self._exact(2)
        methods = self._exact(n)
        if 2 in methods:
            self.request.sendall(b"\x05\x02")
            _, ulen = self._exact(2)
            user = self._exact(ulen)
            plen = self._exact(1)[0]
            pw = self._exact(plen)
            self.server.seen.append(("auth", user, pw))
            self.request.sendall(b"\x01\x00")
        else:
            self.request.sendall(b"\x05\x00")
        _, cmd, _, atyp = self._exact(4)
        if atyp == 3:
            host = self._exact(self._exact(1)[0]).decode()
        else:
            host = socket.inet_ntoa(self._exact(4))
        port = struct.unpack("!H", self._exact(2))[0]
        self.server.seen.append(("connect", atyp, host, port))
        upstream_sock = socket.create_connection((host, port))
        self.request.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x00")
        _pipe(self.request, upstream_sock)


# --- Upstream credentials: AWS SigV4 (checked against botocore), Google RS256 service accounts --

class _StopSend(Exception):
    pass


def botocore_signed(service, region, call, session_token="FQoGZXIvYXdzEXAMPLE//token"):
    """The request botocore's own client signs for ``call(client)``, caught before sending."""
    import botocore.session
    client = botocore.session.get_session().create_client(
        service, region_name=region, aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        aws_session_token=session_token)
    caught = []

    def stop(request, **kw):
        caught.append(request)
        raise _StopSend
    client.meta.events.register("before-send", stop)
    with pytest.raises(_StopSend):
        call(client)
    req = caught[0]
    headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in req.headers.items()}
    return req, headers


# -- the old "Light AI Gateway" app's config.json, and `config check` naming every problem ------

OLD_APP_KEY = "sk-gw-" + "Q" * 48          # the old app made 48 random characters after sk-gw-


def old_app_config(port=3000, first_url="https://api.openai.com/v1",
                   second_url="https://api.deepseek.com/v1"):
    """A config.json as the old app saved it (pydantic's model_dump of its models: every
    field written, its defaults included)."""
    return {
        "settings": {"host": "0.0.0.0", "port": port, "log_level": "info",
                     "require_auth": True, "default_timeout": 120, "enable_fallback": True,
                     "enable_cors": True, "cors_origins": ["*"], "auto_start": False,
                     "high_availability_mode": False},
        "channels": [
            {"id": 1, "name": "OpenAI", "type": "openai", "base_url": first_url,
             "api_key": "sk-old-first-SECRET", "models": ["gpt-4o", "shared"],
             "enabled": True, "priority": 1, "timeout": 60, "max_retries": 3,
             "proxy_enabled": False, "proxy_url": "http://127.0.0.1:9", "max_concurrency": None,
             "min_concurrency": 1, "max_adaptive_concurrency": 100},
            {"id": 2, "name": "DeepSeek", "type": "openai", "base_url": second_url,
             "api_key": "sk-old-second-SECRET", "models": "deepseek-chat, shared",
             "enabled": True, "priority": 2, "timeout": 90, "max_retries": 3,
             "proxy_enabled": False, "proxy_url": "", "max_concurrency": 4},
            {"id": 5, "name": "GLM (web)", "type": "builtin", "base_url": "glm",
             "api_key": "old-cookie", "models": ["glm"], "enabled": True, "priority": 1,
             "timeout": 60},
        ],
        "tokens": [
            {"id": 1, "name": "default", "key": OLD_APP_KEY, "enabled": True,
             "allowed_channels": [2], "allowed_models": []},
            {"id": 2, "name": "off", "key": OLD_APP_KEY[:-1] + "R", "enabled": False,
             "allowed_channels": [], "allowed_models": ["gpt-4o"]},
        ],
    }


# -- saves that never overwrite an edit they have not seen ---------------------------------

def _hand_edit(path, change):
    cfg = json.loads(open(path).read())
    change(cfg)
    with open(path, "w") as f:                 # in place, as an editor might
        json.dump(cfg, f, indent=1)


def _endless(piece: bytes, first: bytes = b""):
    if first:                                   # (an empty chunk would end a chunked body)
        yield first
    while True:
        yield piece


# -- usage history, prices and per-token limits (issue 13) ---------------------------------------

PRICE_ALL = {"*": {"input": 2, "output": 10, "cache_read": 0.5, "cache_write": 4}}


class _Clock:
    def __init__(self, iso="2026-12-01T23:00:00Z"):
        self.now = ag.parse_utc(iso)

    def __call__(self):
        return self.now


def _write_usage(path, rows, clock):
    """Rows through the real store: (model, channel, token id, token, input, output, cache
    read, status, day offset)."""
    store = ag.UsageStore(str(path), prices=PRICE_ALL, retention_days=400, clock=clock)
    base = clock.now
    for model, channel, tid, token, inp, out, read, status, days in rows:
        clock.now = base - days * 86400
        rec = {"time": clock.now, "token": token, "dialect": "openai",
               "route": "/v1/chat/completions", "model": model, "channel": channel,
               "status": status, "error": None if status < 400 else "x", "failures": [],
               "stream": False, "latency_ms": 10.0, "ttfb_ms": 5.0, "bytes_in": 10,
               "bytes_out": 10, "input_tokens": inp, "output_tokens": out,
               "cache_read_tokens": read, "cache_write_tokens": 0, "reasoning_tokens": 0}
        store.record(rec, tid, None)
    clock.now = base
    store.close()


USAGE_SAMPLE = [("gpt-x", "oa", 1, "main", 1000, 100, 500, 200, 0),
                ("gpt-x", "oa", 2, "kid", 1000, 100, 0, 200, 1),
                ("claude-x", "an", 1, "main", 2000, 0, 1000, 200, 2),
                ("claude-x", "an", 1, "main", 0, 0, 0, 500, 2),
                ("old-x", "oa", 1, "main", 5, 5, 0, 200, 40)]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {}}}}]


def _sse_events(data: bytes):
    return [(e, json.loads(d) if d != "[DONE]" else d) for e, d in sse_parse(data)]


def _openai_tool_stream(usage=True):
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def ch(delta, finish=None):
        return dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}])
    chunks = [ch({"role": "assistant", "content": ""}), ch({"reasoning_content": "think "}),
              ch({"content": "Checking"}),
              ch({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                  "function": {"name": "get_weather", "arguments": ""}}]}),
              ch({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
              ch({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
              ch({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                  "function": {"name": "get_time", "arguments": "{}"}}]}),
              ch({}, "tool_calls")]
    if usage:
        chunks.append(dict(base, choices=[], usage={"prompt_tokens": 30,
                                                    "completion_tokens": 9,
                                                    "total_tokens": 39}))
    return b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks) + \
        b"data: [DONE]\r\n\r\n"


class Dialects:
    """Fake upstream answers in each channel type's own format. The fake answers a request whose
    last turn is a tool result with text quoting it; a request with tools with two parallel
    calls; anything else with "hello"."""

    @staticmethod
    def plan(last_text: str | None, has_tools: bool):
        if last_text is not None:
            return "text", f"got {last_text}"
        return ("tools", None) if has_tools else ("text", "hello")

    @staticmethod
    def openai(rec):
        body = json.loads(rec["body"])
        last = body["messages"][-1]
        kind, text = Dialects.plan(last["content"] if last["role"] == "tool" else None,
                                   bool(body.get("tools")))
        if body.get("stream"):
            base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
            deltas = [({"role": "assistant", "content": ""}, None)]
            if kind == "text":
                deltas += [({"content": text[:3]}, None), ({"content": text[3:]}, None),
                           ({}, "stop")]
            else:
                deltas += [({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get_weather",
                                                          "arguments": "{\"city\""}}]}, None),
                           ({"tool_calls": [{"index": 0, "function": {
                               "arguments": ":\"Paris\"}"}}]}, None),
                           ({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                             "function": {"name": "get_time",
                                                          "arguments": "{}"}}]}, None),
                           ({}, "tool_calls")]
            chunks = [dict(base, choices=[{"index": 0, "delta": d, "finish_reason": f}])
                      for d, f in deltas]
            chunks.append(dict(base, choices=[], usage={"prompt_tokens": 11,
                                                        "completion_tokens": 4,
                                                        "total_tokens": 15}))
            return Reply(chunks=[f"data: {json.dumps(c)}\n\n".encode() for c in chunks] +
                         [b"data: [DONE]\n\n"], content_type="text/event-stream")
        msg = {"role": "assistant", "content": text}
        if kind == "tools":
            msg = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {
                    "name": "get_time", "arguments": "{}"}}]}
        return Reply(body=json.dumps({"id": "c", "object": "chat.completion", "created": 1,
                                      "model": "m", "choices": [{
                                          "index": 0, "message": msg,
                                          "finish_reason": "tool_calls" if kind == "tools"
                                          else "stop"}],
                                      "usage": {"prompt_tokens": 11, "completion_tokens": 4,
                                                "total_tokens": 15}}).encode())

    @staticmethod
    def anthropic(rec):
        body = json.loads(rec["body"])
        last = body["messages"][-1]["content"]
        result = next((b for b in reversed(last) if isinstance(b, dict)
                       and b["type"] == "tool_result"), None) if isinstance(last, list) else None
        kind, text = Dialects.plan(
            None if result is None else (result["content"][0]["text"]
                                         if isinstance(result["content"], list)
                                         else result["content"]),
            bool(body.get("tools")))
        blocks = [{"type": "text", "text": text}] if kind == "text" else [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}]
        stop = "end_turn" if kind == "text" else "tool_use"
        if not body.get("stream"):
            return Reply(body=json.dumps({
                "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                "content": blocks, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": 11, "output_tokens": 4}}).encode())

        def ev(name, data):
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        out = [ev("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "usage": {"input_tokens": 11,
                                                          "output_tokens": 1}}})]
        for i, b in enumerate(blocks):
            if b["type"] == "text":
                out.append(ev("content_block_start", {"type": "content_block_start", "index": i,
                                                      "content_block": {"type": "text",
                                                                        "text": ""}}))
                out.append(ev("content_block_delta", {"type": "content_block_delta",
                                                      "index": i, "delta": {
                                                          "type": "text_delta",
                                                          "text": b["text"]}}))
            else:
                out.append(ev("content_block_start", {"type": "content_block_start", "index": i,
                                                      "content_block": dict(b, input={})}))
                out.append(ev("content_block_delta", {"type": "content_block_delta",
                                                      "index": i, "delta": {
                                                          "type": "input_json_delta",
                                                          "partial_json": json.dumps(
                                                              b["input"])}}))
            out.append(ev("content_block_stop", {"type": "content_block_stop", "index": i}))
        out += [ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop},
                                     "usage": {"output_tokens": 4}}),
                ev("message_stop", {"type": "message_stop"})]
        return Reply(chunks=out, content_type="text/event-stream")

    @staticmethod
    def gemini(rec):
        body = json.loads(rec["body"])
        last = body["contents"][-1]["parts"]
        resp = next((p["functionResponse"] for p in reversed(last) if "functionResponse" in p),
                    None)
        kind, text = Dialects.plan(None if resp is None else resp["response"]["result"],
                                   bool(body.get("tools")))
        parts = [{"text": text}] if kind == "text" else [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
             "thoughtSignature": "R0VNU0lH"},
            {"functionCall": {"name": "get_time", "args": {}}}]
        usage = {"promptTokenCount": 11, "candidatesTokenCount": 4, "totalTokenCount": 15}
        if ":streamGenerateContent" in rec["path"]:
            chunks = [{"candidates": [{"content": {"role": "model", "parts": [p]},
                                       "index": 0}]} for p in parts]
            chunks.append({"candidates": [{"content": {"role": "model", "parts": [
                {"text": ""}]}, "finishReason": "STOP", "index": 0}], "usageMetadata": usage})
            return Reply(chunks=[f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks],
                         content_type="text/event-stream", close_delimited=True)
        return Reply(body=json.dumps({"candidates": [{"content": {"role": "model",
                                                                  "parts": parts},
                                                      "finishReason": "STOP"}],
                                      "usageMetadata": usage}).encode())

    @staticmethod
    def ollama(rec):
        body = json.loads(rec["body"])
        last = body["messages"][-1]
        kind, text = Dialects.plan(last["content"] if last["role"] == "tool" else None,
                                   bool(body.get("tools")))
        msg = {"role": "assistant", "content": text or ""}
        if kind == "tools":
            msg["tool_calls"] = [{"function": {"name": "get_weather",
                                               "arguments": {"city": "Paris"}}},
                                 {"function": {"name": "get_time", "arguments": {}}}]
        final = {"model": "l", "message": {"role": "assistant", "content": ""}, "done": True,
                 "done_reason": "stop", "prompt_eval_count": 11, "eval_count": 4}
        if body.get("stream"):
            return Reply(chunks=[json.dumps({"model": "l", "message": msg, "done": False})
                                 .encode() + b"\n", json.dumps(final).encode() + b"\n"],
                         content_type="application/x-ndjson")
        return Reply(body=json.dumps(dict(final, message=msg)).encode())


ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}]


# -- Tools as today's clients send them (issue 12): interleaved parallel calls, n, long tool
# names, provider quirks, Claude Code's tool search, Codex's namespaces -----------------------

def _interleaved_openai_stream():
    """Two parallel calls whose fragments alternate (index 0, 1, 0, 1), as some
    OpenAI-compatible servers stream them."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def ch(delta, finish=None):
        return dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}])

    def frag(index, args, **first):
        tc = {"index": index, "function": {"arguments": args}}
        if first:
            tc.update(id=first["id"], type="function")
            tc["function"]["name"] = first["name"]
        return ch({"tool_calls": [tc]})
    chunks = [ch({"role": "assistant", "content": ""}),
              frag(0, "", id="call_a", name="get_weather"),
              frag(1, "{\"tz\":", id="call_b", name="get_time"),
              frag(0, "{\"city\":"), frag(1, "\"UTC\"}"), frag(0, "\"Paris\"}"),
              ch({}, "tool_calls"),
              dict(base, choices=[], usage={"prompt_tokens": 7, "completion_tokens": 5,
                                            "total_tokens": 12})]
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + \
        [b"data: [DONE]\n\n"]


INTERLEAVED_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]


LONG_TOOL = "mcp__claude_ai_Some_Connector__search_the_workspace_documents_by_title_and_body"
ODD_TOOLS = [LONG_TOOL, "files.read", "db:query", "ok_name-1"]


CODEX_NAMESPACE = {"type": "namespace", "name": "mcp__probe",
                   "description": "Tools in the mcp__probe namespace.",
                   "tools": [{"type": "function", "name": "echo_words", "strict": False,
                              "description": "Echo words back", "parameters": {
                                  "type": "object", "properties": {"words": {"type": "string"}},
                                  "required": ["words"]}},
                             {"type": "custom", "name": "raw_patch", "description": "Patch"}]}


# Provider rules the strict fakes below enforce, each as its documentation states it:
# OpenAI: function names "must be a-z, A-Z, 0-9, or contain underscores and dashes, with a
#   maximum length of 64" (Chat Completions API reference, tools[].function.name).
# Gemini: FunctionDeclaration.name "must start with a letter or an underscore. Must be a-z, A-Z,
#   0-9, or contain underscores, dots, colons and dashes, with a maximum length of 64"
#   (google-genai types.FunctionDeclaration; generativelanguage v1beta reference).
# Anthropic: tools[].name matches ^[a-zA-Z0-9_-]{1,128}$ (Messages API reference).
# Mistral: "Tool call id was ... but must be a-z, A-Z, 0-9, with a length of 9." is its 400 for
#   any other id (quoted in langchain-ai/langchain#24668, anomalyco/opencode#1680).
# DeepSeek thinking mode: on a turn with tool calls, "the reasoning_content must be fully passed
#   back to the API in all subsequent requests", else a 400 (api-docs.deepseek.com/guides/
#   thinking_mode, quoted in anomalyco/opencode#24722).
# Gemini 3.6 Flash, 3.5 Flash-Lite and every later release: "Prefilling model turns is no longer
#   supported" (ai.google.dev/gemini-api/docs/latest-model, quoted in cline/cline#12521), a 400
#   "Requests ending with a model turn are not supported." (Zoo-Code-Org/Zoo-Code#1052; checked
#   live for 3.6 Flash and 3.5 Flash-Lite, 200 for 3.5 Flash, in LibreChat-AI/agents#323; 3.7
#   Flash in #412, 3.8 Flash in anomalyco/opencode#47034).
# Gemini 3.7 and 3.8 Flash take thinking levels LOW, MEDIUM, HIGH only, 3.6 Flash MINIMAL too
#   (the model tables of docs.cloud.google.com/gemini-enterprise-agent-platform/models/guides/
#   gemini-3-7-flash and gemini-3-8-flash); minimal is a 400 (fishjar/kiss-translator#1048).
GEMINI_NO_PREFILL = {"gemini-3.5-flash-lite", "gemini-3.6-flash", "gemini-3.7-flash",
                     "gemini-3.8-flash"}
GEMINI_NO_MINIMAL = {"gemini-3.7-flash", "gemini-3.8-flash"}
# Anthropic, Claude 4.6 and later (Opus 5 too): "This model does not support assistant message
#   prefill. The conversation must end with a user message." (platform.claude.com/docs/en/
#   about-claude/models/whats-new-claude-4-6#prefill-removal, quoted in
#   anthropics/claude-code#28478; Kilo-Org/kilocode#13286 for Opus 5).
CLAUDE_NO_PREFILL = re.compile(r"claude-(?:opus|sonnet)-4-[6-9]|claude-(?:opus|sonnet|haiku)-5")
# Anthropic, Opus 4.7 and later and the Claude 5 family: no sampling parameters, a 400
#   "`temperature` is deprecated for this model" (platform.claude.com/docs/en/about-claude/
#   models/whats-new-claude-4-7#sampling-parameters-removed, quoted in anomalyco/models.dev#1468
#   and Comfy-Org/ComfyUI#13923; Sonnet 5 in bagofwords1/bagofwords#523).
# Anthropic, the Claude 5 family: thinking on unless disabled (Opus 5.5, Fable 5.1: always), and
#   forced tool use (tool_choice any or tool) an error with it ("Forced tool use returns an
#   error", platform.claude.com/docs/en/models/opus-5-5/whats-new-opus-5-5; Sonnet 5.5's page).
CLAUDE_NO_SAMPLING = re.compile(r"claude-opus-4-[7-9]|claude-(?:opus|sonnet|haiku|fable)-5")
STRICT_NAMES = {"openai": re.compile(r"[A-Za-z0-9_-]{1,64}\Z"),
                "responses": re.compile(r"[A-Za-z0-9_-]{1,64}\Z"),
                "gemini": re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}\Z"),
                "anthropic": re.compile(r"[A-Za-z0-9_-]{1,128}\Z")}


def _refuse(ctype, message):
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}} \
        if ctype == "anthropic" else {"error": {"message": message, "code": 400,
                                                "type": "invalid_request_error"}}
    return Reply(status=400, body=json.dumps(body).encode())


def _responses_refusal(body):
    """The Responses API's 400 for what the rules above refuse, else None."""
    if "messages" in body or not isinstance(body.get("input"), list):
        return _refuse("openai", "Missing required parameter: 'input'.")
    calls = set()
    for item in body["input"]:
        if item.get("type") == "function_call":
            calls.add(item["call_id"])
        elif item.get("type") == "function_call_output" and item["call_id"] not in calls:
            return _refuse("openai", f"No tool call found for function call output with "
                                     f"call_id {item['call_id']}.")
    for i, t in enumerate(body.get("tools") or []):
        if t.get("type") != "function" or "strict" not in t or "function" in t:
            return _refuse("openai", f"Missing required parameter: 'tools[{i}].strict'.")
    return None


def _responses_answer(body, text, tool, args=None):
    """A Responses API answer, streamed as its events if the request asked: the text, or a
    call of ``tool`` with ``args`` (a reasoning item first, as reasoning models send)."""
    if tool:
        item = {"type": "function_call", "id": "fc_1",
                "call_id": f"call_up{len(body['input'])}", "name": tool,
                "arguments": json.dumps(args or {"q": "x"}), "status": "completed"}
    else:
        item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
    usage = {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 5},
             "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 3},
             "total_tokens": 28}
    resp = {"id": "resp_1", "object": "response", "status": "completed", "model": body["model"],
            "output": [{"type": "reasoning", "id": "rs_1", "summary": []}, item],
            "usage": usage}
    if not body.get("stream"):
        return Reply(body=json.dumps(resp).encode())

    seq = iter(range(100))

    def ev(kind, **data):
        data = dict(type=kind, sequence_number=next(seq), **data)
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
    out = [ev("response.created", response=dict(resp, status="in_progress", output=[])),
           ev("response.output_item.added", output_index=0, item=resp["output"][0]),
           ev("response.output_item.done", output_index=0, item=resp["output"][0])]
    if tool:
        half = len(item["arguments"]) // 2
        out += [ev("response.output_item.added", output_index=1, item=dict(item, arguments="")),
                ev("response.function_call_arguments.delta", output_index=1, item_id="fc_1",
                   delta=item["arguments"][:half]),
                ev("response.function_call_arguments.delta", output_index=1, item_id="fc_1",
                   delta=item["arguments"][half:]),
                ev("response.output_item.done", output_index=1, item=item)]
    else:
        out += [ev("response.output_item.added", output_index=1, item=dict(item, content=[])),
                ev("response.content_part.added", output_index=1, item_id="msg_1",
                   content_index=0, part={"type": "output_text", "text": "",
                                          "annotations": []}),
                ev("response.output_text.delta", output_index=1, item_id="msg_1",
                   content_index=0, delta=text[:3]),
                ev("response.output_text.delta", output_index=1, item_id="msg_1",
                   content_index=0, delta=text[3:]),
                ev("response.output_item.done", output_index=1, item=item)]
    out.append(ev("response.completed", response=resp))
    return Reply(chunks=out, content_type="text/event-stream")


def strict_upstream(ctype, mistral=False, deepseek=False):
    """A fake of channel type ``ctype`` that enforces the rules above, calls the first tool it
    was offered (by the name it got) or, after a tool result, answers "got <result>"."""
    def respond(rec):
        body = json.loads(rec["body"])
        if ctype == "gemini":
            model = rec["path"].split("/models/")[1].split(":")[0]
            if model in GEMINI_NO_PREFILL and body["contents"][-1]["role"] == "model":
                return _refuse(ctype, "Requests ending with a model turn are not supported.")
            level = body.get("generationConfig", {}).get("thinkingConfig", {}).get(
                "thinkingLevel")
            if model in GEMINI_NO_MINIMAL and str(level).lower() == "minimal":
                return _refuse(ctype, "'minimal' is not a supported thinking level for this "
                                      "model. Allowed values are: medium, low, high.")
            names = [d["name"] for t in body.get("tools") or []
                     for d in t["functionDeclarations"]]
            names += [p["functionCall"]["name"] for c in body["contents"] for p in c["parts"]
                      if "functionCall" in p]
            last = body["contents"][-1]["parts"][-1].get("functionResponse")
            result = last and last["response"]["result"]
        elif ctype == "responses":
            refused = _responses_refusal(body)
            if refused:
                return refused
            names = [t["name"] for t in body.get("tools") or []]
            names += [i["name"] for i in body["input"] if i.get("type") == "function_call"]
            last = body["input"][-1]
            result = last["output"] if last.get("type") == "function_call_output" else None
        elif ctype == "anthropic":
            forced = (body.get("tool_choice") or {}).get("type") in ("any", "tool")
            if forced and re.match(r"claude-(?:opus|sonnet|haiku|fable|mythos)-5", body["model"]):
                return _refuse(ctype, "Forced tool use is not supported with thinking; use "
                                      "tool_choice auto or none.")
            sampled = next((k for k in ("temperature", "top_p", "top_k") if k in body), None)
            if CLAUDE_NO_SAMPLING.match(body["model"]) and sampled:
                return _refuse(ctype, f"`{sampled}` is deprecated for this model.")
            if CLAUDE_NO_PREFILL.match(body["model"]) and body["messages"][-1]["role"] == \
                    "assistant":
                return _refuse(ctype, "This model does not support assistant message prefill. "
                                      "The conversation must end with a user message.")
            names = [t["name"] for t in body.get("tools") or []]
            names += [b["name"] for m in body["messages"] if isinstance(m["content"], list)
                      for b in m["content"] if b["type"] == "tool_use"]
            last = body["messages"][-1]["content"]
            result = next((b["content"][0]["text"] for b in last if isinstance(b, dict) and
                           b["type"] == "tool_result"), None) if isinstance(last, list) else None
        else:
            names = [t["function"]["name"] for t in body.get("tools") or []]
            calls = [c for m in body["messages"] for c in m.get("tool_calls") or []]
            names += [c["function"]["name"] for c in calls]
            ids = [c["id"] for c in calls] + [m["tool_call_id"] for m in body["messages"]
                                              if m["role"] == "tool"]
            bad_id = next((i for i in ids if not re.fullmatch(r"[A-Za-z0-9]{9}", i)), None)
            if mistral and bad_id:
                return _refuse(ctype, f"Tool call id was {bad_id} but must be a-z, A-Z, 0-9, "
                                      f"with a length of 9.")
            if mistral and "stream_options" in body:
                return _refuse(ctype, "stream_options: extra inputs are not permitted")
            if deepseek and any(m["role"] == "assistant" and m.get("tool_calls") and
                                not m.get("reasoning_content") for m in body["messages"]):
                return _refuse(ctype, "Missing `reasoning_content` field in the assistant "
                                      "message at message index 1.")
            last = body["messages"][-1]
            result = last["content"] if last["role"] == "tool" else None
        bad = next((n for n in names if not STRICT_NAMES[ctype].match(n)), None)
        if bad:
            return _refuse(ctype, f"Invalid function name {bad!r}")
        first = names[0] if names and result is None else None
        return _answer_in(ctype, body, rec, f"got {result}" if result else "", first)
    return respond


def _answer_in(ctype, body, rec, text, tool, args=None):
    """One answer in channel type ``ctype``'s own format, streamed if the request asked: the
    text, or a call of ``tool`` with ``args``."""
    args = args or {"q": "x"}
    if ctype == "responses":
        return _responses_answer(body, text, tool, args)
    if ctype == "gemini":
        part = {"functionCall": {"name": tool, "args": args}} if tool else {"text": text}
        chunk = {"candidates": [{"content": {"role": "model", "parts": [part]},
                                 "finishReason": "STOP", "index": 0}],
                 "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2}}
        if ":streamGenerateContent" in rec["path"]:
            return Reply(chunks=[f"data: {json.dumps(chunk)}\r\n\r\n".encode()],
                         content_type="text/event-stream")
        return Reply(body=json.dumps(chunk).encode())
    if ctype == "anthropic":
        block = {"type": "tool_use", "id": "toolu_9", "name": tool, "input": args} if tool \
            else {"type": "text", "text": text}
        msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
               "content": [block], "stop_reason": "tool_use" if tool else "end_turn",
               "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 2}}
        return Reply(body=json.dumps(msg).encode())
    msg = {"role": "assistant", "content": text or None}
    if tool:
        msg["tool_calls"] = [{"id": f"call{len(body['messages']):05d}", "type": "function",
                              "function": {"name": tool, "arguments": json.dumps(args)}}]
    if not body.get("stream"):
        return Reply(body=json.dumps({"id": "c", "object": "chat.completion", "created": 1,
                                      "model": "m", "choices": [{
                                          "index": 0, "message": msg, "finish_reason":
                                          "tool_calls" if tool else "stop"}]}).encode())
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    delta = dict(msg, tool_calls=[dict(c, index=0) for c in msg.get("tool_calls", [])])
    chunks = [dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}]),
              dict(base, choices=[{"index": 0, "delta": {},
                                   "finish_reason": "tool_calls" if tool else "stop"}])]
    return Reply(chunks=[f"data: {json.dumps(c)}\n\n".encode() for c in chunks] +
                 [b"data: [DONE]\n\n"], content_type="text/event-stream")


def _need_xvfb():
    """Without Xvfb the GUI tests skip, saying why; in CI they must run, so they fail."""
    if shutil.which("Xvfb") is None:
        if os.environ.get("CI"):
            pytest.fail("Xvfb is missing and there is no DISPLAY: CI runs the GUI tests "
                        "(apt-get install xvfb)")
        pytest.skip("GUI test: needs a DISPLAY or Xvfb (apt-get install xvfb); CI runs it")


@pytest.fixture(scope="session")
def display():
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    _need_xvfb()
    # Xvfb picks a free display itself and writes its number to the pipe once it accepts
    # clients: parallel workers (pytest -n) and other users' Xvfbs never collide.
    reader, writer = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(writer), "-screen", "0", "1280x800x24",
                             "-nolisten", "tcp"], pass_fds=(writer,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(writer)
    answer = b""
    with open(reader, "rb", buffering=0) as pipe:
        while not answer.endswith(b"\n"):
            assert select.select([pipe], [], [], 10)[0], "Xvfb did not start in 10 s"
            piece = pipe.read(16)
            assert piece, "Xvfb exited without naming its display"
            answer += piece
    num = int(answer)
    os.environ["DISPLAY"] = f":{num}"
    yield os.environ["DISPLAY"]
    del os.environ["DISPLAY"]
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def app(display, tmp_path):
    made = []

    def make(channels=(), settings=None, start=False):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"settings": dict({"port": 0}, **(settings or {})),
                                    "channels": list(channels),
                                    "tokens": [{"name": "main", "key": TOKEN}]}))
        store, _ = ag.ConfigStore.load(str(path))
        a = ag.App(store, host="127.0.0.1", start=start)
        a.confirm_answer = True
        made.append(a)
        a.root.update()
        return a
    yield make
    for a in made:
        a.close()


RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]}},
                   {"type": "function", "name": "get_time",
                    "parameters": {"type": "object", "properties": {}}},
                   {"type": "web_search"}]


genai = _Lazy("google.genai")
genai_errors = _Lazy("google.genai.errors")
genai_types = _Lazy("google.genai.types")


def _genai(g, version="v1beta", key=TOKEN):
    return genai.Client(api_key=key, http_options=genai_types.HttpOptions(
        base_url=g.url, api_version=version, timeout=15000,
        client_args={"verify": sdk_tls()},
        async_client_args={"verify": sdk_tls(), "ssl": sdk_tls()}))     # "ssl": for websockets


def _genai_tools():
    return [genai_types.Tool(function_declarations=[
        genai_types.FunctionDeclaration(name="get_weather", description="Weather", parameters={
            "type": "OBJECT", "properties": {"city": {"type": "STRING"}},
            "required": ["city"]}),
        genai_types.FunctionDeclaration(name="get_time", description="Time")])]


OVERFLOWS = [
    (400, {"type": "error", "error": {"type": "invalid_request_error",
                                      "message": "prompt is too long: 215000 tokens > 200000 "
                                                 "maximum"}}, 215000, 200000),
    (400, {"type": "error", "error": {"type": "invalid_request_error", "message":
           "input length and `max_tokens` exceed context limit: 188059 + 20000 > 200000, "
           "decrease input length or `max_tokens` and try again"}}, 208059, 200000),
    (400, {"error": {"message": "This model's maximum context length is 128000 tokens. However,"
                                " your messages resulted in 130015 tokens. Please reduce the "
                                "length of the messages.", "type": "invalid_request_error",
                     "param": "messages", "code": "context_length_exceeded"}}, 130015, 128000),
    (400, {"error": {"message": "Your input exceeds the context window of this model.",
                     "code": "context_length_exceeded"}}, None, None),
    (400, {"object": "error", "message": "This model's maximum context length is 16384 tokens. "
           "However, you requested 122946 tokens (112946 in the messages, 10000 in the "
           "completion).", "type": "BadRequestError", "param": None, "code": 400},
     122946, 16384),
    (400, {"error": {"code": 400, "message": "The input token count (1200293) exceeds the "
                     "maximum number of tokens allowed (1048576).",
                     "status": "INVALID_ARGUMENT"}}, 1200293, 1048576),
    (500, {"error": "the input length exceeds the context length"}, None, None),
    (400, {"error": {"code": 400, "message": "the request exceeds the available context size, "
                     "try increasing it", "type": "exceed_context_size_error",
                     "n_prompt_tokens": 9000, "n_ctx": 8192}}, 9000, 8192),
]


SIG = "EqMBCkYIBRgCKkC0c2lnbmF0dXJl"


def _open_sockets() -> int:
    """Sockets this process holds. Files are not counted: the usage database opens its -wal
    and -shm files when its writer first needs them, whatever other tests ran before."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):          # the listing's own fd is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


# =================================================================================================
# 0. Docstring, imports, __all__
# =================================================================================================

def test_00_imports_only_the_standard_library():
    """The gateway runs on a bare Python: every import statement anywhere in the module, lazy
    ones in functions included, names a module of the standard library."""
    with open(ag.__file__, encoding="utf-8") as f:
        source = f.read()
    names = set(re.findall(r"^[ \t]*from[ \t]+(\w+)\S*[ \t]+import\b", source, re.M))
    for line in re.findall(r"^[ \t]*import[ \t]+(.+)$", source, re.M):
        names.update(part.split()[0].split(".")[0] for part in line.split(","))
    assert {"asyncio", "tkinter", "sqlite3", "dataclasses", "importlib"} <= names
    assert names - sys.stdlib_module_names - {"__future__"} == set()


def test_00_all_names_exist_and_the_outline_names_every_section():
    assert len(set(ag.__all__)) == len(ag.__all__)
    assert [name for name in ag.__all__ if not hasattr(ag, name)] == []
    with open(ag.__file__, encoding="utf-8") as f:
        banners = re.findall(r"^# (\d+)\. (.+)$", f.read(), re.M)
    assert [int(num) for num, _ in banners] == list(range(15))
    outline = ag.__doc__.split("Outline")[1].split("Each section")[0]
    for num, title in banners:
        assert f"{num}. {title.split()[0]}" in outline, (num, title)


# =================================================================================================
# 1. Constants and limits
# =================================================================================================

def test_01_limits_are_positive_and_fit_inside_each_other():
    numbers = {name: value for name, value in vars(ag).items()
               if name.isupper() and type(value) in (int, float)}
    assert len(numbers) > 50 and [n for n, v in numbers.items() if v <= 0] == []
    assert ag.MAX_REQUEST_LINE < ag.MAX_HEAD_BYTES and ag.MAX_CHUNK_LINE < ag.MAX_HEAD_BYTES
    assert ag.DECODE_PIECE <= ag.MAX_BUFFERED_RESPONSE <= ag.DEFAULT_MAX_RESPONSE_MB << 20
    assert ag.MAX_ERROR_BODY <= ag.DEFAULT_MAX_RESPONSE_MB << 20
    assert ag.SSE_CARRY_LIMIT <= ag.MAX_EVENT_BYTES
    assert ag.USAGE_BATCH_ROWS <= ag.USAGE_QUEUE_LIMIT
    assert ag.DEBUG_CAPTURE_BODY_BYTES <= ag.DEFAULT_MAX_BODY_MB << 20


def test_01_timers_are_ordered_as_their_comments_say():
    assert ag.CLIENT_CHECK_SECONDS < ag.KEEPALIVE_PING_SECONDS < ag.WRITE_TIMEOUT
    assert ag.POOL_IDLE_TTL < 60                   # servers commonly drop idle ones after 60 s
    assert ag.COOLDOWN_SECONDS <= ag.COOLDOWN_MAX_SECONDS
    assert ag.GOOGLE_TOKEN_LAST < ag.GOOGLE_TOKEN_MARGIN < ag.GOOGLE_ASSERTION_SECONDS <= 3600
    assert ag.CONFIG_SETTLE_SECONDS < ag.CONFIG_POLL_SECONDS      # an error is seen twice
    assert ag.USAGE_FLUSH_SECONDS < ag.USAGE_PRUNE_SECONDS


def test_01_defaults_are_loopback_and_names_are_distinct():
    import ipaddress
    assert ipaddress.ip_address(ag.DEFAULT_HOST).is_loopback and 0 < ag.DEFAULT_PORT < 65536
    assert len({ag.OPENAI, ag.ANTHROPIC, ag.RESPONSES, ag.GEMINI}) == 4
    types = [ag.TYPE_OPENAI, ag.TYPE_ANTHROPIC, ag.TYPE_GEMINI, ag.TYPE_OLLAMA, ag.TYPE_CUSTOM,
             ag.TYPE_AZURE]
    assert len(set(types)) == len(types)
    assert re.fullmatch(r"\d+\.\d+\.\d+", ag.__version__) and ag.TOKEN_PREFIX == "sk-gw-"


# =================================================================================================
# 2. Errors
# =================================================================================================

@pytest.mark.parametrize("status, kind", [
    (400, "invalid_request"), (401, "authentication"), (404, "not_found"),
    (413, "request_too_large"), (429, "rate_limit"), (502, "bad_gateway"), (504, "timeout"),
    (418, "invalid_request"), (599, "api_error")])
def test_02_error_kind_follows_the_status(status, kind):
    err = ag.GatewayError(status, "why")
    assert (err.status, err.kind, str(err), err.message) == (status, kind, "why", "why")
    assert ag.GatewayError(status, "why", kind="permission").kind == "permission"


def test_02_error_classes_carry_what_the_client_is_told():
    a, b = ag.GatewayError(400, "x"), ag.GatewayError(400, "y")
    a.headers.append(("Retry-After", "1"))
    assert b.headers == [] and (a.code, a.param) == (None, None)
    up = ag.UpstreamError(503, "busy", retryable=True, upstream_status=529, code="c")
    assert isinstance(up, ag.GatewayError) and up.kind == "overloaded"
    assert (up.retryable, up.upstream_status, up.code) == (True, 529, "c")
    assert issubclass(ag.ProtocolError, ag.GatewayError)
    over = ag.ContextOverflow("too long", tokens=300_000, limit=200_000)
    assert (over.status, over.kind, over.code, over.param) == (
        400, "invalid_request", "context_length_exceeded", "messages")
    assert (over.tokens, over.limit) == (300_000, 200_000)
    assert not issubclass(ag.ConfigError, ag.GatewayError)     # never an HTTP answer


# =================================================================================================
# 3. Small helpers
# =================================================================================================

def test_03_headers_case_insensitive_and_repeated():
    h = ag.Headers([("Content-Type", "a"), ("X-A", "1"), ("x-a", "2")])
    assert h.get("content-type") == "a"
    assert h.get("X-A") == "1, 2"
    assert h.get_all("x-a") == ["1", "2"]
    h.set("x-a", "3")
    assert h.get_all("X-A") == ["3"] and "CONTENT-TYPE" in h and "nope" not in h


def test_03_name_matches_wildcards():
    assert ag.name_matches("gpt-4o*", "GPT-4o-mini")
    assert ag.name_matches("*claude*", "anthropic/claude-3.5")
    assert not ag.name_matches("gpt-4o*", "gpt-4")
    assert ag.name_matches("Qwen2.5:7b", "qwen2.5:7b")
    assert not ag.name_matches("qwen2.5", "qwen2x5")            # dots are literal


def test_03_mask_secret_never_shows_the_middle():
    key = "sk-proj-abcdefghijklmnopqrstuvwxyz"
    masked = ag.mask_secret(key)
    assert "ijklmnop" not in masked and masked.startswith("sk-pro") and masked.endswith("wxyz")
    assert ag.mask_secret("short") == "*****"


def test_03_escape_record_escapes_every_string_and_copies_only_then():
    clean = {"model": "gpt-4o", "tried": ["a", "b"], "failures": [{"error": "429 slow down"}],
             "status": 200, "error": None}
    assert ag.escape_record(clean) is clean                 # nothing to escape: no copy
    dirty = {"model": "m\x1b[31m", "tried": ["a", "b\nc"], "status": 502,
             "failures": [{"channel": "x", "error": "bad\u2028line"}], "skipped": []}
    before = json.dumps(dirty)
    out = ag.escape_record(dirty)
    assert out == {"model": "m\\x1b[31m", "tried": ["a", "b\\nc"], "status": 502,
                   "failures": [{"channel": "x", "error": "bad\\u2028line"}], "skipped": []}
    assert json.dumps(dirty) == before                      # the original is left as it was
    assert out["tried"] is not dirty["tried"] and out["skipped"] is dirty["skipped"]


def test_03_json_loads_raises_400():
    with pytest.raises(ag.GatewayError) as e:
        ag.json_loads(b"{nope")
    assert e.value.status == 400 and "not valid JSON" in e.value.message


# -- strict JSON (issue 9): refused with a 400 naming what and where -----------------------------

@pytest.mark.parametrize("data, needle", [
    (b'{"model":"a","model":"b"}', "'model' appears twice"),
    (b'{"x":[{"k":1,"k":2}]}', "'k' appears twice"),
    (b'{"t":NaN}', "NaN"), (b'[Infinity]', "Infinity"), (b'[-Infinity]', "-Infinity"),
    (b'{"t":1e400}', "1e400 is too large"), (b'[-2.5E+999]', "too large"),
    (b'{"m":[{"content":"\\ud800"}]}', "m[0].content"),
    (b'{"\\udc00x":1}', "a key in the top-level object"),
    (b'["\\ud83d x"]', "unpaired"),
    (b"[" + b"1" * 5000 + b"]", "too many digits"),
    (b"[" * 100_000 + b"]" * 100_000, "deeper than 256"),
    (b'{"a":' * 300 + b"1" + b"}" * 300, "deeper than 256"),
    (b'"\xed\xa0\x80"', "not valid UTF-8"),                # a surrogate encoded in UTF-8
    (b"<html>bad gateway</html>", "not valid JSON"), (b'{"a": [1, 2', "not valid JSON"),
])
def test_03_strict_json_refuses(data, needle):
    with pytest.raises(ag.GatewayError) as e:
        ag.json_loads(data)
    assert e.value.status == 400 and needle in e.value.message, e.value.message


def test_03_strict_json_accepts_what_is_valid_and_keeps_upstream_status():
    assert ag.json_loads('["\\ud83d\\ude00", "\\\\ud800"]') == ["\U0001f600", "\\ud800"]
    assert ag.json_loads(b'\xef\xbb\xbf{"a": 1.5e300}') == {"a": 1.5e300}
    deep = "[" * 256 + "]" * 256
    assert ag.json_loads(deep) and not ag.json_too_deep(deep)
    assert ag.json_too_deep("[" * 257 + "]" * 257)
    comb = "[[[[[1]]]]," * 296 + "0" + "]" * 296     # 296 levels, each with a tooth 4 deep
    assert ag.json_too_deep(comb, 299) and not ag.json_too_deep(comb, 300)
    brackets_in_strings = '{"a": "' + "[{" * 1000 + '\\\\\\"[", "b": [[1]]}'
    assert not ag.json_too_deep(brackets_in_strings, 3)
    assert ag.json_too_deep(brackets_in_strings, 2)
    assert ag.json_loads(brackets_in_strings)["b"] == [[1]]
    assert ag.json_loads(b'{"k":1,"k":2}', unique_keys=False) == {"k": 2}
    with pytest.raises(ag.ProtocolError) as e:
        ag.json_loads(b"[NaN]", "an upstream event", status=502, error=ag.ProtocolError)
    assert e.value.status == 502 and e.value.message.startswith("an upstream event")


# =================================================================================================
# 4. HTTP/1.1 wire format
# =================================================================================================

def test_04_parse_request_head():
    h = ag.parse_request_head(b"POST /v1/chat/completions?beta=true HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 5\r\n\r\n")
    assert (h.method, h.path, h.query, h.version) == ("POST", "/v1/chat/completions",
                                                       "beta=true", "HTTP/1.1")
    assert ag.body_framing(h.headers) == ("length", 5)


@pytest.mark.parametrize("head,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n", 400),
    (b"GET nopath HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),            # RFC 9110 5.5: CR, LF, NUL
    (b"GET / HTTP/1.1\r\nX: a\r\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
])
def test_04_parse_request_head_rejects(head, status):
    with pytest.raises(ag.ProtocolError) as e:
        ag.parse_request_head(head)
    assert e.value.status == status


@pytest.mark.parametrize("headers,status", [
    ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], 400),
    ([("Content-Length", "abc")], 400),
    ([("Content-Length", "\u00b2")], 400),          # "²": str.isdigit() says yes, int() no
    ([("Content-Length", "5"), ("Content-Length", "6")], 400),
    ([("Transfer-Encoding", "gzip")], 501),
])
def test_04_body_framing_rejects(headers, status):
    with pytest.raises(ag.ProtocolError) as e:
        ag.body_framing(ag.Headers(headers))
    assert e.value.status == status


def test_04_response_framing_and_keep_alive():
    H = ag.Headers
    assert ag.response_framing("HEAD", 200, H([("Content-Length", "9")])) == ("none", 0)
    assert ag.response_framing("GET", 204, H()) == ("none", 0)
    assert ag.response_framing("GET", 200, H([("Transfer-Encoding", "chunked")])) == \
        ("chunked", 0)
    assert ag.response_framing("GET", 200, H()) == ("close", 0)
    assert ag.response_framing("GET", 200, H([("Content-Length", "12")])) == ("length", 12)
    for bad in ("\u00b2", "-1", "1 2", "0x10"):
        with pytest.raises(ag.ProtocolError) as e:
            ag.response_framing("GET", 200, H([("Content-Length", bad)]))
        assert e.value.status == 502 and "invalid Content-Length" in e.value.message
    assert ag.keep_alive("HTTP/1.1", H()) and not ag.keep_alive("HTTP/1.0", H())
    assert not ag.keep_alive("HTTP/1.1", H([("Connection", "close")]))
    # Status lines: a version byte that is not ASCII was a UnicodeDecodeError, a 500 (found by a
    # raw-socket fuzzer of upstream answers); "HTTP/1.x" other than 1.0 and 1.1 is no version.
    assert ag.parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n")[:3] == ("HTTP/1.0", 200, "OK")
    for line in (b"HTTP/1.\xcf 200 OK", b"HTTP/1.x 200 OK", b"HTTP/1.10 200 OK", b"HTTP/2 200"):
        with pytest.raises(ag.ProtocolError) as e:
            ag.parse_response_head(line + b"\r\nContent-Length: 0\r\n\r\n")
        assert e.value.status == 502 and "malformed status line" in e.value.message


def test_04_multipart_offsets_allow_exact_replacement():
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF\x00\x01binary\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            b"--XyZ--\r\n")
    ctype = "multipart/form-data; boundary=XyZ"
    parts = ag.parse_multipart(body, ctype)
    assert [ag.multipart_field_name(h) for h, _, _ in parts] == ["file", "model"]
    out = ag.replace_multipart_field(body, ctype, "model", "whisper-large-v3")
    assert out == body.replace(b"whisper-1", b"whisper-large-v3")


# =================================================================================================
# 5. Incremental decoders
# =================================================================================================

def _feed_bytewise(dec, data):
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i:i + 1])
    return out


CHUNKED = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"


def test_05_chunked_whole_and_bytewise():
    d1 = ag.ChunkedDecoder()
    assert b"".join(d1.feed(CHUNKED)) == b"hello world" and d1.done
    d2 = ag.ChunkedDecoder()
    assert b"".join(_feed_bytewise(d2, CHUNKED)) == b"hello world" and d2.done


@pytest.mark.parametrize("data", [b"zz\r\nab\r\n", b"3\r\nabcd\r\n", b"-1\r\n",
                                  b"\r\n", b"1" * 17 + b"\r\n"])
def test_05_chunked_rejects_bad_sizes(data):
    with pytest.raises(ag.ProtocolError):
        ag.ChunkedDecoder().feed(data)


def test_05_chunked_sizes_read_once_are_kept_up_to_their_limit(monkeypatch):
    monkeypatch.setattr(ag, "_CHUNK_SIZES", {})
    monkeypatch.setattr(ag, "CHUNK_SIZES_KEPT", 8)
    data = b"".join(b"%x\r\n%s\r\n" % (n, b"z" * n) for n in range(1, 21)) * 2
    assert b"".join(ag.ChunkedDecoder().feed(data)) == \
        b"".join(b"z" * n for n in range(1, 21)) * 2
    assert ag._CHUNK_SIZES == {b"%x" % n: n for n in range(1, 9)}


def test_05_chunked_keeps_bytes_after_the_end_apart():
    d = ag.ChunkedDecoder()
    assert d.feed(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200") == [b"ok"]
    assert d.done and d.tail == b"HTTP/1.1 200"


SSE = ("\ufeffevent: message_start\r\ndata: {\"a\": \"é€😀\"}\r\n\r\n"
       ": comment\n"
       "data:no-space\n\n"
       "data: line1\ndata: line2\rid: 7\r\r"
       "event: empty\n\n"
       "data: last\n\n").encode()


def test_05_sse_whole_and_bytewise_match():
    expected = [("message_start", '{"a": "é€😀"}', None), (None, "no-space", None),
                (None, "line1\nline2", "7"), (None, "last", "7")]
    assert ag.SSEDecoder().feed(SSE) == expected
    assert _feed_bytewise(ag.SSEDecoder(), SSE) == expected


def test_05_sse_split_crlf_between_reads():
    d = ag.SSEDecoder()
    assert d.feed(b"data: a\r") == []
    assert d.feed(b"\n") == []                      # completes the CRLF, not a blank line
    assert d.feed(b"\r") == [(None, "a", None)]     # this one is the blank line
    assert d.feed(b"\ndata: b\n\n") == [(None, "b", None)]


def test_05_sse_does_not_split_on_unicode_line_separators():
    payload = 'data: {"t": "a\u2028b\u0085c"}\n\n'.encode()
    assert ag.SSEDecoder().feed(payload) == [(None, '{"t": "a\u2028b\u0085c"}', None)]


# Whole events read at once (the usual "data: ..." and "event: ...\ndata: ..." shapes) must
# give what the line-by-line reading gives (bytewise feeding never has a whole event at hand).
SSE_LF = ("data: {\"a\":1}\n\n"
          "event: content_block_delta\ndata: {\"b\":2}\n\n"
          "data: \n\n"                                   # empty data is still an event
          "data: two\ndata: lines\n\n"
          "event: named-only\n\n"                        # no data: nothing dispatched
          ": keep-alive comment\n\n"
          "id: 9\ndata: with id\n\n"
          "data: after id\n\n\n\n"                       # extra blank lines dispatch nothing
          "event: late\ndata: z\n\n"
          "event: e\ndata: x\nretry: 5\n\n"
          "data:tight\n\n"
          "event:tight\ndata: y\n\n"
          "data: unfinished").encode()


def test_05_sse_whole_events_match_line_by_line():
    expected = [(None, '{"a":1}', None), ("content_block_delta", '{"b":2}', None),
                (None, "", None), (None, "two\nlines", None), (None, "with id", "9"),
                (None, "after id", "9"), ("late", "z", "9"), ("e", "x", "9"), (None, "tight", "9"),
                ("tight", "y", "9")]
    whole = ag.SSEDecoder()
    assert whole.feed(SSE_LF) == expected
    assert whole.feed(b"\n\n") == [(None, "unfinished", "9")]
    assert _feed_bytewise(ag.SSEDecoder(), SSE_LF + b"\n\n") == expected + \
        [(None, "unfinished", "9")]
    # An event begun in one read and ended in the next is finished by line, not as a block.
    split = ag.SSEDecoder()
    assert split.feed(b"event: a\n") == []
    assert split.feed(b"data: 1\n\ndata: 2\n\n") == [("a", "1", None), (None, "2", None)]
    # ... and the whole events after it are still read at once: two reads cut anywhere.
    for cut in range(len(SSE_LF) + 1):
        d = ag.SSEDecoder()
        assert d.feed(SSE_LF[:cut]) + d.feed(SSE_LF[cut:]) + d.feed(b"\n\n") == \
            expected + [(None, "unfinished", "9")], cut


def test_05_ndjson_whole_and_bytewise():
    data = b'{"a":1}\r\n\n{"b":[2]}\n{"done":true}'
    assert ag.NDJSONDecoder().feed(data, final=True) == [{"a": 1}, {"b": [2]}, {"done": True}]
    d = ag.NDJSONDecoder()
    out = _feed_bytewise(d, data) + d.feed(b"", final=True)
    assert out == [{"a": 1}, {"b": [2]}, {"done": True}]
    with pytest.raises(ag.ProtocolError):
        ag.NDJSONDecoder().feed(b"not json\n")


# -- limits on one event or line (issue 9): raised, never grown --------------------------------

def test_05_sse_and_ndjson_event_limits_bytewise(monkeypatch):
    monkeypatch.setattr(ag, "MAX_EVENT_BYTES", 64)
    ok = b"data: " + b"a" * 40 + b"\n\n" + b"data: " + b"b" * 40 + b"\n\n"
    assert len(_feed_bytewise(ag.SSEDecoder(), ok)) == 2     # many events, each under the limit
    for endless in (b"data: " + b"x" * 100,                  # one endless line
                    b"data: x\n" * 20,                       # data lines without a blank line
                    b"data\n" * 20):
        with pytest.raises(ag.ProtocolError) as e:
            _feed_bytewise(ag.SSEDecoder(), endless)
        assert e.value.status == 502 and "SSE event longer than" in e.value.message
    assert len(_feed_bytewise(ag.NDJSONDecoder(), (b'{"a":"' + b"y" * 40 + b'"}\n') * 3)) == 3
    with pytest.raises(ag.ProtocolError) as e:
        _feed_bytewise(ag.NDJSONDecoder(), b'{"a":"' + b"y" * 100)
    assert e.value.status == 502 and "NDJSON line longer than" in e.value.message
    with pytest.raises(ag.ProtocolError) as e:
        ag.NDJSONDecoder().feed(b'{"a": NaN}\n')
    assert "NaN" in e.value.message
    pt = ag.SSEPassthrough()
    monkeypatch.setattr(ag, "SSE_CARRY_LIMIT", 16)
    with pytest.raises(ag.ProtocolError):
        for _ in range(10):
            pt.feed(b"data: " + b"z" * 20)
    assert pt.open > 0                          # the relay ends the cut event before its error


def test_05_converted_decoder_refuses_an_event_that_is_not_json():
    dec = ag.OpenAIStreamDecoder()
    assert dec.feed(b"data: [DONE]\n\ndata: \n\n") == []
    with pytest.raises(ag.ProtocolError) as e:
        dec.feed(b'data: {"choices": [Infinity]}\n\n')
    assert e.value.status == 502 and "Infinity" in e.value.message


def test_05_sse_passthrough_holds_partial_events_and_reads_usage():
    pt = ag.SSEPassthrough(ag.DIALECTS[ag.OPENAI].usage)
    events = b"".join(openai_stream_chunks(usage=(11, 4)))
    out = b""
    for i in range(0, len(events), 7):
        piece = pt.feed(events[i:i + 7])
        assert piece == b"" or piece.endswith(b"\n\n")
        out += piece
    assert out + pt.flush() == events
    assert (pt.input_tokens, pt.output_tokens) == (11, 4)
    pa = ag.SSEPassthrough(ag.DIALECTS[ag.ANTHROPIC].usage)
    for c in anthropic_stream_chunks():
        pa.feed(c[:5])
        pa.feed(c[5:])
    assert (pa.input_tokens, pa.output_tokens) == (12, 7)


# Issue 15: usage is found by search; an event whose usage is null is not parsed
def test_05_sse_passthrough_reads_usage_among_null_usage_events():
    # With stream_options.include_usage OpenAI sends "usage": null in every chunk and the totals
    # in the last one; lines may end in CRLF, and a line may mention usage more than once.
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\r\n\r\n',
              b'data: {"choices":[],"usage": null, "x":"usage"}\r\n\r\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7},'
              b'"note":"\\"usage"}\r\n\r\n', b"data: [DONE]\r\n\r\n"]
    pt = ag.SSEPassthrough(ag.DIALECTS[ag.OPENAI].usage)
    assert pt.feed(b"".join(events)) + pt.flush() == b"".join(events)
    assert (pt.input_tokens, pt.output_tokens) == (5, 7)
    pt = ag.SSEPassthrough(ag.DIALECTS[ag.OPENAI].usage)
    assert pt.feed(events[0] + events[1]) == events[0] + events[1] and pt.usage is None
    # The search is for the bare word: a text that says it is passed on as it came, no usage.
    said = b'data: {"choices":[{"index":0,"delta":{"content":"usage: \\"usage\\" low"}}]}\n\n'
    pt = ag.SSEPassthrough(ag.DIALECTS[ag.OPENAI].usage)
    assert pt.feed(said + events[3]) == said + events[3] and pt.usage is None


def _es_all_types():
    return es_message([
        ("t", 0, None), ("f", 1, None), ("byte", 2, -7), ("short", 3, -30000),
        ("int", 4, 2_000_000_000), ("long", 5, -(2 ** 62)), ("blob", 6, b"\x00\xffraw"),
        ("str", 7, "h\u00e9llo \u2603"), ("when", 8, 1764590400123),
        ("id", 9, bytes(range(16))), (":message-type", 7, "event")], b'{"x":1}')


def test_05_eventstream_matches_botocore_fed_any_way():
    from botocore.eventstream import EventStreamBuffer
    stream = (_es_all_types() + bedrock_chunk({"type": "message_start"}) + es_message([], b"")
              + es_event("contentBlockDelta", {"delta": {"text": "hi"}, "contentBlockIndex": 0}))
    ref = EventStreamBuffer()
    ref.add_data(stream)
    expected = [(m.headers, m.payload) for m in ref]
    assert len(expected) == 4 and expected[0][0]["when"] == 1764590400123
    whole = ag.EventStreamDecoder()
    assert whole.feed(stream) == expected
    whole.end()
    for step in (1, 3, 16, 101):
        dec, got = ag.EventStreamDecoder(), []
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i:i + step])
        dec.end()
        assert got == expected, step
    headers = expected[0][0]
    assert headers["t"] is True and headers["f"] is False and headers["str"] == "h\u00e9llo \u2603"
    assert headers["blob"] == b"\x00\xffraw" and headers["id"] == bytes(range(16))


def test_05_eventstream_refuses_broken_framing():
    good = es_event("chunk", {"bytes": ""})
    cases = [(es_event("chunk", {})[:-1] + b"\x00", "message CRC mismatch"),
             (es_message([], b"x", bad_crc=True), "message CRC mismatch"),
             (es_message([], b"x", bad_prelude=True), "prelude CRC mismatch"),
             (es_message([("n", 42, None)]), "unknown type 42"),
             (es_message([("a", 7, "1"), ("a", 7, "2")]), "'a' is repeated"),
             (es_message([(f"h{i}", 0, None) for i in range(ag.EVENTSTREAM_MAX_HEADERS + 1)]),
              f"more than {ag.EVENTSTREAM_MAX_HEADERS} headers"),
             (es_message([], total=15), "do not fit")]
    for data, why in cases:
        dec = ag.EventStreamDecoder()
        with pytest.raises(ag.ProtocolError, match=re.escape(why)) as e:
            dec.feed(good + data)
        assert e.value.status == 502
    # The size check fires on the 12-byte prelude, before the body is buffered.
    huge = es_message([], total=ag.MAX_EVENT_BYTES + 1)[:12]
    with pytest.raises(ag.ProtocolError, match="longer than 16 MiB") as e:
        ag.EventStreamDecoder().feed(huge)
    assert e.value.status == 502
    cut = ag.EventStreamDecoder()
    assert len(cut.feed(good + good[:20])) == 1
    with pytest.raises(ag.ProtocolError, match="ended inside a message"):
        cut.end()


def test_05_eventstream_exceptions_become_gateway_errors():
    chunk = bedrock_chunk({"type": "content_block_delta"})
    dec = ag.EventStreamDecoder()
    with pytest.raises(ag.UpstreamError) as e:
        for i in range(0, 5000):                        # byte by byte up to the exception
            dec.feed(es_exception("throttlingException", "Too many tokens, slow down")[i:i + 1])
    err = e.value
    assert (err.status, err.retryable, err.upstream_status, err.kind) == (429, True, 429,
                                                                         "rate_limit")
    assert "throttlingException: Too many tokens, slow down" in err.message
    # Events before the exception in the same read are returned; the error comes next.
    dec = ag.EventStreamDecoder()
    got = dec.feed(chunk + es_exception("validationException", "bad max_tokens") + chunk)
    assert [h[":event-type"] for h, _ in got] == ["chunk"]
    with pytest.raises(ag.UpstreamError) as e:
        dec.end()
    assert (e.value.status, e.value.retryable) == (400, False)
    assert "bad max_tokens" in e.value.message
    for kind, status in (("modelStreamErrorException", 502), ("internalServerException", 502),
                         ("serviceUnavailableException", 503), ("somethingNewException", 502)):
        with pytest.raises(ag.UpstreamError) as e:
            ag.EventStreamDecoder().feed(es_exception(kind, "x"))
        assert e.value.status == status and e.value.retryable and kind in e.value.message
    error = es_message([(":message-type", 7, "error"), (":error-code", 7, "ThrottlingException"),
                        (":error-message", 7, "Rate exceeded")])
    with pytest.raises(ag.UpstreamError, match="ThrottlingException: Rate exceeded") as e:
        ag.EventStreamDecoder().feed(error)
    assert e.value.status == 429


# =================================================================================================
# 6. Stream helpers (over a real TCP connection: our end as asyncio streams, the peer plain)
# =================================================================================================

async def _streams(limit=ag.MAX_HEAD_BYTES):
    """Our end of a loopback TCP connection as asyncio streams, and the peer's plain socket."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    reader, writer = await asyncio.open_connection(sock=ours, limit=limit)
    peer.settimeout(5)
    return reader, writer, peer


def test_06_read_head_whole_split_closed_idle_and_slow():
    async def go():
        reader, writer, peer = await _streams()
        watchdog = ag.Watchdog(reader)
        peer.sendall(b"GET / HTTP/1.1\r\nHo")
        asyncio.get_running_loop().call_later(0.02, peer.sendall, b"st: x\r\n\r\nGET /next")
        assert await ag.read_head(reader, watchdog, 1, 1) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        assert await reader.read(9) == b"GET /next"          # nothing past the head was taken
        with pytest.raises(TimeoutError):                    # idle: nothing within first_timeout
            await ag.read_head(reader, ag.Watchdog(reader), 0.05, 1)
        reader, writer, peer = await _streams()
        peer.sendall(b"GET / HTTP/1.1\r\n")                  # the rest never comes
        with pytest.raises(ag.ProtocolError) as e:
            await ag.read_head(reader, ag.Watchdog(reader), 1, 0.05)
        assert e.value.status == 408 and "rest of the message head" in e.value.message
        reader, writer, peer = await _streams()
        peer.sendall(b"GET / HTTP/1.1\r\nHost:")
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(ag.ProtocolError) as e:
            await ag.read_head(reader, ag.Watchdog(reader), 1, 1)
        assert e.value.status == 400 and "closed in the middle" in e.value.message
        reader, writer, peer = await _streams()
        peer.close()                                         # closed before a byte: not an error
        assert await ag.read_head(reader, ag.Watchdog(reader), 1, 1) is None
        reader, writer, peer = await _streams(limit=64)
        peer.sendall(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n")
        with pytest.raises(ag.ProtocolError) as e:
            await ag.read_head(reader, ag.Watchdog(reader), 1, 1, too_large_status=502)
        assert e.value.status == 502 and "message head larger than" in e.value.message
    run(go())


def test_06_iter_body_framings_pipelining_limit_and_early_close():
    async def body(data, mode, length=0, shut=True, **kw):
        reader, writer, peer = await _streams()
        peer.sendall(data)
        if shut:
            peer.shutdown(socket.SHUT_WR)
        got = await ag.read_body(reader, ag.Watchdog(reader), mode, length, 0.2, **kw)
        return got, await reader.read()

    async def go():
        assert await body(b"4\r\nWiki\r\n5;x=1\r\npedia\r\n0\r\n\r\nPOST /next",
                          "chunked") == (b"Wikipedia", b"POST /next")    # the next one intact
        assert await body(b"hello world", "length", 5) == (b"hello", b" world")
        big = ag.READ_SIZE + 5                        # past one read: read piece by piece
        assert await body(b"x" * big + b"next", "length", big) == (b"x" * big, b"next")
        with pytest.raises(ag.ProtocolError, match="5 body bytes still to come"):
            await body(b"x" * (big - 5), "length", big)
        assert await body(b"all of it", "close") == (b"all of it", b"")
        assert await body(b"not a body", "none") == (b"", b"not a body")
        with pytest.raises(ag.ProtocolError, match="3 body bytes still to come") as e:
            await body(b"ab", "length", 5, error_status=502)
        assert e.value.status == 502
        with pytest.raises(ag.ProtocolError, match="closed inside a chunked body"):
            await body(b"5\r\nab", "chunked")
        with pytest.raises(ag.GatewayError, match="too much"):
            await body(b"x" * 100, "close", limit=10,
                       limit_error=lambda: ag.GatewayError(413, "too much"))
        with pytest.raises(TimeoutError):                    # a silent peer: the read times out
            await body(b"ab", "length", 5, shut=False)
    run(go())


def test_06_write_and_drain_and_close_writer_with_a_peer_that_does_not_read():
    async def go():
        reader, writer, peer = await _streams()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):                    # the buffers fill; nobody reads
            for _ in range(1000):
                await ag.write_and_drain(writer, b"x" * 65536, timeout=0.1)
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        await ag.close_writer(writer, timeout=0.1)           # unsent data: aborted, not kept
        assert time.monotonic() - t0 < 2 and writer.transport.is_closing()
        def drain():
            while peer.recv(1 << 20):
                pass
        with pytest.raises(ConnectionResetError):            # the reset dropped what was queued
            await asyncio.to_thread(drain)                   # (the loop closes the socket)
        with pytest.raises(ConnectionResetError, match="peer closed"):
            await ag.write_and_drain(writer, b"late")
        reader, writer, peer = await _streams()
        await ag.write_and_drain(writer, b"hello")
        await ag.close_writer(writer)                        # a reading peer gets it all, then EOF
        assert await asyncio.to_thread(peer.recv, 100) == b"hello"
        assert await asyncio.to_thread(peer.recv, 100) == b""
    run(go())


# =================================================================================================
# 7. Upstream HTTP client
# =================================================================================================

async def _client_call(url, client=None, **kw):
    c = client or ag.UpstreamClient()
    resp = await c.request(kw.pop("method", "POST"), url, kw.pop("headers", []),
                           kw.pop("body", b"{}"), **kw)
    body = await resp.read()
    return resp, body


def test_07_pool_reuses_connections_read_to_the_end(upstream):
    up = upstream([openai_chat_reply(), openai_chat_reply(),
                   Reply(body=b"{}", headers={"Connection": "close"}), openai_chat_reply()])

    async def go():
        c = ag.UpstreamClient()
        for _ in range(4):
            resp, body = await _client_call(up.url + "/x", c)
            assert resp.status == 200 and body
        return c.idle_count()
    idle = run(go())
    ports = [r["client_port"] for r in up.requests]
    assert ports[0] == ports[1] == ports[2]        # reused while bodies were read to the end
    assert ports[3] != ports[2]                     # "Connection: close" was honoured
    assert idle == 1


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's")
def test_07_an_upstream_with_nagle_on_is_not_held_by_acks(upstream):
    # A server without TCP_NODELAY sends a small write only once the one before is acknowledged,
    # and Linux delays the ACK on a reused connection by at least 40 ms (TCP_DELACK_MIN), so
    # every answer after the first would take 40 ms or more (measured: 44 ms without
    # ack_at_once, 0.5-0.8 ms with it). The bound is for that kernel timer, not a performance
    # figure: the fastest of four answers on the kept-alive connection beats it.
    events = [b'data: {"n": %d}\n\n' % i for i in range(10)]
    up = upstream([Reply(chunks=events, content_type="text/event-stream")], nagle=True)

    async def go():
        c, took = ag.UpstreamClient(), []
        for _ in range(5):
            t0 = time.perf_counter()
            resp, body = await _client_call(up.url, c)
            took.append(time.perf_counter() - t0)
            assert resp.status == 200 and body == b"".join(events)
        return took
    took = run(go())
    assert len({r["client_port"] for r in up.requests}) == 1      # one kept-alive connection
    assert min(took[1:]) < 0.030, took


def _dropping_port() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full, so that a connect to it hangs (the kernel drops
    the SYN) as one to an address behind a broken route does; and the connections filling it."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fill: list[socket.socket] = []
    for _ in range(8):
        s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect(hole.getsockname())
        except TimeoutError:
            s.close()
            return hole, fill
        fill.append(s)
    pytest.fail("the kernel accepted every connection: no port that drops SYNs")


def test_07_an_address_that_drops_packets_costs_a_quarter_second(upstream):
    # The resolver answers an address that never answers first (a broken IPv6 route), then one
    # that works: the second is tried HAPPY_EYEBALLS_DELAY later, while the first still waits,
    # instead of after the whole connect timeout, which would end in a 504.
    up = upstream()
    hole, fill = _dropping_port()

    async def go():
        seen = []

        async def resolve(host, port, **kw):
            seen.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", hole.getsockname()),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", up.port))]
        asyncio.get_running_loop().getaddrinfo = resolve
        resp, body = await _client_call(f"http://dual.example:{up.port}/x", connect_timeout=2)
        return resp.status, body, seen
    try:
        status, body, seen = run(go())
    finally:
        for s in fill + [hole]:
            s.close()
    assert status == 200 and body and seen == ["dual.example"]
    assert up.last()["headers"]["host"] == f"dual.example:{up.port}"


def test_07_a_connect_tries_at_most_connect_addresses_max(monkeypatch):
    # A DNS answer may list hundreds of addresses: a connect tries the first sixteen, each
    # refused at once here, then fails with the last one's error.
    port = dead_port()
    tried = []
    connect_one = ag._connect_one

    async def counting(info):
        tried.append(info[4])
        return await connect_one(info)
    monkeypatch.setattr(ag, "_connect_one", counting)

    async def go():
        async def resolve(host, p, **kw):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))] * 40
        asyncio.get_running_loop().getaddrinfo = resolve
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(f"http://many.example:{port}/x", connect_timeout=5)
        return e.value
    err = run(go())
    assert err.status == 502 and "cannot connect to many.example" in err.message
    assert len(tried) == ag.CONNECT_ADDRESSES_MAX == 16


def test_07_address_families_take_turns():
    def v6(n):
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (f"2001:db8::{n}", 443, 0, 0))

    def v4(n):
        return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"192.0.2.{n}", 443))
    assert ag.interleave_families([v6(1), v6(2), v6(3), v4(1)]) == [v6(1), v4(1), v6(2), v6(3)]
    assert ag.interleave_families([v4(1), v4(2), v6(1), v6(2)]) == [v4(1), v6(1), v4(2), v6(2)]
    assert ag.interleave_families([]) == []


def _answering_socket(answer: bytes, then: threading.Event):
    """A one-connection server that reads a request head, writes ``answer`` and then waits for
    ``then`` before closing: a body cut short, or one that stops coming."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(answer)
            then.wait(10)
        srv.close()
    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/x"


@pytest.mark.parametrize("hang_up,status,words", [
    (True, 502, "connection closed with 90 body bytes still to come"),
    (False, 504, "upstream went silent for 0.2 s mid-answer")])
def test_07_a_small_answer_cut_short_or_stalled_is_an_error_not_a_short_body(hang_up, status,
                                                                          words):
    # A whole answer of a few bytes is read in one call (no stages): it must still fail as the
    # piecewise read does, never hand on the ten bytes that came as if they were the answer.
    then = threading.Event()
    if hang_up:
        then.set()
    url = _answering_socket(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n" + b'{"id": 1, ', then)

    async def go():
        c = ag.UpstreamClient()
        resp = await c.request("POST", url, [], b"{}", timeout=0.2)
        with pytest.raises(ag.UpstreamError) as e:
            await resp.read()
        return e.value, c.idle_count()
    try:
        err, idle = run(go())
    finally:
        then.set()
    assert (err.status, err.message) == (status, words) and idle == 0


def test_07_unread_body_is_not_returned_to_the_pool(upstream):
    up = upstream([openai_stream_reply()])

    async def go():
        c = ag.UpstreamClient()
        resp = await c.request("POST", up.url, [], b"{}")
        resp.aclose_nowait()                        # body left unread
        await _client_call(up.url, c)
    run(go())
    assert up.requests[0]["client_port"] != up.requests[1]["client_port"]


def test_07_chunked_close_delimited_gzip_and_deflate(upstream):
    text = b"x" * 5000 + "é".encode()
    up = upstream([
        Reply(chunks=[text[:10], text[10:]]),
        Reply(chunks=[text[:3], text[3:]], close_delimited=True),
        Reply(body=gzip.compress(text), headers={"Content-Encoding": "gzip"}),
        Reply(body=zlib.compress(text), headers={"Content-Encoding": "deflate"}),
        Reply(body=zlib.compress(text)[2:-4], headers={"Content-Encoding": "deflate"}),
    ])

    async def go():
        return [(await _client_call(up.url))[1] for _ in range(5)]
    assert run(go()) == [text] * 5


def test_07_whole_answer_cap_and_bomb_inflated_in_pieces(upstream):
    up = upstream([Reply(body=b"x" * (3 << 20)),
                   Reply(chunks=gzip_bomb(0.0625), headers={"Content-Encoding": "gzip"}),
                   Reply(chunks=gzip_bomb(0.0625), headers={"Content-Encoding": "gzip"}),
                   Reply(body=b"y" * (3 << 20))])

    async def go():
        c = ag.UpstreamClient(max_response=2 << 20)
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(up.url, c)
        assert e.value.status == 502 and "settings.max_response_mb" in e.value.message
        resp = await c.request("POST", up.url, [], b"{}")
        sizes = [len(piece) async for piece in resp.iter_bytes()]
        assert sum(sizes) == 64 << 20 and max(sizes) <= ag.DECODE_PIECE   # never inflated whole
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(up.url, c)                  # the bomb read whole: refused at 2 MiB
        assert "2 MiB limit" in e.value.message
        resp = await c.request("POST", up.url, [], b"{}")
        assert await resp.read(ag.MAX_ERROR_BODY) == b"y" * ag.MAX_ERROR_BODY   # error bodies
    run(go())


def _raw_upstream(script):
    """A TCP server that runs ``script(conn)`` on each connection once the request head came."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    got = conn.recv(65536)
                    if not got:
                        break
                    data += got
                try:
                    script(conn)
                except OSError:
                    pass
    threading.Thread(target=serve, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.getsockname()[1]}"


def _wait_for_close(conn):
    conn.settimeout(10)
    try:
        while conn.recv(1024):
            pass
    except OSError:
        pass


def test_07_response_head_deadline(monkeypatch):
    monkeypatch.setattr(ag, "UPSTREAM_HEAD_TIMEOUT", 0.3)

    def drip_head(conn):                     # the head begins, then never completes
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        _wait_for_close(conn)

    def early_hints_forever(conn):           # interim heads do not extend the deadline
        for _ in range(200):
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
            time.sleep(0.01)
        _wait_for_close(conn)
    srv1, url1 = _raw_upstream(drip_head)
    srv2, url2 = _raw_upstream(early_hints_forever)

    async def go():
        t0 = time.monotonic()
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(url1, timeout=30)
        assert e.value.status == 502 and "rest of the message head" in e.value.message
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(url2, timeout=0.5)
        assert e.value.status == 504 and time.monotonic() - t0 < 5
    try:
        run(go())
    finally:
        srv1.close()
        srv2.close()


def test_07_first_byte_and_idle_timeouts(upstream):
    up = upstream([Reply(hang=3), Reply(chunks=[b"a", b"b"], delay=3)])

    async def go():
        t0 = time.monotonic()
        with pytest.raises(ag.UpstreamError) as e1:
            await _client_call(up.url, timeout=0.25)
        assert e1.value.status == 504 and time.monotonic() - t0 < 2.5
        with pytest.raises(ag.UpstreamError) as e2:
            await _client_call(up.url, timeout=0.5)
        assert e2.value.status == 504 and "silent" in e2.value.message
    run(go())


def test_07_connect_error_is_retryable_502():
    async def go():
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(f"http://127.0.0.1:{dead_port()}/v1")
        return e.value
    err = run(go())
    assert err.status == 502 and err.retryable and "cannot connect" in err.message


@pytest.fixture
def self_signed(cert_files):
    return server_context(cert_files)


def test_07_tls_verification_on_by_default_and_off_per_channel(upstream, self_signed):
    up = upstream([openai_chat_reply()], tls_context=self_signed)

    async def go():
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(up.url)
        assert e.value.status == 502 and "TLS" in e.value.message
        resp, body = await _client_call(up.url, verify_tls=False)
        assert resp.status == 200 and b"hello" in body
    run(go())


def test_07_http_proxy_connect_tunnel_and_absolute_form(upstream, self_signed):
    plain = upstream([openai_chat_reply(text="plain")])
    tls = upstream([openai_chat_reply(text="tunnel")], tls_context=self_signed)
    proxy = _ProxyBase(HTTPProxyHandler)
    purl = f"http://user:p%40ss@127.0.0.1:{proxy.server_address[1]}"

    async def go():
        _, b1 = await _client_call(plain.url + "/v1/x", proxy=purl)
        _, b2 = await _client_call(tls.url.replace("127.0.0.1", "localhost") + "/v1/y",
                                   proxy=purl, verify_tls=False)
        return b1, b2
    b1, b2 = run(go())
    assert b"plain" in b1 and b"tunnel" in b2
    absolute, connect = proxy.seen
    assert absolute.startswith(f"POST http://127.0.0.1:{plain.port}/v1/x HTTP/1.1")
    assert "Proxy-Authorization: Basic dXNlcjpwQHNz" in absolute       # user:p@ss
    assert connect.startswith(f"CONNECT localhost:{tls.port} HTTP/1.1")
    proxy.shutdown()


def test_07_socks5_and_socks5h_with_auth(upstream):
    up = upstream([openai_chat_reply(text="via socks")])
    proxy = _ProxyBase(Socks5Handler)
    port = proxy.server_address[1]

    async def go():
        _, b1 = await _client_call(f"http://localhost:{up.port}/",
                                   proxy=f"socks5://127.0.0.1:{port}")
        _, b2 = await _client_call(f"http://localhost:{up.port}/",
                                   proxy=f"socks5h://u:pw@127.0.0.1:{port}")
        return b1, b2
    b1, b2 = run(go())
    assert b"via socks" in b1 and b"via socks" in b2
    assert ("connect", 1, "127.0.0.1", up.port) in proxy.seen          # resolved by us
    assert ("connect", 3, "localhost", up.port) in proxy.seen          # resolved by the proxy
    assert ("auth", b"u", b"pw") in proxy.seen
    proxy.shutdown()


# -- URLs fetched for clients: address classifier and spellings (SSRF) --

def test_07_connect_to_pins_the_address_and_keeps_the_name(upstream):
    up = upstream([Reply(body=b"pinned", content_type="text/plain")])

    async def go():
        c = ag.UpstreamClient()
        # .test never resolves (RFC 6761): only the given addresses are used. ::1 is refused
        # (the fake listens on 127.0.0.1 only), so the next address is tried.
        resp, body = await _client_call(f"http://img.test:{up.port}/a", c, method="GET",
                                        body=b"", connect_to=("::1", "127.0.0.1"))
        return resp.status, body
    assert run(go()) == (200, b"pinned")
    assert [r["path"] for r in up.requests] == ["/a"]
    assert up.requests[0]["headers"]["host"] == f"img.test:{up.port}"


@pytest.mark.parametrize("addr,why", [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "shared (CGNAT)"),
    ("0.0.0.0", "'this network'"), ("0.1.2.3", "'this network'"), ("224.0.0.251", "multicast"),
    ("239.255.255.250", "multicast"), ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"), ("192.0.2.7", "documentation"),
    ("198.51.100.7", "documentation"), ("203.0.113.7", "documentation"),
    ("198.18.0.1", "benchmarking"), ("192.0.0.8", "IETF protocol"),
    ("::", "unspecified"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local"), ("fc00::1", "private (unique local)"),
    ("fd12:3456::1", "private (unique local)"), ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"), ("3fff::1", "documentation"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"), ("::7f00:1", "IPv4-compatible"),
    ("::ffff:127.0.0.1", "loopback (carried in IPv6)"),
    ("::ffff:a9fe:a9fe", "link-local (carried in IPv6)"),
    ("64:ff9b::a00:1", "private (carried in IPv6)"), ("64:ff9b:1::1", "local NAT64"),
    ("2002:7f00:1::1", "loopback (carried in IPv6)"),
    ("2002:c0a8:101::1", "private (carried in IPv6)"), ("fec0::1", "site-local"),
    ("8.8.8.8", None), ("1.1.1.1", None), ("93.184.216.34", None), ("172.32.0.1", None),
    ("100.128.0.1", None), ("2606:4700::1111", None), ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None), ("2002:808:808::1", None),
])
def test_07_address_classifier(addr, why):
    assert ag.address_refusal(__import__("ipaddress").ip_address(addr)) == why


@pytest.mark.parametrize("spelling,addr", [
    ("127.0.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("0177.1", "127.0.0.1"), ("localhost", "127.0.0.1"), ("::ffff:7f00:1", "::ffff:127.0.0.1"),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1"), ("0", "0.0.0.0"), ("0xa9fea9fe", "169.254.169.254"),
    ("2852039166", "169.254.169.254"), ("012.1", "10.0.0.1"), ("3232235777", "192.168.1.1"),
])
def test_07_every_spelling_resolves_to_the_address_it_means(spelling, addr):
    """The system resolver (inet_aton rules) decides what a host string means; the classifier
    judges the address it returns, so no spelling slips past as a 'name'."""
    found = dict(run(ag.resolve_for_fetch(spelling, 80)))
    assert addr in found and all(why is not None for why in found.values())


def test_07_fetch_urls_are_normalised_and_schemes_refused():
    target, host, port = ag._fetch_host(
        "http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3./a b/\u00e9?k=1 2#f",
        "image")
    assert (target, host, port) == ("http://localhost/a%20b/%C3%A9?k=1%202", "localhost", 80)
    assert ag._fetch_host("https://[::FFFF:7f00:1]:8443/x", "image")[1:] == ("::ffff:7f00:1",
                                                                             8443)
    for url, shown in [("file:///etc/passwd", "(none)"), ("ftp://files.test/x", "files.test"),
                       ("gopher://127.0.0.1:70/", "127.0.0.1"),
                       ("javascript:alert(1)", "(none)")]:
        with pytest.raises(ag.GatewayError) as e:
            ag._fetch_host(url, "image")
        assert e.value.status == 400 and f"host '{shown}'" in e.value.message
        assert "only http: and https:" in e.value.message
        assert "fetch_private_urls" in e.value.message
    for url in ("http://a..b\udcff/", "http://img\x00.test/", "http://img test/",
                "http://[::1/", "http://img.test:99999/"):
        with pytest.raises(ag.GatewayError, match="host or port is not valid"):
            ag._fetch_host(url, "image")


def ours_for(req, headers, service, region, session_token="FQoGZXIvYXdzEXAMPLE//token"):
    signed = headers["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    given = [(k, v) for k, v in headers.items()
             if k.lower() in signed and not k.lower().startswith(("x-amz-", "host"))]
    stamp = headers["X-Amz-Date"]
    now = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    return dict(ag.sigv4_headers(req.method, req.url, given, req.body or b"", region=region,
                                 service=service, access_key="AKIDEXAMPLE",
                                 secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                 session_token=session_token, now=now))


def test_07_sigv4_matches_botocores_client_for_bedrock():
    model = "anthropic.claude-sonnet-4-5-20250929-v1:0"
    req, headers = botocore_signed("bedrock-runtime", "us-east-1", lambda c: c.invoke_model(
        modelId=model, body=b'{"messages":[]}', contentType="application/json",
        accept="application/json"))
    # botocore puts the model id in the path with ':' escaped once (serialize.py
    # _render_uri_template -> percent_encode), and signs for "bedrock".
    assert req.url == ("https://bedrock-runtime.us-east-1.amazonaws.com/model/"
                       "anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke")
    assert "X-Amz-Content-SHA256" not in headers
    ours = ours_for(req, headers, "bedrock", "us-east-1")
    assert ours == {k: headers[k] for k in ("X-Amz-Date", "X-Amz-Security-Token",
                                            "Authorization")}
    assert "/us-east-1/bedrock/aws4_request" in ours["Authorization"]
    # An inference-profile id and the streaming operation, without a session token.
    req, headers = botocore_signed(
        "bedrock-runtime", "eu-central-1", lambda c: c.invoke_model_with_response_stream(
            modelId=f"eu.{model}", body=b'{"x":"\xc3\xa9"}'), session_token=None)
    ours = ours_for(req, headers, "bedrock", "eu-central-1", session_token=None)
    assert "X-Amz-Security-Token" not in ours
    assert ours["Authorization"] == headers["Authorization"]
    # ListFoundationModels: a GET with a query string, on the control-plane host.
    req, headers = botocore_signed("bedrock", "eu-west-3", lambda c: c.list_foundation_models(
        byProvider="Anthropic", byOutputModality="TEXT", byInferenceType="ON_DEMAND"))
    assert "?" in req.url
    assert ours_for(req, headers, "bedrock", "eu-west-3") == {
        k: headers[k] for k in ("X-Amz-Date", "X-Amz-Security-Token", "Authorization")}


def test_07_sigv4_matches_botocores_signer_at_a_fixed_time(monkeypatch):
    import datetime

    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials
    fixed = datetime.datetime(2026, 3, 4, 5, 6, 7)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: fixed)
    now = calendar.timegm(fixed.timetuple())
    cases = [
        ("GET", "https://bedrock.us-west-2.amazonaws.com/foundation-models"
                "?b=2&a=x%20y%2Fz&a=1&empty=", [], b""),
        ("POST", "https://bedrock-runtime.us-west-2.amazonaws.com/model/"
                 "us.meta.llama3-3-70b-instruct-v1%3A0/converse",
         [("Content-Type", "application/json"), ("X-Custom", "  a   b  ")], b'{"m":[]}'),
        ("POST", "https://example.test:8443/model/a%2Fb/./x/../invoke", [("Accept", "*/*")],
         b"\x00\x01"),
    ]
    for token in (None, "session-token+/="):
        for method, url, hdrs, body in cases:
            creds = botocore.credentials.Credentials("AKID", "secret/key", token)
            req = botocore.awsrequest.AWSRequest(method=method, url=url, headers=dict(hdrs),
                                                 data=body)
            botocore.auth.SigV4Auth(creds, "bedrock", "us-west-2").add_auth(req)
            ours = dict(ag.sigv4_headers(method, url, hdrs, body, region="us-west-2",
                                         service="bedrock", access_key="AKID",
                                         secret_key="secret/key", session_token=token,
                                         now=now))
            assert ours["X-Amz-Date"] == "20260304T050607Z"
            assert ours["Authorization"] == req.headers["Authorization"], url
            assert ours.get("X-Amz-Security-Token") == req.headers.get("X-Amz-Security-Token")


@pytest.fixture(scope="module")
def rsa_pem():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
    pkcs1 = key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()).decode()
    return key, pkcs8, pkcs1


def service_account_info(pem, token_uri="https://oauth2.googleapis.com/token"):
    return {"type": "service_account", "project_id": "p", "private_key_id": "kid-123",
            "private_key": pem, "client_email": "gw@p.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": token_uri}


def _b64url_json(part):
    return json.loads(ag.base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def verify_jwt(public_key, jwt):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    head, claims, sig = jwt.split(".")
    public_key.verify(ag.base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)),
                      f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return _b64url_json(head), _b64url_json(claims)


def test_07_rs256_signatures_are_cryptographys_and_the_jwt_is_googles(rsa_pem):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    key, pkcs8, pkcs1 = rsa_pem
    for pem in (pkcs8, pkcs1):
        parsed = ag.rsa_private_key(pem)
        assert parsed.n == key.public_key().public_numbers().n
        for data in (b"", b"header.claims", os.urandom(1000)):
            # PKCS#1 v1.5 is deterministic: the same bytes as cryptography's own signature.
            assert ag.rs256_sign(parsed, data) == key.sign(data, padding.PKCS1v15(),
                                                           hashes.SHA256())
    account = ag.service_account(service_account_info(pkcs8))
    assert "PRIVATE" not in repr(account) and "gw@p.iam" in repr(account)
    header, claims = verify_jwt(key.public_key(), ag.google_jwt_assertion(account, 1764590400.7))
    assert header == {"alg": "RS256", "typ": "JWT", "kid": "kid-123"}
    assert claims == {"iss": "gw@p.iam.gserviceaccount.com",
                      "scope": "https://www.googleapis.com/auth/cloud-platform",
                      "aud": "https://oauth2.googleapis.com/token",
                      "iat": 1764590400, "exp": 1764590400 + 3600}


def test_07_bad_service_account_keys_get_clear_config_errors(rsa_pem):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    _, pkcs8, _ = rsa_pem
    body = "".join(pkcs8.splitlines()[1:-1])
    der = ag.base64.b64decode(body)

    def pem(data, label="PRIVATE KEY"):
        text = ag.base64.b64encode(data).decode()
        return f"-----BEGIN {label}-----\n{text}\n-----END {label}-----\n"
    fmt = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        *fmt, serialization.NoEncryption()).decode()
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        *fmt, serialization.NoEncryption()).decode()
    encrypted = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        *fmt, serialization.BestAvailableEncryption(b"pw")).decode()
    cases = [("just text", "no '-----BEGIN PRIVATE KEY-----'"),
             (pkcs8.replace(body[:10], body[:9] + "!"), "no '-----BEGIN PRIVATE KEY-----'"),
             (pem(der[:-7]), "runs past its end"),
             (pem(der + b"\x00"), "data after the PrivateKeyInfo"),
             (pem(der, "RSA PRIVATE KEY"), "expected the RSA n"),
             (ec_pem, "not an RSA key"),
             (small, "shorter than the 2048 bits"),
             (encrypted, "the key is encrypted"),
             ("x" * (ag.MAX_KEY_PEM + 1), "longer than 64 KiB")]
    for text, why in cases:
        with pytest.raises(ag.ConfigError) as e:
            ag.service_account(service_account_info(text), "channels[2].service_account")
        msg = str(e.value)
        assert msg.startswith("channels[2].service_account: 'private_key' is not a usable RSA")
        assert why in msg and body[20:40] not in msg
    for info, why in (([], "expected the JSON object"),
                      (dict(service_account_info(pkcs8), type="authorized_user"),
                       "not 'service_account'"),
                      ({"private_key": pkcs8}, "'client_email' is missing")):
        with pytest.raises(ag.ConfigError, match=re.escape(why)):
            ag.service_account(info)


def google_token_endpoint(upstream, public_key, fail_first=0):
    """A token endpoint per Google's "Using OAuth 2.0 for Server to Server Applications": a
    form POST of grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer and the assertion,
    answered {"access_token", "expires_in", "token_type": "Bearer"}; refused as RFC 6749 5.2."""
    fake = upstream()
    issued = []

    def respond(rec):
        assert rec["headers"]["content-type"] == "application/x-www-form-urlencoded"
        form = dict(ag.urllib.parse.parse_qsl(rec["body"].decode(), strict_parsing=True))
        assert set(form) == {"grant_type", "assertion"}
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        _, claims = verify_jwt(public_key, form["assertion"])
        assert claims["aud"] == f"{fake.url}/token"
        if len(issued) < fail_first:
            issued.append(None)
            return Reply(400, json.dumps({"error": "invalid_grant",
                                          "error_description": "Invalid JWT Signature."}
                                         ).encode())
        issued.append(f"ya29.token-{len(issued)}")
        return Reply(body=json.dumps({"access_token": issued[-1], "expires_in": 3599,
                                      "token_type": "Bearer"}).encode())
    fake.responder = respond
    return fake, issued


def test_07_google_tokens_are_cached_renewed_and_shared(upstream, rsa_pem):
    key, pkcs8, _ = rsa_pem
    fake, issued = google_token_endpoint(upstream, key.public_key())
    account = ag.service_account(service_account_info(pkcs8, f"{fake.url}/token"))
    clock = _Clock()

    async def main():
        client = ag.UpstreamClient()
        src = ag.GoogleTokenSource(account, client, clock=clock)
        # Twenty callers at once share one exchange.
        assert set(await asyncio.gather(*[src.token() for _ in range(20)])) == {issued[0]}
        assert len(fake.requests) == 1
        clock.now += 3599 - ag.GOOGLE_TOKEN_MARGIN - 1          # cached: no new exchange
        assert await src.token() == issued[0] and len(fake.requests) == 1
        clock.now += 2             # within the margin: the old token now, a renewal behind it
        assert await src.token() == issued[0]
        assert await src.token() == issued[0]
        renewal = src._renewal
        assert renewal is not None and await renewal == "ya29.token-1"
        assert await src.token() == "ya29.token-1" and len(fake.requests) == 2
        clock.now += 3599 - ag.GOOGLE_TOKEN_LAST + 1   # nearly expired: callers wait for a new one
        assert await asyncio.gather(src.token(), src.token()) == ["ya29.token-2"] * 2
        assert len(fake.requests) == 3
        client.close()
    run(main())


def test_07_google_token_refusals_fail_the_waiters_and_the_next_call_retries(upstream, rsa_pem):
    key, pkcs8, _ = rsa_pem
    fake, issued = google_token_endpoint(upstream, key.public_key(), fail_first=1)
    account = ag.service_account(service_account_info(pkcs8, f"{fake.url}/token"))

    async def main():
        client = ag.UpstreamClient()
        src = ag.GoogleTokenSource(account, client, clock=_Clock())
        results = await asyncio.gather(src.token(), src.token(), return_exceptions=True)
        for err in results:
            assert isinstance(err, ag.UpstreamError) and err.status == 502 and err.retryable
            assert err.upstream_status == 400
            assert err.message == ("Google's token endpoint for service account gw@p.iam."
                                   "gserviceaccount.com answered 400 invalid_grant: Invalid "
                                   "JWT Signature.")
        assert len(fake.requests) == 1
        assert await src.token() == "ya29.token-1" and len(fake.requests) == 2
        fake.responder = lambda rec: Reply(body=b'{"access_token": "", "expires_in": 10}')
        src2 = ag.GoogleTokenSource(account, client, clock=_Clock())
        with pytest.raises(ag.UpstreamError, match="unusable answer: no access_token"):
            await src2.token()
        fake.responder = lambda rec: Reply(body=b"<html>")
        with pytest.raises(ag.UpstreamError, match="unusable answer: the answer of Google"):
            await src2.token()
        client.close()
    run(main())


# =================================================================================================
# 8. HTTP server (raw sockets: an independent client that sees exactly what we send)
# =================================================================================================

def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of Content-Length framed responses into (status, body) pairs."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def test_08_keep_alive_and_pipelining_answer_in_order(gw, upstream):
    up = upstream()
    up.responder = lambda rec: openai_chat_reply(text=json.loads(rec["body"])["model"])
    g = gw([chan(up)])
    reqs = b""
    for i in range(3):
        body = json.dumps({"model": f"model-{i}", "messages": []}).encode()
        reqs += (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                 f"{TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    reqs += b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    got = _responses(raw_exchange(g.port, reqs))
    assert [s for s, _ in got] == [200, 200, 200, 200]
    assert [json.loads(b)["choices"][0]["message"]["content"] for _, b in got[:3]] == \
        ["model-0", "model-1", "model-2"]


def test_08_chunked_request_body(gw, upstream):
    up = upstream()
    g = gw([chan(up)])
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 10]), body[i:i + 10])
                       for i in range(0, len(body), 10)) + b"0\r\n\r\n"
    out = raw_exchange(g.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                       b"Authorization: Bearer " + TOKEN.encode() +
                       b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
    assert out.startswith(b"HTTP/1.1 200")
    assert up.last()["body"] == body


@pytest.mark.parametrize("raw,status", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"BROKEN LINE\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET /health HTTP/1.1\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n{}", 400),
    # A bare CR in a value was taken (found by a raw-socket fuzzer: with a channel, it failed
    # as the upstream request was written, a 500).
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
     b"\r\r\nContent-Length: 2\r\n\r\n{}", 400),
])
def test_08_framing_errors(gw, raw, status):
    g = gw()
    out = raw_exchange(g.port, raw)
    assert out.startswith(f"HTTP/1.1 {status}".encode()), out[:80]
    assert b"Connection: close" in out
    body = json.loads(out.partition(b"\r\n\r\n")[2])
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]


def test_08_body_too_large_answered_from_content_length(gw):
    g = gw(settings={"max_body_mb": 1})
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nx-api-key: " + TOKEN.encode() +
              b"\r\nContent-Length: 5000000\r\n\r\n")        # and no body at all
    out = s.recv(65536)
    s.close()
    assert out.startswith(b"HTTP/1.1 413")
    err = json.loads(out.partition(b"\r\n\r\n")[2])
    assert err["type"] == "error" and err["error"]["type"] == "request_too_large"


def test_08_errors_before_the_handler_take_the_shape_of_the_route(gw):
    """A 413 answered from the head alone is in the route's dialect, whatever other headers the
    client sends (with anthropic-version every error was Anthropic's, on Gemini routes too)."""
    g = gw(settings={"max_body_mb": 1})
    for path, shape in (("/v1beta/models/gemini-x:generateContent", "gemini"),
                        ("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")):
        s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nanthropic-version: 2023-06-01"
                  f"\r\nContent-Length: 5000000\r\n\r\n".encode())
        out = s.recv(65536)
        s.close()
        err = json.loads(out.partition(b"\r\n\r\n")[2])
        assert out.startswith(b"HTTP/1.1 413"), out
        assert {"gemini": lambda e: e["error"]["status"] == "INVALID_ARGUMENT",
                "openai": lambda e: e["error"]["type"] == "invalid_request_error",
                "anthropic": lambda e: e["type"] == "error"}[shape](err), (path, err)


def test_08_stalled_head_gets_408_and_idle_connection_closes(gw, monkeypatch):
    monkeypatch.setattr(ag, "HEADER_TIMEOUT", 0.2)
    monkeypatch.setattr(ag, "KEEPALIVE_TIMEOUT", 0.3)
    g = gw()
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)   # idle meanwhile
    t_idle = t0 = time.monotonic()
    out = raw_exchange(g.port, b"GET /health HTTP/1.1\r\nHost:")
    assert out.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
    assert s.recv(10) == b"" and time.monotonic() - t_idle < 4    # idle: closed, nothing sent
    s.close()


def test_08_head_options_404_405(gw):
    g = gw(settings={"cors_origins": ["http://app.example"]})
    status, hdrs, body = g.request("HEAD", "/health")
    assert status == 200 and body == b"" and int(hdrs["content-length"]) > 0
    status, hdrs, _ = g.request("OPTIONS", "/v1/chat/completions",
                                headers={"Origin": "http://app.example",
                                         "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "authorization"})
    assert status == 204 and hdrs["access-control-allow-origin"] == "http://app.example"
    assert "POST" in hdrs["access-control-allow-methods"]
    status, hdrs, _ = g.request("OPTIONS", "/v1/chat/completions",
                                headers={"Origin": "http://evil.example"})
    assert status == 403 and "access-control-allow-origin" not in hdrs
    assert "access-control-allow-methods" not in hdrs
    status, _, body = g.request("GET", "/v1/nothing-here")
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, body = g.request("GET", "/v1/messages")
    assert status == 405 and json.loads(body)["type"] == "error"     # Anthropic route
    status, hdrs, body = g.request("DELETE", "/v1/chat/completions")
    assert status == 405 and hdrs["allow"] == "POST" and "error" in json.loads(body)


def test_08_stop_lets_in_flight_streams_finish(gw, upstream):
    began = threading.Event()

    def chunks():                             # ~0.6 s of stream left when the test stops
        events = openai_stream_chunks(pieces=("a",) * 10)
        yield events[0]
        began.set()
        yield from events[1:]
    up = upstream([Reply(chunks=chunks(), delay=0.05, content_type="text/event-stream")])
    g = gw([chan(up)])
    got = {}

    def client():
        with g.openai().chat.completions.create(model="m", messages=[], stream=True) as s:
            got["text"] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    t = threading.Thread(target=client)
    t.start()
    assert began.wait(10)
    g.stop()
    t.join(10)
    assert got.get("text") == "a" * 10
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", g.port), timeout=1)


def test_08_server_survives_garbage(gw, monkeypatch):
    monkeypatch.setattr(ag, "HEADER_TIMEOUT", 0.1)
    g = gw()
    junk = (b"\x00\xff" * 100, b"GET / HTTP/1.1\r\n" * 3, b"\r\n\r\n",
            os.urandom(2000), b"\x16\x03\x01\x02\x00" + os.urandom(300))
    outs: list[bytes | None] = [None] * len(junk)         # None: the exchange raised

    def send(i):                             # at once: most of them wait out HEADER_TIMEOUT
        outs[i] = raw_exchange(g.port, junk[i], timeout=5)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(junk))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for out in outs:
        assert out is not None
        assert out == b"" or out[:10] in (b"HTTP/1.1 4", b"HTTP/1.1 5") or \
            out.startswith((b"HTTP/1.1 400", b"HTTP/1.1 408", b"HTTP/1.1 505")), out[:60]
    assert g.request("GET", "/health")[0] == 200


def test_08_client_that_stops_reading_is_dropped_and_its_socket_aborted(gw, upstream,
                                                                        monkeypatch):
    """A client with a tiny receive buffer that never reads a long stream: after WRITE_TIMEOUT
    without progress it is dropped, the upstream request is cancelled (the fake sees the
    gateway hang up) and the socket is aborted, not left open with unsent data."""
    monkeypatch.setattr(ag, "WRITE_TIMEOUT", 0.2)
    event = (b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 4000 +
             b'"},"finish_reason":null}]}\n\n')
    up = upstream([Reply(chunks=_endless(event), content_type="text/event-stream")])
    g = gw([chan(up)])
    g.request("GET", "/health")
    base_socks = _open_sockets()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", g.port))
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " +
              TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    try:
        assert up.broken.wait(30)                  # the upstream request was cancelled
        assert g.records(1, timeout=10)[-1]["status"] == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (g.thread.server.connection_count() or
                                               _open_sockets() > base_socks + 1):
            time.sleep(0.02)
        assert g.thread.server.connection_count() == 0
        assert _open_sockets() <= base_socks + 1         # only our own, unread, client socket
        s.settimeout(10)
        with pytest.raises(ConnectionResetError):  # aborted: unsent data was dropped
            while s.recv(65536):
                pass
    finally:
        s.close()


def test_08_connection_cap(gw):
    g = gw(settings={"max_connections": 2})
    held = [socket.create_connection(("127.0.0.1", g.port), timeout=5) for _ in range(2)]
    deadline = time.monotonic() + 5
    while g.thread.server.connection_count() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    out = raw_exchange(g.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 503") and b"too many connections" in out
    for s in held:
        s.close()


# =================================================================================================
# 9. Converters and provider adapters: tables, stream state machines, every channel type
# =================================================================================================

def test_09_error_payloads_have_every_key():
    err = ag.GatewayError(429, "slow down")
    assert ag.error_payload(ag.OPENAI, err) == {"error": {
        "message": "slow down", "type": "rate_limit_exceeded", "param": None, "code": None}}
    assert ag.error_payload(ag.ANTHROPIC, err) == {"type": "error", "error": {
        "type": "rate_limit_error", "message": "slow down"}}
    assert ag.error_payload(ag.ANTHROPIC, ag.GatewayError(529, "x"))["error"]["type"] == \
        "overloaded_error"
    assert ag.stream_error_event(ag.ANTHROPIC, err).startswith(b"event: error\ndata: {")


@pytest.mark.parametrize("body,expected", [
    (b'{"error":{"message":"bad key","type":"x"}}', "bad key"),
    (b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
     "Overloaded"),
    (b'[{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}]',
     "Resource exhausted"),
    (b'{"error":"model not found"}', "model not found"),
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "502 Bad Gateway"),
    (b"", "upstream answered 503 Service Unavailable"),
])
def test_09_upstream_error_message_from_any_dialect(body, expected):
    assert ag.upstream_error_message(body, 503) == expected


def test_09_coalesced_text_joins_adjacent_text_and_reasoning_in_order():
    tool = ("tool", 0, "call_1", "f")
    events = [("start", "i", "m"), ("reasoning", "r1"), ("reasoning", "r2"), ("signature", "s"),
              ("text", "a"), ("text", ""), ("text", "b"), tool, ("text", "c"), ("args", 0, "{}"),
              ("finish", "stop")]
    assert ag.coalesced_text(events) == [
        ("start", "i", "m"), ("reasoning", "r1r2"), ("signature", "s"), ("text", "ab"), tool,
        ("text", "c"), ("args", 0, "{}"), ("finish", "stop")]
    one = [("text", "x")]
    assert ag.coalesced_text(one) is one and ag.coalesced_text([]) == []
    many = [("text", str(i)) for i in range(1000)]
    assert ag.coalesced_text(many) == [("text", "".join(map(str, range(1000))))]


def test_09_replace_json_model_is_byte_exact_elsewhere():
    body = (b'{ "model" : "fast",\n "messages": [{"role":"user","content":"1e5 \\u00e9"}], '
            b'"x": 1.10}')
    out = ag.replace_json_model(body, "fast", "gpt-4o-mini")
    assert out == body.replace(b'"model" : "fast"', b'"model":"gpt-4o-mini"')
    nested = b'{"model":"a","metadata":{"model":"a"}}'
    assert json.loads(ag.replace_json_model(nested, "a", "b")) == \
        {"model": "b", "metadata": {"model": "a"}}


@pytest.mark.parametrize("base,expected", [
    ("https://api.openai.com", "https://api.openai.com/v1/chat/completions"),
    ("https://api.openai.com/v1/", "https://api.openai.com/v1/chat/completions"),
    ("https://open.bigmodel.cn/api/paas/v4",
     "https://open.bigmodel.cn/api/paas/v4/chat/completions"),
    ("https://generativelanguage.googleapis.com/v1beta/openai",
     "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"),
    ("https://api.groq.com/openai", "https://api.groq.com/openai/v1/chat/completions"),
])
def test_09_join_base_url_respects_version_segments(base, expected):
    assert ag.join_base_url(base, "/v1/chat/completions") == expected

# --- Bedrock and Vertex helpers (issue 14): bodies, URLs, Converse <-> IR ----------------------

def test_09_bedrock_and_vertex_bodies_and_urls():
    model = "anthropic.claude-sonnet-4-5-20250929-v1:0"
    req, _ = botocore_signed("bedrock-runtime", "us-east-1", lambda c: c.invoke_model(
        modelId=model, body=b"{}"))
    assert ag.bedrock_url(ag.bedrock_base_url("us-east-1"), model, "invoke") == req.url
    arn = "arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude-x-v1:0"
    req, _ = botocore_signed("bedrock-runtime", "us-east-1", lambda c: c.converse_stream(
        modelId=arn, messages=[]))
    assert ag.bedrock_url("https://bedrock-runtime.us-east-1.amazonaws.com/", arn,
                          "converse-stream") == req.url
    req, _ = botocore_signed("bedrock", "eu-west-1", lambda c: c.list_foundation_models(
        byOutputModality="TEXT", byInferenceType="ON_DEMAND"))
    assert ag.bedrock_models_url("eu-west-1") == req.url
    assert ag.bedrock_model_ids({"modelSummaries": [
        {"modelId": "amazon.nova-pro-v1:0", "modelName": "Nova Pro"}, {"modelId": ""}, 7,
        {"modelId": "anthropic.claude-x-v1:0"}, {"modelId": "amazon.nova-pro-v1:0"}]}) == [
        "amazon.nova-pro-v1:0", "anthropic.claude-x-v1:0"]
    assert ag.bedrock_model_ids([]) == []
    a, b = "context-1m-2025-08-07", "interleaved-thinking-2025-05-14"
    body = {"model": "claude-x", "stream": True, "max_tokens": 5, "anthropic_beta": [a],
            "messages": [{"role": "user", "content": "hi"}], "cache_thing": {"k": 1}}
    # Flags Bedrock does not take are left out (its 400 "invalid beta flag" otherwise).
    assert ag.bedrock_invoke_body(body, f"{b}, {a} ,prompt-caching-scope-2026-01-05") == {
        "max_tokens": 5, "anthropic_beta": [a, b], "cache_thing": {"k": 1},
        "messages": [{"role": "user", "content": "hi"}],
        "anthropic_version": "bedrock-2023-05-31"}
    assert "anthropic_beta" not in ag.bedrock_invoke_body({"model": "m"})
    assert "anthropic_beta" not in ag.bedrock_invoke_body({"model": "m"}, "claude-code-20250219")
    assert ag.vertex_raw_predict_body(body) == {
        "stream": True, "max_tokens": 5, "anthropic_beta": [a], "cache_thing": {"k": 1},
        "messages": [{"role": "user", "content": "hi"}], "anthropic_version": "vertex-2023-10-16"}
    assert body["model"] == "claude-x"                          # the client's body is not changed
    assert ag.vertex_model_url(ag.vertex_base_url("global"), "my-proj", "global", "anthropic",
                               "claude-sonnet-4-5@20250929", "streamRawPredict") == (
        "https://aiplatform.googleapis.com/v1/projects/my-proj/locations/global/publishers/"
        "anthropic/models/claude-sonnet-4-5%4020250929:streamRawPredict")
    assert ag.vertex_model_url(ag.vertex_base_url("europe-west4"), "p", "europe-west4",
                               "google", "gemini-2.5-pro", "streamGenerateContent") == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/p/locations/europe-west4/"
        "publishers/google/models/gemini-2.5-pro:streamGenerateContent?alt=sse")


def test_09_bedrock_invoke_stream_is_anthropics_sse():
    events = [json.loads(c.split(b"data: ", 1)[1]) for c in anthropic_stream_chunks()]
    events[-1]["amazon-bedrock-invocationMetrics"] = {"inputTokenCount": 12}
    stream = b"".join(bedrock_chunk(e) for e in events)
    # JSON with line ends inside is sent on one data line (else SSE would cut it).
    pretty = ag.base64.b64encode(json.dumps(events[0], indent=1).encode()).decode()
    stream = es_event("chunk", {"bytes": pretty}) + stream
    conv, sse = ag.BedrockInvokeStream(), b""
    for i in range(len(stream)):
        sse += conv.feed(stream[i:i + 1])
    conv.end()
    got = ag.SSEDecoder().feed(sse)
    assert [(name, json.loads(data)) for name, data, _ in got] == [
        (e["type"], e) for e in [events[0]] + events]
    dec = ag.AnthropicStreamDecoder()
    ir_events = dec.feed(sse) + dec.close()
    assert ("text", "Hi") in ir_events and ir_events[-1] == ("finish", "stop")
    conv = ag.BedrockInvokeStream()
    assert conv.feed(bedrock_chunk(events[0])).startswith(b"event: message_start\ndata: {")
    with pytest.raises(ag.UpstreamError) as e:
        conv.feed(es_exception("modelStreamErrorException", "model failed mid-stream"))
    assert e.value.status == 502 and e.value.upstream_status == 424
    for bad, why in ((es_event("chunk", {"bytes": "%%"}), "without base64 bytes"),
                     (es_event("chunk", {"bytes": "e30="}), "without a type")):
        with pytest.raises(ag.ProtocolError, match=why):
            ag.BedrockInvokeStream().feed(bad)


def test_09_a_relayed_messages_stream_names_the_model_the_client_asked_for():
    chunks = anthropic_stream_chunks("claude-sonnet-4-5-20250929")
    crlf = [c.replace(b"\n", b"\r\n") for c in chunks]
    for stream in (b"".join(chunks), b"".join(crlf)):
        f, out = ag.MessageStartModel("claude-sonnet-4-5"), b""
        for i in range(len(stream)):                     # split anywhere
            out += f.feed(stream[i:i + 1])
        out += f.end()
        got = _sse_events(out)
        assert got[0] == ("message_start", dict(json.loads(chunks[0].split(b"data: ")[1]),
                                                message=dict(json.loads(chunks[0].split(
                                                    b"data: ")[1])["message"],
                                                    model="claude-sonnet-4-5")))
        assert out.endswith(stream[len(stream) - len(crlf[-1] if b"\r" in stream else
                                                      chunks[-1]):])
        assert [e for e, _ in got] == [e for e, _ in _sse_events(stream)]
    # Not a message_start first, or cut before its end: the bytes pass as they came.
    for odd in (chunks[1] + chunks[0], chunks[0][:-2]):
        f = ag.MessageStartModel("x")
        assert f.feed(odd) + f.end() == odd


def _converse_ir():
    png = ag.base64.b64encode(b"\x89PNG fake").decode()
    return ag.openai_request_to_ir({
        "model": "m", "max_tokens": 100, "temperature": 0.5, "stop": ["END"],
        "tool_choice": "required",
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is here?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "old_tool", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": ""},
            {"role": "user", "content": "Thanks"}]}), png


def test_09_converse_request_from_ir_fits_the_aws_model():
    import botocore.session
    import botocore.validate
    ir, png = _converse_ir()
    body = ag.ir_to_converse_request(ir)
    assert body == {
        "messages": [
            {"role": "user", "content": [
                {"text": "What is here?"},
                {"image": {"format": "png", "source": {"bytes": png}}}]},
            {"role": "assistant", "content": [
                {"toolUse": {"toolUseId": "call_1", "name": "get_weather",
                             "input": {"city": "Oslo"}}},
                {"toolUse": {"toolUseId": "call_2", "name": "old_tool", "input": {}}}]},
            {"role": "user", "content": [
                {"toolResult": {"toolUseId": "call_1", "content": [{"text": "Sunny"}],
                                "status": "success"}},
                {"toolResult": {"toolUseId": "call_2", "content": [{"text": ""}],
                                "status": "success"}},
                {"text": "Thanks"}]}],
        "system": [{"text": "Be brief."}],
        "inferenceConfig": {"maxTokens": 100, "temperature": 0.5, "stopSequences": ["END"]},
        "toolConfig": {"tools": [
            {"toolSpec": {"name": "get_weather", "description": "Weather now",
                          "inputSchema": {"json": {"type": "object", "properties": {
                              "city": {"type": "string"}}}}}},
            {"toolSpec": {"name": "old_tool", "inputSchema": {"json": {"type": "object"}}}}],
            "toolChoice": {"any": {}}}}
    # botocore's validator, with the AWS API model's Converse input shape, accepts it (blobs
    # as the bytes botocore would base64 on the wire).
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    params = json.loads(json.dumps(body).replace(f'"{png}"', '"__png__"'))
    params["messages"][0]["content"][1]["image"]["source"]["bytes"] = b"\x89PNG fake"
    botocore.validate.validate_parameters(dict(params, modelId="m"),
                                          model.operation_model("Converse").input_shape)
    ir["messages"][0]["content"][1] = {"type": "image", "url": "https://img.test/a.png"}
    with pytest.raises(ag.GatewayError, match="images as png, jpeg, gif or webp bytes, not a URL"):
        ag.ir_to_converse_request(ir)


def test_09_converse_answers_and_streams_to_ir():
    resp = ag.converse_response_to_ir({
        "output": {"message": {"role": "assistant", "content": [
            {"reasoningContent": {"reasoningText": {"text": "hmm", "signature": "sig"}}},
            {"text": "Let me look."},
            {"toolUse": {"toolUseId": "tu_1", "name": "get_weather",
                         "input": {"city": "Oslo"}}}]}},
        "stopReason": "tool_use", "metrics": {"latencyMs": 5},
        "usage": {"inputTokens": 10, "outputTokens": 7, "totalTokens": 22,
                  "cacheReadInputTokens": 5}}, "m1")
    assert resp["content"] == [
        {"type": "reasoning", "text": "hmm", "signature": "sig", "redacted": None},
        {"type": "text", "text": "Let me look."},
        {"type": "tool_call", "id": "tu_1", "name": "get_weather",
         "arguments": '{"city": "Oslo"}'}]
    assert (resp["finish"], resp["model"]) == ("tool_calls", "m1")
    # Redacted reasoning: its opaque data is the IR's "redacted" (it was True, with the data
    # as the signature, and an Anthropic client got a redacted_thinking block of data true).
    hidden = ag.converse_response_to_ir({
        "output": {"message": {"role": "assistant", "content": [
            {"reasoningContent": {"redactedContent": "b3BhcXVl"}}, {"text": "ok"}]}},
        "stopReason": "end_turn", "usage": {"inputTokens": 1, "outputTokens": 1}}, "m1")
    assert hidden["content"][0] == {"type": "reasoning", "text": "", "signature": None,
                                    "redacted": "b3BhcXVl"}
    assert ag.ir_to_anthropic_response(hidden, "m1")["content"][0] == {
        "type": "redacted_thinking", "data": "b3BhcXVl"}
    assert ag._converse_blocks(hidden["content"][:1]) == [
        {"reasoningContent": {"redactedContent": "b3BhcXVl"}}]
    assert resp["usage"] == {"input": 15, "output": 7, "cache_read": 5, "cache_write": 0,
                             "reasoning": 0}
    with pytest.raises(ag.GatewayError, match="malformed upstream response") as e:
        ag.converse_response_to_ir({"output": []})
    assert e.value.status == 502
    stream = b"".join([
        es_event("messageStart", {"role": "assistant"}),
        es_event("contentBlockDelta", {"delta": {"reasoningContent": {"text": "think"}},
                                       "contentBlockIndex": 0}),
        es_event("contentBlockDelta", {"delta": {"reasoningContent": {"signature": "s1"}},
                                       "contentBlockIndex": 0}),
        es_event("contentBlockStop", {"contentBlockIndex": 0}),
        es_event("contentBlockDelta", {"delta": {"text": "Hi"}, "contentBlockIndex": 1}),
        es_event("contentBlockStart", {"start": {"toolUse": {"toolUseId": "tu_9",
                                                             "name": "f"}},
                                       "contentBlockIndex": 2}),
        es_event("contentBlockDelta", {"delta": {"toolUse": {"input": '{"a":'}},
                                       "contentBlockIndex": 2}),
        es_event("contentBlockDelta", {"delta": {"toolUse": {"input": "1}"}},
                                       "contentBlockIndex": 2}),
        es_event("contentBlockStop", {"contentBlockIndex": 2}),
        es_event("messageStop", {"stopReason": "tool_use"}),
        es_event("metadata", {"usage": {"inputTokens": 3, "outputTokens": 4,
                                        "totalTokens": 7}, "metrics": {"latencyMs": 1}})])
    dec, events = ag.ConverseStreamDecoder("m2"), []
    for i in range(len(stream)):
        events += dec.feed(stream[i:i + 1])
    events += dec.close()
    assert events[0][0] == "start" and events[0][2] == "m2"
    assert events[1:] == [("reasoning", "think"), ("signature", "s1"), ("text", "Hi"),
                          ("tool", 0, "tu_9", "f"), ("args", 0, '{"a":'), ("args", 0, "1}"),
                          ("usage", ag.new_usage(3, 4)), ("finish", "tool_calls")]
    dec = ag.ConverseStreamDecoder()
    events = dec.feed(es_event("contentBlockDelta", {"delta": {"text": "par"},
                                                     "contentBlockIndex": 0})
                      + es_exception("throttlingException", "Too many requests"))
    assert events[1] == ("text", "par")
    events = dec.feed(b"") + dec.close()                  # the error once, then the end
    assert len(events) == 1 and events[0][0] == "error" and events[0][1].status == 429
    assert "Too many requests" in events[0][1].message
    dec = ag.ConverseStreamDecoder()
    events = dec.feed(es_event("messageStart", {"role": "assistant"})[:-3]) + dec.close()
    assert events[1][0] == "error" and "ended inside a message" in events[1][1].message
    assert dec.feed(b"more") == [] and dec.close() == []


# -- Converters: tables, stream state machines, and every channel type end to end -----------------
def _ir_from_openai(**body):
    body.setdefault("model", "m")
    return ag.openai_request_to_ir(body)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this image, and the weather?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
    {"role": "user", "content": "thanks"},
    {"role": "system", "content": "Late system note."},
]


def test_09_openai_to_anthropic_request_table():
    ir = _ir_from_openai(messages=CONVERSATION, tools=TOOLS, temperature=1.5, top_p=0.5,
                         stop=["  ", "END"], tool_choice="required", parallel_tool_calls=False)
    body = ag.ir_to_anthropic_request(ir, "claude-x", stream=False)
    assert body["system"] == [{"type": "text", "text": "You are terse."},
                              {"type": "text", "text": "Use tools."},
                              {"type": "text", "text": "Late system note."}]   # section 7 #24
    assert body["max_tokens"] == ag.DEFAULT_ANTHROPIC_MAX_TOKENS                 # required
    assert body["temperature"] == 1.0 and "top_p" not in body                    # #20, clamped
    assert body["stop_sequences"] == ["END"]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    user = body["messages"][0]["content"]
    assert user[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": "iVBORw0KGgo="}}
    assert user[2] == {"type": "image", "source": {"type": "url",
                                                    "url": "https://example.com/cat.jpg"}}
    calls = body["messages"][1]["content"]
    assert [c["type"] for c in calls] == ["tool_use", "tool_use"]
    assert calls[0]["input"] == {"city": "Paris"} and calls[1]["input"] == {}    # #15
    assert ag._ANTHROPIC_ID_RX.match(calls[0]["id"]) and calls[0]["id"] != "call_b"   # #14
    results = body["messages"][2]["content"]                                     # #8
    assert [b["type"] for b in results] == ["tool_result", "tool_result", "text"]
    assert results[0]["tool_use_id"] == calls[0]["id"]
    assert results[1]["tool_use_id"] == "call_b" and results[2]["text"] == "thanks"
    assert body["tools"][0]["input_schema"]["required"] == ["city"]


def test_09_reasoning_effort_to_thinking_budget_and_max_tokens():
    ir = _ir_from_openai(messages=[{"role": "user", "content": "x"}], reasoning_effort="high",
                         max_tokens=2000, temperature=0.3, tools=TOOLS, tool_choice="required")
    body = ag.ir_to_anthropic_request(ir, "c", stream=True)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 24576}       # #21
    assert body["max_tokens"] > 24576 and "temperature" not in body
    assert body["tool_choice"] == {"type": "auto"} and body["stream"] is True
    capped = ag.ir_to_anthropic_request(ir, "c", stream=False, max_tokens_cap=8000)
    assert capped["max_tokens"] == 8000 and capped["thinking"]["budget_tokens"] < 8000


def test_09_anthropic_to_openai_request_table():
    body = {"model": "claude-x", "max_tokens": 32000, "stream": True,
            "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "Bash", "description": "run", "input_schema": {
                "type": "object", "properties": {"cmd": {"type": "string"}}},
                "cache_control": {"type": "ephemeral"}},
                {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            "thinking": {"type": "enabled", "budget_tokens": 4000},
            "metadata": {"user_id": "u1"}, "top_k": 5,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig=="},
                    {"type": "text", "text": "Let me run it."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                     "input": {"cmd": "ls"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                     "content": [{"type": "text", "text": "denied"},
                                 {"type": "image", "source": {"type": "base64",
                                  "media_type": "image/png", "data": "AAA"}}]},
                    {"type": "text", "text": "try again"}]}]}
    ir = ag.anthropic_request_to_ir(body)
    out = ag.ir_to_openai_request(ir, "o3-mini", stream=True,
                                  max_tokens_field="max_completion_tokens")
    assert out["messages"][0] == {"role": "system", "content": "sys"}
    assert [t["function"]["name"] for t in out["tools"]] == ["Bash"]        # server tool dropped
    assert out["parallel_tool_calls"] is False and out["max_completion_tokens"] == 32000
    assert out["reasoning_effort"] == "medium" and out["user"] == "u1"
    assert out["stream_options"] == {"include_usage": True}
    asst = out["messages"][2]
    assert asst["content"] == "Let me run it." and asst["reasoning_content"] == "hmm"
    assert asst["tool_calls"][0]["function"] == {"name": "Bash", "arguments": '{"cmd": "ls"}'}
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user", "user"]
    assert out["messages"][3] == {"role": "tool", "tool_call_id": "toolu_1",
                                  "content": "Error: denied"}
    assert out["messages"][4]["content"][0]["image_url"]["url"] == "data:image/png;base64,AAA"
    assert out["messages"][5]["content"] == "try again"                     # #17


def test_09_foreign_thinking_never_reaches_anthropic():
    ir = ag.anthropic_request_to_ir({"model": "c", "max_tokens": 10, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "ours", "signature": ag.UNSIGNED_THINKING},
            {"type": "thinking", "thinking": "theirs", "signature": "EqQBCkgIARABGAIiQ=="},
            {"type": "text", "text": "a"}]},
        {"role": "user", "content": "y"}]})
    blocks = ag.ir_to_anthropic_request(ir, "c", stream=False)["messages"][1]["content"]
    assert blocks == [{"type": "thinking", "thinking": "theirs",
                       "signature": "EqQBCkgIARABGAIiQ=="}, {"type": "text", "text": "a"}]


def test_09_gemini_request_schema_cleaning_and_grouped_function_responses():
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "additionalProperties": False,
              "$defs": {"Unit": {"type": "string", "enum": ["c", "f"]}},
              "properties": {
                  "city": {"type": ["string", "null"], "description": "City"},
                  "unit": {"$ref": "#/$defs/Unit"},
                  "days": {"type": "integer", "exclusiveMinimum": 0, "const": 3},
                  "tags": {"type": "array", "items": {"type": "string", "format": "uri"},
                           "uniqueItems": True},
                  "format": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
              "required": ["city", "ghost"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}},
             TOOLS[1]]
    ir = _ir_from_openai(messages=CONVERSATION, tools=tools, tool_choice={
        "type": "function", "function": {"name": "get_weather"}}, max_tokens=100,
        reasoning_effort="low", response_format={"type": "json_object"})
    body = ag.ir_to_gemini_request(ir, {"call_b": "sig-b"})
    params = body["tools"][0]["functionDeclarations"][0]["parameters"]
    assert params == {"type": "OBJECT", "required": ["city"], "properties": {
        "city": {"type": "STRING", "nullable": True, "description": "City"},
        "unit": {"type": "STRING", "enum": ["c", "f"]},
        "days": {"type": "INTEGER"},
        "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
        "format": {"type": "STRING", "nullable": True}}}                    # #10, #11
    assert "parameters" not in body["tools"][0]["functionDeclarations"][1]
    assert body["toolConfig"] == {"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    assert body["systemInstruction"]["parts"][0]["text"].startswith("You are terse.")
    roles = [c["role"] for c in body["contents"]]
    assert roles == ["user", "model", "user"]
    calls = body["contents"][1]["parts"]
    assert calls[0]["thoughtSignature"] == ag.THOUGHT_SKIP                  # #12 foreign history
    assert calls[1]["thoughtSignature"] == "sig-b"                          # replayed
    responses = body["contents"][2]["parts"]                                # #9: one content
    assert [p["functionResponse"]["name"] for p in responses[:2]] == ["get_weather", "get_time"]
    assert responses[0]["functionResponse"]["response"] == {"result": "sunny"}
    assert responses[2] == {"text": "thanks"}
    gen = body["generationConfig"]
    assert gen["maxOutputTokens"] == 2048 and gen["responseMimeType"] == "application/json"
    assert gen["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}


def test_09_ollama_request_objects_strings_and_images():
    ir = _ir_from_openai(messages=CONVERSATION, tools=TOOLS, max_tokens=50, stop="x",
                         response_format={"type": "json_schema", "json_schema": {
                             "name": "o", "schema": {"type": "object"}}})
    body = ag.ir_to_ollama_request(ir, "llama3", stream=True)
    assert body["stream"] is True and body["options"] == {"num_predict": 50, "stop": ["x"]}
    assert body["format"] == {"type": "object"}
    user = body["messages"][1]
    assert isinstance(user["content"], str) and user["images"] == ["iVBORw0KGgo="]   # #16
    call = body["messages"][2]["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Paris"}
    assert body["messages"][3] == {"role": "tool", "content": "sunny",
                                   "tool_call_id": "functions.get_weather:0",
                                   "tool_name": "get_weather"}


def test_09_responses_to_ir_usage_and_finish():
    r = ag.anthropic_response_to_ir({"id": "msg_1", "content": [
        {"type": "thinking", "thinking": "t", "signature": "s"},
        {"type": "text", "text": "a"},
        {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {"x": 1}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 10, "output_tokens": 5,
                                             "cache_read_input_tokens": 90,
                                             "cache_creation_input_tokens": 3}})
    o = ag.ir_to_openai_response(r, "m")
    assert o["choices"][0]["finish_reason"] == "tool_calls"
    assert o["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'
    assert o["usage"] == {"prompt_tokens": 103, "completion_tokens": 5, "total_tokens": 108,
                          "prompt_tokens_details": {"cached_tokens": 90,
                                                    "cache_write_tokens": 3}}
    back = ag.ir_to_anthropic_response(ag.openai_response_to_ir(o), "c")
    assert back["usage"] == {"input_tokens": 10, "output_tokens": 5,
                             "cache_creation_input_tokens": 3, "cache_read_input_tokens": 90}
    assert back["stop_reason"] == "tool_use" and back["content"][-1]["input"] == {"x": 1}
    g = ag.gemini_response_to_ir({"candidates": [{"content": {"role": "model", "parts": [
        {"text": "plan", "thought": True}, {"text": "ok"},
        {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "GS"}]},
        "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 7,
        "candidatesTokenCount": 2, "thoughtsTokenCount": 3, "cachedContentTokenCount": 4}},
        sigs := {})
    assert g["finish"] == "tool_calls"                                       # #7
    assert [p["type"] for p in g["content"]] == ["reasoning", "text", "tool_call"]
    assert sigs == {g["content"][2]["id"]: "GS"}
    assert g["usage"] == ag.new_usage(7, 5, 4, 0, 3)
    blocked = ag.gemini_response_to_ir({"promptFeedback": {"blockReason": "SAFETY"}})
    assert blocked["finish"] == "content_filter"
    ol = ag.ollama_response_to_ir({"message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"q": 1}}}]}, "done": True,
        "done_reason": "stop", "prompt_eval_count": 4, "eval_count": 6})
    assert ol["finish"] == "tool_calls" and ol["content"][0]["arguments"] == '{"q": 1}'


def _convert_stream(decoder, encoder, raw: bytes, step: int = 1) -> bytes:
    out = b""
    for i in range(0, len(raw), step):
        out += encoder.encode(decoder.feed(raw[i:i + step]))
    return out + encoder.encode(decoder.close())


def test_09_openai_stream_to_anthropic_events_bytewise():
    raw = _openai_tool_stream()
    out = _convert_stream(ag.OpenAIStreamDecoder(), ag.AnthropicStreamEncoder("claude-x", 17),
                          raw, step=1)
    assert all(block.startswith(b"event: ") for block in out.split(b"\n\n") if block)   # #1
    events = _sse_events(out)
    assert all(e == d["type"] for e, d in events)
    names = [e for e, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == 17 and "output_tokens" in start["usage"]   # #2
    opened, closed = [], []
    for e, d in events:
        if e == "content_block_start":
            assert d["index"] == len(opened) and (not opened or opened[-1] in closed)
            opened.append(d["index"])
        elif e == "content_block_stop":
            closed.append(d["index"])
        elif e == "content_block_delta":
            assert d["index"] == opened[-1] and d["index"] not in closed
    assert opened == closed == [0, 1, 2, 3]
    blocks = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use", "tool_use"]
    assert blocks[2] == {"type": "tool_use", "id": "call_a", "name": "get_weather",
                         "input": {}}                                       # #3
    args = "".join(d["delta"]["partial_json"] for e, d in events
                   if e == "content_block_delta" and d["index"] == 2)
    assert json.loads(args) == {"city": "Paris"}
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "tool_use"
    assert final["usage"]["input_tokens"] == 30 and final["usage"]["output_tokens"] == 9


def test_09_anthropic_stream_to_openai_chunks_bytewise():
    def ev(name, data):
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    raw = b"".join([
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "model": "c", "usage": {"input_tokens": 5, "output_tokens": 1,
                                                  "cache_read_input_tokens": 100}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "Hi"}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 1,
                                   "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 1,
                                   "delta": {"type": "input_json_delta",
                                             "partial_json": "{\"a\":1}"}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ev("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {
            "type": "tool_use", "id": "toolu_2", "name": "g", "input": {}}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                             "usage": {"output_tokens": 12}}),
        ev("message_stop", {"type": "message_stop"})])
    for include_usage in (False, True):
        out = _convert_stream(ag.AnthropicStreamDecoder(),
                              ag.OpenAIStreamEncoder("m", include_usage), raw, step=3)
        chunks = [d for _, d in _sse_events(out)]
        assert chunks[-1] == "[DONE]"
        body = chunks[:-1]
        assert body[0]["choices"][0]["delta"]["role"] == "assistant"
        assert sum("role" in c["choices"][0]["delta"] for c in body if c["choices"]) == 1
        tool_deltas = [tc for c in body if c["choices"]
                       for tc in c["choices"][0]["delta"].get("tool_calls", [])]
        assert [t["index"] for t in tool_deltas] == [0, 0, 1]                # #4 dense
        assert [("id" in t, "name" in t.get("function", {})) for t in tool_deltas] == \
            [(True, True), (False, False), (True, True)]                     # #5 first only
        finishes = [c["choices"][0]["finish_reason"] for c in body if c["choices"]]
        assert finishes[-1] == "tool_calls" and finishes.count(None) == len(finishes) - 1
        usage_chunks = [c for c in body if not c["choices"]]
        if include_usage:                                                    # #6
            assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
            assert usage_chunks[0]["usage"]["prompt_tokens"] == 105
            assert usage_chunks[0]["usage"]["completion_tokens"] == 12
        else:
            assert usage_chunks == [] and all("usage" not in c for c in body)


# -- text events read by template (issue 15): the same IR as the strict parse, or its error --

def _decode_all(decoder_cls, raw: bytes | list[bytes], step: int = 0):
    """IR events of ``raw`` fed in ``step``-byte reads (or as the reads listed), else the
    error's ("error", status, message, the IR events before it)."""
    dec, out = decoder_cls(), []
    reads = raw if isinstance(raw, list) else [raw[i:i + step] for i in range(0, len(raw), step)]
    try:
        for data in reads:
            out += dec.feed(data)
        return out + dec.close()
    except ag.GatewayError as exc:
        return ("error", exc.status, str(exc), out)


def _openai_text_chunk(text, **extra):
    """A text chunk as api.openai.com streams one (keys in its order, as seen in captured
    streams, e.g. ENTERPILOT/GoModel's tests/contract/testdata/openai/chat_completion_stream.txt),
    ``extra`` after "choices" where OpenAI puts "obfuscation"."""
    chunk = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 7,
             "model": "gpt-x", "service_tier": "default", "system_fingerprint": "fp_1",
             "choices": [{"index": 0, "delta": {"content": text},
                          "logprobs": None, "finish_reason": None}]}
    return dict(chunk, **extra)


def _sse_raw(objs, name=None, ensure_ascii=False):
    head = f"event: {name}\n" if name else ""
    return "".join(f"{head}data: {json.dumps(o, ensure_ascii=ensure_ascii)}\n\n"
                   if not isinstance(o, str) else o for o in objs).encode()


# Upstream texts the scanner must decode exactly: escapes, raw and escaped non-ASCII, an
# escaped surrogate pair, a quote and a backslash at the ends.
TEMPLATE_TEXTS = ["Hello", " wor\"ld\\", "é€ line\nbreak\ttab", "😀 pair", "\\", '"', "/", "x"]


@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_09_text_template_gives_the_strict_parse_ir(monkeypatch, ensure_ascii):
    # Real Chat Completions chunks carry a random "obfuscation" string unless the request set
    # stream_options.include_obfuscation to false (OpenAI API reference,
    # ChatCompletionStreamOptions), so every event differs from the one before in two places.
    pads = iter(["aZ", "q", "", "0123456789", "r\\u00e9", "s", "tt", "u", "v", "w"])
    objs = [_openai_text_chunk("", obfuscation="x0")]
    objs[0]["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    objs += [_openai_text_chunk(t, obfuscation=next(pads)) for t in TEMPLATE_TEXTS]
    objs.append(_openai_text_chunk("", obfuscation="end"))              # empty: read by parse
    tool = _openai_text_chunk(None, obfuscation="tc")
    tool["choices"][0]["delta"] = {"tool_calls": [{"index": 0, "id": "call_1", "type":
                                   "function", "function": {"name": "f", "arguments": "{}"}}]}
    objs.append(tool)
    done = _openai_text_chunk("after", obfuscation="z")
    done["choices"][0]["finish_reason"] = "stop"
    objs += [done, {"id": "chatcmpl-t", "choices": [], "usage": {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}, "data: [DONE]\n\n"]
    raw = _sse_raw(objs, ensure_ascii=ensure_ascii)
    parses = []
    real_loads = ag.json_loads
    monkeypatch.setattr(ag, "json_loads", lambda *a, **k: parses.append(1) or real_loads(*a, **k))
    fast = [_decode_all(ag.OpenAIStreamDecoder, raw, step) for step in (len(raw), 7, 1)]
    texts = [ev[1] for ev in fast[0] if ev[0] == "text"]
    assert texts == TEMPLATE_TEXTS + ["after"]
    assert fast[0] == fast[1] == fast[2]
    # The template read the text events: of the 14 events, each feed of the stream parsed the
    # role chunk, the learning event (and its probe), the empty one, tool call, finish, usage.
    assert len(parses) <= 3 * 8
    monkeypatch.setattr(ag, "TEMPLATE_LEARNS", 0)            # every event by the strict parse
    parses.clear()
    strict = _decode_all(ag.OpenAIStreamDecoder, raw, len(raw))
    assert len(parses) == 13 and strict == fast[0]


def _first_text_then(later: str) -> list[bytes]:
    """Two reads: a text event the template learns from, then ``later``."""
    first = json.dumps(_openai_text_chunk("hi"), separators=(",", ":"))
    return [f"data: {first}\n\n".encode(), f"data: {later}\n\n".encode()]


_PREFIX = ('{"id":"chatcmpl-t","object":"chat.completion.chunk","created":7,"model":"gpt-x",'
           '"service_tier":"default","system_fingerprint":"fp_1",'
           '"choices":[{"index":0,"delta":{"content":')
_SUFFIX = '},"logprobs":null,"finish_reason":null}]}'


# The same length as _SUFFIX, but finishing with "length": only its bytes tell them apart.
_SUFFIX_LENGTH = '},"lp":null,  "finish_reason":"length"}]}'


@pytest.mark.parametrize("later, why", [
    (_PREFIX + '"\\ud800"' + _SUFFIX, "unpaired UTF-16 surrogate"),    # a lone surrogate
    (_PREFIX + '"a\x01b"' + _SUFFIX, "not valid JSON"),                # a raw control character
    (_PREFIX + '"a""b"' + _SUFFIX, "not valid JSON"),                  # two strings in the slot
    (_PREFIX + '"a" ,"b"' + _SUFFIX, "not valid JSON"),
    (_PREFIX + '"open' + _SUFFIX, "not valid JSON"),                   # a string never ended
    (_PREFIX + '"\\x41"' + _SUFFIX, "not valid JSON"),                 # not a JSON escape
    (_PREFIX + '"ok"' + _SUFFIX + ' x', "not valid JSON"),             # bytes past the end
    (_PREFIX + '5' + _SUFFIX, None),                                   # not a string
    (_PREFIX + '"ok"' + _SUFFIX_LENGTH, None),                          # other bytes, same size
])
def test_09_text_template_refuses_what_the_strict_parser_refuses(monkeypatch, later, why):
    assert len(_SUFFIX_LENGTH) == len(_SUFFIX)
    raw = _first_text_then(later)
    fast = _decode_all(ag.OpenAIStreamDecoder, raw)
    monkeypatch.setattr(ag, "TEMPLATE_LEARNS", 0)
    assert fast == _decode_all(ag.OpenAIStreamDecoder, raw)
    if why is None:
        assert fast[0] != "error"
    else:
        assert fast[0] == "error" and fast[1] == 502 and why in fast[2]
        assert [ev for ev in fast[3] if ev[0] == "text"] == [("text", "hi")]


def test_09_text_template_is_not_fooled_by_a_decoy_field(monkeypatch):
    # The first "content" in the event is a decoy with the same text: learning must find the
    # field the decoder reads (its probe check), or learn nothing; never read the decoy.
    def ev(decoy, text):
        chunk = _openai_text_chunk(text)
        return dict({"x": {"content": decoy}, "obfuscation": "pad" + decoy}, **chunk)
    raw = _sse_raw([ev("hi", "hi"), ev("EVIL", "hi"), ev("hi", "bye"), ev("hi", "more"),
                    ev("EVIL", "ok"), ev("EVIL", "last")])
    fast = _decode_all(ag.OpenAIStreamDecoder, raw, len(raw))
    assert [e[1] for e in fast if e[0] == "text"] == ["hi", "hi", "bye", "more", "ok", "last"]
    monkeypatch.setattr(ag, "TEMPLATE_LEARNS", 0)
    assert fast == _decode_all(ag.OpenAIStreamDecoder, raw, len(raw))


def test_09_text_template_reads_anthropic_text_deltas(monkeypatch):
    def delta(text, index=0):
        return {"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": text}}
    raw = b"".join([
        _sse_raw([{"type": "message_start", "message": {"id": "msg_1", "model": "c",
                   "usage": {"input_tokens": 5, "output_tokens": 1}}}], "message_start"),
        _sse_raw([{"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}], "content_block_start"),
        _sse_raw([delta(t) for t in TEMPLATE_TEXTS], "content_block_delta"),
        _sse_raw([delta("other block", index=1)], "content_block_delta"),
        _sse_raw([{"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                   "usage": {"output_tokens": 9}}], "message_delta")])
    parses = []
    real_loads = ag.json_loads
    monkeypatch.setattr(ag, "json_loads", lambda *a, **k: parses.append(1) or real_loads(*a, **k))
    fast = _decode_all(ag.AnthropicStreamDecoder, raw, len(raw))
    assert [e[1] for e in fast if e[0] == "text"] == TEMPLATE_TEXTS + ["other block"]
    assert fast == _decode_all(ag.AnthropicStreamDecoder, raw, 5)
    assert len(parses) <= 2 * 7
    monkeypatch.setattr(ag, "TEMPLATE_LEARNS", 0)
    assert fast == _decode_all(ag.AnthropicStreamDecoder, raw, len(raw))


def test_09_gemini_stream_tool_call_then_stop_chunk_finishes_with_tool_calls():
    chunks = [
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "Let me "}]}}]},
        {"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "a", "args": {"x": 1}}, "thoughtSignature": "S1"},
            {"functionCall": {"name": "b", "args": {}}}]}}]},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
                         "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 4}}]
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks)
    sigs = {}
    out = _convert_stream(ag.GeminiStreamDecoder(sigs), ag.OpenAIStreamEncoder("g", True), raw,
                          step=5)
    body = [d for _, d in _sse_events(out)][:-1]
    calls = [tc for c in body if c["choices"] for tc in c["choices"][0]["delta"].get(
        "tool_calls", [])]
    assert [c["index"] for c in calls if "id" in c] == [0, 1]
    assert len({c["id"] for c in calls if "id" in c}) == 2
    assert body[-2]["choices"][0]["finish_reason"] == "tool_calls"          # #7
    assert body[-1]["usage"]["prompt_tokens"] == 8
    assert list(sigs.values()) == ["S1"]


def test_09_ollama_stream_to_anthropic_with_mid_stream_error():
    lines = [{"model": "l", "message": {"role": "assistant", "content": "Hel"}, "done": False},
             {"model": "l", "message": {"role": "assistant", "content": "lo"}, "done": False},
             {"error": "model crashed"}]
    raw = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    out = _convert_stream(ag.OllamaStreamDecoder(), ag.AnthropicStreamEncoder("l"), raw, step=4)
    events = _sse_events(out)
    assert events[-1][0] == "error" and "model crashed" in events[-1][1]["error"]["message"]
    assert "message_stop" not in [e for e, _ in events]


def test_09_count_tokens_estimate_grows_with_content():
    small = ag.estimate_tokens(_ir_from_openai(messages=[{"role": "user", "content": "hi"}]))
    big = ag.estimate_tokens(_ir_from_openai(messages=[{"role": "user", "content": "word " * 400}],
                                             tools=TOOLS))
    cjk = ag.estimate_tokens(_ir_from_openai(messages=[{"role": "user",
                                                        "content": "漢字" * 100}]))
    assert 1 <= small < 20 and 400 < big < 800 and cjk >= 200


CHANNEL_TYPES = ["openai", "anthropic", "gemini", "ollama"]


def _typed_gw(gw, upstream, ctype, **extra):
    up = upstream()
    up.responder = getattr(Dialects, ctype)
    return gw([chan(up, type=ctype, api_key="sk-up-KEY", **extra)]), up


@pytest.mark.parametrize("ctype", ["openai", "gemini", "ollama"])
@pytest.mark.parametrize("stream", [False, True])
def test_09_anthropic_sdk_tool_loop_through_every_channel_type(gw, upstream, ctype, stream):
    g, up = _typed_gw(gw, upstream, ctype)
    c = g.anthropic()
    msgs = [{"role": "user", "content": "weather in Paris and the time?"}]

    def call(messages):
        kw = dict(model="claude-test", max_tokens=32000, tools=ANTHROPIC_TOOLS,
                  messages=messages)
        if not stream:
            return c.messages.create(**kw)
        with c.messages.stream(**kw) as s:
            for _ in s:
                pass
            return s.get_final_message()
    first = call(msgs)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "Paris"}),
                                                 ("get_time", {})]
    assert first.usage.input_tokens > 0
    msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                               for b in first.content]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                 {"type": "tool_result", "tool_use_id": uses[1].id, "content": "noon"}]}]
    second = call(msgs)
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == "got noon"
    assert second.usage.output_tokens == 4
    sent = json.loads(up.last()["body"])
    assert "sk-up-KEY" in json.dumps(up.last()["headers"]) or ctype == "ollama"
    if ctype == "gemini":
        assert up.last()["headers"]["x-goog-api-key"] == "sk-up-KEY"
        model_turn = sent["contents"][1]["parts"]
        assert model_turn[0]["thoughtSignature"] == "R0VNU0lH"                 # replayed (#12)
        assert len(sent["contents"][2]["parts"]) == 2                        # (#9)
    elif ctype == "openai":
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool"]
        assert sent["max_tokens"] == 32000
    else:
        assert sent["messages"][2]["tool_name"] == "get_weather"
        assert sent["stream"] is stream


@pytest.mark.parametrize("ctype", ["anthropic", "gemini", "ollama"])
@pytest.mark.parametrize("stream", [False, True])
def test_09_openai_sdk_tool_loop_through_every_channel_type(gw, upstream, ctype, stream):
    g, up = _typed_gw(gw, upstream, ctype)
    c = g.openai()
    msgs = [{"role": "user", "content": "weather and time?"}]

    def call(messages):
        kw = dict(model="any-model", messages=messages, tools=TOOLS)
        if not stream:
            return c.chat.completions.create(**kw)
        with c.chat.completions.stream(**kw) as s:
            for _ in s:
                pass
            return s.get_final_completion()
    first = call(msgs)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert calls[0].id != calls[1].id
    msgs.append(choice.message.model_dump(exclude_none=True, exclude={"parsed"}))
    msgs += [{"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
             {"role": "tool", "tool_call_id": calls[1].id, "content": "noon"}]
    second = call(msgs)
    assert second.choices[0].message.content == "got noon"
    assert second.choices[0].finish_reason == "stop"
    if not stream:
        assert second.usage.prompt_tokens == 11 and second.usage.completion_tokens == 4
    if ctype == "anthropic":
        sent = json.loads(up.last()["body"])
        assert up.last()["headers"]["x-api-key"] == "sk-up-KEY"
        assert sent["max_tokens"] == ag.DEFAULT_ANTHROPIC_MAX_TOKENS
        assert sent["messages"][-1]["content"][0]["type"] == "tool_result"


def test_09_claude_code_style_request_to_openai_channel(gw, upstream):
    """What Claude Code sends: ?beta=true, anthropic-beta, cache_control, context_management,
    metadata, system blocks, a huge max_tokens; a channel cap clamps it."""
    g, up = _typed_gw(gw, upstream, "openai", max_tokens_cap=8192)
    status, hdrs, body = g.request(
        "POST", "/v1/messages?beta=true", {
            "model": "claude-test", "max_tokens": 64000, "stream": False,
            "system": [{"type": "text", "text": "You are Claude Code.",
                        "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
            "metadata": {"user_id": "user_abc"},
            "context_management": {"edits": []}},
        headers={"Authorization": None, "x-api-key": TOKEN, "anthropic-version": "2023-06-01",
                 "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"})
    assert status == 200, body
    msg = json.loads(body)
    assert msg["type"] == "message" and msg["content"] == [{"type": "text", "text": "hello"}]
    sent = json.loads(up.last()["body"])
    assert sent["max_tokens"] == 8192 and "context_management" not in sent
    assert "cache_control" not in json.dumps(sent) and sent["user"] == "user_abc"
    assert "anthropic-beta" not in up.last()["headers"]


def test_09_claude_codes_billing_line_reaches_anthropic_only(gw, upstream):
    """Claude Code puts ``x-anthropic-billing-header: cc_version=…; cc_entrypoint=…; cch=…;``
    at the head of its system prompt (a block of its own; its cch differs request by
    request). A channel of another provider gets the prompt without it, so two requests that
    differ only there send the same prompt, a prefix its cache can hit; an Anthropic channel
    gets the request as it came."""
    def body(cch, form):
        line = f"x-anthropic-billing-header: cc_version=2.1.332.732; cc_entrypoint=cli; cch={cch};"
        system = {"blocks": [{"type": "text", "text": line},
                             {"type": "text", "text": "You are Claude Code."}],
                  "string": f"{line}\nYou are Claude Code.",
                  "hoisted": None}[form]
        msgs = [{"role": "user", "content": "hi"}]
        if form == "hoisted":                   # a system turn among the messages
            msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": line}]})
            system = "You are Claude Code."
        return {"model": "claude-test", "max_tokens": 64, "system": system, "messages": msgs}
    g, up = _typed_gw(gw, upstream, "openai")
    for form in ("blocks", "string", "hoisted"):
        for cch in ("71fea", "0c3d2"):
            status, _, answer = g.request("POST", "/v1/messages", body(cch, form))
            assert status == 200, answer
        first, second = (json.loads(r["body"]) for r in up.requests[-2:])
        assert first == second, form
        assert first["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    ga, upa = _typed_gw(gw, upstream, "anthropic")
    status, _, answer = ga.request("POST", "/v1/messages", body("71fea", "blocks"))
    assert status == 200, answer
    assert json.loads(upa.last()["body"])["system"][0]["text"].endswith("cch=71fea;")
    assert ag.without_billing_header([{"type": "text", "text": "x-anthropic-billing-header: a"}]
                                     ) == []


# The wordings of a max_tokens above the model's output limit that the gateway reads (see
# output_limit_in): OpenAI's (ChatGPTNextWeb/NextChat#3195), DeepSeek's (mnfst/llm-gateway#1177)
# and Vertex AI's; all are 400s with the limit in the message.
OUTPUT_LIMIT_REFUSALS = {
    "openai": lambda asked, limit: f"max_tokens is too large: {asked}. This model supports at "
                                   f"most {limit} completion tokens, whereas you provided {asked}.",
    "deepseek": lambda asked, limit: f"Invalid max_tokens value, the valid range of max_tokens "
                                     f"is [1, {limit}]",
    # Vertex AI's (stackblitz-labs/bolt.diy#955), an exclusive upper bound
    "vertex": lambda asked, limit: f"Unable to submit request because it has a maxOutputTokens "
                                   f"value of {asked} but the supported range is from 1 "
                                   f"(inclusive) to {limit + 1} (exclusive). Update the value and "
                                   f"try again."}


@pytest.mark.parametrize("wording", sorted(OUTPUT_LIMIT_REFUSALS))
def test_09_an_output_limit_the_upstream_names_is_learned(gw, upstream, wording):
    """Claude Code asks for max_tokens 128000; a provider whose model takes fewer refuses it,
    naming its limit. The gateway asks again within it, and from then on asks so at once; the
    client sees its answer, not the refusal."""
    limit = 8192

    def respond(rec):
        body = json.loads(rec["body"])
        asked = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        if asked > limit:
            return _refuse("openai", OUTPUT_LIMIT_REFUSALS[wording](asked, limit))
        return Dialects.openai(rec)
    up = upstream()
    up.responder = respond
    g = gw([chan(up, models=["claude-*"])])
    ask = dict(model="claude-opus-5-5", max_tokens=128000,
               messages=[{"role": "user", "content": "hi"}])
    assert g.anthropic().messages.create(**ask).content[0].text == "hello"
    sent = [json.loads(r["body"]) for r in up.requests]
    asked = [b.get("max_completion_tokens") or b.get("max_tokens") for b in sent]
    assert asked == [128000, limit]
    with g.anthropic().messages.stream(**ask) as stream:      # learned: one request
        assert stream.get_final_text() == "hello"
    assert len(up.requests) == 3
    last = json.loads(up.last()["body"])
    assert (last.get("max_completion_tokens") or last.get("max_tokens")) == limit
    assert any(f"takes at most {limit} output tokens" in p for k, p in g.events() if k == "log")
    assert [r["status"] for r in g.records(2)] == [200, 200]
    g.thread.apply_config()                     # a new configuration: learned anew
    assert g.anthropic().messages.create(**ask).content[0].text == "hello"
    assert len(up.requests) == 5


def test_09_learned_output_limits_are_bounded(gw, upstream, monkeypatch):
    """At most LEARNED_CAPS_MAX (channel, model) limits are kept, the oldest dropped first:
    the model names are the clients'."""
    monkeypatch.setattr(ag, "LEARNED_CAPS_MAX", 2)

    def respond(rec):
        body = json.loads(rec["body"])
        asked = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        return _refuse("openai", OUTPUT_LIMIT_REFUSALS["deepseek"](asked, 100)) \
            if asked > 100 else Dialects.openai(rec)
    up = upstream()
    up.responder = respond
    g = gw([chan(up, models=["claude-*"])])
    counts = []
    for model in ("claude-a", "claude-b", "claude-c", "claude-c", "claude-a"):
        before = len(up.requests)
        g.anthropic().messages.create(model=model, max_tokens=1000,
                                      messages=[{"role": "user", "content": "hi"}])
        counts.append(len(up.requests) - before)
    assert counts == [2, 2, 2, 1, 2]            # claude-a's limit was the oldest: dropped
    assert len(g.gateway.relay.learned_caps) == 2


def test_09_other_refusals_and_a_limit_not_below_the_ask_reach_the_client(gw, upstream):
    """A 400 that names no output limit, or one at or above what was asked, is the client's
    (the gateway asks once, not again and again)."""
    up = upstream([_refuse("openai", "messages: bad role"),
                   _refuse("openai", OUTPUT_LIMIT_REFUSALS["deepseek"](0, 200000))])
    g = gw([chan(up, models=["claude-*"])])
    for expected in ("bad role", "valid range"):
        with pytest.raises(anthropic.BadRequestError) as info:
            g.anthropic().messages.create(model="claude-x", max_tokens=1000,
                                          messages=[{"role": "user", "content": "hi"}])
        assert expected in str(info.value)
    assert len(up.requests) == 2
    assert ag.output_limit_in("the valid range of max_tokens is [1, 65536]") == 65536
    assert ag.output_limit_in("max_tokens must be positive") is None
    # What a converted request asked for, in each channel type's field:
    for sent, n in ((b'{"max_completion_tokens": 7}', 7), (b'{"max_tokens": 8}', 8),
                    (b'{"generationConfig": {"maxOutputTokens": 9}}', 9),
                    (b'{"options": {"num_predict": 10}}', 10), (b"[]", 0), (b"\xff", 0)):
        assert ag.sent_output_tokens(sent) == n


def test_09_count_tokens_for_non_anthropic_channel_is_local(gw, upstream):
    g, up = _typed_gw(gw, upstream, "openai")
    r = g.anthropic().messages.count_tokens(
        model="claude-x", messages=[{"role": "user", "content": "hello " * 100}],
        tools=ANTHROPIC_TOOLS)
    assert 100 < r.input_tokens < 300 and not up.requests
    assert g.records()[-1]["channel"] == "(local estimate)"


@pytest.mark.parametrize("ctype,status,body,sdk_error,atype", [
    ("gemini", 429,
     b'{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}',
     "RateLimitError", "rate_limit_error"),
    ("openai", 400, b'{"error":{"message":"bad schema","type":"invalid_request_error"}}',
     "BadRequestError", "invalid_request_error"),
    ("ollama", 404, b'{"error":"model \'x\' not found"}', "NotFoundError",
     "not_found_error"),
])
def test_09_upstream_errors_translated_to_client_shape(gw, upstream, ctype, status, body,
                                                       sdk_error, atype):
    up = upstream([Reply(status, body)])
    g = gw([chan(up, type=ctype)])
    with pytest.raises(getattr(anthropic, sdk_error)) as e:
        g.anthropic().messages.create(model="m", max_tokens=10,
                                      messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == atype
    msg = e.value.body["error"]["message"]
    assert upstream_text(body) in msg


def upstream_text(body: bytes) -> str:
    return ag.upstream_error_message(body, 0)


def test_09_converted_stream_survives_upstream_reset(gw, upstream):
    chunks = _openai_tool_stream().split(b"\r\n\r\n")
    up = upstream([Reply(chunks=[c + b"\r\n\r\n" for c in chunks if c], reset_after=4,
                         content_type="text/event-stream")])
    g = gw([chan(up)])
    with pytest.raises(anthropic.APIStatusError, match="broke off"):
        with g.anthropic().messages.stream(model="m", max_tokens=10, messages=[
                {"role": "user", "content": "x"}]) as s:
            for _ in s:
                pass


@pytest.mark.parametrize("ctype", ["gemini", "ollama"])
def test_09_embeddings_to_gemini_and_ollama(gw, upstream, ctype):
    up = upstream()

    def respond(rec):
        body = json.loads(rec["body"])
        if ctype == "gemini":
            assert rec["path"].endswith("/v1beta/models/text-emb-4:batchEmbedContents")
            return Reply(body=json.dumps({"embeddings": [
                {"values": [0.5, float(i)]} for i, _ in enumerate(body["requests"])]}).encode())
        assert rec["path"] == "/api/embed"
        return Reply(body=json.dumps({"model": body["model"], "embeddings": [
            [0.5, float(i)] for i, _ in enumerate(body["input"])],
            "prompt_eval_count": 6}).encode())
    up.responder = respond
    g = gw([chan(up, type=ctype, model_mapping={"emb": "text-emb-4"})])
    r = g.openai().embeddings.create(model="emb", input=["a", "b"])
    assert [d.embedding for d in r.data] == [[0.5, 0.0], [0.5, 1.0]]
    assert r.model == "emb" and r.usage.prompt_tokens > 0
    sent = json.loads(up.last()["body"])
    if ctype == "gemini":
        assert sent["requests"][1] == {"model": "models/text-emb-4",
                                       "content": {"parts": [{"text": "b"}]}}
    else:
        assert sent == {"model": "text-emb-4", "input": ["a", "b"]}
    b64 = g.openai().embeddings.create(model="emb", input="a", encoding_format="base64")
    raw = b64.data[0].embedding
    assert raw == [0.5, 0.0] or struct.unpack("<2f", __import__("base64").b64decode(raw)) == \
        (0.5, 0.0)
    with pytest.raises(openai.BadRequestError, match="list of strings"):
        g.openai().embeddings.create(model="emb", input=[[1, 2, 3]])


def test_09_silent_streams_get_keepalive_pings(gw, upstream, monkeypatch):
    monkeypatch.setattr(ag, "KEEPALIVE_PING_SECONDS", 0.01)
    up = upstream()
    up.responder = lambda rec: Reply(chunks=[c for c in Dialects.openai(rec).chunks],
                                     delay=0.025, content_type="text/event-stream")
    g = gw([chan(up, name="oa", models=["gpt-*"]),
            chan(up, name="gem-as-openai", type="openai", models=["other"])])
    status, _, body = g.request("POST", "/v1/messages", {
        "model": "gpt-x", "max_tokens": 10, "stream": True,
        "messages": [{"role": "user", "content": "x"}]},
        headers={"anthropic-version": "2023-06-01"}, timeout=30)
    events = _sse_events(body)
    names = [e for e, _ in events]
    assert status == 200 and names.count("ping") >= 2 and names[-1] == "message_stop"
    assert all(e == d["type"] for e, d in events)
    status, _, body = g.request("POST", "/v1/chat/completions", {
        "model": "gpt-x", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        timeout=30)
    assert body.count(b": keepalive\n\n") >= 2
    assert [d for _, d in _sse_events(body)][-1] == "[DONE]"


@pytest.mark.parametrize("ctype", ["gemini", "ollama"])
def test_09_http_image_urls_are_fetched_for_inline_only_channels(gw, upstream, ctype):
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    pics = upstream([Reply(body=png, content_type="image/png")])
    up = upstream()
    up.responder = getattr(Dialects, ctype)
    g = gw([chan(up, type=ctype)], settings={"fetch_private_urls": True})     # pics: loopback
    g.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": pics.url + "/cat.png"}}]}])
    sent = json.loads(up.last()["body"])
    b64 = __import__("base64").b64encode(png).decode()
    if ctype == "gemini":
        assert sent["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/png",
                                                                  "data": b64}}
    else:
        assert sent["messages"][0]["images"] == [b64]
    missing = upstream([Reply(404, b"nope", content_type="text/plain")])
    with pytest.raises(openai.BadRequestError, match="cannot fetch image"):
        g.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": missing.url + "/x.png"}}]}])


def test_09_cursor_style_foreign_bodies_are_normalised_even_for_openai_channels(gw, upstream):
    up = upstream()
    up.responder = Dialects.openai
    g = gw([chan(up)])
    responses_shaped = {"model": "m", "instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}]}
    status, _, body = g.request("POST", "/v1/chat/completions", responses_shaped)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "got sunny"
    sent = json.loads(up.last()["body"])
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    anthropic_shaped = {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_time",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "noon"}]}],
        "tools": [{"name": "get_time", "input_schema": {"type": "object", "properties": {}}}]}
    status, _, body = g.request("POST", "/v1/chat/completions", anthropic_shaped)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "got noon"
    sent = json.loads(up.last()["body"])
    assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "get_time",
                                                                "arguments": "{}"}
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": "noon"}
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "x_new_field": 1}
    g.request("POST", "/v1/chat/completions", plain)
    assert json.loads(up.last()["body"]) == plain                    # still byte passthrough


def test_09_max_completion_tokens_for_reasoning_models_on_openai_channels():
    ir = _ir_from_openai(messages=[{"role": "user", "content": "x"}], max_tokens=100)
    assert "max_completion_tokens" in ag.encode_upstream_chat("openai", ir, "o3-mini",
                                                              stream=False)   # #18
    assert "max_completion_tokens" in ag.encode_upstream_chat("openai", ir, "gpt-5", stream=False)
    assert ag.encode_upstream_chat("openai", ir, "gpt-4o", stream=False)["max_tokens"] == 100
    assert ag.encode_upstream_chat("custom", ir, "o3", stream=False)["max_tokens"] == 100
    assert ag.encode_upstream_chat("ollama", ir, "l", stream=False,
                                   max_tokens_cap=50)["options"]["num_predict"] == 50


@pytest.mark.parametrize("ctype", ["anthropic", "openai", "gemini", "ollama"])
def test_09_length_cut_offs_and_reasoning_reach_the_other_dialect(gw, upstream, ctype):
    up = upstream()
    answers = {
        "anthropic": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                      "content": [{"type": "thinking", "thinking": "deep", "signature": "S"},
                                  {"type": "text", "text": "partial"}],
                      "stop_reason": "max_tokens", "usage": {"input_tokens": 3,
                                                             "output_tokens": 9}},
        "openai": {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "finish_reason": "length", "message": {
                       "role": "assistant", "content": "partial",
                       "reasoning_content": "deep"}}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 9}},
        "gemini": {"candidates": [{"content": {"role": "model", "parts": [
            {"text": "deep", "thought": True}, {"text": "partial"}]},
            "finishReason": "MAX_TOKENS"}], "usageMetadata": {"promptTokenCount": 3,
                                                              "candidatesTokenCount": 9}},
        "ollama": {"model": "m", "message": {"role": "assistant", "content": "partial",
                                             "thinking": "deep"}, "done": True,
                   "done_reason": "length", "prompt_eval_count": 3, "eval_count": 9}}
    up.replies = [Reply(body=json.dumps(answers[ctype]).encode())]
    g = gw([chan(up, type=ctype)])
    if ctype == "anthropic":
        r = g.openai().chat.completions.create(model="m", messages=[{"role": "user",
                                                                     "content": "x"}])
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content == "partial"
        assert r.choices[0].message.model_extra["reasoning_content"] == "deep"
    else:
        m = g.anthropic().messages.create(model="m", max_tokens=5,
                                          messages=[{"role": "user", "content": "x"}])
        assert m.stop_reason == "max_tokens"
        assert [b.type for b in m.content] == ["thinking", "text"]
        assert m.content[0].thinking == "deep" and m.content[1].text == "partial"
        assert m.usage.output_tokens == 9


def test_09_interleaved_tool_fragments_become_sequential_complete_calls():
    raw = b"".join(_interleaved_openai_stream())
    ir = ag.empty_request("m")
    ir["tools"] = [{"name": "get_weather", "description": "", "parameters": {}},
                   {"name": "get_time", "description": "", "parameters": {}}]
    out = _convert_stream(ag.OpenAIStreamDecoder(), ag.AnthropicStreamEncoder("c", 1), raw)
    events = _sse_events(out)
    opened, closed, inputs = [], [], {}
    for e, d in events:
        if e == "content_block_start":
            assert not opened or opened[-1] in closed        # one block open at a time
            opened.append(d["index"])
            inputs[d["index"]] = [d["content_block"]["name"], ""]
        elif e == "content_block_stop":
            closed.append(d["index"])
        elif e == "content_block_delta":
            assert d["index"] == opened[-1] and d["index"] not in closed
            inputs[d["index"]][1] += d["delta"]["partial_json"]
    assert [(n, json.loads(a)) for n, a in inputs.values()] == INTERLEAVED_CALLS
    out = _convert_stream(ag.OpenAIStreamDecoder(), ag.ResponsesStreamEncoder("m", ir), raw)
    done = [d["item"] for e, d in _sse_events(out) if e == "response.output_item.done"]
    assert [(i["name"], json.loads(i["arguments"])) for i in done] == INTERLEAVED_CALLS
    arg_done = [d["arguments"] for e, d in _sse_events(out)
                if e == "response.function_call_arguments.done"]
    assert "{}" not in arg_done and len(arg_done) == 2
    out = _convert_stream(ag.OpenAIStreamDecoder(), ag.GeminiStreamEncoder("m", ir), raw)
    parts = [p for _, d in _sse_events(out) for c in d["candidates"]
             for p in c["content"]["parts"]]
    assert [(p["functionCall"]["name"], p["functionCall"]["args"]) for p in parts] == \
        INTERLEAVED_CALLS


@pytest.mark.parametrize("ctype", ["openai", "custom", "anthropic", "gemini", "ollama"])
def test_09_tool_names_shortened_by_the_channels_rule(ctype):
    for name in ODD_TOOLS:
        short = ag.channel_tool_name(name, ctype)
        assert short == ag.channel_tool_name(name, ctype)          # deterministic
        rule = ag.TOOL_NAME_RULES.get(ctype)
        if rule is None:
            assert short == name
            continue
        assert rule[0].match(short)
        if rule[0].match(name):
            assert short == name
        else:
            assert short.startswith(name[:20].replace(".", "_").replace(":", "_"))
    assert ag.channel_tool_name(LONG_TOOL, "openai") != ag.channel_tool_name(
        LONG_TOOL + "2", "openai")
    assert ag.channel_tool_name("files.read", "gemini") == "files.read"      # dots are allowed
    assert ag.channel_tool_name("files.read", "openai") != "files_read"     # no collisions


def test_09_tool_names_renamed_in_tools_history_and_choice_then_restored():
    ir = ag.anthropic_request_to_ir({
        "model": "m", "max_tokens": 10,
        "tools": [{"name": n, "input_schema": {"type": "object"}} for n in ODD_TOOLS],
        "tool_choice": {"type": "tool", "name": LONG_TOOL},
        "messages": [{"role": "user", "content": "go"},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                                        "name": LONG_TOOL, "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result",
                                                   "tool_use_id": "toolu_1",
                                                   "content": "found"}]}]})
    body = ag.encode_upstream_chat("openai", ir, "m", stream=False)
    short = ag.channel_tool_name(LONG_TOOL, "openai")
    assert [t["function"]["name"] for t in body["tools"]] == [
        ag.channel_tool_name(n, "openai") for n in ODD_TOOLS]
    assert body["tool_choice"] == {"type": "function", "function": {"name": short}}
    assert body["messages"][1]["tool_calls"][0]["function"]["name"] == short
    assert ir["tools"][0]["name"] == LONG_TOOL                      # the client's IR untouched
    names = ag.upstream_tool_names(ir, "openai")
    whole, stream = ag.upstream_decoders("openai", None, names)
    resp = whole({"choices": [{"message": {"tool_calls": [{"id": "c", "function": {
        "name": short, "arguments": "{}"}}]}}]})
    assert resp["content"][0]["name"] == LONG_TOOL
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c",
                                                                "function": {"name": short}}]}}]}
    events = stream().feed(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    assert [e for e in events if e[0] == "tool"] == [("tool", 0, "c", LONG_TOOL)]


def test_09_n_above_one_on_a_converted_route_names_n():
    ir = ag.openai_request_to_ir({"model": "m", "n": 2, "messages": [
        {"role": "user", "content": "x"}]})
    for ctype in ("anthropic", "gemini", "ollama", "openai"):
        with pytest.raises(ag.GatewayError) as exc:
            ag.encode_upstream_chat(ctype, ir, "m", stream=False)
        assert exc.value.status == 400 and exc.value.param == "n" and "n = 2" in str(exc.value)


def test_09_openai_quirks_on_the_chat_body():
    body = {"model": "m", "max_completion_tokens": 50, "stream": True,
            "stream_options": {"include_usage": True}, "parallel_tool_calls": True,
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "plain", "reasoning_content": "r1"},
                {"role": "assistant", "content": None, "reasoning_content": "r2",
                 "tool_calls": [{"id": "toolu_01ABCdef", "type": "function",
                                 "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "toolu_01ABCdef", "content": "ok"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "abcDEF123", "type": "function",
                     "function": {"name": "f", "arguments": "{}"}}]}]}
    out = ag.apply_openai_quirks(body, {
        "tool_call_id": "mistral9", "reasoning_back": "tool_calls",
        "reasoning_field": "reasoning", "max_tokens_field": "max_tokens",
        "drop_params": ["stream_options", "parallel_tool_calls"]})
    msgs = out["messages"]
    new_id = msgs[2]["tool_calls"][0]["id"]
    assert len(new_id) == 9 and new_id.isalnum() and msgs[3]["tool_call_id"] == new_id
    assert msgs[4]["tool_calls"][0]["id"] == "abcDEF123"           # already valid: kept
    assert "reasoning_content" not in msgs[1] and "reasoning" not in msgs[1]
    assert msgs[2]["reasoning"] == "r2" and "reasoning_content" not in msgs[2]
    assert out["max_tokens"] == 50 and "max_completion_tokens" not in out
    assert "stream_options" not in out and "parallel_tool_calls" not in out
    assert body["messages"][2]["tool_calls"][0]["id"] == "toolu_01ABCdef"   # input untouched
    assert ag.apply_openai_quirks(body, {}) is body
    # Answers are read in either reasoning field (OpenRouter and vLLM stream `reasoning`).
    answer = ag.openai_response_to_ir({"choices": [{"message": {"reasoning": "r",
                                                                "content": "a"}}]})
    assert [p["type"] for p in answer["content"]] == ["reasoning", "text"]
    chunk = {"choices": [{"index": 0, "delta": {"reasoning": "hm"}}]}
    assert ("reasoning", "hm") in ag.OpenAIStreamDecoder().feed(
        b"data: " + json.dumps(chunk).encode() + b"\n\n")


# Issue 14: quirks of Anthropic-compatible channels
def test_09_anthropic_quirks_strip_markers_and_fields_not_inputs():
    schema = {"type": "object", "properties": {"cache_control": {"type": "string"}}}
    body = {"model": "m", "top_k": 3, "max_tokens": 9,
            "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "t", "input_schema": schema, "cache_control": {}}],
            "messages": [{"role": "user", "content": "x"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "a",
                                                            "name": "t", "input": {
                                                                "cache_control": "keep"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                                       "cache_control": {}, "content": [
                                                           {"type": "text", "text": "r",
                                                            "cache_control": {}}]}]}]}
    out = ag.apply_anthropic_quirks(body, {"cache_control": "strip", "drop_params": ["top_k"]})
    assert "top_k" not in out and out["max_tokens"] == 9 and "top_k" in body     # a copy
    assert out["system"] == [{"type": "text", "text": "s"}]
    assert out["tools"] == [{"name": "t", "input_schema": schema}]              # schema kept
    assert out["messages"][1]["content"][0]["input"] == {"cache_control": "keep"}
    assert out["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "a",
                                              "content": [{"type": "text", "text": "r"}]}]
    assert ag.apply_anthropic_quirks(body, {"drop_params": []})["system"] == body["system"]
    assert ag.quirk_dropped_headers({"drop_headers": ["Anthropic-Beta"]}) == {"anthropic-beta"}


def test_09_tool_search_deferred_tools_and_tool_references():
    """Claude Code's tool search (Anthropic docs, tool search tool: tools with
    defer_loading: true load when a tool_reference block {"type": "tool_reference",
    "tool_name": ...} names them in a tool_result)."""
    tools = [{"name": "ToolSearch", "input_schema": {"type": "object"}},
             {"name": "mcp__a__found", "defer_loading": True,
              "input_schema": {"type": "object"}},
             {"name": "mcp__a__hidden", "defer_loading": True,
              "input_schema": {"type": "object"}}]
    msgs = [{"role": "user", "content": "find a tool"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                               "name": "ToolSearch", "input": {"q": "f"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "tool_reference",
                                                       "tool_name": "mcp__a__found"}]}]}]
    ir = ag.anthropic_request_to_ir({"model": "m", "max_tokens": 9, "tools": tools,
                                     "messages": msgs})
    assert [t["name"] for t in ir["tools"]] == ["ToolSearch", "mcp__a__found"]
    body = ag.encode_upstream_chat("openai", ir, "m", stream=False)
    assert "defer_loading" not in json.dumps(body) and "tool_reference" not in json.dumps(body)
    assert body["messages"][-1] == {"role": "tool", "tool_call_id": "toolu_1",
                                    "content": "Tool mcp__a__found is now available."}
    server = ag.anthropic_request_to_ir({"model": "m", "max_tokens": 9, "messages": msgs[:1],
                                         "tools": tools[1:] + [{
                                             "type": "tool_search_tool_regex_20251119",
                                             "name": "tool_search_tool_regex"}]})
    assert [t["name"] for t in server["tools"]] == ["mcp__a__found", "mcp__a__hidden"]
    # A loaded tool whose name the channel takes only shortened is offered under that name, and
    # the reference names it so too: the model is told of the tool it can call.
    long_name = "mcp__workspace_documents_server__search_the_workspace_documents_by_title"
    renamed = json.loads(json.dumps([tools, msgs]).replace("mcp__a__found", long_name))
    ir = ag.anthropic_request_to_ir({"model": "m", "max_tokens": 9, "tools": renamed[0],
                                     "messages": renamed[1]})
    for ctype in ("openai", "gemini"):
        short = ag.channel_tool_name(long_name, ctype)
        assert short != long_name
        wire = json.dumps(ag.encode_upstream_chat(ctype, ag.rename_ir_tools(ir, ctype), "m",
                                                  stream=False))
        assert f"Tool {short} is now available." in wire and long_name not in wire
        assert "reference" not in wire                  # the IR's note is not sent
    assert ag.rename_ir_tools(ir, "anthropic") is ir    # a name it takes: nothing changes


def test_09_codex_namespaced_tools_flattened_and_split_again():
    body = {"model": "m", "tools": [CODEX_NAMESPACE], "tool_choice": {
        "type": "function", "name": "echo_words", "namespace": "mcp__probe"}, "input": [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "call_1", "name": "echo_words",
         "namespace": "mcp__probe", "arguments": "{\"words\":\"a\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a"}]}
    ir = ag.responses_request_to_ir(body)
    assert [t["name"] for t in ir["tools"]] == ["mcp__probe__echo_words",
                                               "mcp__probe__raw_patch"]
    sent = ag.encode_upstream_chat("openai", ir, "m", stream=False)
    assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "mcp__probe__echo_words"
    assert sent["tool_choice"] == {"type": "function",
                                   "function": {"name": "mcp__probe__echo_words"}}
    resp = {"id": "r", "model": "m", "finish": "tool_calls", "usage": ag.new_usage(1, 1),
            "content": [{"type": "tool_call", "id": "call_2", "name": "mcp__probe__echo_words",
                         "arguments": "{\"words\":\"b\"}"},
                        {"type": "tool_call", "id": "call_3", "name": "mcp__probe__raw_patch",
                         "arguments": "{\"input\":\"p\"}"}]}
    out = ag.ir_to_responses_response(resp, "m", ir)["output"]
    assert [(o["type"], o["name"], o["namespace"]) for o in out] == [
        ("function_call", "echo_words", "mcp__probe"),
        ("custom_tool_call", "raw_patch", "mcp__probe")]
    raw = ag.ResponsesStreamEncoder("m", ir).encode(ag.response_events(resp))
    items = [(e, d["item"]) for e, d in _sse_events(raw) if "item" in d]
    assert all(i["namespace"] == "mcp__probe" and "__" not in i["name"] for _, i in items)
    assert [i["name"] for e, i in items if e == "response.output_item.done"] == [
        "echo_words", "raw_patch"]


# Azure OpenAI channels (issue 11). The fake enforces Azure's rules as its docs state them:
# learn.microsoft.com/azure/ai-foundry/openai/reference ("Authentication": the key goes in an
# `api-key` header; "API specs": data-plane calls are
# {endpoint}/openai/deployments/{deployment-id}/{operation}?api-version={version}, a dated
# version being required); the Responses API in the dated form is /openai/responses with the
# deployment as "model" (learn.microsoft.com/azure/ai-foundry/openai/how-to/responses); the v1
# API is {endpoint}/openai/v1/{operation} with the deployment as "model" and no dated
# api-version (learn.microsoft.com/azure/ai-foundry/openai/api-version-lifecycle).
AZURE_KEY = "azure-secret-key"
_AZURE_DATED = re.compile(r"/openai/deployments/([^/?]+)/(chat/completions|embeddings)\Z")
_AZURE_OPS = ("chat/completions", "embeddings", "responses")


def _azure_error(status, code, message):
    return Reply(status, json.dumps({"error": {"code": code, "message": message}}).encode())


def azure_upstream(upstream):
    """A fake Azure OpenAI resource; rec["deployment"] and rec["query"] say what it saw."""
    up = upstream()

    def respond(rec):
        path, _, query = rec["path"].partition("?")
        params = urllib.parse.parse_qs(query)
        rec["query"] = params
        if rec["headers"].get("api-key") != AZURE_KEY:
            return _azure_error(401, "401", "Access denied due to invalid subscription key or "
                                            "wrong API endpoint.")
        body = json.loads(rec["body"] or b"{}")
        if path.startswith("/openai/v1/"):
            op = path[len("/openai/v1/"):]
            if op not in _AZURE_OPS or "api-version" in params:
                return _azure_error(404, "404", "Resource not found")
            rec["deployment"] = body.get("model")
        else:
            if not params.get("api-version"):
                return _azure_error(404, "404", "Resource not found")
            m = _AZURE_DATED.match(path)
            if path == "/openai/responses":
                op, rec["deployment"] = "responses", body.get("model")
            elif m:
                rec["deployment"], op = urllib.parse.unquote(m.group(1)), m.group(2)
            else:
                return _azure_error(404, "404", "Resource not found")
        if not rec["deployment"]:
            return _azure_error(404, "DeploymentNotFound", "The API deployment for this "
                                                           "resource does not exist.")
        if op == "embeddings":
            return Reply(body=json.dumps({"object": "list", "model": "text-embedding-3-small",
                                          "data": [{"object": "embedding", "index": 0,
                                                    "embedding": [0.25, -0.5]}],
                                          "usage": {"prompt_tokens": 3, "total_tokens": 3}}
                                         ).encode())
        if op == "responses":
            return Reply(body=json.dumps({
                "id": "resp_azure", "object": "response", "created_at": 1, "status":
                "completed", "model": body["model"], "output": [{
                    "type": "message", "id": "msg_a", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "from azure",
                                 "annotations": []}]}],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}).encode())
        if body.get("stream"):
            return openai_stream_reply(model=rec["deployment"], pieces=("az", "ure"))
        return openai_chat_reply(model=rec["deployment"], text="from azure")
    up.responder = respond
    return up


def azure_chan(up, suffix="", **kw):
    return chan(up.url + suffix, type="azure", api_key=AZURE_KEY, **kw)


def test_09_azure_dated_form_from_the_openai_sdk(gw, upstream):
    up = azure_upstream(upstream)
    g = gw([azure_chan(up, models=["gpt-4o", "emb"], responses_api=True,
                       model_mapping={"gpt-4o": "my gpt4o"})])
    c = g.openai()
    r = c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "from azure"
    rec = up.last()
    assert rec["path"] == "/openai/deployments/my%20gpt4o/chat/completions?api-version=" \
        + ag.AZURE_API_VERSION and rec["deployment"] == "my gpt4o"
    assert "authorization" not in rec["headers"]
    with c.chat.completions.create(model="gpt-4o", stream=True,
                                   messages=[{"role": "user", "content": "x"}]) as s:
        assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == "azure"
    e = c.embeddings.create(model="emb", input="a")
    assert e.data[0].embedding == [0.25, -0.5] and up.last()["deployment"] == "emb"
    out = c.responses.create(model="gpt-4o", input="hi")
    assert out.output_text == "from azure"
    assert up.last()["path"] == f"/openai/responses?api-version={ag.AZURE_API_VERSION}"
    assert up.last()["deployment"] == "my gpt4o"


def test_09_azure_v1_form_and_own_api_version(gw, upstream):
    up = azure_upstream(upstream)
    g = gw([azure_chan(up, "/openai/v1", name="v1", models=["gpt-4o", "emb"],
                       responses_api=True),
            azure_chan(up, name="dated", models=["old"], api_version="2024-06-01")])
    c = g.openai()
    assert c.chat.completions.create(model="gpt-4o", messages=[
        {"role": "user", "content": "x"}]).choices[0].message.content == "from azure"
    assert up.last()["path"] == "/openai/v1/chat/completions"
    assert up.last()["deployment"] == "gpt-4o"
    assert c.responses.create(model="gpt-4o", input="hi").output_text == "from azure"
    assert up.last()["path"] == "/openai/v1/responses"
    assert c.embeddings.create(model="emb", input="a").data[0].embedding == [0.25, -0.5]
    assert up.last()["path"] == "/openai/v1/embeddings"
    c.chat.completions.create(model="old", messages=[{"role": "user", "content": "x"}])
    assert up.last()["query"] == {"api-version": ["2024-06-01"]}


def test_09_azure_reached_by_conversion(gw, upstream):
    up = azure_upstream(upstream)
    g = gw([azure_chan(up, models=["claude-on-azure", "gpt-4o"],
                       model_mapping={"claude-on-azure": "gpt4o-deploy"})])
    msg = g.anthropic().messages.create(model="claude-on-azure", max_tokens=50, messages=[
        {"role": "user", "content": "x"}])
    assert msg.content[0].text == "from azure" and msg.model == "claude-on-azure"
    rec = up.last()
    assert rec["path"].startswith("/openai/deployments/gpt4o-deploy/chat/completions?")
    assert json.loads(rec["body"])["messages"] == [{"role": "user", "content": "x"}]
    with g.anthropic().messages.stream(model="claude-on-azure", max_tokens=50, messages=[
            {"role": "user", "content": "x"}]) as s:
        assert "".join(s.text_stream) == "azure"
    # A Responses client on a channel without responses_api is converted to chat.
    assert g.openai().responses.create(model="gpt-4o", input="hi").output_text == "from azure"
    assert up.last()["path"].startswith("/openai/deployments/gpt-4o/chat/completions?")


def test_09_azure_wrong_key_is_the_channels_failure(gw, upstream):
    up = azure_upstream(upstream)
    g = gw([chan(up.url, type="azure", api_key="wrong", models=["gpt-4o"])])
    with pytest.raises(openai.APIStatusError) as e:
        g.openai().chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": "x"}])
    assert e.value.status_code == 401 and "invalid subscription key" in str(e.value)
    assert up.last()["headers"]["api-key"] == "wrong"


# -- Responses API clients (the openai SDK's client.responses, as Codex speaks it) ----------------
@pytest.mark.parametrize("ctype", CHANNEL_TYPES)
@pytest.mark.parametrize("stream", [False, True])
def test_09_responses_api_tool_loop_through_every_channel_type(gw, upstream, ctype, stream):
    g, up = _typed_gw(gw, upstream, ctype)
    c = g.openai()
    items = [{"role": "user", "content": [{"type": "input_text",
                                           "text": "weather and time?"}]}]

    def call(inp):
        kw = dict(model="gpt-5-codex", instructions="You are Codex.", input=inp,
                  tools=RESPONSES_TOOLS, reasoning={"effort": "low"}, store=False)
        if not stream:
            return c.responses.create(**kw)
        with c.responses.stream(**kw) as s:
            types = [ev.type for ev in s]
            final = s.get_final_response()
        assert types[:2] == ["response.created", "response.in_progress"]
        assert types[-1] == "response.completed"
        return final
    first = call(items)
    calls = [o for o in first.output if o.type == "function_call"]
    assert [(o.name, json.loads(o.arguments)) for o in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert first.status == "completed" and first.usage.input_tokens == 11
    items += [o.model_dump(exclude_none=True) for o in first.output]
    items += [{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
              {"type": "function_call_output", "call_id": calls[1].call_id, "output": "noon"}]
    second = call(items)
    assert second.output_text == "got noon" and second.usage.output_tokens == 4
    if ctype == "openai":
        sent = json.loads(up.last()["body"])
        assert sent["messages"][0] == {"role": "system", "content": "You are Codex."}
        assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]
        assert sent["reasoning_effort"] == "low"


def test_09_responses_custom_tool_and_native_passthrough(gw, upstream):
    up = upstream()
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"

    def respond(rec):
        body = json.loads(rec["body"])
        if rec["path"].endswith("/responses"):                # native channel: untouched
            return Reply(body=json.dumps({
                "id": "resp_native", "object": "response", "created_at": 1, "status":
                "completed", "model": body["model"], "output": [{
                    "type": "message", "id": "msg_n", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
                "parallel_tool_calls": True,
                "tool_choice": "auto", "tools": []}).encode())
        assert body["tools"][0]["function"]["parameters"]["required"] == ["input"]
        return Reply(body=json.dumps({
            "id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [{
                "index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": None, "tool_calls": [{
                        "id": "call_p", "type": "function", "function": {
                            "name": "apply_patch",
                            "arguments": json.dumps({"input": patch})}}]}}]}).encode())
    up.responder = respond
    g = gw([chan(up, name="chat", models=["gpt-5"]),
            chan(up, name="native", models=["gpt-4.1"], responses_api=True)])
    custom = [{"type": "custom", "name": "apply_patch", "description": "Apply a patch",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}]
    r = g.openai().responses.create(model="gpt-5", input="add a file", tools=custom)
    item = r.output[0]
    assert item.type == "custom_tool_call" and item.input == patch and item.call_id == "call_p"
    with g.openai().responses.stream(model="gpt-5", input="add a file", tools=custom) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_response()
    assert "response.custom_tool_call_input.done" in kinds and final.output[0].input == patch
    body = {"model": "gpt-4.1", "input": "hi", "store": False, "new_field": {"x": 1}}
    status, _, out = g.request("POST", "/v1/responses", body)
    assert status == 200 and json.loads(out)["id"] == "resp_native"
    assert json.loads(up.last()["body"]) == body                       # byte passthrough
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        g.openai().responses.create(model="gpt-5", input="x", previous_response_id="resp_1")


def test_09_responses_stream_event_order_and_failure_bytewise():
    ir = ag.responses_request_to_ir({"model": "m", "input": "x", "tools": RESPONSES_TOOLS})
    raw = _openai_tool_stream()
    out = _convert_stream(ag.OpenAIStreamDecoder(), ag.ResponsesStreamEncoder("m", ir), raw,
                          step=7)
    events = _sse_events(out)
    assert all(e == d["type"] for e, d in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    names = [e for e, _ in events]
    assert names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert names[-1] == "response.completed"
    done = [d["item"] for e, d in events if e == "response.output_item.done"]
    assert [i["type"] for i in done] == ["reasoning", "message", "function_call",
                                         "function_call"]
    added = [d["output_index"] for e, d in events if e == "response.output_item.added"]
    assert added == [0, 1, 2, 3]
    final = events[-1][1]["response"]
    assert [o["type"] for o in final["output"]] == [i["type"] for i in done]
    assert final["usage"]["input_tokens"] == 30 and final["usage"]["total_tokens"] == 39
    broken = ag.ResponsesStreamEncoder("m", ir)
    dec = ag.OpenAIStreamDecoder()
    out = broken.encode(dec.feed(raw[:400])) + broken.encode(
        [("error", ag.GatewayError(429, "slow down"))])
    last = _sse_events(out)[-1]
    assert last[0] == "response.failed"
    assert last[1]["response"]["error"] == {"code": "rate_limit_exceeded",
                                            "message": "slow down"}


# -- Gemini-native clients (the google-genai SDK, as gemini-cli speaks it) ------------------------
@pytest.mark.parametrize("ctype", CHANNEL_TYPES)
@pytest.mark.parametrize("stream,version", [(False, "v1beta"), (True, "v1beta"), (False, "v1")])
def test_09_genai_sdk_function_calling_through_every_channel_type(gw, upstream, ctype, stream,
                                                                  version):
    g, up = _typed_gw(gw, upstream, ctype)
    c = _genai(g, version)
    config = genai_types.GenerateContentConfig(
        tools=_genai_tools(), system_instruction="Be brief.",
        automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True))
    contents = [genai_types.Content(role="user", parts=[genai_types.Part(text="weather?")])]

    def call():
        if not stream:
            return c.models.generate_content(model="gemini-2.5-pro", contents=contents,
                                             config=config)
        chunks = list(c.models.generate_content_stream(model="gemini-2.5-pro",
                                                       contents=contents, config=config))
        parts = [p for ch in chunks for cand in ch.candidates or [] if cand.content
                 for p in cand.content.parts or []]
        last = chunks[-1]
        return genai_types.GenerateContentResponse(
            candidates=[genai_types.Candidate(content=genai_types.Content(
                role="model", parts=parts), finish_reason=last.candidates[0].finish_reason)],
            usage_metadata=last.usage_metadata)
    first = call()
    calls = [p.function_call for p in first.candidates[0].content.parts if p.function_call]
    assert [(fc.name, fc.args) for fc in calls] == [("get_weather", {"city": "Paris"}),
                                                    ("get_time", {})]
    assert first.candidates[0].finish_reason == "STOP"
    assert first.usage_metadata.prompt_token_count == 11
    contents.append(first.candidates[0].content)
    contents.append(genai_types.Content(role="user", parts=[
        genai_types.Part.from_function_response(name="get_weather", response={"result": "sunny"}),
        genai_types.Part.from_function_response(name="get_time", response={"result": "noon"})]))
    second = call()
    text = "".join(p.text or "" for p in second.candidates[0].content.parts)
    assert text == "got noon"
    sent = up.last()
    if ctype == "gemini":                                   # passthrough: body untouched
        assert sent["path"].startswith("/v1beta/models/gemini-2.5-pro:")
        assert ("alt=sse" in sent["path"]) == stream
        body = json.loads(sent["body"])
        assert body["systemInstruction"]["parts"][0]["text"] == "Be brief."
        assert TOKEN not in json.dumps(sent["headers"]) + sent["path"]
    elif ctype == "openai":
        body = json.loads(sent["body"])
        assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool",
                                                         "tool"]
        assert body["messages"][3]["tool_call_id"] == body["messages"][2]["tool_calls"][0]["id"]


def test_09_genai_count_embed_list_and_errors(gw, upstream):
    oa = upstream()

    def respond(rec):
        if rec["path"].endswith("/embeddings"):
            n = len(json.loads(rec["body"])["input"])
            return Reply(body=json.dumps({"object": "list", "data": [
                {"object": "embedding", "index": i, "embedding": [0.25, float(i)]}
                for i in range(n)], "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode())
        return Dialects.openai(rec)
    oa.responder = respond
    gem = upstream([Reply(body=b'{"totalTokens": 77}')])
    g = gw([chan(oa, name="oa", models=["gpt-*", "text-embedding-3-small"]),
            chan(gem, name="gem", type="gemini", models=["gemini-*"])])
    c = _genai(g)
    assert c.models.count_tokens(model="gpt-4o", contents="hello " * 50).total_tokens > 40
    assert not oa.requests                                    # a local estimate
    assert c.models.count_tokens(model="gemini-2.5-pro", contents="hi").total_tokens == 77
    assert gem.last()["path"] == "/v1beta/models/gemini-2.5-pro:countTokens"
    emb = c.models.embed_content(model="text-embedding-3-small", contents=["a", "b"])
    assert [e.values for e in emb.embeddings] == [[0.25, 0.0], [0.25, 1.0]]
    names = [m.name for m in c.models.list()]
    assert "models/gpt-*" not in names and "models/text-embedding-3-small" in names
    with pytest.raises(genai_errors.ClientError) as e:
        c.models.generate_content(model="nope-model", contents="x")
    assert e.value.code == 404 and e.value.status == "NOT_FOUND"
    wrong = _genai(g, key="sk-gw-wrong-key-123")
    with pytest.raises(genai_errors.ClientError) as e2:
        wrong.models.generate_content(model="gpt-4o", contents="x")
    assert e2.value.code == 401 and e2.value.status == "UNAUTHENTICATED"


def test_09_gemini_json_array_stream_without_alt_sse(gw, upstream):
    g, up = _typed_gw(gw, upstream, "openai")
    status, hdrs, body = g.request(
        "POST", "/v1beta/models/gpt-4o:streamGenerateContent",
        {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        headers={"Authorization": None, "x-goog-api-key": TOKEN})
    chunks = json.loads(body)
    assert status == 200 and isinstance(chunks, list) and len(chunks) >= 2
    assert "".join(p.get("text", "") for c in chunks
                   for p in c["candidates"][0]["content"]["parts"]) == "hello"
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert chunks[-1]["usageMetadata"]["promptTokenCount"] == 11


# -- Issue 12: thinking by model, Gemini 3 call ids, context overflow, empty answers --------------
@pytest.mark.parametrize("model,mode", [
    ("claude-opus-4-7", "adaptive"), ("anthropic.claude-opus-4-7", "adaptive"),
    ("claude-opus-4-8@20260601", "adaptive"), ("claude-sonnet-5", "adaptive"),
    ("claude-mythos-preview", "adaptive"), ("claude-opus-4-6", "both"),
    ("claude-sonnet-4-6", "both"), ("claude-sonnet-4-5-20250929", "budget"),
    ("claude-opus-4-20250514", "budget"), ("claude-opus-4-1", "budget"),
    ("claude-3-7-sonnet-latest", "budget"), ("claude-3-5-sonnet-20241022", "none"),
    ("claude-3-opus-20240229", "none"), ("my-relay-model", "budget")])
def test_09_thinking_mode_by_model_name(model, mode):
    assert ag.anthropic_thinking_mode(model) == mode
    assert ag.anthropic_thinking_mode(model, "adaptive") == "adaptive"
    assert ag.anthropic_thinking_mode(model, "budget") == "budget"


def _reasoning_ir(effort, budget=None, max_tokens=2000, **kw):
    ir = _ir_from_openai(messages=[{"role": "user", "content": "x"}], max_tokens=max_tokens,
                         **kw)
    ir["reasoning"] = {"effort": effort, "budget": budget}
    return ir


def test_09_thinking_request_follows_the_model():
    body = ag.ir_to_anthropic_request(_reasoning_ir("xhigh"), "claude-opus-4-7", stream=False)
    # Opus 4.7 and later omit the thinking text unless asked: the client asked for reasoning
    assert body["thinking"] == {"type": "adaptive", "display": "summarized"}
    assert body["output_config"] == {"effort": "xhigh"}
    assert body["max_tokens"] > 32768                     # covers thinking and answer
    body = ag.ir_to_anthropic_request(_reasoning_ir("xhigh"), "claude-opus-4-6", stream=False)
    assert body["thinking"] == {"type": "adaptive"} and body["output_config"]["effort"] == "max"
    body = ag.ir_to_anthropic_request(_reasoning_ir("medium", 4000), "claude-opus-4-6",
                                      stream=False)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4000}
    assert "output_config" not in body                    # the client's own budget, kept
    body = ag.ir_to_anthropic_request(_reasoning_ir("minimal"), "claude-sonnet-4-5",
                                      stream=False)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert "output_config" not in body
    assert "thinking" not in ag.ir_to_anthropic_request(_reasoning_ir("high"),
                                                        "claude-3-5-sonnet", stream=False)
    forced = ag.ir_to_anthropic_request(_reasoning_ir("low"), "claude-opus-4-7", stream=False,
                                        thinking_setting="budget")
    assert forced["thinking"]["type"] == "enabled"
    ir = _reasoning_ir("low", response_format={"type": "json_schema", "json_schema": {
        "name": "o", "schema": {"type": "object"}}})
    ir["reasoning"] = {"effort": "low", "budget": None}
    body = ag.ir_to_anthropic_request(ir, "claude-opus-4-7", stream=False, max_tokens_cap=1500)
    assert body["output_config"] == {"effort": "low", "format": {
        "type": "json_schema", "schema": {"type": "object"}}}
    assert body["max_tokens"] == 1500


def test_09_effort_mapped_both_ways():
    oa = _ir_from_openai(messages=[{"role": "user", "content": "x"}], reasoning_effort="xhigh")
    assert oa["reasoning"] == {"effort": "xhigh", "budget": None}
    an = ag.anthropic_request_to_ir({"model": "c", "max_tokens": 9, "messages": [
        {"role": "user", "content": "x"}], "thinking": {"type": "adaptive"},
        "output_config": {"effort": "max"}})
    assert ag.ir_to_openai_request(an, "gpt-5.6-sol", stream=False)["reasoning_effort"] == "xhigh"
    assert ag.ir_to_openai_request(an, "o3", stream=False)["reasoning_effort"] == "high"
    default = ag.anthropic_request_to_ir({"model": "c", "max_tokens": 9, "thinking": {
        "type": "adaptive"}, "messages": [{"role": "user", "content": "x"}]})
    assert default["reasoning"]["effort"] == "high"           # Anthropic's default effort
    gem = ag.gemini_request_to_ir({"contents": [{"parts": [{"text": "x"}]}],
                                   "generationConfig": {"thinkingConfig": {
                                       "thinkingLevel": "LOW"}}})
    assert gem["reasoning"] == {"effort": "low", "budget": None}
    dyn = ag.gemini_request_to_ir({"contents": [{"parts": [{"text": "x"}]}],
                                   "generationConfig": {"thinkingConfig": {
                                       "thinkingBudget": -1}}})
    assert dyn["reasoning"]["effort"] == "high"
    rs = ag.responses_request_to_ir({"model": "m", "input": "x", "reasoning": {
        "effort": "xhigh"}})
    assert rs["reasoning"]["effort"] == "xhigh"


@pytest.mark.parametrize("model,effort,budget,expected", [
    ("gemini-3-pro-preview", "medium", None, {"thinkingLevel": "high"}),
    ("gemini-3-pro-preview", "none", None, {"thinkingLevel": "low"}),
    ("gemini-3-flash-preview", "none", None, {"thinkingLevel": "minimal"}),
    ("gemini-3-flash-preview", "medium", None, {"thinkingLevel": "medium"}),
    ("gemini-3.1-pro", "max", None, {"thinkingLevel": "high"}),
    ("gemini-3.1-pro-preview", "medium", None, {"thinkingLevel": "medium"}),
    ("gemini-3.1-pro-preview", "minimal", None, {"thinkingLevel": "low"}),
    ("gemini-3.6-flash", "minimal", None, {"thinkingLevel": "minimal"}),
    ("gemini-3.5-flash-lite", "none", None, {"thinkingLevel": "minimal"}),
    ("gemini-3.7-flash", "minimal", None, {"thinkingLevel": "low"}),
    ("gemini-3.8-flash", "none", None, {"thinkingLevel": "low"}),
    ("gemini-3.8-flash", "xhigh", None, {"thinkingLevel": "high"}),
    ("gemini-2.5-pro", "none", None, {"thinkingBudget": 128}),
    ("gemini-2.5-flash", "none", None, {"thinkingBudget": 0}),
    ("gemini-2.5-flash", "max", None, {"thinkingBudget": 24576}),
    ("gemini-2.5-flash-lite", "low", 100, {"thinkingBudget": 512}),
    ("gemini-2.5-pro", "high", 5000, {"thinkingBudget": 5000}),
    ("gemini-2.0-flash", "high", None, None),
])
def test_09_gemini_thinking_level_or_budget_never_both(model, effort, budget, expected):
    ir = _reasoning_ir(effort, budget)
    gen = ag.ir_to_gemini_request(ir, {}, model).get("generationConfig", {})
    cfg = gen.get("thinkingConfig")
    if expected is None:
        assert cfg is None
        return
    assert {k: v for k, v in cfg.items() if k != "includeThoughts"} == expected
    assert not ("thinkingLevel" in cfg and "thinkingBudget" in cfg)
    if cfg.get("thinkingBudget"):                     # maxOutputTokens counts the thinking
        assert gen["maxOutputTokens"] > cfg["thinkingBudget"]


def _current_fake(ctype):
    """The strict fake's refusals (its own turn last, a level the model does not take), else the
    text that continues a JSON reply begun with "{"."""
    strict = strict_upstream(ctype)

    def respond(rec):
        refused = strict(rec)
        if refused.status == 400:
            return refused
        return _answer_in(ctype, json.loads(rec["body"]), rec, '"a": 1}', None)
    return respond


@pytest.mark.parametrize("model,continued", [("gemini-3.8-flash", False),
                                             ("gemini-3.5-flash-lite", False),
                                             ("gemini-3.5-flash", True)])
@pytest.mark.parametrize("stream", [False, True])
def test_09_a_reply_the_client_began_reaches_gemini_as_each_model_takes_it(gw, upstream, model,
                                                                          continued, stream):
    """An Anthropic prefill ("{" as the last, assistant message): Gemini 3.6 Flash, 3.5
    Flash-Lite and later refuse a model turn last, so it is followed by a user turn asking to
    continue; older models get it last, as they continue it themselves."""
    up = upstream()
    up.responder = _current_fake("gemini")
    g = gw([chan(up, type="gemini")])
    kw = dict(model=model, max_tokens=500, messages=[
        {"role": "user", "content": "Give me a JSON object."},
        {"role": "assistant", "content": "{"}])
    c = g.anthropic()
    if stream:
        with c.messages.stream(**kw) as s:
            text = s.get_final_text()
    else:
        text = c.messages.create(**kw).content[0].text
    assert "{" + text == '{"a": 1}'
    contents = json.loads(up.last()["body"])["contents"]
    assert contents[1] == {"role": "model", "parts": [{"text": "{"}]}
    if continued:
        assert len(contents) == 2
    else:
        assert contents[2:] == [{"role": "user", "parts": [{"text": ag.CONTINUE_ASK}]}]


@pytest.mark.parametrize("model,continued", [("claude-sonnet-5-5", False),
                                             ("claude-opus-4-6", False),
                                             ("claude-sonnet-4-5", True)])
@pytest.mark.parametrize("stream", [False, True])
def test_09_a_reply_the_client_began_reaches_claude_as_each_model_takes_it(gw, upstream, model,
                                                                          continued, stream):
    """OpenAI messages ending with the assistant's "{": Claude 4.6 and later refuse a last
    assistant message (prefill), so a user turn asking to continue follows it; Claude 4.5 and
    older continue it themselves."""
    up = upstream()
    up.responder = _current_fake("anthropic")
    g = gw([chan(up, type="anthropic")])
    kw = dict(model=model, messages=[{"role": "user", "content": "Give me a JSON object."},
                                     {"role": "assistant", "content": "{"}])
    c = g.openai()
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(stream=True, **kw) if ch.choices)
    else:
        text = c.chat.completions.create(**kw).choices[0].message.content
    assert text == '"a": 1}'
    msgs = json.loads(up.last()["body"])["messages"]
    assert msgs[1] == {"role": "assistant", "content": [{"type": "text", "text": "{"}]}
    if continued:
        assert len(msgs) == 2
    else:
        assert msgs[2:] == [{"role": "user", "content": [{"type": "text",
                                                          "text": ag.CONTINUE_ASK}]}]


def test_09_a_call_without_its_result_last_gets_no_continue_ask():
    """A conversation ending with the assistant's tool call (no result) is not a begun reply:
    no ask is added, and the provider's own error about the missing result reaches the client."""
    ir = ag.checked_request(ag.openai_request_to_ir({"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}))
    contents = ag.ir_to_gemini_request(ir, {}, "gemini-3.8-flash")["contents"]
    assert contents[-1]["role"] == "model" and "functionCall" in contents[-1]["parts"][-1]
    msgs = ag.ir_to_anthropic_request(ir, "claude-opus-5", stream=False)["messages"]
    assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"][-1]["type"] == "tool_use"


# OpenAI from GPT-5.4 on refuses function tools on Chat Completions with reasoning (the model's
# default effort counts): "Function tools with reasoning_effort are not supported for <model> in
# /v1/chat/completions. To use function tools, use /v1/responses or set reasoning_effort to
# 'none'." (community.openai.com/t/gpt-5-6-chat-completion-reasoning-effort-bug-behavior-change/
# 1386454; onyx-dot-app/onyx#15008 for gpt-6-sol; embabel/embabel-agent#1895: with no
# reasoning_effort sent too). The Responses API: a function_call_output needs the function_call
# of its call_id earlier in the input, else a 400 "No tool call found for function call output
# with call_id ..."; function tools carry "strict" (openai-python types/responses/
# function_tool_param.py: Required). GPT-6 refuses reasoning effort none and minimal (checked
# live in BerriAI/litellm-docs#1173; the refusal's wording as for gpt-5.6 in
# mnfst/modelparams.dev#236). Reasoning models take only the default temperature, 1 (the 400
# quoted in diffbot/code-gpt-docs#445 for gpt-5, johny-b/llmcomp#69 for gpt-5.4).
RESPONSES_ONLY_TOOLS = ("gpt-5.6-sol", "gpt-6-astra", "gpt-5.4-mini")


def openai_now(rec):
    """OpenAI as it is now, Chat Completions and Responses: the rules above; calls the first
    tool offered, or after a tool's output answers "got <output>", else "hello"."""
    body = json.loads(rec["body"])
    path = rec["path"].split("?")[0]
    if path.endswith("/chat/completions"):
        model = body["model"]
        if model in RESPONSES_ONLY_TOOLS and body.get("tools") and \
                body.get("reasoning_effort") != "none":
            return Reply(400, json.dumps({"error": {
                "message": f"Function tools with reasoning_effort are not supported for {model} "
                           f"in /v1/chat/completions. To use function tools, use /v1/responses "
                           f"or set reasoning_effort to 'none'.",
                "type": "invalid_request_error", "param": "reasoning_effort",
                "code": None}}).encode())
        effort = body.get("reasoning_effort")
        if re.match(r"gpt-[5-9]|o\d", model) and body.get("temperature", 1) != 1 and \
                effort != "none":
            return Reply(400, json.dumps({"error": {
                "message": f"Unsupported value: 'temperature' does not support "
                           f"{body['temperature']} with this model. Only the default (1) value "
                           f"is supported.", "type": "invalid_request_error",
                "param": "temperature", "code": "unsupported_value"}}).encode())
        if model.startswith("gpt-6") and effort in ("none", "minimal"):
            return Reply(400, json.dumps({"error": {
                "message": f"Unsupported value: '{effort}' is not supported with this model. "
                           f"Supported values are: 'low', 'medium', 'high', and 'xhigh'.",
                "type": "invalid_request_error", "param": "reasoning_effort",
                "code": "unsupported_value"}}).encode())
        return Dialects.openai(rec)
    assert path.endswith("/v1/responses"), path
    refused = _responses_refusal(body)
    if refused:
        return refused
    last = body["input"][-1]
    if last.get("type") == "function_call_output":
        return _responses_answer(body, f"got {last['output']}", None)
    if body.get("tools"):
        return _responses_answer(body, "", body["tools"][0]["name"], {"city": "Paris"})
    return _responses_answer(body, "hello", None)


@pytest.mark.parametrize("model", ["gpt-5.6-sol", "gpt-6-astra"])
@pytest.mark.parametrize("stream", [False, True])
def test_09_claude_code_on_gpt_56_and_gpt_6_runs_its_tools_over_the_responses_api(
        gw, upstream, model, stream):
    """An Anthropic client's tool loop on an OpenAI channel whose model refuses tools on Chat
    Completions: both turns go to /v1/responses, the call and its result paired by call_id."""
    up = upstream()
    up.responder = openai_now
    g = gw([chan(up, type="openai")])
    c = g.anthropic()

    def call(messages):
        kw = dict(model=model, max_tokens=4000, tools=ANTHROPIC_TOOLS, messages=messages,
                  thinking={"type": "adaptive"}, output_config={"effort": "medium"})
        if not stream:
            return c.messages.create(**kw)
        with c.messages.stream(**kw) as s:
            return s.get_final_message()
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    first = call(msgs)
    use = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and len(use) == 1
    assert use[0].name == "get_weather" and use[0].input == {"city": "Paris"}
    msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                               for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id,
                                           "content": "sunny"}]}]
    second = call(msgs)
    assert second.content[-1].text == "got sunny" and second.stop_reason == "end_turn"
    assert second.usage.output_tokens == 7
    assert [r["path"] for r in up.requests] == ["/v1/responses"] * 2
    sent = [json.loads(r["body"]) for r in up.requests]
    assert all(b["store"] is False and b["reasoning"] == {"effort": "medium"} and
               b["max_output_tokens"] == 4000 for b in sent)
    assert sent[0]["tools"][0] == {"type": "function", "name": "get_weather",
                                   "description": "Weather",
                                   "parameters": ANTHROPIC_TOOLS[0]["input_schema"],
                                   "strict": False}
    assert sent[1]["input"][1:] == [
        {"type": "function_call", "call_id": use[0].id, "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": use[0].id, "output": "sunny"}]


def test_09_which_requests_go_to_the_responses_api(gw, upstream):
    """Without tools gpt-6 stays on Chat Completions (with max_completion_tokens, as GPT-5 and
    later take it); a custom channel follows responses_api: on, every converted request goes
    to /v1/responses; off, even gpt-5.6 with tools goes to Chat Completions first (the
    server's own rules), and to /v1/responses once its refusal names it."""
    up, custom_on, custom_off = upstream(), upstream(), upstream()
    for u in (up, custom_on, custom_off):
        u.responder = openai_now
    g = gw([chan(up, type="openai", name="oa", models=["gpt-6-astra"]),
            chan(custom_on, type="custom", name="on", models=["local-a"], responses_api=True),
            chan(custom_off, type="custom", name="off", models=["gpt-5.6-sol"])])
    c = g.anthropic()
    r = c.messages.create(model="gpt-6-astra", max_tokens=300,
                          messages=[{"role": "user", "content": "hi"}])
    assert r.content[0].text == "hello"
    assert up.last()["path"] == "/v1/chat/completions"
    assert json.loads(up.last()["body"])["max_completion_tokens"] == 300
    r = c.messages.create(model="local-a", max_tokens=300,
                          messages=[{"role": "user", "content": "hi"}])
    assert r.content[0].text == "hello" and custom_on.last()["path"] == "/v1/responses"
    r = c.messages.create(model="gpt-5.6-sol", max_tokens=300, tools=ANTHROPIC_TOOLS,
                          messages=[{"role": "user", "content": "hi"}])
    assert r.stop_reason == "tool_use"          # after its server's refusal asked for it
    assert [q["path"] for q in custom_off.requests] == ["/v1/chat/completions",
                                                        "/v1/responses"]


@pytest.mark.parametrize("model,efforts", [
    ("gpt-6-astra", ["low", "low", "low", "medium", "high", "xhigh", "xhigh"]),
    ("gpt-5.6-sol", ["none", "low", "low", "medium", "high", "xhigh", "xhigh"]),
    ("gpt-5.1", ["none", "low", "low", "medium", "high", "high", "high"]),
    ("gpt-5-mini", ["minimal", "minimal", "low", "medium", "high", "high", "high"]),
    ("o4-mini", ["low", "low", "low", "medium", "high", "high", "high"]),
    ("deepseek-reasoner", list(ag.EFFORTS[:-1]) + ["xhigh"]),     # not OpenAI's: as asked
])
def test_09_each_openai_model_gets_an_effort_it_takes(model, efforts):
    got = [ag.ir_to_openai_request(_reasoning_ir(e), model, stream=False)["reasoning_effort"]
           for e in ag.EFFORTS]
    assert got == efforts
    assert [ag.ir_to_responses_request(_reasoning_ir(e), model, stream=False)["reasoning"]
            ["effort"] for e in ag.EFFORTS] == efforts


def test_09_a_converted_minimal_effort_reaches_gpt_6_as_low(gw, upstream):
    """A Responses client (not passed through: the channel has no responses_api) asks gpt-6
    for minimal effort, which the model refuses: it gets low. An OpenAI client's own request
    goes through as it came, and the refusal reaches it in OpenAI's format."""
    up = upstream()
    up.responder = openai_now
    g = gw([chan(up, type="openai")])
    c = g.openai()
    r = c.responses.create(model="gpt-6-astra", input="hi", reasoning={"effort": "minimal"})
    assert r.output_text == "hello"
    assert json.loads(up.last()["body"])["reasoning_effort"] == "low"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="gpt-6-astra", reasoning_effort="minimal",
                                  messages=[{"role": "user", "content": "hi"}])
    assert "Supported values are" in str(e.value)


def test_09_a_temperature_reasoning_models_refuse_is_left_out(gw, upstream):
    """An Anthropic client's temperature 0.2: gpt-5.6 (a reasoning model, default effort)
    takes only 1, so it is not sent; another provider's model gets it."""
    up, other = upstream(), upstream()
    up.responder = other.responder = openai_now
    g = gw([chan(up, type="openai", models=["gpt-5.6-sol"]),
            chan(other, type="custom", models=["deepseek-chat"])])
    c = g.anthropic()
    for model, u in (("gpt-5.6-sol", up), ("deepseek-chat", other)):
        r = c.messages.create(model=model, max_tokens=300, extra_body={"temperature": 0.2},
                              messages=[{"role": "user", "content": "hi"}])
        assert r.content[-1].text == "hello"
    assert "temperature" not in json.loads(up.last()["body"])
    assert json.loads(other.last()["body"])["temperature"] == 0.2
    ir = _reasoning_ir("none", temperature=0.2)
    assert ag.ir_to_openai_request(ir, "gpt-5.6-sol", stream=False)["temperature"] == 0.2
    assert "temperature" not in ag.ir_to_responses_request(dict(ir, reasoning=None),
                                                           "gpt-6-astra", stream=False)


def test_09_an_upstream_that_asks_for_the_responses_api_gets_it(gw, upstream):
    """A deployment name the gateway cannot place (an Azure or compatible server's): its
    refusal of tools on Chat Completions, naming /v1/responses, is asked again there at once,
    and later requests for that model go there from the start; a new configuration learns
    anew. A refusal that names no Responses API reaches the client."""
    def respond(rec):
        body = json.loads(rec["body"])
        if rec["path"].endswith("/chat/completions"):
            if body.get("tools"):
                return _refuse("openai", "Function tools with reasoning_effort are not "
                                         "supported for my-deploy in /v1/chat/completions. To "
                                         "use function tools, use /v1/responses or set "
                                         "reasoning_effort to 'none'.")
            return _refuse("openai", "something else")
        return openai_now(rec)
    up = upstream()
    up.responder = respond
    g = gw([chan(up, type="custom", models=["my-deploy"])])
    c = g.anthropic()
    ask = dict(model="my-deploy", max_tokens=300, tools=ANTHROPIC_TOOLS,
               messages=[{"role": "user", "content": "weather?"}])
    assert c.messages.create(**ask).content[-1].name == "get_weather"
    assert [r["path"] for r in up.requests] == ["/v1/chat/completions", "/v1/responses"]
    with c.messages.stream(**ask) as stream:                 # learned: one request
        assert stream.get_final_message().stop_reason == "tool_use"
    assert [r["path"] for r in up.requests[2:]] == ["/v1/responses"]
    assert any("wants the Responses API" in p for k, p in g.events() if k == "log")
    g.thread.apply_config()
    with pytest.raises(anthropic.BadRequestError) as e:      # no tools: Chat Completions,
        c.messages.create(model="my-deploy", max_tokens=300,  # whose refusal is the client's
                          messages=[{"role": "user", "content": "hi"}])
    assert "something else" in str(e.value)
    assert up.last()["path"] == "/v1/chat/completions"
    assert c.messages.create(**ask).content[-1].name == "get_weather"
    assert [r["path"] for r in up.requests[-2:]] == ["/v1/chat/completions", "/v1/responses"]


def test_09_responses_answers_decoded():
    whole = ag.responses_answer_to_ir({
        "id": "resp_9", "status": "incomplete", "model": "gpt-6-sol",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}]},
                   {"type": "message", "content": [{"type": "output_text", "text": "par"}]}],
        "usage": {"input_tokens": 3, "output_tokens": 4}})
    assert whole["finish"] == "length" and whole["usage"]["output"] == 4
    assert [(p["type"], p["text"]) for p in whole["content"]] == [("reasoning", "hm"),
                                                                   ("text", "par")]
    with pytest.raises(ag.GatewayError) as e:
        ag.responses_answer_to_ir({"status": "failed", "error": {"message": "overloaded"}})
    assert e.value.status == 502 and "overloaded" in e.value.message
    dec = ag.ResponsesStreamDecoder()

    def ev(kind, **data):
        return f"event: {kind}\ndata: {json.dumps(dict(type=kind, **data))}\n\n".encode()
    # arguments that come only in the done item; an error event
    events = dec.feed(ev("response.output_item.added", output_index=0, item={
        "type": "function_call", "call_id": "c1", "name": "f", "arguments": ""}) +
        ev("response.output_item.done", output_index=0, item={
            "type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'}) +
        ev("error", code="server_error", message="boom"))
    assert events[1:3] == [("tool", 0, "c1", "f"), ("args", 0, '{"a":1}')]
    assert events[3][0] == "error" and events[3][1].message == "boom"
    assert dec.close()[-1] == ("finish", "tool_calls")


@pytest.mark.parametrize("model,sent", [("claude-sonnet-5-5", False), ("claude-opus-4-7", False),
                                        ("claude-sonnet-4-5", True)])
def test_09_claude_models_without_sampling_get_no_temperature(gw, upstream, model, sent):
    """An OpenAI client's temperature: Opus 4.7 and the Claude 5 family refuse any sampling
    parameter, so none is sent to them; Claude 4.5 gets it."""
    up = upstream()
    up.responder = _current_fake("anthropic")
    g = gw([chan(up, type="anthropic")])
    r = g.openai().chat.completions.create(model=model, temperature=0.3, top_p=0.9,
                                           messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == '"a": 1}'
    body = json.loads(up.last()["body"])
    assert ("temperature" in body) == sent and "top_p" not in body
    if sent:
        assert body["temperature"] == 0.3


@pytest.mark.parametrize("model,forced", [("claude-opus-5-5", False), ("claude-sonnet-5", False),
                                          ("claude-sonnet-4-5", True)])
def test_09_a_forced_tool_reaches_the_claude_5_family_as_auto(gw, upstream, model, forced):
    """OpenAI's tool_choice "required": the Claude 5 family thinks by default and refuses a
    forced tool with thinking on, so it gets auto; Claude 4.5 (no thinking asked) gets any."""
    up = upstream()
    up.responder = _current_fake("anthropic")
    g = gw([chan(up, type="anthropic")])
    r = g.openai().chat.completions.create(model=model, tools=TOOLS, tool_choice="required",
                                           messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == '"a": 1}'
    sent = json.loads(up.last()["body"])["tool_choice"]["type"]
    assert sent == ("any" if forced else "auto")


@pytest.mark.parametrize("model,level", [("gemini-3.8-flash", "low"),
                                         ("gemini-3.7-flash", "low"),
                                         ("gemini-3.6-flash", "minimal")])
def test_09_the_lowest_effort_is_a_level_each_gemini_model_takes(gw, upstream, model, level):
    up = upstream()
    up.responder = _current_fake("gemini")
    g = gw([chan(up, type="gemini")])
    r = g.openai().chat.completions.create(model=model, reasoning_effort="minimal",
                                           messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == '"a": 1}'
    cfg = json.loads(up.last()["body"])["generationConfig"]["thinkingConfig"]
    assert cfg["thinkingLevel"] == level


def test_09_signature_only_and_redacted_thinking_survive():
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "c",
              "content": [{"type": "thinking", "thinking": "", "signature": "SIGONLY"},
                          {"type": "redacted_thinking", "data": "REDACTED=="},
                          {"type": "tool_use", "id": "toolu_9", "name": "Bash",
                           "input": {"cmd": "ls"}}],
              "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 1}}
    kept = {}
    resp = ag.anthropic_response_to_ir(answer, kept)
    out = ag.ir_to_anthropic_response(resp, "c")
    assert out["content"][:2] == [{"type": "thinking", "thinking": "", "signature": "SIGONLY"},
                                  {"type": "redacted_thinking", "data": "REDACTED=="}]
    assert kept == {"toolu_9": answer["content"][:2]}
    # An OpenAI client's history has lost both; the next request to Claude gets them back.
    msg = ag.ir_to_openai_response(resp, "c")["choices"][0]["message"]
    ir = _ir_from_openai(reasoning_effort="high", messages=[
        {"role": "user", "content": "list"}, msg,
        {"role": "tool", "tool_call_id": "toolu_9", "content": "a.txt"}])
    body = ag.ir_to_anthropic_request(ir, "claude-opus-4-7", stream=False, kept=kept)
    assert body["messages"][1]["content"][:2] == answer["content"][:2]
    assert body["thinking"] == {"type": "adaptive", "display": "summarized"}
    # Without them, thinking is left off rather than refused by Claude.
    bare = ag.ir_to_anthropic_request(ir, "claude-opus-4-7", stream=False, kept={})
    assert "thinking" not in bare and "output_config" not in bare


def test_09_signature_only_thinking_stream_round_trip():
    def ev(name, data):
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    raw = b"".join([
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "model": "c", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "thinking", "thinking": ""}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "signature_delta", "signature": "SIG"}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": "{}"}}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                             "usage": {"output_tokens": 5}}),
        ev("message_stop", {"type": "message_stop"})])
    kept = {}
    out = _convert_stream(ag.AnthropicStreamDecoder(kept), ag.AnthropicStreamEncoder("c"), raw, 7)
    events = [e for _, e in _sse_events(out)]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert starts[0] == {"type": "thinking", "thinking": ""}
    sigs = [e["delta"]["signature"] for e in events
            if e["type"] == "content_block_delta" and e["delta"]["type"] == "signature_delta"]
    assert sigs == ["SIG"]
    assert kept == {"toolu_1": [{"type": "thinking", "thinking": "", "signature": "SIG"}]}


def test_09_gemini_3_call_ids_sent_back_only_to_gemini_3():
    sigs = {}
    resp = ag.gemini_response_to_ir({"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"id": "fc1", "name": "read", "args": {"p": "a"}},
         "thoughtSignature": "S1"},
        {"functionCall": {"id": "fc2", "name": "read", "args": {"p": "b"}}}]},
        "finishReason": "STOP"}]}, sigs)
    assert [p["id"] for p in resp["content"]] == ["fc1", "fc2"]
    ir = ag.empty_request("g")
    ir["messages"] = [{"role": "user", "content": [{"type": "text", "text": "read both"}]},
                      {"role": "assistant", "content": resp["content"]},
                      {"role": "tool", "content": [{"type": "tool_result", "id": "fc2",
                                                    "name": "read", "is_error": False,
                                                    "content": [{"type": "text",
                                                                 "text": "B"}]}]},
                      {"role": "tool", "content": [{"type": "tool_result", "id": "fc1",
                                                    "name": "read", "is_error": False,
                                                    "content": [{"type": "text",
                                                                 "text": "A"}]}]}]
    g3 = ag.ir_to_gemini_request(ir, sigs, "gemini-3-flash-preview")["contents"]
    calls = [p for p in g3[1]["parts"]]
    assert [c["functionCall"]["id"] for c in calls] == ["fc1", "fc2"]
    assert calls[0]["thoughtSignature"] == "S1" and "thoughtSignature" not in calls[1]
    assert [p["functionResponse"]["id"] for p in g3[2]["parts"]] == ["fc2", "fc1"]
    g25 = json.dumps(ag.ir_to_gemini_request(ir, sigs, "gemini-2.5-pro"))
    assert '"id"' not in g25
    foreign = ag.ir_to_gemini_request(ir, {}, "gemini-3-pro-preview")     # ids we minted
    assert '"id"' not in json.dumps(foreign)


def test_09_gemini_signature_only_last_chunk_is_no_empty_delta():
    chunks = [{"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]}}]},
              {"candidates": [{"content": {"role": "model", "parts": [
                  {"text": "", "thoughtSignature": "TAIL"}]}, "finishReason": "STOP"}],
               "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 1}}]
    raw = b"".join(f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks)
    out = _convert_stream(ag.GeminiStreamDecoder({}), ag.AnthropicStreamEncoder("g"), raw, 5)
    deltas = [e["delta"] for _, e in _sse_events(out) if e.get("type") == "content_block_delta"]
    assert deltas == [{"type": "text_delta", "text": "Hi"}]
    oa = _convert_stream(ag.GeminiStreamDecoder({}), ag.OpenAIStreamEncoder("g", False), raw, 5)
    contents = [c["choices"][0]["delta"].get("content") for _, c in _sse_events(oa)
                if isinstance(c, dict) and c.get("choices")]
    assert "" not in [c for c in contents if c is not None][1:]
    assert "Hi" in contents


@pytest.mark.parametrize("status,body,tokens,limit", OVERFLOWS)
def test_09_context_overflow_read_from_every_provider(status, body, tokens, limit):
    err = ag.context_overflow(json.dumps(body).encode(), status)
    assert err is not None and err.status == 400
    assert (err.tokens, err.limit) == (tokens, limit)
    an = ag.error_payload(ag.ANTHROPIC, err)["error"]
    assert an["type"] == "invalid_request_error"
    assert an["message"].startswith("prompt is too long")
    if tokens:
        assert f"{tokens} tokens > {limit}" in an["message"]
    oa = ag.error_payload(ag.OPENAI, err)["error"]
    assert oa["code"] == "context_length_exceeded" and oa["type"] == "invalid_request_error"
    gm = ag.error_payload(ag.GEMINI, err)["error"]
    assert gm["code"] == 400 and gm["status"] == "INVALID_ARGUMENT"
    resp_ev = ag.stream_error_event(ag.RESPONSES, err)
    assert b'"code":"context_length_exceeded"' in resp_ev


@pytest.mark.parametrize("status,name", [
    (400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED"),
    (404, "NOT_FOUND"), (409, "ABORTED"), (416, "OUT_OF_RANGE"), (429, "RESOURCE_EXHAUSTED"),
    (499, "CANCELLED"), (414, "FAILED_PRECONDITION"), (415, "FAILED_PRECONDITION"),
    (431, "FAILED_PRECONDITION"), (501, "UNIMPLEMENTED"), (503, "UNAVAILABLE"),
    (504, "DEADLINE_EXCEEDED"), (500, "INTERNAL"), (505, "INTERNAL"), (302, "UNKNOWN")])
def test_09_gemini_errors_name_the_google_status_of_their_code(status, name):
    # The HTTP -> google.rpc.Code table of Google's error model (googleapis google/rpc/code.proto):
    # a 4xx or 5xx without a code of its own is FAILED_PRECONDITION or INTERNAL, never UNKNOWN.
    err = ag.error_payload(ag.GEMINI, ag.GatewayError(status, "no"))["error"]
    assert err == {"code": status, "message": "no", "status": name}


def test_09_other_errors_are_not_overflow():
    for body in ({"error": {"message": "max_tokens: 999999 > 64000, which is the maximum"}},
                 {"error": {"message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}},
                 {"error": "model not found"}):
        assert ag.context_overflow(json.dumps(body).encode(), 400) is None


@pytest.mark.parametrize("content,finish,empty", [
    ([], "stop", True), ([{"type": "text", "text": " \n"}], "stop", True),
    ([], "length", False), ([], "content_filter", False),
    ([{"type": "text", "text": "ok"}], "stop", False),
    ([{"type": "reasoning", "text": "hm", "signature": None, "redacted": None}], "stop", False),
    ([{"type": "tool_call", "id": "c", "name": "f", "arguments": "{}"}], "tool_calls", False)])
def test_09_empty_answer_table(content, finish, empty):
    assert ag.answer_is_empty({"content": content, "finish": finish}) is empty


def _oa(message, finish="stop"):
    return {"id": "c", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": dict(role="assistant", **message),
                         "finish_reason": finish}]}


def _an(*blocks, stop="end_turn"):
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": list(blocks), "stop_reason": stop, "usage": {"input_tokens": 1}}


@pytest.mark.parametrize("dialect,answer,plain,empty", [
    (ag.OPENAI, _oa({"content": "ok"}), True, False),
    (ag.OPENAI, _oa({"content": " \n"}), False, True),
    (ag.OPENAI, _oa({"content": ""}), False, True),
    (ag.OPENAI, _oa({"content": None, "tool_calls": [{"id": "t", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}, "tool_calls"), False, False),
    (ag.OPENAI, _oa({"content": None}, "length"), False, False),
    (ag.OPENAI, {"choices": []}, False, True),
    (ag.OPENAI, {"choices": [{"message": {"content": 7}}]}, False, None),
    (ag.ANTHROPIC, _an({"type": "text", "text": "ok"}), True, False),
    (ag.ANTHROPIC, _an({"type": "text", "text": "\t"}), False, True),
    (ag.ANTHROPIC, _an({"type": "thinking", "thinking": "hm", "signature": "s"},
                       {"type": "text", "text": ""}), False, False),
    (ag.ANTHROPIC, _an(), False, True),
    (ag.ANTHROPIC, _an({"type": "tool_use", "id": "t", "name": "f", "input": {}},
                       stop="tool_use"), False, False)])
def test_09_plainly_has_text_settles_only_what_the_decoder_agrees_with(dialect, answer, plain,
                                                                      empty):
    # The shortcut of a passed-through answer's emptiness check: True only where decoding the
    # answer finds it not empty; otherwise the decoder decides (None: it refuses the answer).
    d = ag.DIALECTS[dialect]
    assert d.plainly_has_text(answer) is plain
    try:
        assert ag.answer_is_empty(d.passthrough_decoders()[0](answer)) is empty
    except ag.GatewayError:
        assert empty is None
    assert ag.Relay._passthrough_empty(dialect, answer) is bool(empty)


# =================================================================================================
# 10. Configuration
# =================================================================================================

def test_10_missing_file_is_created_owner_only_with_one_token(tmp_path):
    path = tmp_path / "config.json"
    store, key = ag.ConfigStore.load(str(path))
    assert key.startswith("sk-gw-") and len(key) > 30
    data = json.loads(path.read_text())
    assert data["tokens"][0]["key"] == key and data["settings"]["host"] == "127.0.0.1"
    assert data["settings"]["require_auth"] is True
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ag.ConfigStore.load(str(path))[1] is None          # second load creates nothing


@pytest.mark.parametrize("config,needle", [
    ({"channels": [{"type": "bogus"}]}, "channels[0].type: 'bogus' is not a channel type"),
    ({"settings": {"port": "3000"}}, "settings.port"),
    ({"settings": {"port": 70000}}, "use a port from 1 to 65535"),
    ({"channels": [{"type": "custom"}]}, "channels[0].base_url: is empty"),
    ({"channels": [{"type": "openai", "timeout": -1}]}, "channels[0].timeout"),
    ({"channels": [{"name": "a"}, {"name": "A"}]}, "channels[1].name"),
    ({"channels": [{"proxy": "ftp://x"}]}, "channels[0].proxy"),
    ({"tokens": [{"key": "short"}]}, "tokens[0].key"),
    ({"tokens": [{"key": "samesame1"}, {"key": "samesame1"}]}, "tokens[1].key"),
    ({"settings": {"require_auth": "yes"}}, "settings.require_auth"),
    ({"settings": {"max_response_mb": 0}}, "settings.max_response_mb: 0 is not a positive number"),
])
def test_10_invalid_config_names_file_field_and_fix(tmp_path, config, needle):
    path = tmp_path / "config.json"
    text = json.dumps(config)
    path.write_text(text)
    with pytest.raises(ag.ConfigError) as e:
        ag.ConfigStore.load(str(path))
    msg = str(e.value)
    assert str(path) in msg and needle in msg and ";" in msg
    assert path.read_text() == text                            # never overwritten


# -- Bedrock and Vertex channels' own fields (issue 14) -------------------------------------------

def _bedrock(**kw):
    return dict({"name": "br", "type": "bedrock", "region": "us-east-1",
                 "aws_access_key_id": "AKIDEXAMPLE",
                 "aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}, **kw)


@pytest.mark.parametrize("channel,needle", [
    (_bedrock(region="US East"), "channels[0].region: 'US East' is not an AWS region"),
    (_bedrock(region=""), "channels[0].region"),
    (_bedrock(aws_secret_access_key=""), "channels[0].aws_secret_access_key: is empty while its "
                                         "pair is set"),
    (_bedrock(aws_access_key_id="", aws_secret_access_key="", aws_session_token="t"),
     "channels[0].aws_session_token: is set without an access key"),
    (_bedrock(aws_access_key_id="", aws_secret_access_key=""),
     "channels[0].api_key: is empty and no AWS access key is set"),
    (_bedrock(region=7), "channels[0].region: 7 is not an AWS region such as"),
    ({"type": "vertex", "project": "p-1", "location": "Europe West"},
     "channels[0].location: 'Europe West' is not a Vertex AI location"),
    ({"type": "vertex", "project": "My Project", "api_key": "k"}, "channels[0].project"),
    ({"type": "vertex", "project": "proj-1"}, "channels[0].api_key: is empty and no service "
                                              "account"),
    ({"type": "vertex", "service_account": "/nonexistent/key.json"},
     "channels[0].project: is empty while a service account is set"),
    ({"type": "vertex", "project": "proj-1", "service_account": "/nonexistent/key.json"},
     "channels[0].service_account: cannot read '/nonexistent/key.json'"),
    ({"type": "vertex", "project": "proj-1", "service_account": {"type": "authorized_user"}},
     "channels[0].service_account: 'type' is 'authorized_user', not 'service_account'"),
    ({"type": "vertex", "project": "proj-1", "service_account": 5},
     "channels[0].service_account: 5 is not the path of a service-account JSON key file"),
])
def test_10_cloud_channel_fields_are_checked(tmp_path, channel, needle):
    path = tmp_path / "config.json"
    text = json.dumps({"channels": [channel]})
    path.write_text(text)
    with pytest.raises(ag.ConfigError) as e:
        ag.ConfigStore.load(str(path))
    assert needle in str(e.value) and ";" in str(e.value)
    assert path.read_text() == text                            # never overwritten


def test_10_cloud_channels_derive_their_url_and_read_the_key_file(tmp_path, rsa_pem):
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(service_account_info(rsa_pem[1])))
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "service_account", "type": "x"}')
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"channels": [
        _bedrock(), _bedrock(name="eu", region="eu-central-1", aws_access_key_id="",
                             aws_secret_access_key="", api_key="bedrock-api-key-123"),
        {"name": "vx", "type": "vertex", "project": "proj-1", "service_account": str(key_file)},
        {"name": "vx-eu", "type": "vertex", "project": "proj-1", "location": "europe-west4",
         "api_key": "AIza-express"},
        {"name": "vx-express", "type": "vertex", "api_key": "AIza-express"}]}))
    store, _ = ag.ConfigStore.load(str(path))
    saved = store.data["channels"]
    assert [c["base_url"] for c in saved] == [""] * 5      # derived each time, so a new region
    assert saved[2]["location"] == "global"               # ... or location moves it
    chans = [ag.Channel(c, "") for c in store.data["channels"]]
    assert [c.base_url for c in chans] == [
        "https://bedrock-runtime.us-east-1.amazonaws.com",
        "https://bedrock-runtime.eu-central-1.amazonaws.com",
        "https://aiplatform.googleapis.com", "https://europe-west4-aiplatform.googleapis.com",
        "https://aiplatform.googleapis.com"]
    assert chans[0].creds == ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None)
    assert chans[1].creds is None and chans[1].keys == ("bedrock-api-key-123",)
    assert chans[2].creds.email == "gw@p.iam.gserviceaccount.com"
    assert "PRIVATE KEY" not in repr(chans[2].creds)
    secrets = chans[0].secrets() + chans[2].secrets()
    assert "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY" in secrets and str(key_file) in secrets
    provider = ag.PROVIDERS["vertex"]
    assert provider.url(chans[4], "gemini-2.5-pro", "generateContent") == (
        "https://aiplatform.googleapis.com/v1/publishers/google/models/gemini-2.5-pro:"
        "generateContent")                                 # express mode: no project
    assert provider.chat_url(chans[3], "claude-opus-4-5@20251101", True) == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/proj-1/locations/"
        "europe-west4/publishers/anthropic/models/claude-opus-4-5%4020251101:streamRawPredict")
    path.write_text(json.dumps({"channels": [{"type": "vertex", "project": "proj-1",
                                              "service_account": str(bad)}]}))
    with pytest.raises(ag.ConfigError,
                       match=r"channels\[0\]\.service_account: .*key 'type' appears twice"):
        ag.ConfigStore.load(str(path))


# -- A channel's quirks (issue 12) ----------------------------------------------------------

@pytest.mark.parametrize("quirks, needle, fix", [
    ("mistral", "channels[0].quirks: is not an object", '{"tool_call_id": "mistral9"}'),
    ({"tool_call_id": "mistral"}, "channels[0].quirks.tool_call_id", '"mistral9"'),
    ({"reasoning_back": True}, "channels[0].quirks.reasoning_back", '"tool_calls"'),
    ({"reasoning_field": "thinking"}, "channels[0].quirks.reasoning_field", '"reasoning"'),
    ({"max_tokens_field": "max"}, "channels[0].quirks.max_tokens_field", '"max_tokens"'),
    ({"drop_params": [1]}, "channels[0].quirks.drop_params", "a list such as"),
    ({"tool_id": "mistral9"}, "'tool_id' is not a quirk", "use only tool_call_id"),
])
def test_10_channel_quirks_are_checked(tmp_path, quirks, needle, fix):
    with pytest.raises(ag.ConfigError) as e:
        ag.validate_config({"channels": [{"base_url": "http://x", "quirks": quirks}]}, "cfg")
    assert needle in str(e.value) and fix in str(e.value)
    ok = ag.validate_config({"channels": [{"base_url": "http://x", "quirks": {
        "tool_call_id": "mistral9", "drop_params": "stream_options, parallel_tool_calls"}}]},
        "cfg")
    assert ok["channels"][0]["quirks"]["drop_params"] == ["stream_options",
                                                          "parallel_tool_calls"]
    assert ag.validate_config({"channels": [{"base_url": "http://x"}]}, "c")[
        "channels"][0]["quirks"] == {}
# Issue 12: the channel's thinking mode and the empty-answer fallback setting
@pytest.mark.parametrize("config,needle", [
    ({"channels": [{"thinking": "enabled"}]},
     'channels[0].thinking: \'enabled\' is not a thinking mode; write "auto"'),
    ({"channels": [{"thinking": 1}]}, "channels[0].thinking"),
    ({"settings": {"empty_answer_fallback": "no"}}, "settings.empty_answer_fallback"),
])
def test_10_thinking_and_empty_answer_settings_validated(tmp_path, config, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ag.ConfigError, match=re.escape(needle)):
        ag.ConfigStore.load(str(path))
    path.write_text(json.dumps({"channels": [{"thinking": "budget"}]}))
    cfg = ag.ConfigStore.load(str(path))[0].data
    assert cfg["channels"][0]["thinking"] == "budget"
    assert cfg["settings"]["empty_answer_fallback"] is True


# Issue 14: presets for OpenAI- and Anthropic-compatible services
def test_10_every_preset_validates_with_its_type_url_and_quirks():
    chans = [{"name": name, "preset": name} for name in ag.PRESETS]
    out = ag.validate_config({"channels": chans}, "config.json")["channels"]
    for ch, (name, preset) in zip(out, ag.PRESETS.items()):
        assert ch["preset"] == name and ch["type"] == preset["type"]
        assert ch["base_url"] == preset["base_url"]
        assert ch["quirks"] == preset.get("quirks", {})
    by_name = {c["name"]: c for c in out}
    assert by_name["mistral"]["quirks"]["tool_call_id"] == "mistral9"
    assert by_name["deepseek"]["quirks"] == {"reasoning_back": "tool_calls"}
    assert by_name["openrouter"]["quirks"] == {"reasoning_field": "reasoning"}
    assert by_name["zhipu"]["base_url"] == "https://open.bigmodel.cn/api/paas/v4"
    assert by_name["deepseek-anthropic"]["type"] == "anthropic"
    assert ag.join_base_url(by_name["zhipu"]["base_url"], "/v1/chat/completions") == \
        "https://open.bigmodel.cn/api/paas/v4/chat/completions"
    assert ag.join_base_url(by_name["deepseek-anthropic"]["base_url"], "/v1/messages") == \
        "https://api.deepseek.com/anthropic/v1/messages"


def test_10_a_preset_fills_only_what_the_channel_left_out():
    ch = ag.validate_config({"channels": [{
        "preset": "mistral", "type": "openai", "base_url": "http://127.0.0.1:9/v1",
        "quirks": {"drop_params": ["n"]}, "headers": {"X-Mine": "1"}}]}, "c")["channels"][0]
    assert ch["type"] == "openai" and ch["base_url"] == "http://127.0.0.1:9/v1"
    assert ch["quirks"] == {"tool_call_id": "mistral9", "max_tokens_field": "max_tokens",
                            "drop_params": ["n"]}                    # the channel's own win
    assert ch["headers"] == {"X-Mine": "1"} and ch["preset"] == "mistral"
    empty = ag.validate_config({"channels": [{"preset": "groq", "base_url": ""}]}, "c")
    assert empty["channels"][0]["base_url"] == "https://api.groq.com/openai/v1"
    none = ag.validate_config({"channels": [{"preset": "", "type": "openai"}]}, "c")
    assert none["channels"][0]["base_url"] == "https://api.openai.com"


@pytest.mark.parametrize("preset", ["deepseak", 7, ["mistral"]])
def test_10_an_unknown_preset_names_every_preset(preset):
    with pytest.raises(ag.ConfigError) as e:
        ag.validate_config({"channels": [{"name": "a", "preset": preset}]}, "config.json")
    msg = str(e.value)
    assert msg.startswith("config.json: channels[0].preset: ") and "is not a preset" in msg
    assert all(name in msg for name in ag.PRESETS) and "aigateway presets" in msg


def test_10_preset_is_kept_in_the_file_as_written(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"channels": [{"name": "ds", "preset": "deepseek"}],
                                "tokens": [{"name": "main", "key": TOKEN}]}))
    store, _ = ag.ConfigStore.load(str(path))
    store.add_token(name="second")
    saved = json.loads(path.read_text())["channels"][0]
    assert saved["preset"] == "deepseek" and saved["base_url"] == "https://api.deepseek.com/v1"


# -- issue 13: affinity, weights, aliases, overrides and debug capture settings ----------------

@pytest.mark.parametrize("config,needle", [
    ({"settings": {"affinity_ttl_s": -1}},
     "settings.affinity_ttl_s: -1 is not a number of seconds; use 3600"),
    ({"settings": {"aliases": ["fast"]}}, "settings.aliases: is not an object; write an object"),
    ({"settings": {"aliases": {"fast": []}}},
     "settings.aliases: 'fast' is not a list of 1 to 32 models"),
    ({"settings": {"aliases": {"fast": [{"model": "a", "weight": 0}]}}},
     "settings.aliases: 'fast': the weight of 'a' is not a positive number"),
    ({"settings": {"aliases": {"fast": [{"name": "a"}]}}},
     "'fast': {\"name\": \"a\"} is not a model entry; write {\"model\": \"name\", \"weight\": 2}"),
    ({"settings": {"aliases": {"fast": ["slow"], "slow": ["m"]}}},
     "'fast': 'slow' is an alias itself; name the upstream models directly"),
    ({"settings": {"debug_capture": 501}}, "settings.debug_capture: 501 is not from 0 to 500"),
    ({"settings": {"debug_capture_file": 5}}, "settings.debug_capture_file"),
    ({"channels": [{"weight": 0}]}, "channels[0].weight: 0 is not a positive number; use 1"),
    ({"channels": [{"weight": "3"}]}, "channels[0].weight: \"3\" is not a positive number"),
    ({"channels": [{"overrides": {"set": {}}}]},
     "channels[0].overrides: is not a list of at most 32 rules"),
    ({"channels": [{"overrides": [{"sett": {"a": 1}}]}]},
     "channels[0].overrides[0]: 'sett' is not an override key; use only models, set"),
    ({"channels": [{"overrides": [{"models": "m"}]}]},
     "channels[0].overrides[0]: changes nothing; give it set, remove"),
    ({"channels": [{"overrides": [{"set": {"a..b": 1}}]}]},
     "channels[0].overrides[0]: 'a..b' is not a dotted path"),
    ({"channels": [{"overrides": [{"remove": "a"}]}]},
     "channels[0].overrides[0].remove: is not a list of paths"),
    ({"channels": [{"overrides": [{"models": 5, "remove": ["a"]}]}]},
     "channels[0].overrides[0].models: is not a model pattern or a list of them"),
    ({"channels": [{"overrides": [{"headers": {"X-Api-Key": "sk-1"}}]}]},
     "'X-Api-Key' carries the channel's key; put the key in the channel's api_key"),
    ({"channels": [{"overrides": [{"remove_headers": ["Content-Length"]}]}]},
     "'Content-Length' is set by the HTTP client"),
    ({"channels": [{"overrides": [{"headers": {"X-A": "1\r\nX-B: 2"}}]}]},
     "'X-A' is not a valid header"),
])
def test_10_routing_settings_validated(tmp_path, config, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ag.ConfigError, match=re.escape(needle)):
        ag.ConfigStore.load(str(path))


def test_10_routing_settings_defaults_and_good_values(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"settings": {"aliases": {"fast": [
        "mini", {"model": "flash", "weight": 2.5}]}},
        "channels": [{"weight": 3, "overrides": [{"models": ["gpt-*"], "set": {
            "messages.0.role": "developer"}, "remove_headers": ["Authorization"]}]}, {}]}))
    cfg = ag.ConfigStore.load(str(path))[0].data
    s = cfg["settings"]
    assert (s["affinity_ttl_s"], s["debug_capture"], s["debug_capture_file"]) == (3600, 0, "")
    assert ag.alias_members(s["aliases"]["fast"]) == [("mini", 1.0), ("flash", 2.5)]
    assert [c["weight"] for c in cfg["channels"]] == [3, 1]
    assert cfg["channels"][1]["overrides"] == []


def test_10_config_problems_names_every_routing_problem():
    problems = ag.config_problems({"settings": {"aliases": {"a": []}, "debug_capture": -3},
                                   "channels": [{"overrides": [{"sett": 1}], "weight": 0}]},
                                  "cfg")
    assert [p.split(": ")[1] for p in problems] == [
        "settings.aliases", "settings.debug_capture", "channels[0].weight",
        "channels[0].overrides[0]"]


# Issue 13: usage settings, prices and a token's limits and expiry
_TOK = {"name": "t", "key": "sk-gw-0123456789"}


@pytest.mark.parametrize("config,needle", [
    ({"settings": {"usage_retention_days": 0}},
     "settings.usage_retention_days: 0 is below 1; keep 400 days or so"),
    ({"settings": {"usage_db": None}}, "settings.usage_db"),
    ({"prices": {"gpt-*": {"input": -1}}},
     "prices.gpt-*.input: -1 is not a price; write US dollars per million tokens"),
    ({"prices": {"gpt-*": {"inptu": 1}}}, "prices.gpt-*: 'inptu' is not a price; use input, "
     "output, cache_read, cache_write"),
    ({"prices": []}, "prices: is not an object"),
    ({"tokens": [dict(_TOK, limits={"requests_per_hour": 5})]},
     "tokens[0].limits: 'requests_per_hour' is not a limit; use only requests_per_day, "
     "tokens_per_day, cost_per_day, cost_per_month, tpm"),
    ({"tokens": [dict(_TOK, limits={"tpm": 2.5})]},
     "tokens[0].limits.tpm: 2.5 is not a whole number of 0 or more; use 0 for no limit"),
    ({"tokens": [dict(_TOK, limits={"cost_per_day": "5"})]},
     'tokens[0].limits.cost_per_day: "5" is not a number of 0 or more; write US dollars'),
    ({"tokens": [dict(_TOK, expires_at="next year")]},
     "tokens[0].expires_at: 'next year' is not an ISO date; write a UTC date such as"),
])
def test_10_usage_prices_and_limits_validated(tmp_path, config, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ag.ConfigError, match=re.escape(needle)):
        ag.ConfigStore.load(str(path))
    path.write_text(json.dumps({"tokens": [dict(_TOK, limits={"cost_per_month": 2.5},
                                                expires_at="2027-01-01T12:00:00Z")],
                                "prices": {"m*": {"input": 1, "output": 2}}}))
    cfg = ag.ConfigStore.load(str(path))[0].data
    assert cfg["settings"]["usage_db"] == "usage.db"
    assert cfg["settings"]["usage_retention_days"] == 400
    tok = ag.Token(cfg["tokens"][0])
    assert tok.limits == {"cost_per_month": 2.5}
    assert tok.expires == ag.parse_utc("2027-01-01T12:00Z")


def test_10_prices_most_specific_pattern_and_user_first():
    book = ag.PriceBook({"gpt-4o*": {"input": 9, "output": 9}})
    assert book.lookup("gpt-4o-mini") == {"input": 9, "output": 9}         # the user's wins
    assert ag.PriceBook({}).lookup("gpt-4o-mini-2024-07-18")["input"] == 0.15
    assert ag.PriceBook({}).lookup("gpt-4o")["input"] == 2.5
    assert ag.PriceBook({}).lookup("anthropic/claude-opus-4-7")["cache_write"] == 6.25
    assert ag.PriceBook({}).lookup("gemini-2.5-flash-lite")["output"] == 0.4
    assert ag.PriceBook({}).lookup("my-local-llama") is None
    # Today's models at their own prices, not an older family's their names also match
    # (gpt-5.6-sol was priced as gpt-5 by "gpt-5*", gemini-3.8-flash as Gemini 3 Flash).
    today = {"gpt-6-astra": (10.0, 50.0), "gpt-6-sol-2026-09-22": (2.0, 10.0),
             "gpt-5.6": (4.0, 20.0), "gpt-5.6-terra": (2.0, 12.0),
             "claude-opus-5-5": (4.0, 20.0), "claude-opus-5": (5.0, 25.0),
             "claude-sonnet-5-5-20260924": (2.0, 10.0), "claude-haiku-5-5": (0.1, 0.5),
             "gemini-3.8-flash": (0.75, 3.75), "gemini-3.5-flash-lite": (0.3, 2.5),
             "gemini-3-flash-preview": (0.5, 3.0)}
    assert {m: (p["input"], p["output"]) for m in today
            for p in [ag.PriceBook({}).lookup(m)]} == today
    assert ag.PriceBook({}).lookup("gemini-3.7-flash") is None         # no price of its own
    usage = {"input": 1000, "output": 100, "cache_read": 600, "cache_write": 200, "reasoning": 0}
    assert ag.usage_cost({"input": 1, "output": 2}, usage) == pytest.approx(1200 / 1e6)


def test_10_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "settings": {\n    "port": 3000\n    "host": "x"\n  }\n}')
    with pytest.raises(ag.ConfigError) as e:
        ag.ConfigStore.load(str(path))
    assert "line 4" in str(e.value)


def test_10_unknown_fields_kept_ids_never_reused_saves_atomic(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"future_section": {"x": 1}, "channels": [
        {"name": "a", "type": "openai", "my_note": "keep me"}]}))
    store, _ = ag.ConfigStore.load(str(path))
    b = store.add_channel(name="b", type="ollama")
    assert b["id"] == 2 and b["base_url"] == "http://localhost:11434"
    store.delete_channel(2)
    c = store.add_channel(name="c", type="anthropic")
    assert c["id"] == 3                                           # 2 is not reused
    t = store.add_token(name="ci")
    assert t["key"].startswith("sk-gw-")
    with pytest.raises(ag.ConfigError):
        store.update_channel(1, type="nope")
    data = json.loads(path.read_text())
    assert data["future_section"] == {"x": 1}
    assert data["channels"][0]["my_note"] == "keep me" and data["channels"][0]["type"] == "openai"
    assert [c["id"] for c in data["channels"]] == [1, 3]
    assert sorted(os.listdir(tmp_path)) == ["config.json"]       # no temp file left
    reloaded, _ = ag.ConfigStore.load(str(path))
    assert reloaded.add_channel(name="d")["id"] == 4


def test_10_old_app_config_maps_its_keys_and_keeps_the_rest():
    notes = []
    cfg = ag.validate_config(old_app_config(), "old.json", notes)
    s = cfg["settings"]
    assert s["cors_origins"] == ["*"] and "enable_cors" not in s
    assert s["host"] == "0.0.0.0" and s["require_auth"] is True and s["default_timeout"] == 120
    assert s["log_level"] == "info" and s["high_availability_mode"] is False     # kept
    first, second = cfg["channels"]
    assert first["proxy"] == "" and "proxy_enabled" not in first and "proxy_url" not in first
    assert first["max_concurrency"] == 0 and first["max_retries"] == 3 and first["timeout"] == 60
    assert second["models"] == ["deepseek-chat", "shared"] and second["max_concurrency"] == 4
    assert [c["id"] for c in cfg["channels"]] == [1, 2]
    assert cfg["unsupported_channels"][0]["name"] == "GLM (web)"
    assert cfg["next_ids"]["channel"] == 6                   # the GLM channel's id stays taken
    assert [t["allowed_channels"] for t in cfg["tokens"]] == [[2], []]
    assert len(notes) == 1 and "'GLM (web)'" in notes[0] and "unsupported_channels" in notes[0]
    assert ag.validate_config(cfg, "again.json", notes) == cfg and len(notes) == 1


@pytest.mark.parametrize("settings,origins", [
    ({"enable_cors": True}, ["*"]),
    ({"enable_cors": True, "cors_origins": ["https://app.example"]}, ["https://app.example"]),
    ({"enable_cors": False, "cors_origins": ["*"]}, []),
    ({}, []),
])
def test_10_old_app_enable_cors(settings, origins):
    assert ag.validate_config({"settings": settings}, "c.json")["settings"]["cors_origins"] \
        == origins


def test_10_old_app_keys_with_wrong_values_are_named():
    with pytest.raises(ag.ConfigError, match=r"settings\.enable_cors: \"yes\" is not true"):
        ag.validate_config({"settings": {"enable_cors": "yes"}}, "c.json")
    for bad in (0, float("nan"), float("inf")):
        with pytest.raises(ag.ConfigError, match=r"settings\.default_timeout: .* is not a pos"):
            ag.validate_config({"settings": {"default_timeout": bad}}, "c.json")
    cfg = ag.validate_config({"settings": {"default_timeout": 45}, "channels": [
        {"name": "a", "proxy_enabled": True, "proxy_url": "socks5h://127.0.0.1:1080"},
        {"name": "b", "timeout": 7}]}, "c.json")
    assert [c["timeout"] for c in cfg["channels"]] == [45, 7]
    assert cfg["channels"][0]["proxy"] == "socks5h://127.0.0.1:1080"
    notes = []
    ag.validate_config({"settings": {"high_availability_mode": True}}, "c.json", notes)
    assert "high_availability_mode" in notes[0] and "not supported" in notes[0]
    with pytest.raises(ag.ConfigError, match=r"channels\[2\]\.timeout"):   # the file's place
        ag.validate_config({"channels": [{"type": "builtin", "base_url": "kimi"},
                                         {"name": "ok"}, {"name": "x", "timeout": -1}]}, "c")


def test_10_config_problems_names_every_problem_once():
    raw = {"settings": {"port": 70000, "require_auth": "yes", "theme": "blue"},
           "channels": [{"type": "bogus"}, {"name": "a", "type": "custom"},
                        {"name": "A", "timeout": -1}],
           "tokens": [{"key": "short"}, {"key": "samesame1"}, {"key": "samesame1"}]}
    problems = ag.config_problems(raw, "c.json")
    wheres = [p.split(": ")[1] for p in problems]
    assert wheres == ["settings.port", "settings.require_auth", "settings.theme",
                      "channels[0].type", "channels[1].base_url", "channels[2].name",
                      "channels[2].timeout", "tokens[0].key", "tokens[2].key"]
    assert all(p.startswith("c.json: ") and "; " in p for p in problems)
    assert ag.config_problems({"channels": []}, "c.json") == []
    assert ag.config_problems([], "c.json") == [
        'c.json: top level: is not a JSON object; write {"settings": {...}, "channels": [...], '
        '"tokens": [...]}']


def test_10_two_stores_on_one_file_keep_both_edits(tmp_path):
    path = str(tmp_path / "config.json")
    one, _ = ag.ConfigStore.load(path)
    two, _ = ag.ConfigStore.load(path)
    one.add_channel(name="first", type="anthropic")
    two.add_channel(name="second", type="openai")      # two has not seen "first"
    two.update_settings(port=4000)
    one.update_token(1, rpm=7)
    on_disk = json.loads(open(path).read())
    assert [(c["id"], c["name"]) for c in on_disk["channels"]] == [(1, "first"), (2, "second")]
    assert on_disk["settings"]["port"] == 4000 and on_disk["tokens"][0]["rpm"] == 7
    assert one.data == on_disk


def test_10_hand_edit_between_load_and_save_survives(tmp_path):
    path = str(tmp_path / "config.json")
    store, _ = ag.ConfigStore.load(path)
    _hand_edit(path, lambda c: c["settings"].update(log_file="mine.jsonl"))
    store.update_settings(port=3999)
    saved = json.loads(open(path).read())["settings"]
    assert saved["log_file"] == "mine.jsonl" and saved["port"] == 3999
    _hand_edit(path, lambda c: c["channels"].append({"name": "typed", "type": "nope"}))
    edited = open(path).read()
    with pytest.raises(ag.ConfigError, match=r"channels\[0\]\.type.*not saved.*fix it first"):
        store.add_token(name="lost")
    with pytest.raises(ag.ConfigError, match="changed by another program"):
        store.save()
    assert open(path).read() == edited and store.data["settings"]["port"] == 3999


def test_10_reload_waits_out_a_half_written_file_then_reports_it(tmp_path):
    path = str(tmp_path / "config.json")
    store, _ = ag.ConfigStore.load(path)
    assert store.reload() is False                              # nothing changed
    with open(path, "w") as f:
        f.write('{"settings": ')                                # an editor mid-write
    written = os.stat(path).st_mtime_ns / 1e9
    assert store.reload(now=lambda: written + 0.1) is False     # may still be being written
    for _ in range(2):                                          # then reported, every time
        with pytest.raises(ag.ConfigError, match="line 1 column 14"):
            store.reload(now=lambda: written + 1.0)
    with pytest.raises(ag.ConfigError, match="line 1 column 14"):
        store.reload(force=True, now=lambda: written + 0.1)     # SIGHUP does not wait
    assert store.data["tokens"][0]["name"] == "default"         # the last good one stays
    with open(path, "w") as f:
        json.dump({"tokens": [{"name": "edited", "key": TOKEN}]}, f)
    assert store.reload() is True and store.data["tokens"][0]["name"] == "edited"


def test_10_example_config_is_valid():
    with open(os.path.join(HERE, "config.example.json")) as f:
        cfg = ag.validate_config(json.load(f), "config.example.json")
    assert [c["type"] for c in cfg["channels"]] == ["openai", "custom", "anthropic", "custom"]


def test_10_azure_channel_config_is_checked(tmp_path):
    base = {"settings": {}, "tokens": [], "channels": [
        {"id": 1, "name": "az", "type": "azure", "base_url": "", "api_key": "k"}]}
    with pytest.raises(ag.ConfigError, match=r"channels\[0\]\.base_url"):
        ag.validate_config(copy.deepcopy(base), "config.json")
    base["channels"][0].update(base_url="https://res.openai.azure.com", api_version=5)
    with pytest.raises(ag.ConfigError, match=r"channels\[0\]\.api_version"):
        ag.validate_config(copy.deepcopy(base), "config.json")
    base["channels"][0]["api_version"] = "2024-06-01"
    cfg = ag.validate_config(base, "config.json")
    assert cfg["channels"][0]["type"] == "azure" and cfg["channels"][0]["api_version"] == \
        "2024-06-01"


# =================================================================================================
# 11. Gateway: end to end with the official SDKs
# =================================================================================================

def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def test_11_openai_chat_non_stream_passthrough(gw, upstream):
    up = upstream([openai_chat_reply(model="gpt-4o-2024", text="pong", usage=(7, 1))])
    g = gw([chan(up, models=["gpt-4o"], model_mapping={"gpt-4o": "gpt-4o-2024"},
                 headers={"HTTP-Referer": "https://me.example"})])
    r = g.openai().chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "ping"}], temperature=0.25)
    assert r.choices[0].message.content == "pong" and r.usage.total_tokens == 8
    sent = up.last()
    assert sent["path"] == "/v1/chat/completions"
    body = json.loads(sent["body"])
    assert body["model"] == "gpt-4o-2024" and body["temperature"] == 0.25
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-secret"
    assert sent["headers"]["http-referer"] == "https://me.example"
    assert "gzip" in sent["headers"]["accept-encoding"]
    assert TOKEN not in json.dumps(sent["headers"])
    rec = g.records()[-1]
    assert (rec["status"], rec["model"], rec["channel"], rec["input_tokens"],
            rec["output_tokens"], rec["token"]) == (200, "gpt-4o", sent and rec["channel"], 7, 1,
                                                    "main")


def test_11_openai_chat_stream_passthrough_is_not_buffered(gw, upstream):
    up = upstream([Reply(chunks=openai_stream_chunks(pieces=("a", "b", "c")), delay=0.1,
                         content_type="text/event-stream")])
    g = gw([chan(up)])
    arrivals = []
    with g.openai().chat.completions.create(model="m", messages=[], stream=True,
                                            stream_options={"include_usage": True}) as s:
        for chunk in s:
            arrivals.append((time.monotonic(), chunk))
    text = "".join(c.choices[0].delta.content or "" for _, c in arrivals if c.choices)
    assert text == "abc" and arrivals[-1][1].usage.completion_tokens == 2
    assert arrivals[-1][0] - arrivals[0][0] > 0.3            # events arrived as they were sent
    rec = g.records()[-1]
    assert rec["stream"] and rec["input_tokens"] == 9 and rec["output_tokens"] == 2


def test_11_other_openai_routes(gw, upstream):
    audio = bytes(range(256)) * 400
    up = upstream()

    def respond(rec):
        path = rec["path"]
        if path.endswith("/completions") and "chat" not in path:
            return Reply(body=json.dumps({"id": "c", "object": "text_completion", "created": 1,
                                          "model": "m", "choices": [{"text": "ok", "index": 0,
                                          "logprobs": None, "finish_reason": "stop"}]}).encode())
        if path.endswith("/embeddings"):
            return Reply(body=json.dumps({"object": "list", "model": "e", "data": [
                {"object": "embedding", "index": 0, "embedding": [0.5, -1.0]}],
                "usage": {"prompt_tokens": 2, "total_tokens": 2}}).encode())
        if path.endswith("/images/generations"):
            return Reply(body=json.dumps({"created": 1, "data": [{"url": "http://x/i.png"}]})
                         .encode())
        if path.endswith("/audio/speech"):
            return Reply(chunks=[audio[:1000], audio[1000:]], content_type="audio/mpeg")
        if path.endswith("/audio/transcriptions"):
            return Reply(body=b'{"text":"hello world"}')
        return Reply(404, b'{"error":{"message":"?"}}')
    up.responder = respond
    g = gw([chan(up, model_mapping={"whisper": "whisper-large-v3"})])
    c = g.openai()
    assert c.completions.create(model="m", prompt="x").choices[0].text == "ok"
    assert c.embeddings.create(model="e", input="x").data[0].embedding == [0.5, -1.0]
    assert c.images.generate(prompt="a cat").data[0].url == "http://x/i.png"
    assert json.loads(up.last()["body"]) == {"prompt": "a cat"}       # model left out, untouched
    speech = c.audio.speech.create(model="tts-1", voice="alloy", input="hi")
    assert speech.content == audio
    tr = c.audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFF....", "audio/wav"))
    assert tr.text == "hello world"
    sent = up.last()["body"]
    assert b"whisper-large-v3" in sent and b"RIFF...." in sent and b'name="model"' in sent


def test_11_model_mapping_keys_may_be_patterns(gw, upstream):
    """A model_mapping key with "*" maps every name it matches (an exact key first, then the
    longest pattern), and the channel serves those names; a pattern names no model, so the
    model list leaves it out."""
    up = upstream()
    up.responder = lambda rec: openai_chat_reply(model=json.loads(rec["body"])["model"])
    g = gw([chan(up, models=["deepseek-chat"], model_mapping={
        "claude-*": "deepseek-chat", "claude-haiku-*": "deepseek-small",
        "claude-haiku-5-5": "deepseek-tiny"})])
    sent = []
    for model in ("claude-opus-5-5", "Claude-Haiku-4-5", "claude-haiku-5-5", "deepseek-chat"):
        g.openai().chat.completions.create(model=model,
                                           messages=[{"role": "user", "content": "hi"}])
        sent.append(json.loads(up.last()["body"])["model"])
        assert g.records()[-1]["model"] == model
    assert sent == ["deepseek-chat", "deepseek-small", "deepseek-tiny", "deepseek-chat"]
    with pytest.raises(openai.NotFoundError):           # matched by no name and no pattern
        g.openai().chat.completions.create(model="gpt-4o",
                                           messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in g.openai().models.list()] == ["deepseek-chat", "claude-haiku-5-5"]


def test_11_models_list_in_both_shapes(gw, upstream):
    up = upstream()
    g = gw([chan(up, name="a", models=["gpt-4o", "gpt-4o-*"], model_mapping={"fast": "x"}),
            chan(up, name="b", models=["claude-x"], type="anthropic", priority=1),
            chan(up, name="off", models=["hidden"], enabled=False)],
           tokens=[{"name": "main", "key": TOKEN},
                   {"name": "limited", "key": TOKEN2, "allowed_models": ["claude-*"]}])
    assert [m.id for m in g.openai().models.list()] == ["gpt-4o", "fast", "claude-x"]
    assert [m.id for m in g.openai(api_key=TOKEN2).models.list()] == ["claude-x"]
    assert g.openai().models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"      # routable
    with pytest.raises(openai.NotFoundError):
        g.openai().models.retrieve("hidden")
    page = g.anthropic().models.list()
    assert [m.id for m in page.data] == ["gpt-4o", "fast", "claude-x"]
    assert page.data[0].type == "model"


def test_11_anthropic_messages_passthrough_stream_and_not(gw, upstream):
    up = upstream()
    up.responder = lambda rec: (
        Reply(chunks=anthropic_stream_chunks(), content_type="text/event-stream")
        if json.loads(rec["body"]).get("stream") else
        Reply(body=json.dumps(anthropic_message()).encode()))
    g = gw([chan(up, type="anthropic", api_key="sk-ant-upstream", models=["claude-*"])])
    c = g.anthropic(default_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"})
    msg = c.messages.create(model="claude-x", max_tokens=100,
                            messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "hi there" and msg.usage.cache_read_input_tokens == 4
    sent = up.last()
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == "sk-ant-upstream"
    assert sent["headers"]["anthropic-version"] == c.default_headers["anthropic-version"]
    assert sent["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert "authorization" not in sent["headers"] and TOKEN not in json.dumps(sent["headers"])
    with c.messages.stream(model="claude-x", max_tokens=100,
                           messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hi there" and final.usage.output_tokens == 7
    rec = g.records(2)[-1]
    assert rec["stream"] and (rec["input_tokens"], rec["output_tokens"]) == (12, 7)


def test_11_count_tokens_with_beta_query(gw, upstream):
    up = upstream([Reply(body=b'{"input_tokens": 42}')])
    g = gw([chan(up, type="anthropic", models=["claude-*"])])
    status, _, body = g.request("POST", "/v1/messages/count_tokens?beta=true",
                                {"model": "claude-x", "messages": [{"role": "user",
                                                                   "content": "hi"}]},
                                headers={"anthropic-version": "2023-06-01"})
    assert status == 200 and json.loads(body) == {"input_tokens": 42}
    assert up.last()["path"] == "/v1/messages/count_tokens?beta=true"
    g.request("POST", "/messages/count_tokens", {"model": "claude-x", "messages": []},
              headers={"Authorization": None, "x-api-key": TOKEN})
    assert up.last()["headers"]["anthropic-version"] == "2023-06-01"     # the gateway's default
    r = g.anthropic().messages.count_tokens(model="claude-x",
                                            messages=[{"role": "user", "content": "hi"}])
    assert r.input_tokens == 42


def test_11_paths_without_v1_prefix_and_versioned_base(gw, upstream):
    up = upstream()
    g = gw([chan(up.url + "/api/paas/v4")])
    status, _, _ = g.request("POST", "/chat/completions", {"model": "m", "messages": []})
    assert status == 200 and up.last()["path"] == "/api/paas/v4/chat/completions"


@pytest.mark.parametrize("where", ["bearer", "x-api-key", "x-goog-api-key", "query"])
def test_11_token_accepted_from_every_place(gw, upstream, where):
    up = upstream()
    g = gw([chan(up)])
    headers = {"Authorization": None}
    path = "/v1/chat/completions"
    if where == "bearer":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif where == "query":
        path += f"?key={TOKEN}&keep=1"
    else:
        headers[where] = TOKEN
    status, _, _ = g.request("POST", path, {"model": "m", "messages": []}, headers=headers)
    assert status == 200
    sent = up.last()
    assert TOKEN not in sent["path"] and TOKEN not in json.dumps(sent["headers"])
    if where == "query":
        assert sent["path"].endswith("?keep=1")


def test_11_auth_errors_and_allow_lists(gw, upstream):
    up = upstream()
    g = gw([chan(up, name="cheap", models=["gpt-4o-mini"]),
            chan(up, name="pricey", models=["o3"])],
           tokens=[{"name": "main", "key": TOKEN, "allowed_models": ["gpt-4o*"]},
                   {"name": "off", "key": TOKEN2, "enabled": False},
                   {"name": "chan-limited", "key": "sk-gw-chan-limited-1",
                    "allowed_channels": ["cheap"]}])
    with pytest.raises(openai.AuthenticationError) as e:
        g.openai(api_key="sk-gw-wrong-token-000").chat.completions.create(model="o3",
                                                                           messages=[])
    assert "invalid gateway token" in str(e.value) and "sk-gw-wrong" not in str(e.value)
    with pytest.raises(openai.AuthenticationError, match="disabled"):
        g.openai(api_key=TOKEN2).chat.completions.create(model="o3", messages=[])
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'o3'"):
        g.openai().chat.completions.create(model="o3", messages=[])
    with pytest.raises(openai.PermissionDeniedError, match="may not use the channels"):
        g.openai(api_key="sk-gw-chan-limited-1").chat.completions.create(model="o3",
                                                                          messages=[])
    assert g.openai(api_key="sk-gw-chan-limited-1").chat.completions.create(
        model="gpt-4o-mini", messages=[]).choices
    status, _, body = g.request("GET", "/v1/models", headers={"Authorization": None})
    assert status == 401 and "missing gateway token" in json.loads(body)["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        g.anthropic(api_key="nope-nope-nope").messages.create(
            model="o3", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert g.request("GET", "/health", headers={"Authorization": None})[0] == 200
    assert len(up.requests) == 1


def test_11_auth_off_lets_anyone_in(gw, upstream):
    up = upstream()
    g = gw([chan(up)], settings={"require_auth": False})
    status, _, _ = g.request("POST", "/v1/chat/completions", {"model": "m", "messages": []},
                             headers={"Authorization": None})
    assert status == 200


def test_11_routing_priority_round_robin_wildcards_and_no_match(gw, upstream):
    a, b, c = upstream(), upstream(), upstream()
    g = gw([chan(a, name="a", models=["gpt-*"], priority=1),
            chan(b, name="b", models=["GPT-4O"], priority=0),
            chan(c, name="c", models=["gpt-4o"], priority=0)])
    client = g.openai()
    for _ in range(4):
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert len(b.requests) == 2 and len(c.requests) == 2 and not a.requests
    client.chat.completions.create(model="gpt-3.5", messages=[])
    assert len(a.requests) == 1
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="llama", messages=[])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as e2:
        g.anthropic().messages.create(model="llama", max_tokens=5,
                                      messages=[{"role": "user", "content": "x"}])
    assert e2.value.body["error"]["type"] == "not_found_error"
    assert "no channel is configured" not in e2.value.body["error"]["message"]


def test_11_routing_kept_per_model_route_and_token_follows_config_and_is_bounded(gw, upstream):
    """The router keeps each routing decision (Router.order); what a token may use, the
    route's reach and a new configuration still decide, and client-chosen model names cannot
    grow what is kept past ROUTER_CACHE_MAX."""
    a, b = upstream(), upstream([Reply(body=json.dumps(anthropic_message()).encode())])
    g = gw([chan(a, name="a", models=["m-*"], priority=0),
            chan(b, name="b", type="anthropic", models=["m-*"], priority=1)],
           tokens=[{"name": "all", "key": TOKEN},
                   {"name": "only-b", "key": TOKEN + "-b", "allowed_channels": ["b"]}])
    for _ in range(2):                          # alternating: neither sees the other's routing
        g.openai().chat.completions.create(model="m-1", messages=[])
        g.openai(api_key=TOKEN + "-b").chat.completions.create(model="m-1", messages=[])
    assert (len(a.requests), len(b.requests)) == (2, 2)
    assert [r["channel"] for r in g.records(4)] == ["a", "b", "a", "b"]
    # A route whose dialect reaches only its own channels: the same model, another decision.
    status, _, data = g.request("POST", "/v1/completions", {"model": "m-1", "prompt": "x"})
    assert status == 200 and len(a.requests) == 3
    g.store.update_channel(g.store.data["channels"][0]["id"], enabled=False)
    g.thread.apply_config()
    g.openai().chat.completions.create(model="m-1", messages=[])
    assert len(a.requests) == 3 and len(b.requests) == 3     # the new configuration routes
    router, gwy = g.gateway.router, g.gateway
    route, token = ag.ROUTES["/v1/chat/completions"], gwy.tokens[0]
    for i in range(ag.ROUTER_CACHE_MAX + 50):
        assert [c.name for c in router.order(gwy.channels, f"m-{i}", route, token)] == ["b"]
    assert len(router._cache) == ag.ROUTER_CACHE_MAX


def test_11_passed_through_requests_drop_what_the_channel_replaces_or_connection_lists(
        gw, upstream):
    """RFC 9110 section 7.6.1: a header named in Connection is for the next hop only; the
    channel's own headers replace the client's of the same name, its quirks' drop_headers are
    never sent, and the upstream key replaces whatever credential the client sent."""
    up = upstream()
    g = gw([chan(up, headers={"X-Team": "channel"}, quirks={"drop_headers": ["X-Drop"]})])
    status, _, _ = g.request("POST", "/v1/chat/completions", _chat_body(), headers={
        "Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-Keep": "2", "X-Team": "client",
        "X-Drop": "3", "Cookie": "c=1", "Content-Type": "application/json"})
    assert status == 200
    sent = up.requests[-1]["headers"]
    assert sent["x-keep"] == "2"
    assert [v for n, v in up.requests[-1]["header_list"] if n == "x-team"] == ["channel"]
    assert "x-hop" not in sent and "x-drop" not in sent and "cookie" not in sent
    assert sent["authorization"] == "Bearer sk-upstream-secret"
    status, _, _ = g.request("POST", "/v1/chat/completions", _chat_body(),
                             headers={"X-Hop": "1", "Content-Type": "application/json"})
    assert status == 200 and up.requests[-1]["headers"]["x-hop"] == "1"   # not listed now


def test_11_the_first_request_of_a_new_install_says_how_to_add_a_channel(gw):
    g = gw([])
    status, _, data = g.request("POST", "/v1/chat/completions", _chat_body())
    err = json.loads(data)["error"]
    assert status == 404 and err["code"] == "model_not_found"
    assert "no channel is configured yet" in err["message"]
    assert "python aigateway.py channels add" in err["message"]
    status, _, data = g.request("POST", "/v1beta/models/m:generateContent",
                                {"contents": [{"parts": [{"text": "x"}]}]})
    assert status == 404 and "Channels tab" in json.loads(data)["error"]["message"]


@pytest.mark.parametrize("first", [
    Reply(500, b'{"error":{"message":"boom"}}'),
    Reply(429, b'{"error":{"message":"slow"}}', headers={"Retry-After": "3"}),
    Reply(401, b'{"error":{"message":"bad upstream key"}}'),
    Reply(503, b"<html>down</html>", content_type="text/html"),
    "dead", "hang",
])
def test_11_fallback_moves_to_next_channel(gw, upstream, first):
    good = upstream([openai_chat_reply(text="from backup")])
    if first == "dead":
        bad = chan(f"http://127.0.0.1:{dead_port()}", name="bad")
    else:
        up_bad = upstream([Reply(hang=5) if first == "hang" else first])
        bad = chan(up_bad, name="bad", timeout=0.3 if first == "hang" else 1)
    g = gw([bad, chan(good, name="good", priority=5)])
    r = g.openai().chat.completions.create(model="m", messages=[])
    assert r.choices[0].message.content == "from backup"
    rec = g.records()[-1]
    assert rec["tried"] == ["bad", "good"] and rec["channel"] == "good"


def test_11_client_errors_are_not_retried(gw, upstream):
    bad = upstream([Reply(400, b'{"error":{"message":"context_length_exceeded!",'
                               b'"type":"invalid_request_error","param":"messages",'
                               b'"code":"context_length_exceeded"}}')])
    good = upstream()
    g = gw([chan(bad, name="bad"), chan(good, name="good", priority=1)])
    with pytest.raises(openai.BadRequestError) as e:
        g.openai().chat.completions.create(model="m", messages=[])
    assert e.value.body["code"] == "context_length_exceeded" and not good.requests


def test_11_streaming_falls_back_before_first_byte(gw, upstream):
    bad = upstream([Reply(502, b"bad gateway", content_type="text/plain")])
    good = upstream([openai_stream_reply(pieces=("ok",))])
    g = gw([chan(bad, name="bad"), chan(good, name="good", priority=1)])
    with g.openai().chat.completions.create(model="m", messages=[], stream=True) as s:
        text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    assert text == "ok" and len(bad.requests) == 1


def test_11_all_channels_failed_and_fallback_off(gw, upstream):
    a = upstream([Reply(500, b'{"error":{"message":"a broke"}}')])
    b = upstream([Reply(429, b'{"error":{"message":"b is busy"}}', headers={"Retry-After": "7"})])
    g = gw([chan(a, name="a"), chan(b, name="b", priority=1)])
    with pytest.raises(openai.RateLimitError) as e:
        g.openai().chat.completions.create(model="m", messages=[])
    assert "b is busy" in str(e.value) and e.value.response.headers["retry-after"] == "7"
    g2 = gw([chan(f"http://127.0.0.1:{dead_port()}", name="x"),
             chan(f"http://127.0.0.1:{dead_port()}", name="y")])
    with pytest.raises(openai.InternalServerError) as e2:
        g2.openai().chat.completions.create(model="m", messages=[])
    assert e2.value.status_code == 502 and "'x'" in str(e2.value) and "'y'" in str(e2.value)
    g3 = gw([chan(a, name="a"), chan(b, name="b", priority=1)],
            settings={"enable_fallback": False})
    with pytest.raises(openai.InternalServerError, match="a broke"):
        g3.openai().chat.completions.create(model="m", messages=[])


def test_11_mid_stream_failure_gives_in_band_error(gw, upstream):
    up = upstream([Reply(chunks=openai_stream_chunks(pieces=("a", "b", "c", "d")),
                         reset_after=3, content_type="text/event-stream")])
    g = gw([chan(up)])
    got = []
    with pytest.raises(openai.APIError, match="broke off"):
        with g.openai().chat.completions.create(model="m", messages=[], stream=True) as s:
            for c in s:
                got.append(c)
    assert len(got) == 3
    aup = upstream([Reply(chunks=anthropic_stream_chunks(pieces=("x",) * 5), reset_after=4,
                          content_type="text/event-stream")])
    ga = gw([chan(aup, type="anthropic")])
    with pytest.raises(anthropic.APIStatusError, match="broke off"):
        with ga.anthropic().messages.stream(model="c", max_tokens=9,
                                            messages=[{"role": "user", "content": "x"}]) as s:
            for _ in s.text_stream:
                pass
    rec = ga.records()[-1]
    assert rec["status"] == 200 and "broke off" in rec["error"]


def test_11_route_without_conversion_gives_clear_error(gw, upstream):
    up = upstream()
    g = gw([chan(up, name="gem", type="gemini", models=["gemini-*"])])
    with pytest.raises(openai.APIStatusError) as e:
        g.openai().images.generate(model="gemini-image", prompt="x")
    assert e.value.status_code == 501 and "gemini channel 'gem'" in str(e.value)
    assert "reaches only openai, custom, azure channels" in str(e.value)
    assert not up.requests


def test_11_bad_bodies_get_clear_errors(gw, upstream):
    g = gw([chan(upstream())])
    for body, needle in ((b"{not json", "not valid JSON"), (b"[1,2]", "JSON object"),
                         (b'{"messages": []}', "'model' is required"), (b"", "empty")):
        status, _, out = g.request("POST", "/v1/chat/completions", body,
                                   headers={"Content-Type": "application/json"})
        err = json.loads(out)["error"]
        assert status == 400 and needle in err["message"] and set(err) == {
            "message", "type", "param", "code"}
    status, _, out = g.request("POST", "/v1/messages", b"{oops",
                               headers={"anthropic-version": "2023-06-01"})
    assert status == 400 and json.loads(out)["error"]["type"] == "invalid_request_error"


# -- Bedrock and Vertex channels through the relay (issue 14) -----------------------------------
# What the gateway sends a cloud and what its clients get back; the real CLIs against fuller
# fakes are at the end of the file.

CLAUDE_ON_BEDROCK = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def _bedrock_claude(rec, events, throttle_after=None):
    """InvokeModel (whole) or InvokeModelWithResponseStream (event-stream of ``events``)."""
    if rec["path"].endswith("/invoke"):
        return Reply(body=json.dumps(anthropic_message("claude-on-bedrock")).encode())
    frames = [bedrock_chunk(e) for e in events]
    if throttle_after is not None:
        # An exception message ends the stream (Amazon Bedrock API reference,
        # InvokeModelWithResponseStream: throttlingException, HTTP status 429).
        frames = frames[:throttle_after] + [es_exception("throttlingException",
                                                         "Too many tokens, slow down")]
    return Reply(chunks=frames, content_type="application/vnd.amazon.eventstream")


@pytest.mark.parametrize("stream", [False, True])
def test_11_bedrock_relays_claude_for_anthropic_clients(gw, upstream, stream):
    events = [json.loads(c.split(b"data: ", 1)[1]) for c in anthropic_stream_chunks()]
    up = upstream()
    up.responder = lambda rec: _bedrock_claude(rec, events)
    g = gw([_bedrock(base_url=up.url, aws_session_token="FQoGZXIvYXdzEXAMPLE//token",
                     model_mapping={"claude-sonnet-4-5": CLAUDE_ON_BEDROCK})],
           settings={"debug_capture": 2})
    betas = "interleaved-thinking-2025-05-14,prompt-caching-scope-2026-01-05"
    msg = _anthropic_turn(g.anthropic(default_headers={"anthropic-beta": betas}), stream,
                          model="claude-sonnet-4-5", system="Be brief.", thinking={
                              "type": "enabled", "budget_tokens": 1024},
                          messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == ("Hi there" if stream else "hi there")
    assert msg.model == "claude-sonnet-4-5"              # the name Claude Code asked for
    rec = up.last()
    op = "invoke-with-response-stream" if stream else "invoke"
    assert rec["path"] == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/" + op
    body = json.loads(rec["body"])
    # The InvokeModel body: no model (it is in the path) and no stream (the operation says
    # it), anthropic_version, and the beta flags Bedrock takes as a list (AWS Bedrock user guide,
    # "Anthropic Claude Messages API").
    assert "model" not in body and "stream" not in body
    assert body["anthropic_version"] == "bedrock-2023-05-31"
    assert body["anthropic_beta"] == ["interleaved-thinking-2025-05-14"]   # a flag it takes
    assert body["system"] == "Be brief."
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    hdrs = rec["headers"]
    assert hdrs["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/us-east-1/bedrock/aws4_request" in hdrs["authorization"]
    assert hdrs["x-amz-security-token"] == "FQoGZXIvYXdzEXAMPLE//token"
    for client_header in ("x-api-key", "anthropic-version", "anthropic-beta", "user-agent",
                          "x-stainless-lang"):
        assert client_header not in hdrs                 # the client's headers stay here
    record = g.records(1)[-1]
    assert (record["channel"], record["upstream_model"]) == ("br", CLAUDE_ON_BEDROCK)
    assert record["input_tokens"] == (12 if stream else 12 + 4)      # + the cache read
    shown = g.gateway.capture.text(record["id"])
    assert "FQoGZXIvYXdzEXAMPLE//token" not in shown and "EXAMPLEKEY" not in shown
    assert "Signature=" not in shown and "X-Amz-Security-Token" in shown


def test_11_bedrock_exception_events_are_the_clients_errors(gw, upstream):
    """Before any content (the gateway holds a stream until it shows some) an exception event
    is the channel's failure, with its status; after content it ends the stream in-band."""
    events = [json.loads(c.split(b"data: ", 1)[1]) for c in anthropic_stream_chunks()]
    up = upstream()
    cut = [3]
    up.responder = lambda rec: _bedrock_claude(rec, events, throttle_after=cut[0])
    g = gw([_bedrock(base_url=up.url)])
    body = {"model": CLAUDE_ON_BEDROCK, "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    status, _, data = g.request("POST", "/v1/messages", body)
    err = json.loads(data)
    assert status == 429 and err["type"] == "error"
    assert err["error"]["type"] == "rate_limit_error"
    assert "throttlingException: Too many tokens, slow down" in err["error"]["message"]
    cut[0] = 4                                            # after "Hi"
    status, _, data = g.request("POST", "/v1/messages", body)
    got = _sse_events(data)
    assert status == 200 and got[0][0] == "message_start"
    assert ("content_block_delta", events[3]) in got
    assert got[-1][0] == "error"
    assert "throttlingException: Too many tokens" in got[-1][1]["error"]["message"]
    assert "broke off" in g.records(2)[-1]["error"]


def test_11_bedrock_lists_its_models_and_vertex_says_it_has_no_list(gw, upstream):
    up = upstream([Reply(body=json.dumps({"modelSummaries": [
        {"modelId": "anthropic.claude-sonnet-4-5-20250929-v1:0"},
        {"modelId": "amazon.nova-pro-v1:0"}]}).encode())])
    g = gw([_bedrock(base_url=up.url, api_key="bedrock-api-key-123", aws_access_key_id="",
                     aws_secret_access_key=""),
            {"name": "vx", "type": "vertex", "api_key": "AIza-express"}])
    br, vx = g.gateway.channels
    assert g.thread.submit(g.gateway.fetch_models(br)).result(10) == [
        "anthropic.claude-sonnet-4-5-20250929-v1:0", "amazon.nova-pro-v1:0"]
    assert up.last()["path"] == ("/foundation-models?byOutputModality=TEXT&"
                                 "byInferenceType=ON_DEMAND")
    assert up.last()["headers"]["authorization"] == "Bearer bedrock-api-key-123"
    with pytest.raises(ag.GatewayError, match="A vertex channel has no model list"):
        g.thread.submit(g.gateway.fetch_models(vx)).result(10)
    default = ag.Channel(dict(ag.CHANNEL_DEFAULTS, **_bedrock(id=1)), "")
    assert ag.PROVIDERS["bedrock"].models_url(default) == (
        "https://bedrock.us-east-1.amazonaws.com/foundation-models?byOutputModality=TEXT&"
        "byInferenceType=ON_DEMAND")                     # the control plane's own host


def test_11_vertex_channels_share_a_service_accounts_token_until_it_expires(gw, upstream,
                                                                             rsa_pem):
    up = upstream()
    issued = []

    def respond(rec):
        if rec["path"] == "/token":
            issued.append(f"ya29.token-{len(issued)}")
            return Reply(body=json.dumps({"access_token": issued[-1], "expires_in": 3600,
                                          "token_type": "Bearer"}).encode())
        return Reply(body=json.dumps({"candidates": [{"content": {"role": "model", "parts": [
            {"text": "from vertex"}]}, "finishReason": "STOP"}]}).encode())
    up.responder = respond
    account = service_account_info(rsa_pem[1], up.url + "/token")
    g = gw([{"name": "vx1", "type": "vertex", "project": "proj-1", "base_url": up.url,
             "service_account": account, "models": ["gemini-2.5-pro"]},
            {"name": "vx2", "type": "vertex", "project": "proj-1", "base_url": up.url,
             "location": "us-central1", "service_account": account}])
    now = [time.time()]
    g.gateway.relay.creds.clock = lambda: now[0]
    c = g.openai()
    for model in ("gemini-2.5-pro", "gemini-2.5-flash"):
        reply = c.chat.completions.create(model=model, messages=[{"role": "user",
                                                                  "content": "hi"}])
        assert reply.choices[0].message.content == "from vertex"
    chats = [r for r in up.requests if r["path"] != "/token"]
    assert issued == ["ya29.token-0"]                     # one exchange for both channels
    assert [r["headers"]["authorization"] for r in chats] == ["Bearer ya29.token-0"] * 2
    assert chats[1]["path"] == ("/v1/projects/proj-1/locations/us-central1/publishers/google/"
                                "models/gemini-2.5-flash:generateContent")
    now[0] += 3600 - 10                                   # nearly expired: renewed first
    c.chat.completions.create(model="gemini-2.5-pro", messages=[{"role": "user",
                                                                 "content": "hi"}])
    assert issued == ["ya29.token-0", "ya29.token-1"]
    assert up.last()["headers"]["authorization"] == "Bearer ya29.token-1"


# -- hostile JSON and hostile upstreams (issue 9, points 4 and 5) --------------------------------

def test_11_hostile_json_bodies_refused_before_any_upstream(gw, upstream):
    up_o, up_a = upstream(), upstream([Reply(body=json.dumps(anthropic_message()).encode())])
    g = gw([chan(up_o, name="pass", models=["m", "whisper-1"]),
            chan(up_a, name="conv", type="anthropic", models=["claude-*"])])
    deep = b'{"model":"m","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = [
        (b'{"model":"m","model":"claude-x","messages":[]}', "'model' appears twice"),
        (b'{"model":"m","messages":[],"temperature":NaN}', "NaN"),
        (deep, "deeper than 256"),
        (b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
         "messages[0].content"),                                           # passthrough
        (b'{"model":"claude-x","messages":[{"role":"user","content":"\\ud800"}]}',
         "unpaired"),                                                      # converted
    ]
    for body, needle in cases:
        status, _, out = g.request("POST", "/v1/chat/completions", body,
                                   headers={"Content-Type": "application/json"})
        err = json.loads(out)["error"]
        assert status == 400 and needle in err["message"], (body[:60], err)
        assert set(err) == {"message", "type", "param", "code"}
    status, _, out = g.request("POST", "/v1/messages",
                               b'{"model":"claude-x","max_tokens":5,"stream":Infinity,'
                               b'"messages":[]}', headers={"anthropic-version": "2023-06-01"})
    assert status == 400 and json.loads(out)["error"]["type"] == "invalid_request_error"
    status, _, out = g.request("POST", "/v1beta/models/claude-x:generateContent",
                               b'{"contents": [{"parts": [{"text": "\\udfff"}]}]}',
                               headers={"Content-Type": "application/json"})
    err = json.loads(out)["error"]
    assert status == 400 and err["status"] == "INVALID_ARGUMENT"
    assert "contents[0].parts[0].text" in err["message"]
    form = (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nother\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            b'RIFF\r\n--B--\r\n')
    status, _, out = g.request("POST", "/v1/audio/transcriptions", form,
                               headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert status == 400 and "more than one 'model'" in json.loads(out)["error"]["message"]
    assert not up_o.requests and not up_a.requests          # nothing invalid was forwarded


def test_11_upstream_html_or_bad_json_is_502_naming_the_channel(gw, upstream):
    html = Reply(body=b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
    up_a = upstream([html])                                      # behind an OpenAI client
    up_o = upstream([html, Reply(body=b'{"id": "x", "choices": [{"mess')])   # behind Anthropic
    zipped = openai_chat_reply(usage=(21, 8)).body
    up_p = upstream([Reply(body=b'{"id": "x", "usage": {"prompt_tokens": NaN}}'),
                     Reply(chunks=[gzip.compress(b'{"id": "x", "choices": [')],
                           headers={"Content-Encoding": "gzip"}),
                     Reply(chunks=[gzip.compress(zipped)], headers={"Content-Encoding": "gzip"})])
    g = gw([chan(up_a, name="relay-a", type="anthropic", models=["claude-*"]),
            chan(up_o, name="relay-o", models=["gpt-*"]),
            chan(up_p, name="relay-p", models=["pass-*"])])
    with pytest.raises(openai.APIStatusError) as e:
        g.openai().chat.completions.create(model="claude-x", messages=[
            {"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and "channel 'relay-a'" in e.value.message
    assert "not valid JSON" in e.value.message
    for _ in ("html", "truncated JSON"):
        with pytest.raises(anthropic.APIStatusError) as e:
            g.anthropic().messages.create(model="gpt-4o", max_tokens=5, messages=[
                {"role": "user", "content": "hi"}])
        assert e.value.status_code == 502 and e.value.body["type"] == "error"
        assert e.value.body["error"]["type"] == "api_error"
        assert "channel 'relay-o'" in e.value.body["error"]["message"]
    for _ in ("NaN", "truncated, gzip and chunked"):                 # passthrough, too
        status, _, out = g.request("POST", "/v1/chat/completions",
                                   {"model": "pass-1", "messages": []})
        assert status == 502 and "channel 'relay-p'" in json.loads(out)["error"]["message"]
    status, _, out = g.request("POST", "/v1/chat/completions", {"model": "pass-1",
                                                                "messages": []})
    assert status == 200 and out == zipped                      # checked, decoded, forwarded
    assert (g.records(5)[-1]["input_tokens"], g.records(5)[-1]["output_tokens"]) == (21, 8)


def test_11_converted_stream_event_that_is_not_json_gives_in_band_error(gw, upstream):
    chunks = openai_stream_chunks(pieces=("ok",))
    chunks.insert(2, b"data: {\"choices\": [{\"delta\": NaN\n\n")
    up = upstream([Reply(chunks=chunks, content_type="text/event-stream")])
    body = {"model": "gpt-x", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    # Streams not held for the empty-answer check: the bad event comes after the first byte.
    g = gw([chan(up, name="relay")], settings={"empty_answer_fallback": False})
    status, hdrs, out = g.request("POST", "/v1/messages", body,
                                  headers={"anthropic-version": "2023-06-01"})  # clean end
    events = _sse_events(out)
    assert status == 200 and events[-1][0] == "error"
    assert "channel 'relay'" in events[-1][1]["error"]["message"]
    assert "NaN" in events[-1][1]["error"]["message"]


def test_11_ill_typed_fields_of_a_client_body_are_a_400_never_a_500(gw, upstream):
    """Found by fuzzing the converters with bodies whose fields have other types: each was an
    "internal gateway error" (500) before, from the look for a foreign body or a converter."""
    up_o, up_a = upstream(), upstream([Reply(body=json.dumps(anthropic_message()).encode())])
    g = gw([chan(up_o, name="pass", models=["gpt-*"]),
            chan(up_a, name="conv", type="anthropic", models=["claude-*"])])
    user = {"role": "user", "content": "hi"}
    odd_part = {"role": "user", "content": [{"type": ["text"], "text": "hi"}]}
    # Passed through: the upstream reads the body and answers for it (here: the fake's 200).
    for body in ({"model": "gpt-x", "messages": [user], "tools": -1},
                 {"model": "gpt-x", "messages": [odd_part]},
                 {"model": "gpt-x", "messages": True, "tools": 1}):
        status, _, out = g.request("POST", "/v1/chat/completions", body)
        assert status == 200 and json.loads(up_o.last()["body"]) == body, out
    # Converted: refused in the client's format before anything is sent.
    for path, body, needle in (
            ("/v1/chat/completions", {"model": "claude-x", "messages": [user], "tools": -1},
             "malformed request body"),
            ("/v1/chat/completions", {"model": "claude-x", "messages": True},
             "'messages' must be a list of message objects"),
            ("/v1/chat/completions", {"model": "claude-x", "messages": [user], "tools": [
                {"type": "function", "function": {"name": "get", "parameters": [1]}}]},
             "tool 'get': its parameters are a list, not a JSON Schema object"),
            ("/v1/responses", {"model": "claude-x", "input": "hi", "tools": [
                {"type": "function", "name": "get", "parameters": -1}]},
             "tool 'get': its parameters are a int, not a JSON Schema object"),
            ("/v1/responses", {"model": "claude-x", "input": "hi", "tools": [
                {"type": "function", "name": "get", "description": 5}]},
             "tool 'get': its description is a int, not a string")):
        status, _, out = g.request("POST", path, body)
        err = json.loads(out)["error"]
        assert status == 400 and needle in err["message"], (body, err)
        assert err["type"] == "invalid_request_error"
    status, _, out = g.request("POST", "/v1beta/models/claude-x:generateContent", {
        "contents": [{"parts": [{"text": "hi"}]}],
        "tools": [{"functionDeclarations": [{"parameters": {"type": "OBJECT"}}]}]})
    err = json.loads(out)["error"]
    assert status == 400 and err["status"] == "INVALID_ARGUMENT" and "a tool has no name" in \
        err["message"]
    status, _, out = g.request("POST", "/v1beta/models/gpt-x:batchEmbedContents",
                               {"requests": [5]})                # an embedding request, not one
    err = json.loads(out)["error"]
    assert status == 400 and err["status"] == "INVALID_ARGUMENT" and "malformed request body" \
        in err["message"]
    assert not up_a.requests


def test_11_upstream_fields_of_the_wrong_type_are_a_502_never_forwarded(gw, upstream):
    """Found by fuzzing the converters with upstream answers whose fields have other types: a
    Gemini call named by an object went to the client as it was, one named by a list cut the
    client's stream unfinished, a finishReason that is an object did so at the stream's end,
    and an OpenAI usage with a number for its details was a 500 even passed through."""
    def gemini(parts, finish="STOP"):
        return {"candidates": [{"content": {"role": "model", "parts": parts},
                                "finishReason": finish}],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}}

    def sse_of(*chunks):
        return Reply(chunks=[f"data: {json.dumps(c)}\n\n".encode() for c in chunks],
                     content_type="text/event-stream")
    up_g = upstream([
        Reply(body=json.dumps(gemini([{"functionCall": {"name": {"a": 1}}}])).encode()),
        Reply(body=json.dumps(gemini([{"functionCall": {"name": "get", "args": [1]}}])).encode()),
        sse_of(gemini([{"text": "he"}], None), gemini([{"functionCall": {"name": [[]]}}])),
        sse_of(gemini([{"text": "hello"}], {"reason": "STOP"}))])
    odd_usage = dict(json.loads(openai_chat_reply().body), usage={
        "prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": 5})
    up_o = upstream([Reply(body=json.dumps(odd_usage).encode())])
    g = gw([chan(up_g, name="gem", type="gemini", models=["gemini-*"]),
            chan(up_o, name="pass", models=["gpt-*"])],
           settings={"empty_answer_fallback": False})
    msgs = [{"role": "user", "content": "hi"}]
    for needle in ("a tool_call part's name is a dict, not a string",
                   "a functionCall's args is a list, not an object"):
        with pytest.raises(openai.APIStatusError) as e:
            g.openai().chat.completions.create(model="gemini-x", messages=msgs)
        assert e.value.status_code == 502 and "malformed upstream answer" in e.value.message
        assert needle in e.value.message
    for path, body in (("/v1/responses", {"model": "gemini-x", "input": "hi", "stream": True}),
                       ("/v1/chat/completions", {"model": "gemini-x", "messages": msgs,
                                                 "stream": True})):
        status, _, out = g.request("POST", path, body)       # read to its clean end
        events = _sse_events(out)
        assert status == 200 and "malformed upstream" in json.dumps(events[-1][1]), events[-2:]
    status, _, out = g.request("POST", "/v1/chat/completions", {"model": "gpt-x",
                                                                "messages": msgs})
    assert status == 200 and json.loads(out) == odd_usage
    assert g.records(5)[-1]["input_tokens"] == 5
    # Passed through and looked into for emptiness (empty_answer_fallback, the default): a
    # text that is a number was a 500; the answer is the upstream's to send, as it came.
    odd_text = dict(anthropic_message(), content=[{"type": "text", "text": 1.5}])
    odd_item = {"id": "resp_1", "object": "response", "status": "completed", "output": [
        {"type": "reasoning", "content": "thought", "summary": [{"text": 2}]}]}
    up_h = upstream([Reply(body=json.dumps(odd_text).encode())])
    up_r = upstream([Reply(body=json.dumps(odd_item).encode())])
    held = gw([chan(up_h, name="held", type="anthropic", models=["claude-*"]),
               chan(up_r, name="resp", models=["gpt-*"], responses_api=True)])
    status, _, out = held.request("POST", "/v1/messages", {
        "model": "claude-x", "max_tokens": 5, "messages": msgs},
        headers={"anthropic-version": "2023-06-01"})
    assert status == 200 and json.loads(out) == odd_text
    status, _, out = held.request("POST", "/v1/responses", {"model": "gpt-x", "input": "hi"})
    assert status == 200 and json.loads(out) == odd_item


@pytest.mark.parametrize("ctype,answers", [
    ("gemini", [{"embeddings": True}, {"embeddings": [{"values": [0.5, "a"]}]},
                {"embeddings": [{"values": {"x": 1}}]}]),
    ("ollama", [{"embeddings": [None]}, {"embeddings": [[0.5, [1]]]}, {"embeddings": 5}])])
def test_11_embeddings_of_the_wrong_type_are_a_502(gw, upstream, ctype, answers):
    """An embeddings answer whose vectors are not lists of numbers was a 500, or went to the
    client as it was (a vector holding a string)."""
    up = upstream([Reply(body=json.dumps(a).encode()) for a in answers])
    g = gw([chan(up, type=ctype, models=["emb"])])
    for _ in answers:
        with pytest.raises(openai.APIStatusError) as e:
            g.openai().embeddings.create(model="emb", input=["a"])
        message = e.value.message
        assert e.value.status_code == 502 and ("malformed embeddings answer" in message or
                                               "an embedding is not a list of numbers" in message)
    with pytest.raises(ag.GatewayError, match="not whole float32 numbers"):   # 7 bytes: a 500
        ag.openai_embed_vectors({"data": [{"embedding": "MTIzNDU2Nw=="}]})
    for odd in ({"data": True}, {"models": [{"name": 5}, "x", {"name": "m1"}]}):   # model lists
        up.replies = [Reply(body=json.dumps(odd).encode())]
        names = g.thread.submit(g.gateway.fetch_models(g.gateway.channels[0])).result(10)
        assert names == ([] if "data" in odd else ["m1"])


def _reset_peak_rss() -> float:
    with open("/proc/self/clear_refs", "w") as f:       # peak RSS (VmHWM) starts again from now
        f.write("5")
    return _rss_mib()


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_11_unbounded_upstreams_end_in_errors_with_bounded_memory(gw, upstream):
    """An endless body without a newline, a 1 GiB gzip bomb and an endless SSE line, on converted
    and passthrough routes: each ends in a 502 or an in-band error, and the gateway's peak RSS
    (measured: it runs in this process) grows by far less than what the upstreams sent."""
    line = b"x" * 65536
    body = upstream([Reply(chunks=_endless(line), close_delimited=True)])
    bomb = upstream([Reply(chunks=gzip_bomb(1.0), headers={"Content-Encoding": "gzip"})])
    sse = upstream([Reply(chunks=_endless(line, b'event: content_block_delta\ndata: {"a":"'),
                          content_type="text/event-stream")])
    sse_pt = upstream([Reply(chunks=_endless(line, b'data: {"a":"'),
                             content_type="text/event-stream")])
    err_bomb = upstream([Reply(400, chunks=gzip_bomb(1.0), headers={"Content-Encoding": "gzip"}),
                         Reply(500, chunks=gzip_bomb(1.0), headers={"Content-Encoding": "gzip"})])
    g = gw([chan(body, name="endless", type="anthropic", models=["claude-endless"]),
            chan(bomb, name="bomb", type="anthropic", models=["claude-bomb"]),
            chan(err_bomb, name="err-bomb", type="anthropic", models=["claude-err"]),
            chan(sse, name="line", type="anthropic", models=["claude-line"]),
            chan(sse_pt, name="line-pt", models=["gpt-line"])])
    g.request("GET", "/health")
    base = _reset_peak_rss()
    msgs = [{"role": "user", "content": "hi"}]
    for model, needle in (("claude-endless", "64 MiB limit (settings.max_response_mb)"),
                          ("claude-bomb", "64 MiB limit (settings.max_response_mb)")):
        status, _, out = g.request("POST", "/v1/chat/completions",
                                   {"model": model, "messages": msgs}, timeout=60)
        err = json.loads(out)["error"]["message"]
        assert status == 502 and needle in err and f"channel '{model[7:]}'" in err
    for expected in (400, 500):                     # error bodies: read up to MAX_ERROR_BODY
        status, _, out = g.request("POST", "/v1/chat/completions",
                                   {"model": "claude-err", "messages": msgs}, timeout=60)
        assert status == expected and "channel 'err-bomb'" in json.loads(out)["error"]["message"]
    for model in ("claude-line", "gpt-line"):
        status, _, out = g.request("POST", "/v1/chat/completions",
                                   {"model": model, "messages": msgs, "stream": True},
                                   timeout=60)
        assert status == 200 and out.rstrip().endswith(b"}")      # cleanly ended, not empty
        last = json.loads(out.rstrip().rsplit(b"\n", 1)[-1][5:])
        assert "SSE event longer than 16 MiB" in last["error"]["message"]
    grown = _peak_rss_mib() - base
    assert grown < 200, f"peak RSS grew by {grown:.0f} MiB"
    for up in (body, sse, sse_pt):                 # (the bomb is only 1 MiB on the wire)
        assert up.broken.wait(10)                  # the gateway hung up on the endless ones


def test_11_request_log_and_events_hold_no_secret(gw, upstream, tmp_path):
    up = upstream([Reply(500, b'{"error":{"message":"nope"}}'), openai_chat_reply()])
    g = gw([chan(up, name="one", api_key="sk-upstream-SECRET"),
            chan(up, name="two", api_key="sk-upstream-SECRET2", priority=1)],
           settings={"log_requests": True, "log_file": "requests.jsonl"})
    g.openai().chat.completions.create(model="m", messages=[])
    g.request("POST", "/v1/chat/completions", {"model": "m"}, headers={
        "Authorization": "Bearer sk-gw-not-a-real-token"})
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["tried"] == ["one", "two"] and first["status"] == 200
    assert first["token"] == "main" and second["status"] == 401
    everything = "\n".join(lines) + repr(g.events())
    for secret in (TOKEN, "sk-upstream-SECRET", "sk-gw-not-a-real-token"):
        assert secret not in everything
    kinds = {k for k, _ in g.events()}
    assert isinstance(kinds, set)


# -- URLs fetched for clients (SSRF): a canary server that must never receive a request --

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(32))


def _image_chat(url, model="m"):
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}}]}]}


def _names(answers):
    """A resolver for the gateway's UrlFetcher: the test names in ``answers`` (host -> [(address,
    refusal or None)]) answer as given, any other host through the real one."""
    async def resolve(host, port):
        if host in answers:
            return answers[host]
        return await ag.resolve_for_fetch(host, port)
    return resolve


def _fetch_error(g, url, ctype_model="m"):
    status, _, body = g.request("POST", "/v1/chat/completions", _image_chat(url, ctype_model))
    assert status == 400, body
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and "cannot fetch image" in err["message"]
    return err["message"]


@pytest.mark.parametrize("ctype", ["gemini", "ollama"])
def test_11_fetch_refuses_private_addresses_in_every_spelling(gw, upstream, ctype):
    canary = upstream([Reply(body=PNG, content_type="image/png")])
    up = upstream()
    up.responder = getattr(Dialects, ctype)
    g = gw([chan(up, type=ctype)])
    p = canary.port
    for url, host in [
            (f"http://127.0.0.1:{p}/cat.png?sig=SECRET-SIG", "127.0.0.1"),
            (f"http://localhost:{p}/", "localhost"), (f"http://LocalHost.:{p}/", "localhost"),
            ("http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3:%d/" % p, "localhost"),
            (f"http://[::1]:{p}/", "::1"), (f"http://[::ffff:127.0.0.1]:{p}/", "::ffff:127.0.0.1"),
            (f"http://[::ffff:7f00:1]:{p}/", "::ffff:7f00:1"), (f"http://2130706433:{p}/",
                                                                 "2130706433"),
            (f"http://0x7f.1:{p}/", "0x7f.1"), (f"http://127.1:{p}/", "127.1"),
            (f"http://0177.0.0.1:{p}/", "0177.0.0.1"),
            ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
            ("http://10.0.0.1/", "10.0.0.1"), ("http://192.168.1.1/", "192.168.1.1"),
            ("http://100.64.0.1/", "100.64.0.1"), (f"http://0.0.0.0:{p}/", "0.0.0.0"),
            ("file:///etc/passwd", "(none)"), (f"ftp://127.0.0.1:{p}/x.png", "127.0.0.1")]:
        message = _fetch_error(g, url)
        assert f"host '{host}'" in message and "fetch_private_urls" in message, url
        assert "SECRET-SIG" not in message
    assert canary.requests == [] and up.requests == []
    g2 = gw([chan(up, type=ctype)], settings={"fetch_private_urls": True})
    g2.openai().chat.completions.create(**_image_chat(f"http://2130706433:{p}/cat.png"))
    assert [r["path"] for r in canary.requests] == ["/cat.png"]
    sent = json.loads(up.last()["body"])
    b64 = __import__("base64").b64encode(PNG).decode()
    assert b64 in (sent["messages"][0].get("images", []) if ctype == "ollama" else
                   [p.get("inlineData", {}).get("data") for p in sent["contents"][0]["parts"]])


def test_11_fetch_refusals_speak_the_clients_dialect(gw, upstream):
    canary = upstream([Reply(body=PNG, content_type="image/png")])
    gem, oll = upstream(), upstream()
    gem.responder, oll.responder = Dialects.gemini, Dialects.ollama
    g = gw([chan(gem, type="gemini", models=["claude-*"]),
            chan(oll, type="ollama", models=["llama*"])])
    url = f"http://127.0.0.1:{canary.port}/cat.png"
    status, _, body = g.request("POST", "/v1/messages", {
        "model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": url}}]}]},
        headers={"anthropic-version": "2023-06-01"})
    out = json.loads(body)
    assert status == 400 and out["type"] == "error"
    assert out["error"]["type"] == "invalid_request_error"
    assert "host '127.0.0.1'" in out["error"]["message"]
    assert "fetch_private_urls" in out["error"]["message"]
    status, _, body = g.request("POST", "/v1beta/models/llama3:generateContent", {
        "contents": [{"role": "user", "parts": [
            {"text": "x"}, {"fileData": {"mimeType": "image/png", "fileUri": url}}]}]})
    err = json.loads(body)["error"]
    assert status == 400 and err["code"] == 400 and err["status"] == "INVALID_ARGUMENT"
    assert "host '127.0.0.1'" in err["message"] and "fetch_private_urls" in err["message"]
    assert canary.requests == gem.requests == oll.requests == []


def _pictures(canary):
    """A fake image host: /cat.png, /hop/N (N redirects, then the picture), /to/URL-ish paths
    that redirect elsewhere, and answers that must be refused."""
    big = ag.MAX_IMAGE_BYTES

    def reply(rec):
        path = rec["path"]
        if path.startswith("/hop/"):
            n = int(path.split("/")[2])
            return Reply(302, headers={"Location": f"/hop/{n - 1}" if n > 1 else "/cat.png"})
        return {
            "/cat.png": Reply(body=PNG, content_type="image/png"),
            "/to-canary": Reply(302, headers={
                "Location": f"http://127.0.0.1:{canary.port}/x.png"}),
            "/to-localhost": Reply(307, headers={"Location": f"http://localhost:{canary.port}/"}),
            "/to-file": Reply(301, headers={"Location": "file:///etc/passwd"}),
            "/missing": Reply(404, b"nope", content_type="text/plain"),
            "/page": Reply(body=b"<html></html>", content_type="text/html"),
            "/paper.pdf": Reply(body=b"%PDF-1.4 tiny", content_type="application/pdf"),
            "/big-chunked": Reply(chunks=[b"\0" * 65536] * (big // 65536 + 4),
                                  content_type="image/png"),
            "/big-declared": Reply(body=b"\0" * (big + 1), content_type="image/png"),
            "/slow": Reply(body=PNG, content_type="image/png", hang=5),
        }[path]
    return reply


def test_11_fetch_pins_the_checked_address_and_rechecks_redirects(gw, upstream):
    canary = upstream()
    pics = upstream()
    pics.responder = _pictures(canary)
    up = upstream()
    up.responder = Dialects.ollama
    g = gw([chan(up, type="ollama")])
    # img.test stands for a public name: the injected resolver answers 127.0.0.1 as public.
    # .test never resolves (RFC 6761), so a second lookup by name would fail the fetch.
    g.gateway.fetcher.resolve = _names({
        "img.test": [("127.0.0.1", None)],
        "mixed.test": [("127.0.0.1", None), ("10.0.0.1", "private")]})
    base = f"http://img.test:{pics.port}"
    g.openai().chat.completions.create(**_image_chat(base + "/cat.png"))
    assert pics.last()["headers"]["host"] == f"img.test:{pics.port}"
    b64 = __import__("base64").b64encode(PNG).decode()
    assert json.loads(up.last()["body"])["messages"][0]["images"] == [b64]
    g.openai().chat.completions.create(**_image_chat(base + "/hop/3"))       # 3: followed
    assert [r["path"] for r in pics.requests[-4:]] == ["/hop/3", "/hop/2", "/hop/1", "/cat.png"]
    assert "more than 3 redirects" in _fetch_error(g, base + "/hop/4")
    message = _fetch_error(g, base + "/to-canary")
    assert "host '127.0.0.1'" in message and "loopback" in message
    assert "fetch_private_urls" in message
    assert "host 'localhost'" in _fetch_error(g, base + "/to-localhost")
    assert "scheme 'file:'" in _fetch_error(g, base + "/to-file")
    seen = len(pics.requests)
    message = _fetch_error(g, f"http://mixed.test:{pics.port}/cat.png")
    assert "host 'mixed.test'" in message and "10.0.0.1, a private address" in message
    assert len(pics.requests) == seen and canary.requests == []


def test_11_fetch_caps_size_type_status_and_time(gw, upstream):
    pics = upstream()
    pics.responder = _pictures(upstream())
    gem, oll = upstream(), upstream()
    gem.responder, oll.responder = Dialects.gemini, Dialects.ollama
    g = gw([chan(oll, type="ollama", models=["llama*"]),
            chan(gem, type="gemini", models=["gemini*"])])
    g.gateway.fetcher.resolve = _names({"img.test": [("127.0.0.1", None)]})
    base = f"http://img.test:{pics.port}"
    assert "host 'img.test': it answered 404" in _fetch_error(g, base + "/missing", "llama")
    assert "content type 'text/html' is not one of image/" in _fetch_error(
        g, base + "/page", "llama")
    assert "content type 'application/pdf'" in _fetch_error(g, base + "/paper.pdf", "llama")
    for path in ("/big-chunked", "/big-declared"):
        assert "larger than 20 MiB" in _fetch_error(g, base + path, "llama")
    g.gateway.fetcher.timeout = 0.5
    assert "no complete answer within 0.5 s" in _fetch_error(g, base + "/slow", "llama")
    assert oll.requests == []
    g.openai().chat.completions.create(**_image_chat(base + "/paper.pdf", "gemini-x"))
    parts = json.loads(gem.last()["body"])["contents"][0]["parts"]
    pdf = __import__("base64").b64encode(b"%PDF-1.4 tiny").decode()
    assert parts[1] == {"inlineData": {"mimeType": "application/pdf", "data": pdf}}


def test_11_fetch_through_a_proxy_hands_it_the_checked_address(gw, upstream):
    pics = upstream()
    pics.responder = _pictures(upstream())
    up = upstream()
    up.responder = Dialects.ollama
    proxy = _ProxyBase(HTTPProxyHandler)
    g = gw([chan(up, type="ollama", proxy=f"http://127.0.0.1:{proxy.server_address[1]}")])
    g.gateway.fetcher.resolve = _names({"img.test": [("127.0.0.1", None)]})
    g.openai().chat.completions.create(**_image_chat(f"http://img.test:{pics.port}/cat.png"))
    assert proxy.seen[0].startswith(f"CONNECT 127.0.0.1:{pics.port} HTTP/1.1")
    assert pics.requests[0]["headers"]["host"] == f"img.test:{pics.port}"
    assert "cannot fetch image" in _fetch_error(g, f"http://10.0.0.1:{pics.port}/cat.png")
    assert len(proxy.seen) == 2                 # the second is the channel's own request
    proxy.shutdown()
    socks = _ProxyBase(Socks5Handler)
    g2 = gw([chan(up, type="ollama", proxy=f"socks5h://127.0.0.1:{socks.server_address[1]}")])
    g2.gateway.fetcher.resolve = _names({"img.test": [("127.0.0.1", None)]})
    g2.openai().chat.completions.create(**_image_chat(f"http://img.test:{pics.port}/cat.png"))
    assert socks.seen[0] == ("connect", 1, "127.0.0.1", pics.port)     # an IP, not the name
    assert pics.requests[-1]["headers"]["host"] == f"img.test:{pics.port}"
    socks.shutdown()


def test_11_fetch_over_https_sends_the_name_as_sni_and_verifies_it(gw, upstream, cert_files):
    ctx = server_context(cert_files)
    names = []
    ctx.sni_callback = lambda sock, name, c: names.append(name)
    pics = upstream([Reply(body=PNG, content_type="image/png")], tls_context=ctx)
    up = upstream()
    up.responder = Dialects.ollama
    g = gw([chan(up, type="ollama")])
    g.gateway.fetcher.resolve = _names({"img.test": [("127.0.0.1", None)]})
    message = _fetch_error(g, f"https://img.test:{pics.port}/cat.png")
    assert "host 'img.test'" in message and "TLS with img.test failed" in message
    assert names == ["img.test"] and pics.requests == [] and up.requests == []
# -- who may call: Host (DNS rebinding), browser origins, body types, failed-auth throttling -----

def _chat_body(model="m"):
    return json.dumps({"model": model, "messages": []}).encode()


def test_11_foreign_host_is_refused_before_routing_even_with_auth_off(gw, upstream):
    up = upstream()
    g = gw([chan(up)], settings={"require_auth": False})
    for path, body, shape in (("/v1/chat/completions", _chat_body(), "openai"),
                              ("/v1/messages", _chat_body(), "anthropic"),
                              ("/v1beta/models/m:generateContent", b"{}", "gemini"),
                              ("/health", None, "openai")):
        method = "GET" if body is None else "POST"
        status, _, data = g.request(method, path, body, headers={
            "Host": "evil.example:3000", "Content-Type": "application/json"})
        err = json.loads(data)
        assert status == 403, (path, data)
        if shape == "anthropic":
            assert err["type"] == "error" and err["error"]["type"] == "permission_error"
        elif shape == "gemini":
            assert err["error"]["status"] == "PERMISSION_DENIED"
        assert "settings.allowed_hosts" in err["error"]["message"]
        assert "evil.example" in err["error"]["message"]
    assert up.requests == []
    for host in ("localhost:3000", "LOCALHOST.", "127.0.0.1", "127.8.9.10:80", "[::1]:3000",
                 "app.localhost:5000", f"127.0.0.1:{g.port}"):
        assert g.request("POST", "/v1/chat/completions", _chat_body(),
                         headers={"Host": host, "Content-Type": "application/json"})[0] == 200
    assert len(up.requests) == 7
    # HTTP/1.1 without a Host header: 400; HTTP/1.0 may leave it out.
    out = raw_exchange(g.port, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"no Host header" in out
    out = raw_exchange(g.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n"
                               b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"more than one Host" in out
    assert raw_exchange(g.port, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_11_allowed_hosts_names_patterns_and_any(gw, upstream):
    up = upstream()
    g = gw([chan(up)], settings={"allowed_hosts": ["gw.lan", "*.example.org"]})
    for host, status in (("gw.lan", 200), ("GW.lan:3000", 200), ("a.example.org", 200),
                         ("gw.lan.evil.com", 403), ("example.org", 403)):
        assert g.request("GET", "/v1/models", headers={"Host": host})[0] == status, host
    g2 = gw([chan(up)], settings={"allowed_hosts": ["*"]})
    assert g2.request("GET", "/v1/models", headers={"Host": "anything.example"})[0] == 200


def test_11_listening_on_every_address_accepts_ip_literals_and_the_host_name(gw, upstream):
    up = upstream()
    g = gw([chan(up)], settings={"host": "0.0.0.0"})    # the fixture still binds 127.0.0.1
    for host, status in ((socket.gethostname(), 200), ("192.0.2.7:3000", 200),
                         ("[2001:db8::1]:3000", 200), ("evil.example", 403)):
        assert g.request("GET", "/v1/models", headers={"Host": host})[0] == status, host


def test_11_cross_site_pages_are_refused_whatever_the_content_type(gw, upstream):
    up = upstream()
    g = gw([chan(up)])
    for headers in ({"Origin": "https://evil.example", "Content-Type": "text/plain"},
                    {"Origin": "https://evil.example", "Content-Type": "application/json"},
                    {"Origin": "null", "Content-Type": "text/plain"},
                    {"Origin": "http://localhost.evil.example"},
                    {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}):
        status, hdrs, data = g.request("POST", "/v1/chat/completions", _chat_body(), headers)
        assert status == 403, headers
        assert "settings.cors_origins" in json.loads(data)["error"]["message"]
        assert "access-control-allow-origin" not in hdrs
    status, _, data = g.request("POST", "/v1/messages", _chat_body(), {
        "Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert status == 403 and json.loads(data)["error"]["type"] == "permission_error"
    assert up.requests == []
    for origin in ("http://localhost:5173", "https://127.0.0.1:8443", "http://[::1]:3000",
                   "app://obsidian.md", "file://", "tauri://localhost",
                   "vscode-webview://1abc", "http://tauri.localhost"):
        status, hdrs, _ = g.request("POST", "/v1/chat/completions", _chat_body(), {
            "Origin": origin, "Content-Type": "application/json",
            "Sec-Fetch-Site": "cross-site"})
        assert status == 200 and hdrs["access-control-allow-origin"] == origin, origin
    assert len(up.requests) == 8


def test_11_cors_origins_lists_pages_and_star_allows_any(gw, upstream):
    up = upstream()
    g = gw([chan(up)], settings={"cors_origins": ["https://My.App/", "null"]})
    for origin, status in (("https://my.app", 200), ("null", 200), ("https://other.app", 403)):
        got, hdrs, _ = g.request("POST", "/v1/chat/completions", _chat_body(),
                                 {"Origin": origin, "Content-Type": "application/json"})
        assert got == status, origin
        assert ("access-control-allow-origin" in hdrs) == (status == 200)
    g2 = gw([chan(up)], settings={"cors_origins": ["*"]})
    status, hdrs, _ = g2.request("POST", "/v1/chat/completions", _chat_body(),
                                 {"Origin": "https://any.example", "Sec-Fetch-Site": "cross-site",
                                  "Content-Type": "application/json"})
    assert status == 200 and hdrs["access-control-allow-origin"] == "*"
    assert g2.request("GET", "/v1/models", headers={"Sec-Fetch-Site": "cross-site"})[0] == 200
    status, hdrs, _ = g2.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "https://any.example", "Access-Control-Request-Method": "POST"})
    assert status == 204 and "POST" in hdrs["access-control-allow-methods"]
    assert "x-goog-api-key" in hdrs["access-control-allow-headers"]


def test_11_json_routes_take_json_and_transcriptions_take_multipart(gw, upstream):
    up = upstream()
    g = gw([chan(up)])
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"):
        status, _, data = g.request("POST", "/v1/chat/completions", _chat_body(),
                                    {"Content-Type": ctype})
        msg = json.loads(data)["error"]["message"]
        assert status == 415 and "application/json" in msg and ctype.split(";")[0] in msg
    status, _, data = g.request("POST", "/v1/messages", _chat_body(),
                                {"Content-Type": "text/plain"})
    assert status == 415 and json.loads(data)["type"] == "error"
    status, _, data = g.request("POST", "/v1beta/models/m:generateContent", b"{}",
                                {"Content-Type": "text/plain"})
    err = json.loads(data)["error"]
    assert status == 415 and err["code"] == 415 and err["status"] == "FAILED_PRECONDITION"
    assert up.requests == []
    for ctype in ("application/json", "Application/JSON; charset=utf-8", None):
        assert g.request("POST", "/v1/chat/completions", _chat_body(),
                         {"Content-Type": ctype})[0] == 200, ctype
    status, _, data = g.request("POST", "/v1/audio/transcriptions", _chat_body(),
                                {"Content-Type": "application/json"})
    assert status == 415 and "multipart/form-data" in json.loads(data)["error"]["message"]
    status, _, _ = g.request("POST", "/v1/audio/transcriptions", _chat_body())
    assert status == 415
    up.replies = [Reply(200, b'{"text":"hi"}', {"Content-Type": "application/json"})]
    form = (b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b'Content-Type: audio/wav\r\n\r\nRIFF\r\n--XX--\r\n')
    assert g.request("POST", "/v1/audio/transcriptions", form,
                     {"Content-Type": "multipart/form-data; boundary=XX"})[0] == 200
    assert len(up.requests) == 4


def test_11_control_characters_from_clients_are_escaped_in_every_log(gw, upstream, tmp_path):
    up = upstream([Reply(500, b'{"error":{"message":"nope"}}')])
    g = gw([chan(up, name="one")], settings={"log_requests": True, "log_file": "r.jsonl",
                                            "enable_fallback": False})
    model = "m\n12:00:00 POST /v1/chat/completions gpt -> x 200\r\x1b[31mred\x7f\x85\u2028"
    status, _, _ = g.request("POST", "/v1/chat/completions", _chat_body(model))
    assert status == 500
    g.records()
    rec = [p for k, p in g.events() if k == "request"][-1]      # what the headless printer gets
    line = ag.access_line(rec)
    shown = " ".join(ag.format_record(rec)) + ag.record_detail(rec).replace("\n", " ")
    for text in (line, shown):
        assert not any(c in text for c in "\n\r\x1b\x7f\x85\u2028"), text
        assert "m\\n12:00:00" in text and "\\r\\x1b[31mred\\x7f\\x85\\u2028" in text
    assert line.count(" 500 ") == 1
    raw = (tmp_path / "r.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n") and "\u2028".encode() not in raw
    logged = json.loads(raw)
    assert logged["model"] == rec["model"] and "\\u2028" in logged["model"]
    logs = [p for k, p in g.events() if k == "log"]
    assert any("m\\n12:00:00" in p for p in logs)
    assert not any(c in p for p in logs for c in "\n\r\x1b\u2028")


def _request_from(port, source, token, path="/v1/models"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15,
                                      source_address=(source, 0))
    headers = {"Authorization": f"Bearer {token}"} if path != "/v1/messages" else {
        "x-api-key": token, "anthropic-version": "2023-06-01",
        "Content-Type": "application/json"}
    conn.request("GET" if path == "/v1/models" else "POST", path,
                 body=None if path == "/v1/models" else _chat_body(), headers=headers)
    resp = conn.getresponse()
    out = resp.status, resp.getheader("Retry-After"), json.loads(resp.read())
    conn.close()
    return out


def test_11_wrong_tokens_from_one_address_are_throttled(gw, upstream):
    up = upstream([Reply(body=json.dumps(anthropic_message()).encode())])
    g = gw([chan(up, type="anthropic")])
    now = [1000.0]
    g.gateway.clock = lambda: now[0]
    for _ in range(19):
        assert _request_from(g.port, "127.0.0.1", "sk-gw-guess")[0] == 401
    now[0] += 61                          # the window moved on: these 19 no longer count
    for i in range(ag.AUTH_FAILURES_LIMIT):
        status, _, body = _request_from(g.port, "127.0.0.1", "sk-gw-guess")
        assert status == 401, i
    assert "x-goog-api-key" in body["error"]["message"] and "?key=" in body["error"]["message"]
    status, retry, body = _request_from(g.port, "127.0.0.1", TOKEN)
    assert status == 429 and retry == "60" and body["error"]["code"] == "rate_limit_exceeded"
    status, retry, body = _request_from(g.port, "127.0.0.1", TOKEN, "/v1/messages")
    assert status == 429 and retry == "60" and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert _request_from(g.port, "127.0.0.2", TOKEN)[0] == 200
    assert _request_from(g.port, "127.0.0.2", TOKEN, "/v1/messages")[0] == 200
    now[0] += 30.5
    assert _request_from(g.port, "127.0.0.1", TOKEN)[1] == "30"
    now[0] += 30.6
    assert _request_from(g.port, "127.0.0.1", TOKEN)[0] == 200
    assert len(up.requests) == 1


def test_11_auth_throttle_table_is_bounded():
    t = ag.AuthThrottle(max_addresses=100)
    for i in range(250):
        t.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(t) == 100
    for _ in range(ag.AUTH_FAILURES_LIMIT):
        t.failed("10.9.9.9", 5.0)
    assert t.blocked_for("10.9.9.9", 5.0) == ag.AUTH_BLOCK_SECONDS
    assert t.blocked_for("10.0.0.249", 5.0) == 0.0 and len(t) == 100
# -- a request log that cannot be written: reported once, counted, and serving goes on ---------

def test_11_request_log_on_a_full_disk_is_reported_once_and_counted(gw, upstream):
    # /dev/full opens fine and fails every write with ENOSPC: a full disk, as the kernel says.
    up = upstream([openai_chat_reply(text="still served")])
    g = gw([chan(up)], settings={"log_requests": True, "log_file": "/dev/full"})
    for _ in range(3):
        reply = g.openai().chat.completions.create(model="m", messages=[])
        assert reply.choices[0].message.content == "still served"
    g.records(3)
    status, _, body = g.request("GET", "/health?details=1")
    assert status == 200 and json.loads(body)["request_log_errors"] == 3
    logs = [p for k, p in g.events() if k == "log" and "request log" in p]
    assert logs == ["cannot write the request log /dev/full (No space left on device); "
                    "requests are served but not logged there until it works again"]


def test_11_request_log_failure_is_reported_again_after_it_recovered(tmp_path):
    # Read-only folders do not stop root (the suite runs as root), so the failing write is a
    # file object whose write raises EROFS, as a remount read-only would make it.
    heard = []
    log = ag.RequestLog(str(tmp_path / "r.jsonl"), heard.append)

    class ReadOnly:
        def write(self, data):
            raise OSError(30, "Read-only file system")

        def close(self):
            pass
    log.write({"n": 1})
    for fail in (True, True, False, True):
        if fail:
            log._file = ReadOnly()
        log.write({"n": 2})
    assert log.errors == 3 and len(heard) == 2             # the 2nd failure in a row is quiet
    assert all("Read-only file system" in h for h in heard)
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 2


# -- issue 13: session affinity, weights, aliases, request overrides, debug capture ---------------

def _served_by(*ups):
    """How many requests each fake received (by the fakes' own records)."""
    return [len(u.requests) for u in ups]


def _chat_record(g, headers=None, body=None):
    """Send one chat request through ``g``; its record."""
    count = len(g.gateway.records)
    status, _, _ = g.request("POST", "/v1/chat/completions",
                             body or {"model": "m", "messages": []}, headers=headers)
    assert status == 200
    return g.records(count + 1)[-1]


SESSION_SOURCES = {
    # Claude Code (v2.1.86+) sends this header on every request of a session.
    "claude_header": lambda s: ({"X-Claude-Code-Session-Id": s}, {}),
    # Codex: codex-rs/codex-api/src/requests/headers.rs sends the conversation id as session_id.
    "codex_header": lambda s: ({"session_id": s}, {}),
    "codex_hyphen_header": lambda s: ({"Session-Id": s}, {}),
    "prompt_cache_key": lambda s: ({}, {"prompt_cache_key": s}),
    "metadata_user_id": lambda s: ({}, {"metadata": {"user_id": f"user_x_session_{s}"}}),
    "system_and_first_user": lambda s: ({}, {"messages": [
        {"role": "system", "content": f"You are {s}"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yes"}, {"role": "user", "content": "more"}]}),
}


@pytest.mark.parametrize("source", list(SESSION_SOURCES))
def test_11_affinity_pins_a_session_for_each_session_key_source(gw, upstream, source):
    a, b = upstream(), upstream()
    g = gw([chan(a, name="a"), chan(b, name="b")])

    def ask(session, turn=0):
        hdrs, extra = SESSION_SOURCES[source](session)
        body = {"model": "m", "messages": [{"role": "user", "content": f"turn {turn}"}]}
        body.update(extra)
        if source == "system_and_first_user":
            body["messages"] = body["messages"][:2 + turn]    # the conversation grows
        return _chat_record(g, hdrs, body)
    first = ask("one")
    second = ask("two")
    assert (first["channel"], first["affinity"]) == ("a", "new")
    assert (second["channel"], second["affinity"]) == ("b", "new")
    for turn in range(1, 3):                  # without affinity these would alternate
        r1, r2 = ask("one", turn), ask("two", turn)
        assert (r1["channel"], r1["affinity"]) == ("a", "hit")
        assert (r2["channel"], r2["affinity"]) == ("b", "hit")
    assert _served_by(a, b) == [3, 3]


def test_11_affinity_for_anthropic_metadata_and_codex_responses(gw, upstream):
    a1 = upstream([Reply(body=json.dumps(anthropic_message()).encode())])
    a2 = upstream([Reply(body=json.dumps(anthropic_message()).encode())])
    o1, o2 = upstream(), upstream()
    g = gw([chan(a1, name="a1", type="anthropic", models=["claude-*"]),
            chan(a2, name="a2", type="anthropic", models=["claude-*"]),
            chan(o1, name="o1", models=["gpt-*"]), chan(o2, name="o2", models=["gpt-*"])])
    client = g.anthropic()
    for user in ("u1", "u2", "u1", "u2", "u1"):
        client.messages.create(model="claude-x", max_tokens=5, metadata={"user_id": user},
                               messages=[{"role": "user", "content": "x"}])
    assert _served_by(a1, a2) == [3, 2]
    assert [json.loads(r["body"])["metadata"]["user_id"] for r in a1.requests] == ["u1"] * 3
    for sid in ("c1", "c2", "c1", "c1"):       # Codex on /v1/responses, converted to chat
        status, _, _ = g.request("POST", "/v1/responses", {"model": "gpt-5", "input": "hi"},
                                 headers={"session_id": sid})
        assert status == 200
    assert _served_by(o1, o2) == [3, 1]


def test_11_different_sessions_spread_and_affinity_off(gw, upstream):
    a, b = upstream(), upstream()
    g = gw([chan(a, name="a"), chan(b, name="b")])
    for i in range(20):
        g.request("POST", "/v1/chat/completions", {"model": "m", "messages": []},
                  headers={"X-Claude-Code-Session-Id": f"s{i}"})
    assert _served_by(a, b) == [10, 10]
    assert len(g.gateway.affinity) == 20
    g2 = gw([chan(a, name="a"), chan(b, name="b")], settings={"affinity_ttl_s": 0})
    for _ in range(4):
        g2.request("POST", "/v1/chat/completions", {"model": "m", "messages": []},
                   headers={"X-Claude-Code-Session-Id": "same"})
    assert _served_by(a, b) == [12, 12]                # alternating: no pin
    assert {r["affinity"] for r in g2.records(4)} == {None}


def test_11_no_pin_where_one_channel_with_one_key_is_the_only_choice(gw, upstream):
    a = upstream()
    g = gw([chan(a, name="a")])
    for _ in range(3):
        rec = _chat_record(g, {"X-Claude-Code-Session-Id": "s"})
        assert (rec["channel"], rec["affinity"]) == ("a", None)
    assert len(g.gateway.affinity) == 0
    g2 = gw([chan(a, name="a", api_keys=["sk-upstream-second"])])   # two keys: a choice
    assert [_chat_record(g2, {"X-Claude-Code-Session-Id": "s"})["affinity"]
            for _ in range(3)] == ["new", "hit", "hit"]
    assert len(g2.gateway.affinity) == 1


def test_11_affinity_repins_after_a_failure_and_pins_the_key(gw, upstream):
    failing = threading.Event()
    a, b = upstream(), upstream()
    a.responder = lambda rec: Reply(500, b'{"error":{"message":"a down"}}') \
        if failing.is_set() else openai_chat_reply()
    g = gw([chan(a, name="a", api_keys=["sk-upstream-second"]), chan(b, name="b")])

    def ask(session):
        return _chat_record(g, {"X-Claude-Code-Session-Id": session})
    assert ask("s")["channel"] == "a"
    assert ask("other")["channel"] == "b"
    key = a.requests[0]["headers"]["authorization"]
    for _ in range(3):
        assert ask("s")["affinity"] == "hit"
    assert {r["headers"]["authorization"] for r in a.requests} == {key}   # same key each time
    failing.set()
    rec = ask("s")
    assert rec["tried"] == ["a", "b"] and rec["channel"] == "b"
    assert rec["affinity"] == "repinned"
    failing.clear()
    before = len(a.requests)
    rec = ask("s")
    assert (rec["channel"], rec["affinity"]) == ("b", "hit") and len(a.requests) == before


def test_11_affinity_expires_after_its_ttl_by_the_injected_clock(gw, upstream):
    a, b = upstream(), upstream()
    g = gw([chan(a, name="a"), chan(b, name="b")], settings={"affinity_ttl_s": 100})
    now = [1000.0]
    g.gateway.affinity.clock = lambda: now[0]

    def ask():
        r = _chat_record(g, {"X-Claude-Code-Session-Id": "s"})
        return r["channel"], r["affinity"]
    assert ask() == ("a", "new")
    now[0] += 99                                   # each use keeps the pin another 100 s
    assert ask() == ("a", "hit")
    now[0] += 99
    assert ask() == ("a", "hit")
    now[0] += 100                                  # idle for the whole TTL: a new pin
    assert ask() == ("b", "new")
    assert ask() == ("b", "hit")


def test_11_affinity_table_is_bounded():
    now = [0.0]
    aff = ag.Affinity(ttl=10, clock=lambda: now[0], max_sessions=3)
    for i in range(5):
        aff.served(("t", "m", f"s{i}"), None, (1, "m", 0))
    assert len(aff) == 3 and aff.lookup(("t", "m", "s0")) is None
    assert aff.lookup(("t", "m", "s4")) == (1, "m", 0)


def test_11_weights_share_equal_priorities_in_proportion(gw, upstream):
    a, b, c = upstream(), upstream(), upstream()
    g = gw([chan(a, name="a", weight=3), chan(b, name="b"),
            chan(c, name="c", priority=1, weight=50)])          # a lower priority: fallback only
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=15)
    for _ in range(40):                                         # over the wire
        conn.request("POST", "/v1/chat/completions", body=b'{"model":"m","messages":[]}',
                     headers={"Authorization": f"Bearer {TOKEN}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    conn.close()
    assert _served_by(a, b, c) == [30, 10, 0]
    # Smooth: the 1 in 4 is spread out, never a run of the light channel.
    order = [r["channel"] for r in g.records(40)[:8]]
    assert order.count("b") == 2 and "b, b" not in ", ".join(order)
    # Many more routing decisions of the same gateway (each one a request's first choice; the
    # wire costs ~35 ms a request on the test machine, so these 400 skip it).
    route = ag.ROUTES["/v1/chat/completions"]
    firsts = [g.gateway.candidates("m", route, None)[0].name for _ in range(400)]
    assert abs(firsts.count("a") - 300) <= 10 and abs(firsts.count("b") - 100) <= 10
    assert g.gateway.candidates("m", route, None)[-1].name == "c"        # c stays the fallback


def test_11_weighted_order_is_plain_round_robin_with_equal_weights():
    state: dict = {}
    firsts = [ag.weighted_order(["x", "y", "z"], [1, 1, 1], state) for _ in range(4)]
    assert firsts == [["x", "y", "z"], ["y", "z", "x"], ["z", "x", "y"], ["x", "y", "z"]]
    state = {}
    assert [ag.weighted_order(["x", "y"], [3, 1], state)[0] for _ in range(8)] == \
        ["x", "x", "y", "x"] * 2
    assert ag.weighted_order(["y", "w"], [1, 1], state) == ["y", "w"]   # x's score is dropped
    assert set(state) == {"y", "w"}


def test_11_aliases_weighted_with_fallback_across_models(gw, upstream):
    mini, flash = upstream(), upstream()
    g = gw([chan(mini, name="mini-ch", models=["gpt-4o-mini"]),
            chan(flash, name="flash-ch", models=["gemini-2.5-flash"],
                 model_mapping={"gemini-2.5-flash": "gemini-2.5-flash-001"})],
           settings={"aliases": {"fast": [{"model": "gpt-4o-mini", "weight": 2},
                                          "gemini-2.5-flash", "nowhere-model"]}})
    client = g.openai()
    for _ in range(30):
        r = client.chat.completions.create(model="fast", messages=[])
        assert r.choices[0].message.content == "hello"
    assert _served_by(mini, flash) == [20, 10]
    assert {json.loads(r["body"])["model"] for r in mini.requests} == {"gpt-4o-mini"}
    assert {json.loads(r["body"])["model"] for r in flash.requests} == {"gemini-2.5-flash-001"}
    recs = g.records(30)
    assert {(r["model"], r["upstream_model"]) for r in recs} == {
        ("fast", "gpt-4o-mini"), ("fast", "gemini-2.5-flash-001")}
    mini.replies = [Reply(503, b'{"error":{"message":"mini overloaded"}}')]
    client.chat.completions.create(model="fast", messages=[])
    rec = g.records(31)[-1]
    assert rec["tried"] == ["mini-ch", "flash-ch"] and rec["channel"] == "flash-ch"
    assert rec["upstream_model"] == "gemini-2.5-flash-001"
    assert "sent upstream as: gemini-2.5-flash-001" in ag.record_detail(rec)
    listed = [m.id for m in client.models.list()]
    assert listed == ["gpt-4o-mini", "gemini-2.5-flash", "fast"]
    assert client.models.retrieve("fast").id == "fast"
    g3 = gw([chan(mini, name="mini-ch", models=["gpt-4o-mini"])],
            settings={"aliases": {"ghost": ["nowhere-model"]}})
    with pytest.raises(openai.NotFoundError) as e:
        g3.openai().chat.completions.create(model="ghost", messages=[])
    assert "nowhere-model" in e.value.body["message"]


OVERRIDES = [{"models": "gpt-4o*", "set": {"temperature": 0.25, "metadata.tag": "gw",
                                           "messages.0.role": "developer"},
              "remove": ["max_tokens", "messages.1", "no.such.path"],
              "headers": {"X-Title": "aigateway"}, "remove_headers": ["X-Drop-Me"]},
             {"models": ["other-*"], "set": {"never": True}}]


def test_11_overrides_on_the_wire_for_passthrough(gw, upstream):
    up = upstream()
    g = gw([chan(up, name="o", overrides=OVERRIDES)])
    body = (b'{"model": "gpt-4o",  "max_tokens": 9, "messages": [{"role": "system", '
            b'"content": "s"}, {"role": "user", "content": "u"}], "x": 1}')
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=15)
    for model in (b"gpt-4o", b"plain"):
        conn.request("POST", "/v1/chat/completions", body=body.replace(b"gpt-4o", model),
                     headers={"Authorization": f"Bearer {TOKEN}", "X-Drop-Me": "1",
                              "X-Keep-Me": "2", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    conn.close()
    changed, untouched = up.requests
    sent = json.loads(changed["body"])
    assert sent == {"model": "gpt-4o", "temperature": 0.25, "metadata": {"tag": "gw"},
                    "messages": [{"role": "developer", "content": "s"}], "x": 1}
    assert changed["headers"]["x-title"] == "aigateway" and "x-drop-me" not in changed["headers"]
    assert changed["headers"]["x-keep-me"] == "2"
    assert changed["headers"]["authorization"] == "Bearer sk-upstream-secret"
    # No rule for this model: the body goes byte for byte as the client sent it.
    assert untouched["body"] == body.replace(b"gpt-4o", b"plain")
    assert untouched["headers"]["x-drop-me"] == "1" and "x-title" not in untouched["headers"]


def test_11_overrides_on_the_wire_for_a_converted_route(gw, upstream):
    up = upstream()
    rules = [{"models": "gpt-4o-2024*", "set": {"stream_options.include_usage": False,
                                                "reasoning_effort": "low"},
              "remove": ["temperature"], "headers": {"X-Vendor": "quirk"},
              "remove_headers": ["Accept-Encoding"]}]
    g = gw([chan(up, name="o", model_mapping={"gpt-4o": "gpt-4o-2024-11-20"},
                 overrides=rules)])
    status, _, _ = g.request("POST", "/v1/messages", {
        "model": "gpt-4o", "max_tokens": 7, "temperature": 0.5,
        "messages": [{"role": "user", "content": "x"}]},
        headers={"anthropic-version": "2023-06-01"})
    assert status == 200
    sent = json.loads(up.last()["body"])
    assert sent["model"] == "gpt-4o-2024-11-20" and sent["reasoning_effort"] == "low"
    assert "temperature" not in sent and sent["stream_options"] == {"include_usage": False}
    assert up.last()["headers"]["x-vendor"] == "quirk"
    assert "accept-encoding" not in up.last()["headers"]


def test_11_overrides_skip_paths_that_do_not_reach_and_forms():
    body = json.dumps({"a": "text", "l": [1, 2], "o": {}}).encode()
    rules = [{"set": {"a.b": 1, "l.5": 0, "l.1": 9, "o.x.y": True, "new": [1]},
              "remove": ["l.7", "o.missing", "l.0"], "headers": {"X-A": "1"}}]
    out, hdrs = ag.apply_overrides(body, [("x-a", "old"), ("Keep", "k")], rules, ("m",))
    assert json.loads(out) == {"a": "text", "l": [9], "o": {"x": {"y": True}}, "new": [1]}
    assert hdrs == [("Keep", "k"), ("X-A", "1")]
    form = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--b--\r\n"
    assert ag.apply_overrides(form, [], rules, ("m",)) == (form, [("X-A", "1")])
    assert ag.apply_overrides(body, [], [dict(rules[0], models="gpt-*")], ("m", "m2")) == \
        (body, [])


def test_11_debug_capture_keeps_bodies_masked_and_writes_them(gw, upstream, tmp_path):
    up = upstream([Reply(500, b'{"error":{"message":"echo sk-upstream-secret"}}'),
                   openai_stream_reply(pieces=("strea", "med")), openai_chat_reply()])
    g = gw([chan(up, name="one"), chan(up, name="two", priority=1)],
           settings={"debug_capture": 2, "debug_capture_file": "capture.jsonl"})
    with g.openai().chat.completions.create(model="m", stream=True, messages=[
            {"role": "user", "content": f"my token is {TOKEN}, say hi"}]) as s:
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "streamed"
    rec = g.records(1)[-1]
    text = g.gateway.capture.text(rec["id"])
    for secret in (TOKEN, "sk-upstream-secret"):
        assert secret not in text
    for key in (TOKEN, "sk-upstream-secret"):              # the client's, then the channel's
        assert f"authorization: bearer {ag.mask_secret(key)}".lower() in text.lower()
    assert "── client request: POST /v1/chat/completions" in text
    assert "── upstream request 1: POST http://127.0.0.1" in text
    assert "── upstream answer 1: 500" in text and "── upstream answer 2: 200" in text
    assert '"content": "strea"' in text.replace('":"', '": "') and "say hi" in text
    assert ag.mask_secret("sk-upstream-secret") in text
    st, _, _ = g.request("POST", f"/v1beta/models/m:generateContent?key={TOKEN}",
                         {"contents": [{"role": "user", "parts": [{"text": "q"}]}]},
                         headers={"Authorization": None})
    assert st == 200
    gem = g.records(2)[-1]
    gtext = g.gateway.capture.text(gem["id"])
    assert "key=***" in gtext and TOKEN not in gtext
    g.request("POST", "/v1/chat/completions", {"model": "m", "messages": []})
    assert g.gateway.capture.text(rec["id"]) == ""           # only the last 2 are kept
    path = tmp_path / "capture.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = json.loads(lines[0])
    assert first["id"] == rec["id"] and len(first["upstream"]) == 2
    assert "data: " in first["upstream"][1]["response"]["body"]
    assert TOKEN not in path.read_text() and "sk-upstream-secret" not in path.read_text()


def test_11_debug_capture_off_by_default_and_bodies_bounded(gw, upstream, monkeypatch):
    up = upstream()
    g = gw([chan(up)])
    g.request("POST", "/v1/chat/completions", {"model": "m", "messages": []})
    assert g.gateway.capture.text(g.records(1)[-1]["id"]) == ""
    monkeypatch.setattr(ag, "DEBUG_CAPTURE_BODY_BYTES", 40)
    g2 = gw([chan(up)], settings={"debug_capture": 1})
    g2.request("POST", "/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "y" * 5000}]})
    text = g2.gateway.capture.text(g2.records(1)[-1]["id"])
    assert "y" * 200 not in text and "(cut at 0 KiB of" in text


def _usage_gw(gw, channels, tokens=None, prices=PRICE_ALL, **settings):
    g = gw(channels, settings, tokens)
    g.store.update_prices(prices)
    g.thread.apply_config()
    return g


def _db_rows(path, where="1"):
    conn = ag.open_usage_db(str(path))
    conn.row_factory = lambda cur, row: dict(zip([c[0] for c in cur.description], row))
    try:
        return conn.execute(f"SELECT * FROM requests WHERE {where} ORDER BY id").fetchall()
    finally:
        conn.close()


def test_11_usage_costs_from_reported_usage_in_every_dialect(gw, upstream, tmp_path):
    oa = upstream([Reply(body=json.dumps({
        "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
                  "prompt_tokens_details": {"cached_tokens": 400},
                  "completion_tokens_details": {"reasoning_tokens": 50}}}).encode())])
    msg = anthropic_message()
    msg["usage"] = {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 800,
                    "cache_creation_input_tokens": 100}
    an = upstream([Reply(body=json.dumps(msg).encode())])
    ge = upstream([Reply(body=json.dumps({
        "candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]},
                        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 100,
                          "cachedContentTokenCount": 500, "thoughtsTokenCount": 100,
                          "totalTokenCount": 1200}}).encode())])
    re_ = upstream([Reply(body=json.dumps({
        "id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
        "model": "resp-x", "output": [{"type": "message", "id": "m1", "role": "assistant",
                                       "status": "completed", "content": [
                                           {"type": "output_text", "text": "ok",
                                            "annotations": []}]}],
        "usage": {"input_tokens": 1000, "output_tokens": 300, "total_tokens": 1300,
                  "input_tokens_details": {"cached_tokens": 200},
                  "output_tokens_details": {"reasoning_tokens": 100}}}).encode())])
    g = _usage_gw(gw, [chan(oa, name="oa", models=["gpt-x"]),
                       chan(an, name="an", type="anthropic", models=["claude-x"]),
                       chan(ge, name="ge", type="gemini", models=["gem-x"]),
                       chan(re_, name="re", models=["resp-x"], responses_api=True)])
    g.openai().chat.completions.create(model="gpt-x", messages=[{"role": "user",
                                                                 "content": "hi"}])
    g.anthropic().messages.create(model="claude-x", max_tokens=10,
                                  messages=[{"role": "user", "content": "hi"}])
    # An OpenAI client on the Anthropic channel: converted, the cache tokens carried over.
    r = g.openai().chat.completions.create(model="claude-x", messages=[{"role": "user",
                                                                        "content": "hi"}])
    assert r.usage.prompt_tokens_details.cached_tokens == 800
    status, _, _ = g.request("POST", "/v1beta/models/gem-x:generateContent",
                             {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert status == 200
    g.openai().responses.create(model="resp-x", input="hi")
    recs = g.records(5)
    got = [(r["route"], r["channel"], r["input_tokens"], r["output_tokens"],
            r["cache_read_tokens"], r["cache_write_tokens"], r["reasoning_tokens"],
            round(r["cost"] * 1e6, 3), r["cost_estimated"]) for r in recs]
    assert got == [
        ("/v1/chat/completions", "oa", 1000, 200, 400, 0, 50, 3400.0, False),
        ("/v1/messages", "an", 1000, 50, 800, 100, 0, 1500.0, False),
        ("/v1/chat/completions", "an", 1000, 50, 800, 100, 0, 1500.0, False),
        ("/v1beta/models/{model}:generateContent", "ge", 1000, 200, 500, 0, 100, 3250.0, False),
        ("/v1/responses", "re", 1000, 300, 200, 0, 100, 4700.0, False)]
    g.stop()                                     # the writer writes what is queued, then stops
    rows = _db_rows(tmp_path / "usage.db")
    assert [(r["dialect"], r["model"], r["channel"], r["token"], r["status"],
             r["cache_read_tokens"], round(r["cost"] * 1e6, 3)) for r in rows] == [
        ("openai", "gpt-x", "oa", "main", 200, 400, 3400.0),
        ("anthropic", "claude-x", "an", "main", 200, 800, 1500.0),
        ("openai", "claude-x", "an", "main", 200, 800, 1500.0),
        ("gemini", "gem-x", "ge", "main", 200, 500, 3250.0),
        ("responses", "resp-x", "re", "main", 200, 200, 4700.0)]
    assert all(r["latency_ms"] is not None and r["key_index"] == 0 for r in rows)


def test_11_responses_usage_counts_cache_writes_both_ways(gw, upstream):
    """The Responses API's usage has input_tokens_details.cache_write_tokens beside
    cached_tokens, required (openai-python 3.57, types/responses/response_usage.py, generated
    from OpenAI's OpenAPI spec): read from a Responses upstream, written for a Responses
    client; it was left out, so the SDK's usage object had no such attribute."""
    msg = dict(anthropic_message(), usage={"input_tokens": 10, "output_tokens": 4,
                                           "cache_read_input_tokens": 3,
                                           "cache_creation_input_tokens": 7})
    up_a = upstream([Reply(body=json.dumps(msg).encode())])
    native = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
              "model": "gpt-x", "output": [{"type": "message", "id": "m1", "role": "assistant",
                                            "status": "completed", "content": [
                                                {"type": "output_text", "text": "ok",
                                                 "annotations": []}]}],
              "usage": {"input_tokens": 30, "output_tokens": 5, "total_tokens": 35,
                        "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 9},
                        "output_tokens_details": {"reasoning_tokens": 0}}}
    up_r = upstream([Reply(body=json.dumps(native).encode())])
    g = gw([chan(up_a, name="claude", type="anthropic", models=["claude-*"]),
            chan(up_r, name="resp", models=["gpt-*"], responses_api=True)])
    u = g.openai().responses.create(model="claude-x", input="hi").usage       # converted
    assert (u.input_tokens, u.input_tokens_details.cached_tokens,
            u.input_tokens_details.cache_write_tokens, u.output_tokens) == (20, 3, 7, 4)
    g.openai().responses.create(model="gpt-x", input="hi")                    # passed through
    assert [(r["channel"], r["input_tokens"], r["cache_read_tokens"], r["cache_write_tokens"])
            for r in g.records(2)] == [("claude", 20, 3, 7), ("resp", 30, 6, 9)]


def test_11_usage_streams_and_estimates(gw, upstream, tmp_path):
    up = upstream([openai_stream_reply(usage=(30, 6)),
                   Reply(body=json.dumps({"id": "c", "object": "chat.completion", "created": 1,
                                          "model": "m", "choices": [{
                                              "index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant",
                                                          "content": "x" * 400}}]}).encode())])
    g = _usage_gw(gw, [chan(up, models=["m"], model_mapping={"m": "m-up"})])
    with g.openai().chat.completions.create(model="m", stream=True, messages=[
            {"role": "user", "content": "hi"}]) as s:
        list(s)
    g.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    status, _, _ = g.request("POST", "/v1/messages/count_tokens", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200                           # counted, but free: no usage row
    first, second, counted = g.records(3)
    assert counted["route"] == "/v1/messages/count_tokens" and "cost" not in counted
    assert (first["stream"], first["input_tokens"], first["output_tokens"],
            round(first["cost"] * 1e6, 3), first["cost_estimated"]) == (True, 30, 6, 120.0,
                                                                        False)
    # No usage reported: about a token per 4 bytes each way, and marked estimated.
    assert second["input_tokens"] is None and second["cost_estimated"] is True
    expect = (second["bytes_in"] // 4 * 2 + second["bytes_out"] // 4 * 10) / 1e6
    assert second["cost"] == pytest.approx(expect)
    g.stop()
    rows = _db_rows(tmp_path / "usage.db")
    assert [(r["stream"], r["upstream_model"], r["cost_estimated"]) for r in rows] == [
        (1, "m-up", 0), (0, "m-up", 1)]


def _limited_gw(gw, up, limits, clock, **tok):
    g = _usage_gw(gw, [chan(up, models=["m"], type=tok.pop("type", "openai"))],
                  tokens=[dict({"name": "kid", "key": TOKEN, "limits": limits}, **tok)])
    g.gateway.usage.clock = g.gateway.wall_clock = clock
    return g


def _chat(g, path="/v1/chat/completions", body=None, headers=None):
    status, hdrs, data = g.request("POST", path, body or {
        "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers=headers)
    return status, hdrs, json.loads(data)


def test_11_limit_requests_per_day_in_each_dialect_and_after_a_restart(gw, upstream, tmp_path):
    up = upstream()
    clock = _Clock()
    g = _limited_gw(gw, up, {"requests_per_day": 2}, clock)
    assert _chat(g)[0] == 200 and _chat(g)[0] == 200
    status, hdrs, body = _chat(g)
    assert status == 429 and hdrs["retry-after"] == "3600"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["message"] == (
        "gateway token 'kid' reached its requests_per_day limit: 2 of 2 used today (UTC); it "
        "resets at 2026-12-02T00:00:00Z (in 3600 s)")
    status, _, body = _chat(g, "/v1/messages", headers={"anthropic-version": "2023-06-01"},
                            body={"model": "m", "max_tokens": 5,
                                  "messages": [{"role": "user", "content": "hi"}]})
    assert status == 429 and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error" and "2 of 2" in body["error"]["message"]
    status, _, body = _chat(g, "/v1beta/models/m:generateContent",
                            body={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert status == 429 and body["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert len(up.requests) == 2                         # refused before routing
    assert g.request("GET", "/v1/models")[0] == 200       # listing spends nothing
    g.stop()
    # A new gateway on the same database: the count came back from it.
    g2 = _limited_gw(gw, up, {"requests_per_day": 2}, clock)
    g2.gateway.usage.close()                   # seeded at the real "now": again at the clock's
    g2.gateway.usage = ag.UsageStore(str(tmp_path / "usage.db"), prices={},
                                     retention_days=400, clock=clock)
    status, _, body = _chat(g2)
    assert status == 429 and "2 of 2 used today" in body["error"]["message"]
    clock.now += 3600                                    # the next UTC day
    assert _chat(g2)[0] == 200


def test_11_limit_tokens_cost_and_tpm(gw, upstream):
    up = upstream([openai_chat_reply(usage=(600, 400))])  # 1000 tokens, $0.0012 + $0.004
    clock = _Clock("2026-12-31T12:00:00Z")
    g = _limited_gw(gw, up, {"tokens_per_day": 1500}, clock)
    assert _chat(g)[0] == 200 and _chat(g)[0] == 200
    status, hdrs, body = _chat(g)
    assert status == 429 and hdrs["retry-after"] == str(12 * 3600)
    assert "tokens_per_day limit: 2000 of 1500 used today" in body["error"]["message"]
    g.stop()
    g = _limited_gw(gw, up, {"cost_per_month": 0.01}, clock)
    clock.now += 86400 * 31                              # a month on: the counts started over
    assert [_chat(g)[0] for _ in range(2)] == [200, 200]
    status, hdrs, body = _chat(g)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    assert body["error"]["message"] == (
        "gateway token 'kid' reached its cost_per_month limit: $0.0104 of $0.01 used this "
        "month (UTC); it resets at 2027-02-01T00:00:00Z (in 43200 s)")
    g.stop()
    g = _limited_gw(gw, up, {"cost_per_day": 0.004}, clock)
    assert _chat(g)[0] == 200
    status, _, body = _chat(g)
    assert status == 429 and "cost_per_day limit: $0.0052 of $0.004" in body["error"]["message"]
    g.stop()
    g = _limited_gw(gw, up, {"tpm": 1500}, clock)
    clock.now += 1000
    assert _chat(g)[0] == 200
    clock.now += 10
    assert _chat(g)[0] == 200
    status, hdrs, body = _chat(g)
    assert status == 429 and hdrs["retry-after"] == "50"      # when the first one ages out
    assert "tpm limit: 2000 of 1500 used in the last minute" in body["error"]["message"]
    clock.now += 50
    assert _chat(g)[0] == 200


def test_11_tpm_window_keeps_its_total_as_requests_age_out_and_overflow(monkeypatch):
    # The total is kept as events come and go (read with every request of a limited token,
    # it used to be summed over up to USAGE_TPM_EVENTS events each time).
    monkeypatch.setattr(ag, "USAGE_TPM_EVENTS", 3)
    w = ag.TpmWindow()
    for t, toks in ((100.0, 10), (110.0, 20), (120.0, 30), (130.0, 40)):
        w.add(t, toks)
    assert list(w.events) == [(110.0, 20), (120.0, 30), (130.0, 40)] and w.total == 90
    assert w.tokens(165.0) == 90                       # nothing is a minute old yet
    assert w.tokens(170.0) == 70                       # 110 + 60: out
    assert w.tokens(185.0) == 40 and list(w.events) == [(130.0, 40)]
    assert w.tokens(1000.0) == 0 and not w.events
    w.add(1001.0, 5)
    assert w.tokens(1001.0) == 5


def test_11_expired_token_is_401_in_the_clients_dialect(gw, upstream):
    up = upstream()
    g = _limited_gw(gw, up, {}, _Clock(), expires_at="2026-12-01")
    status, _, body = _chat(g)
    assert status == 401 and body["error"]["code"] == "token_expired"
    assert body["error"]["message"] == ("gateway token 'kid' expired at 2026-12-01T00:00:00Z; "
                                        "ask for a new one or move its expires_at")
    status, _, body = _chat(g, "/v1/messages", headers={"anthropic-version": "2023-06-01"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert not up.requests


def test_11_usage_endpoint(gw, tmp_path):
    clock = _Clock()
    _write_usage(tmp_path / "usage.db", USAGE_SAMPLE, clock)
    g = gw(tokens=[{"name": "main", "key": TOKEN}, {"name": "kid", "key": "sk-gw-kid-token"}])
    g.gateway.wall_clock = clock
    status, _, data = g.request("GET", "/usage?since=7d&by=model")
    body = json.loads(data)
    assert status == 200 and body["since"] == "2026-11-25" and body["by"] == "model"
    # Token 'main' sees its own requests only: claude-x (2 requests, one failed), gpt-x (1).
    assert [(r["model"], r["requests"], r["errors"], r["input_tokens"], r["cache_hit_rate"],
             round(r["cost"] * 1e6)) for r in body["rows"]] == [
        ("claude-x", 2, 1, 2000, 0.5, 2500), ("gpt-x", 1, 0, 1000, 0.5, 2250)]
    assert body["totals"]["requests"] == 3 and body["totals"]["cache_hit_rate"] == 0.5
    status, _, data = g.request("GET", "/usage?by=day",
                                headers={"Authorization": "Bearer sk-gw-kid-token"})
    assert [(r["day"], r["requests"]) for r in json.loads(data)["rows"]] == [("2026-11-30", 1)]
    status, _, data = g.request("GET", "/usage?since=yesterday")
    assert status == 400 and json.loads(data)["error"]["param"] == "since"
    assert "write 7d, 30d or a date" in json.loads(data)["error"]["message"]
    status, _, data = g.request("GET", "/usage?by=colour")
    assert status == 400 and json.loads(data)["error"]["message"].startswith("by='colour'")
    assert g.request("GET", "/usage", headers={"Authorization": None})[0] == 401
    assert g.request("POST", "/usage", {})[0] == 405


@pytest.mark.parametrize("ctype,path,answer,expected", [
    ("openai", "/v1/models", {"object": "list", "data": [{"id": "gpt-4o"}, {"id": "o3"}]},
     ["gpt-4o", "o3"]),
    ("anthropic", "/v1/models", {"data": [{"type": "model", "id": "claude-x"}]}, ["claude-x"]),
    ("gemini", "/v1beta/models?pageSize=1000", {"models": [{"name": "models/gemini-2.5-pro"}]},
     ["gemini-2.5-pro"]),
    ("ollama", "/api/tags", {"models": [{"name": "llama3.2:latest", "model": "llama3.2"}]},
     ["llama3.2:latest"]),
    ("azure", f"/openai/models?api-version={ag.AZURE_API_VERSION}",
     {"object": "list", "data": [{"id": "gpt-4o"}]}, ["gpt-4o"]),
])
def test_11_fetch_models_from_each_channel_type(gw, upstream, ctype, path, answer, expected):
    up = upstream([Reply(body=json.dumps(answer).encode())])
    g = gw([chan(up, type=ctype, api_key="k-123")])
    fut = g.thread.submit(g.gateway.fetch_models(g.gateway.channels[0]))
    assert fut.result(10) == expected
    assert up.last()["method"] == "GET" and up.last()["path"] == path


def _anthropic_turn(c, stream, **kw):
    kw.setdefault("max_tokens", 100)
    if not stream:
        return c.messages.create(**kw)
    with c.messages.stream(**kw) as s:
        for _ in s:
            pass
        return s.get_final_message()


def test_11_interleaved_tool_streams_reach_each_client_as_whole_calls(gw, upstream):
    up = upstream([Reply(chunks=_interleaved_openai_stream(), content_type="text/event-stream")])
    g = gw([chan(up, type="custom")])
    tools = [{"name": n, "input_schema": {"type": "object"}} for n in ("get_weather",
                                                                       "get_time")]
    m = _anthropic_turn(g.anthropic(), True, model="m", tools=tools,
                        messages=[{"role": "user", "content": "both"}])
    assert [(b.name, b.input) for b in m.content] == INTERLEAVED_CALLS
    with g.openai().responses.stream(model="m", input="both", tools=[
            {"type": "function", "name": n, "parameters": {"type": "object"}}
            for n in ("get_weather", "get_time")]) as s:
        for _ in s:
            pass
        final = s.get_final_response()
    assert [(o.name, json.loads(o.arguments)) for o in final.output] == INTERLEAVED_CALLS
    status, _, raw = g.request("POST", "/v1beta/models/m:streamGenerateContent?alt=sse", {
        "contents": [{"role": "user", "parts": [{"text": "both"}]}],
        "tools": [{"functionDeclarations": [{"name": "get_weather"}, {"name": "get_time"}]}]})
    parts = [p for _, d in _sse_events(raw) for c in d["candidates"]
             for p in c["content"]["parts"]]
    assert status == 200 and [(p["functionCall"]["name"], p["functionCall"]["args"])
                              for p in parts] == INTERLEAVED_CALLS


def test_11_n_above_one_through_a_converting_channel_is_a_400_naming_n(gw, upstream):
    up = upstream([Reply(body=json.dumps(anthropic_message()).encode())])
    g = gw([chan(up, type="anthropic")])
    with pytest.raises(openai.BadRequestError) as exc:
        g.openai().chat.completions.create(model="m", n=2, messages=[
            {"role": "user", "content": "x"}])
    assert exc.value.body["param"] == "n" and "n = 2" in exc.value.body["message"]
    assert up.requests == []


@pytest.mark.parametrize("ctype", ["openai", "gemini"])
@pytest.mark.parametrize("stream", [False, True])
def test_11_claude_code_long_mcp_tool_names_to_openai_and_gemini(gw, upstream, ctype, stream):
    up = upstream()
    up.responder = strict_upstream(ctype)
    g = gw([chan(up, type=ctype)])
    c = g.anthropic()
    tools = [{"name": n, "description": "a tool", "input_schema": {
        "type": "object", "properties": {"q": {"type": "string"}}}} for n in ODD_TOOLS]
    msgs = [{"role": "user", "content": "search"}]
    first = _anthropic_turn(c, stream, model="m", tools=tools, messages=msgs)
    assert [(b.type, b.name, b.input) for b in first.content] == [
        ("tool_use", LONG_TOOL, {"q": "x"})]
    msgs += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result",
                                           "tool_use_id": first.content[0].id,
                                           "content": "found"}]}]
    second = _anthropic_turn(c, stream, model="m", tools=tools, messages=msgs)
    assert second.content[0].text == "got found"
    sent = json.dumps(json.loads(up.last()["body"]))
    short = ag.channel_tool_name(LONG_TOOL, ctype)
    assert LONG_TOOL not in sent and sent.count(short) >= 2          # the tool and the call


@pytest.mark.parametrize("stream", [False, True])
def test_11_openai_and_responses_clients_with_names_the_channel_refuses(gw, upstream, stream):
    up = upstream()
    up.responder = strict_upstream("anthropic")
    g = gw([chan(up, type="anthropic")])
    name = "files.read:v2"
    kw = dict(model="m", messages=[{"role": "user", "content": "read"}], tools=[
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}])
    if stream:
        with g.openai().chat.completions.stream(**kw) as s:
            for _ in s:
                pass
            r = s.get_final_completion()
    else:
        r = g.openai().chat.completions.create(**kw)
    assert r.choices[0].message.tool_calls[0].function.name == name
    sent = json.loads(up.last()["body"])
    assert sent["tools"][0]["name"] == ag.channel_tool_name(name, "anthropic") != name
    up2 = upstream()
    up2.responder = strict_upstream("openai")
    g2 = gw([chan(up2, type="openai", name="oa")])
    long_ns = dict(CODEX_NAMESPACE, name="mcp__a_server_with_a_rather_long_descriptive_name")
    kw = dict(model="m", input="go", tools=[long_ns])
    if stream:
        with g2.openai().responses.stream(**kw) as s:
            for _ in s:
                pass
            out = s.get_final_response().output
    else:
        out = g2.openai().responses.create(**kw).output
    assert (out[0].type, out[0].name, out[0].namespace) == (
        "function_call", "echo_words", long_ns["name"])
    assert all(len(t["function"]["name"]) <= 64
               for t in json.loads(up2.last()["body"])["tools"])


@pytest.mark.parametrize("stream", [False, True])
def test_11_gemini_client_dotted_names_to_an_openai_channel(gw, upstream, stream):
    up = upstream()
    up.responder = strict_upstream("openai")
    g = gw([chan(up, type="openai")])
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    contents = [{"role": "user", "parts": [{"text": "read"}]}]
    tools = [{"functionDeclarations": [{"name": "files.read", "parameters": {
        "type": "OBJECT", "properties": {"q": {"type": "STRING"}}}}]}]
    status, _, raw = g.request("POST", f"/v1beta/models/m:{method}",
                               {"contents": contents, "tools": tools})
    chunks = [d for _, d in _sse_events(raw)] if stream else [json.loads(raw)]
    calls = [p["functionCall"] for c in chunks for p in c["candidates"][0]["content"]["parts"]
             if "functionCall" in p]
    assert status == 200 and [(c["name"], c["args"]) for c in calls] == [("files.read",
                                                                           {"q": "x"})]
    contents += [{"role": "model", "parts": [{"functionCall": calls[0]}]},
                 {"role": "user", "parts": [{"functionResponse": dict(
                     {k: v for k, v in calls[0].items() if k == "id"}, name="files.read",
                     response={"result": "text"})}]}]
    status, _, raw = g.request("POST", f"/v1beta/models/m:{method}",
                               {"contents": contents, "tools": tools})
    assert status == 200 and b"got text" in raw
    sent = json.loads(up.last()["body"])
    assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == \
        sent["tools"][0]["function"]["name"] == ag.channel_tool_name("files.read", "openai")

@pytest.mark.parametrize("stream", [False, True])
def test_11_codex_namespaced_mcp_tools_round_trip(gw, upstream, stream):
    up = upstream()
    up.responder = strict_upstream("openai")
    g = gw([chan(up, type="custom")])
    c = g.openai()

    def turn(items):
        kw = dict(model="gpt-5-codex", input=items, tools=[CODEX_NAMESPACE], store=False)
        if not stream:
            return c.responses.create(**kw)
        with c.responses.stream(**kw) as s:
            added = [ev.item for ev in s if ev.type == "response.output_item.added"]
            final = s.get_final_response()
        assert all(getattr(i, "namespace", None) == "mcp__probe" for i in added
                   if i.type == "function_call")
        return final
    items = [{"role": "user", "content": "echo"}]
    first = turn(items)
    call = first.output[0]
    assert (call.type, call.name, call.namespace, json.loads(call.arguments)) == (
        "function_call", "echo_words", "mcp__probe", {"q": "x"})
    sent = json.loads(up.last()["body"])
    assert [t["function"]["name"] for t in sent["tools"]] == [
        "mcp__probe__echo_words", "mcp__probe__raw_patch"]
    items += [call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": "said x"}]
    second = turn(items)
    assert second.output_text == "got said x"
    history = json.loads(up.last()["body"])["messages"]
    assert history[1]["tool_calls"][0]["function"]["name"] == "mcp__probe__echo_words"


@pytest.mark.parametrize("stream", [False, True])
def test_11_codex_client_side_tool_search_through_a_converting_channel(gw, upstream, stream):
    """Codex's tool search for the models of its catalog (openai-python types/responses:
    ToolSearchToolParam with execution "client", ResponseToolSearchCall,
    ResponseToolSearchOutputItemParam whose tools are namespaces of deferred functions)."""
    up = upstream()
    up.responder = strict_upstream("openai")
    g = gw([chan(up, type="custom")])
    search = {"type": "tool_search", "execution": "client", "description": "Find tools",
              "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}
    kw = dict(model="m", tools=[search], store=False)
    items = [{"role": "user", "content": "find an echo tool"}]

    def turn():
        if not stream:
            return g.openai().responses.create(input=items, **kw)
        with g.openai().responses.stream(input=items, **kw) as s:
            for _ in s:
                pass
            return s.get_final_response()
    call = turn().output[0]
    assert (call.type, call.execution, call.arguments) == ("tool_search_call", "client",
                                                           {"q": "x"})
    deferred = dict(CODEX_NAMESPACE, tools=[dict(CODEX_NAMESPACE["tools"][0],
                                                 defer_loading=True)])
    items += [call.model_dump(exclude_none=True),
              {"type": "tool_search_output", "call_id": call.call_id, "execution": "client",
               "status": "completed", "tools": [deferred]}]
    turn()
    sent = json.loads(up.last()["body"])
    assert [t["function"]["name"] for t in sent["tools"]] == ["tool_search",
                                                              "mcp__probe__echo_words"]
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": call.call_id,
                                    "content": "Tools now available: mcp__probe__echo_words"}
    assert "defer_loading" not in json.dumps(sent)

@pytest.mark.parametrize("stream", [False, True])
def test_11_mistral_quirks_for_claude_code_ids_and_refused_params(gw, upstream, stream):
    up = upstream()
    up.responder = strict_upstream("openai", mistral=True)
    quirks = {"tool_call_id": "mistral9", "drop_params": ["stream_options"]}
    g = gw([chan(up, type="custom", quirks=quirks)])
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    msgs = [{"role": "user", "content": "run"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01XyZ",
                                               "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01XyZ",
                                          "content": "ran"}]}]
    m = _anthropic_turn(g.anthropic(), stream, model="m", tools=tools, messages=msgs)
    assert m.content[0].text == "got ran"
    sent = json.loads(up.last()["body"])
    assert sent["messages"][1]["tool_calls"][0]["id"] == sent["messages"][2]["tool_call_id"]
    chat = [{"role": "user", "content": "run"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_Ab_12345678", "type": "function",
                 "function": {"name": "Bash", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_Ab_12345678", "content": "ran"}]
    kw = dict(model="m", messages=chat, stream_options={"include_usage": True}) if stream \
        else dict(model="m", messages=chat)
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in
                       g.openai().chat.completions.create(stream=True, **kw) if ch.choices)
    else:
        text = g.openai().chat.completions.create(**kw).choices[0].message.content
    assert text == "got ran"                               # passed through, quirks applied


def test_11_deepseek_gets_reasoning_back_on_tool_call_turns(gw, upstream):
    up = upstream()
    up.responder = strict_upstream("openai", deepseek=True)
    g = gw([chan(up, type="custom", quirks={"reasoning_back": "tool_calls"})])
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "say hi",
                                               "signature": "x"},
                                              {"type": "text", "text": "hi"}]},
            {"role": "user", "content": "run"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "use Bash", "signature": "x"},
                {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": "ran"}]}]
    m = _anthropic_turn(g.anthropic(), False, model="m", messages=msgs, tools=[
        {"name": "Bash", "input_schema": {"type": "object"}}])
    assert m.content[0].text == "got ran"
    sent = json.loads(up.last()["body"])["messages"]
    assert "reasoning_content" not in sent[1] and sent[3]["reasoning_content"] == "use Bash"


# Issue 14: preset channels end to end (the user's base_url points at the fake)
@pytest.mark.parametrize("stream", [False, True])
def test_11_mistral_preset_gets_nine_letter_ids_and_no_refused_params(gw, upstream, stream):
    up = upstream()
    up.responder = strict_upstream("openai", mistral=True)
    g = gw([{"name": "mistral", "preset": "mistral", "base_url": up.url + "/v1",
             "api_key": "sk-upstream-secret"}])
    chat = [{"role": "user", "content": "run"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_Ab_12345678", "type": "function",
                 "function": {"name": "Bash", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_Ab_12345678", "content": "ran"}]
    kw = dict(model="mistral-large-latest", messages=chat, max_completion_tokens=50)
    if stream:
        chunks = g.openai().chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = g.openai().chat.completions.create(**kw).choices[0].message.content
    assert text == "got ran"
    rec = up.last()
    sent = json.loads(rec["body"])
    assert rec["path"] == "/v1/chat/completions"
    assert rec["headers"]["authorization"] == "Bearer sk-upstream-secret"
    assert re.fullmatch(r"[A-Za-z0-9]{9}", sent["messages"][2]["tool_call_id"])
    assert sent["messages"][1]["tool_calls"][0]["id"] == sent["messages"][2]["tool_call_id"]
    assert "stream_options" not in sent and "max_completion_tokens" not in sent
    assert sent["max_tokens"] == 50


def test_11_deepseek_preset_sends_reasoning_back_on_tool_call_turns(gw, upstream):
    up = upstream()
    up.responder = strict_upstream("openai", deepseek=True)
    g = gw([{"name": "ds", "preset": "deepseek", "base_url": up.url + "/v1"}])
    chat = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hi", "reasoning_content": "say hi"},
            {"role": "user", "content": "run"},
            {"role": "assistant", "content": None, "reasoning_content": "use Bash",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "Bash", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ran"}]
    reply = g.openai().chat.completions.create(model="deepseek-reasoner", messages=chat)
    assert reply.choices[0].message.content == "got ran"
    sent = json.loads(up.last()["body"])["messages"]
    assert "reasoning_content" not in sent[1] and sent[3]["reasoning_content"] == "use Bash"


def test_11_anthropic_compatible_preset_strips_what_the_service_ignores(gw, upstream):
    up = upstream()
    up.responder = strict_upstream("anthropic")
    g = gw([{"name": "ds", "preset": "deepseek-anthropic", "base_url": up.url,
             "api_key": "sk-upstream-secret"}])
    m = _anthropic_turn(
        g.anthropic(), False, model="deepseek-chat",
        extra_body={"top_k": 5, "service_tier": "auto"},
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        tools=[{"name": "Bash", "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "run",
                                                "cache_control": {"type": "ephemeral"}}]}],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert m.content[0].name == "Bash"
    rec = up.last()
    sent = json.loads(rec["body"])
    assert rec["path"] == "/v1/messages" and rec["headers"]["x-api-key"] == "sk-upstream-secret"
    assert "cache_control" not in rec["body"].decode()
    assert "top_k" not in sent and "service_tier" not in sent
    assert sent["system"] == [{"type": "text", "text": "be brief"}]
    assert "anthropic-beta" not in rec["headers"]
    g2 = gw([{"name": "ds2", "preset": "deepseek-anthropic", "base_url": up.url,
              "quirks": {"drop_params": ["temperature"]}}])
    reply = g2.openai().chat.completions.create(                      # converted
        model="deepseek-chat", temperature=0.5, messages=[{"role": "user", "content": "hi"}],
        tools=[{"type": "function", "function": {"name": "Bash", "parameters": {
            "type": "object"}}}])
    assert reply.choices[0].message.tool_calls[0].function.name == "Bash"
    rec = up.last()
    assert rec["path"] == "/v1/messages" and "temperature" not in json.loads(rec["body"])


def test_11_bearer_auth_preset_sends_the_key_as_claude_code_would(gw, upstream):
    up = upstream()
    up.responder = strict_upstream("anthropic")
    g = gw([{"name": "glm", "preset": "zai-anthropic", "base_url": up.url,
             "api_key": "sk-upstream-secret"}])
    m = g.anthropic().messages.create(model="glm-4.7", max_tokens=50, messages=[
        {"role": "user", "content": "hi"}], tools=[{"name": "Bash",
                                                    "input_schema": {"type": "object"}}])
    assert m.content[0].name == "Bash"
    g.openai().chat.completions.create(model="glm-4.7", messages=[                # converted
        {"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {
            "name": "Bash", "parameters": {"type": "object"}}}])
    for rec in up.requests:
        assert rec["headers"]["authorization"] == "Bearer sk-upstream-secret"
        assert "x-api-key" not in rec["headers"]


def test_11_fetch_models_says_when_a_preset_has_no_model_list(gw):
    g = gw([{"name": "mm", "preset": "minimax-anthropic"}])
    ch = g.gateway.channel(g.store.data["channels"][0]["id"])
    with pytest.raises(ag.GatewayError, match="MiniMax .* has no model list"):
        asyncio.run(g.gateway.fetch_models(ch))


@pytest.mark.parametrize("stream", [False, True])
def test_11_claude_code_tool_search_to_an_openai_channel(gw, upstream, stream):
    up = upstream()
    up.responder = strict_upstream("openai")
    g = gw([chan(up, type="openai")])
    body = {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": stream, "tools": [
        {"name": "ToolSearch", "input_schema": {"type": "object"}},
        {"name": "mcp__docs__lookup", "defer_loading": True,
         "input_schema": {"type": "object"}},
        {"name": "mcp__docs__unused", "defer_loading": True,
         "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                               "name": "ToolSearch", "input": {"q": "docs"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "tool_reference",
                                                       "tool_name": "mcp__docs__lookup"}]}]}]}
    status, _, raw = g.request("POST", "/v1/messages?beta=true", body,
                               headers={"anthropic-version": "2023-06-01",
                                        "anthropic-beta": "advanced-tool-use-2025-11-20"})
    assert status == 200, raw
    text = raw.decode()
    assert "got Tool mcp__docs__lookup is now available." in (
        text if not stream else "".join(d["delta"]["text"] for e, d in _sse_events(raw)
                                        if e == "content_block_delta"))
    sent = json.loads(up.last()["body"])
    assert [t["function"]["name"] for t in sent["tools"]] == ["ToolSearch", "mcp__docs__lookup"]
    assert "defer_loading" not in json.dumps(sent)


def _anthropic_sse(blocks, stop, model="c"):
    """An Anthropic Messages stream carrying ``blocks`` whole (one delta each)."""
    def ev(name, data):
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    out = [ev("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "usage": {"input_tokens": 11, "output_tokens": 1}}})]
    for i, b in enumerate(blocks):
        if b["type"] == "thinking":
            out.append(ev("content_block_start", {"type": "content_block_start", "index": i,
                                                  "content_block": {"type": "thinking",
                                                                    "thinking": ""}}))
            out.append(ev("content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "signature_delta",
                                                            "signature": b["signature"]}}))
        elif b["type"] == "tool_use":
            out.append(ev("content_block_start", {"type": "content_block_start", "index": i,
                                                  "content_block": dict(b, input={})}))
            out.append(ev("content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "input_json_delta",
                                                            "partial_json": json.dumps(
                                                                b["input"])}}))
        else:
            out.append(ev("content_block_start", {"type": "content_block_start", "index": i,
                                                  "content_block": {"type": "text",
                                                                    "text": ""}}))
            if b["text"]:
                out.append(ev("content_block_delta", {"type": "content_block_delta",
                                                      "index": i, "delta": {
                                                          "type": "text_delta",
                                                          "text": b["text"]}}))
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": i}))
    out += [ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop},
                                 "usage": {"output_tokens": 4}}),
            ev("message_stop", {"type": "message_stop"})]
    return Reply(chunks=out, content_type="text/event-stream")


def _anthropic_reply(body, blocks, stop):
    if body.get("stream"):
        return _anthropic_sse(blocks, stop, body["model"])
    return Reply(body=json.dumps({"id": "msg_1", "type": "message", "role": "assistant",
                                  "model": body["model"], "content": blocks,
                                  "stop_reason": stop, "stop_sequence": None,
                                  "usage": {"input_tokens": 11, "output_tokens": 4}}).encode())


def _anthropic_error(message):
    return Reply(400, json.dumps({"type": "error", "error": {
        "type": "invalid_request_error", "message": message}}).encode())


def claude_opus_4_7(rec):
    """Claude Opus 4.7 as its API behaves with thinking: a tool call after thinking sent with
    display omitted (a signature only), then an answer once the tool result comes back."""
    body = json.loads(rec["body"])
    thinking = body.get("thinking") or {}
    # Opus 4.7 takes only adaptive thinking; "enabled" with budget_tokens is a 400
    # (platform.claude.com/docs/en/build-with-claude/adaptive-thinking; Bedrock's copy:
    # docs.aws.amazon.com/bedrock/latest/userguide/claude-messages-adaptive-thinking.html).
    if thinking.get("type") == "enabled":
        return _anthropic_error("thinking.type.enabled is not supported for this model. Use "
                                "thinking.type.adaptive and output_config.effort")
    msgs = body["messages"]
    if len(msgs) > 1:
        last_assistant = msgs[-2]["content"]
        # With thinking on, the assistant turn before the tool results must start with its
        # thinking block, unchanged (Anthropic's 400 quoted in sigoden/llm-functions#222).
        if thinking and last_assistant[0] != {"type": "thinking", "thinking": "",
                                              "signature": SIG}:
            return _anthropic_error("messages.1.content.0.type: Expected `thinking` or "
                                    "`redacted_thinking`, but found `tool_use`. When "
                                    "`thinking` is enabled, a final `assistant` message "
                                    "must start with a thinking block")
        return _anthropic_reply(body, [{"type": "text", "text": "done"}], "end_turn")
    return _anthropic_reply(body, [{"type": "thinking", "thinking": "", "signature": SIG},
                                   {"type": "tool_use", "id": "toolu_A", "name": "get_weather",
                                    "input": {"city": "Paris"}}], "tool_use")


@pytest.mark.parametrize("client", ["openai", "responses", "genai"])
@pytest.mark.parametrize("stream", [False, True])
def test_11_adaptive_thinking_tool_loop_from_every_dialect(gw, upstream, client, stream):
    up = upstream()
    up.responder = claude_opus_4_7
    g = gw([chan(up, type="anthropic")])
    model = "claude-opus-4-7"
    if client == "openai":
        c = g.openai()

        def call(messages):
            kw = dict(model=model, messages=messages, tools=TOOLS, reasoning_effort="xhigh")
            if not stream:
                return c.chat.completions.create(**kw)
            with c.chat.completions.stream(**kw) as s:
                for _ in s:
                    pass
                return s.get_final_completion()
        msgs = [{"role": "user", "content": "weather?"}]
        first = call(msgs).choices[0]
        assert first.message.tool_calls[0].id == "toolu_A"
        msgs += [first.message.model_dump(exclude_none=True, exclude={"parsed"}),
                 {"role": "tool", "tool_call_id": "toolu_A", "content": "sunny"}]
        assert call(msgs).choices[0].message.content == "done"
        effort = "xhigh"
    elif client == "responses":
        c = g.openai()

        def call(inp):
            kw = dict(model=model, input=inp, tools=RESPONSES_TOOLS[:2],
                      reasoning={"effort": "medium"}, store=False)
            if not stream:
                return c.responses.create(**kw)
            with c.responses.stream(**kw) as s:
                for _ in s:
                    pass
                return s.get_final_response()
        items = [{"role": "user", "content": "weather?"}]
        first = call(items)
        fc = [o for o in first.output if o.type == "function_call"][0]
        items += [o.model_dump(exclude_none=True) for o in first.output]
        items.append({"type": "function_call_output", "call_id": fc.call_id, "output": "sun"})
        assert call(items).output_text == "done"
        effort = "medium"
    else:
        c = _genai(g)
        config = genai_types.GenerateContentConfig(
            tools=_genai_tools(), thinking_config=genai_types.ThinkingConfig(thinking_level="LOW"),
            automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True))
        contents = [genai_types.Content(role="user", parts=[genai_types.Part(text="weather?")])]

        def call():
            if not stream:
                r = c.models.generate_content(model=model, contents=contents, config=config)
                return r.candidates[0].content.parts
            return [p for ch in c.models.generate_content_stream(
                model=model, contents=contents, config=config)
                for cand in ch.candidates or [] if cand.content for p in cand.content.parts or []]
        parts = call()
        fc = [p.function_call for p in parts if p.function_call][0]
        contents.append(genai_types.Content(role="model", parts=parts))
        contents.append(genai_types.Content(role="user", parts=[
            genai_types.Part(function_response=genai_types.FunctionResponse(
                id=fc.id, name=fc.name, response={"result": "sunny"}))]))
        assert "".join(p.text or "" for p in call()) == "done"
        effort = "low"
    sent = [json.loads(r["body"]) for r in up.requests]
    assert len(sent) == 2
    assert all(b["thinking"] == {"type": "adaptive", "display": "summarized"} for b in sent)
    assert all(b["output_config"] == {"effort": effort} for b in sent)
    assert sent[1]["messages"][1]["content"][0] == {"type": "thinking", "thinking": "",
                                                    "signature": SIG}


def test_11_channel_thinking_setting_overrides_the_table(gw, upstream):
    up = upstream()
    up.responder = lambda rec: _anthropic_reply(json.loads(rec["body"]),
                                                [{"type": "text", "text": "ok"}], "end_turn")
    g = gw([chan(up, type="anthropic", thinking="adaptive")])
    r = g.openai().chat.completions.create(model="relay-claude", reasoning_effort="low",
                                           messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "ok"
    assert json.loads(up.last()["body"])["thinking"] == {"type": "adaptive"}


def gemini_fake(rec):
    """Gemini with two parallel calls of one function. Gemini 3 gives each call an id and the
    first call alone a thoughtSignature (ai.google.dev/gemini-api/docs/thought-signatures:
    "only the first functionCall part" of parallel calls carries it), and needs the ids back
    to tell the results apart; Gemini 2.x answers any "id" with a 400 (JetBrains/koog#735)."""
    body = json.loads(rec["body"])
    model = rec["path"].split("/models/")[1].split(":")[0]
    three = model.startswith("gemini-3")
    stream = ":streamGenerateContent" in rec["path"]
    turns = body["contents"]
    cfg = body.get("generationConfig", {}).get("thinkingConfig", {})
    if "thinkingLevel" in cfg and "thinkingBudget" in cfg:    # docs/thinking: never both
        return Reply(400, b'{"error":{"code":400,"message":"thinking_budget and thinking_level'
                          b' are not supported together","status":"INVALID_ARGUMENT"}}')
    if not three and '"id"' in json.dumps(turns):
        return Reply(400, b'{"error":{"code":400,"message":"Invalid JSON payload received. '
                          b'Unknown name \\"id\\" at \'contents[1].parts[0].function_call\': '
                          b'Cannot find field.","status":"INVALID_ARGUMENT"}}')
    results = [p["functionResponse"] for p in turns[-1]["parts"] if "functionResponse" in p]
    if results:
        if three:
            calls = [p for p in turns[-2]["parts"] if "functionCall" in p]
            assert calls[0]["thoughtSignature"] == "SIG3" and "thoughtSignature" not in calls[1]
            assert [c["functionCall"]["id"] for c in calls] == ["fc-a", "fc-b"]
            by_id = {r["id"]: r["response"]["result"] for r in results}
            text = f"a={by_id['fc-a']} b={by_id['fc-b']}"
        else:
            text = "ok"
        parts = [{"text": text}]
    else:
        parts = [{"functionCall": dict({"name": "get_weather", "args": {"city": city}},
                                       **({"id": cid} if three else {}))}
                 for cid, city in (("fc-a", "Paris"), ("fc-b", "Rome"))]
        if three:
            parts[0]["thoughtSignature"] = "SIG3"
    usage = {"promptTokenCount": 5, "candidatesTokenCount": 2}
    if not stream:
        return Reply(body=json.dumps({"candidates": [{"content": {"role": "model",
                                                                  "parts": parts},
                                                      "finishReason": "STOP"}],
                                      "usageMetadata": usage}).encode())
    chunks = [{"candidates": [{"content": {"role": "model", "parts": [p]}}]} for p in parts]
    # The last chunk may carry only a signature on an empty text part.
    chunks.append({"candidates": [{"content": {"role": "model", "parts": [
        {"text": "", "thoughtSignature": "TAIL"}]}, "finishReason": "STOP"}],
        "usageMetadata": usage})
    return Reply(chunks=[f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks],
                 content_type="text/event-stream")


@pytest.mark.parametrize("model", ["gemini-3-flash-preview", "gemini-2.5-flash"])
@pytest.mark.parametrize("client", ["anthropic", "openai"])
@pytest.mark.parametrize("stream", [False, True])
def test_11_gemini_parallel_calls_of_one_function(gw, upstream, model, client, stream):
    up = upstream()
    up.responder = gemini_fake
    g = gw([chan(up, type="gemini")])
    if client == "anthropic":
        c = g.anthropic()

        def call(messages):
            kw = dict(model=model, max_tokens=4000, tools=ANTHROPIC_TOOLS, messages=messages,
                      thinking={"type": "adaptive"})
            if not stream:
                return c.messages.create(**kw)
            with c.messages.stream(**kw) as s:
                deltas = [e for e in s if e.type == "content_block_delta"]
                assert all(getattr(e.delta, "text", "x") for e in deltas)    # none empty
                return s.get_final_message()
        msgs = [{"role": "user", "content": "weather in Paris and Rome"}]
        first = call(msgs)
        uses = [b for b in first.content if b.type == "tool_use"]
        msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                   for b in first.content]},
                 {"role": "user", "content": [
                     {"type": "tool_result", "tool_use_id": uses[1].id, "content": "rain"},
                     {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sun"}]}]
        text = call(msgs).content[0].text
    else:
        c = g.openai()

        def call(messages):
            kw = dict(model=model, messages=messages, tools=TOOLS, reasoning_effort="low")
            if not stream:
                return c.chat.completions.create(**kw).choices[0].message
            with c.chat.completions.stream(**kw) as s:
                for _ in s:
                    pass
                return s.get_final_completion().choices[0].message
        msgs = [{"role": "user", "content": "weather in Paris and Rome"}]
        first = call(msgs)
        calls = first.tool_calls
        msgs += [first.model_dump(exclude_none=True, exclude={"parsed"}),
                 {"role": "tool", "tool_call_id": calls[1].id, "content": "rain"},
                 {"role": "tool", "tool_call_id": calls[0].id, "content": "sun"}]
        text = call(msgs).content
    three = model.startswith("gemini-3")
    assert text == ("a=sun b=rain" if three else "ok")
    cfg = json.loads(up.requests[0]["body"])["generationConfig"]["thinkingConfig"]
    assert ("thinkingLevel" in cfg) == three and ("thinkingBudget" in cfg) != three


def _two_channels(gw, upstream, ctype, first_reply, **settings):
    bad, good = upstream([first_reply]), upstream()
    good.responder = getattr(Dialects, {"custom": "openai"}.get(ctype, ctype))
    g = gw([chan(bad, type=ctype, name="first", priority=0),
            chan(good, type=ctype, name="second", priority=1)], settings=settings or None)
    return g, bad, good


OVERFLOW_CASES = [   # (channel type, status, upstream body)
    ("anthropic", 400, OVERFLOWS[0][1]), ("openai", 400, OVERFLOWS[2][1]),
    ("custom", 400, OVERFLOWS[4][1]), ("gemini", 400, OVERFLOWS[5][1]),
    ("ollama", 500, OVERFLOWS[6][1]),
]


@pytest.mark.parametrize("ctype,status,body", OVERFLOW_CASES)
@pytest.mark.parametrize("client", ["anthropic", "openai", "genai"])
@pytest.mark.parametrize("stream", [False, True])
def test_11_context_overflow_in_each_clients_wording(gw, upstream, ctype, status, body, client,
                                                     stream):
    reply = Reply(status, json.dumps(body).encode())
    g, bad, good = _two_channels(gw, upstream, ctype, reply)
    msgs = [{"role": "user", "content": "a very long prompt"}]
    if client == "anthropic":
        with pytest.raises(anthropic.BadRequestError) as e:
            kw = dict(model="m", max_tokens=10, messages=msgs)
            if stream:
                with g.anthropic().messages.stream(**kw) as s:
                    list(s)
            else:
                g.anthropic().messages.create(**kw)
        err = e.value.body["error"]
        assert err["type"] == "invalid_request_error"
        assert err["message"].lower().startswith("prompt is too long")
        tokens, limit = next((t, lim) for _, b, t, lim in OVERFLOWS if b == body)
        if tokens:                       # what Claude Code reads to size its compaction
            assert f"{tokens} tokens > {limit}" in err["message"]
    elif client == "openai":
        with pytest.raises(openai.BadRequestError) as e:
            g.openai().chat.completions.create(model="m", messages=msgs, stream=stream)
        assert e.value.code == "context_length_exceeded"
        assert e.value.status_code == 400
    else:
        with pytest.raises(genai_errors.ClientError) as e:
            gc = _genai(g)
            call = gc.models.generate_content_stream if stream else gc.models.generate_content
            res = call(model="m", contents="a very long prompt")
            if stream:
                list(res)
        assert e.value.code == 400 and e.value.status == "INVALID_ARGUMENT"
        tokens, limit = next((t, lim) for _, b, t, lim in OVERFLOWS if b == body)
        if tokens:
            assert f"input token count ({tokens}) exceeds the maximum number of tokens " \
                   f"allowed ({limit})" in e.value.message
    assert not good.requests                               # not a failure to fall back from
    rec = g.records()[-1]
    assert rec["status"] == 400 and rec["failures"] == []
    assert _health(g, "first")["state"] == "ok"


def test_11_context_overflow_told_in_band_before_content(gw, upstream):
    err = {"type": "error", "error": {"type": "invalid_request_error",
                                      "message": "prompt is too long: 300000 tokens > 200000 "
                                                 "maximum"}}
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message",
                                                  "role": "assistant", "model": "c",
                                                  "content": [], "usage": {"input_tokens": 1}}}
    up = upstream([Reply(chunks=[f"event: message_start\ndata: {json.dumps(start)}\n\n".encode(),
                                 f"event: error\ndata: {json.dumps(err)}\n\n".encode()],
                         content_type="text/event-stream")])
    g = gw([chan(up, type="anthropic")])
    with pytest.raises(openai.BadRequestError) as e:
        list(g.openai().chat.completions.create(model="c", stream=True, messages=[
            {"role": "user", "content": "x"}]))
    assert e.value.code == "context_length_exceeded" and "200000 tokens" in e.value.message


EMPTY = {
    "openai": (Reply(body=json.dumps({"id": "c", "object": "chat.completion", "created": 1,
                                      "model": "m", "choices": [{
                                          "index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": ""}}],
                                      "usage": {"prompt_tokens": 3,
                                                "completion_tokens": 0}}).encode()),
               Reply(chunks=openai_stream_chunks(pieces=("", " ")),
                     content_type="text/event-stream")),
    "anthropic": (Reply(body=json.dumps(dict(anthropic_message(), content=[])).encode()),
                  _anthropic_sse([{"type": "text", "text": ""}], "end_turn")),
    "gemini": (Reply(body=b'{"candidates":[{"content":{"role":"model","parts":[{"text":""}]},'
                          b'"finishReason":"STOP"}]}'),
               Reply(chunks=[b'data: {"candidates":[{"content":{"role":"model","parts":'
                             b'[{"text":""}]},"finishReason":"STOP"}]}\r\n\r\n'],
                     content_type="text/event-stream")),
}


def _ask(g, client, stream):
    """The answer text a client of ``client`` dialect gets for a one-line question."""
    if client == "openai":
        r = g.openai().chat.completions.create(model="m", stream=stream, messages=[
            {"role": "user", "content": "x"}])
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content or ""
    if client == "anthropic":
        kw = dict(model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        if stream:
            with g.anthropic().messages.stream(**kw) as s:
                return "".join(s.text_stream)
        return "".join(b.text for b in g.anthropic().messages.create(**kw).content)
    c = _genai(g)
    if stream:
        return "".join(ch.text or "" for ch in c.models.generate_content_stream(
            model="m", contents="x"))
    return c.models.generate_content(model="m", contents="x").text or ""


@pytest.mark.parametrize("ctype,client", [
    ("openai", "openai"), ("anthropic", "anthropic"), ("gemini", "genai"),     # passthrough
    ("openai", "anthropic"), ("anthropic", "openai"), ("gemini", "openai")])   # converted
@pytest.mark.parametrize("stream", [False, True])
def test_11_empty_answer_falls_back_to_the_next_channel(gw, upstream, ctype, client, stream):
    g, bad, good = _two_channels(gw, upstream, ctype, EMPTY[ctype][stream])
    assert _ask(g, client, stream) == "hello"
    assert len(bad.requests) == 1 and len(good.requests) == 1
    rec = g.records()[-1]
    assert rec["channel"] == "second" and "empty answer" in rec["failures"][0]["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_11_empty_answer_falls_back_on_responses_passthrough(gw, upstream, stream):
    bad = upstream([_responses_answer({"model": "gpt-5", "stream": stream, "input": []}, "",
                                      None)])
    good = upstream([_responses_answer({"model": "gpt-5", "stream": stream, "input": []},
                                       "hello", None)])
    g = gw([chan(bad, name="first", responses_api=True),
            chan(good, name="second", priority=1, responses_api=True)])
    c = g.openai()
    if stream:
        with c.responses.stream(model="gpt-5", input="x") as s:
            text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    else:
        text = c.responses.create(model="gpt-5", input="x").output_text
    assert text == "hello" and len(bad.requests) == 1
    rec = g.records()[-1]
    assert rec["channel"] == "second"
    assert (rec["input_tokens"], rec["output_tokens"]) == (21, 7)    # read in either form


def test_11_empty_answer_setting_off_and_explained_stops(gw, upstream):
    g, bad, good = _two_channels(gw, upstream, "openai", EMPTY["openai"][True],
                                 empty_answer_fallback=False)
    assert _ask(g, "openai", True) == " " and not good.requests
    cut = json.loads(EMPTY["openai"][False].body)
    cut["choices"][0]["finish_reason"] = "length"            # explained: max_tokens reached
    g, bad, good = _two_channels(gw, upstream, "openai", Reply(body=json.dumps(cut).encode()))
    assert _ask(g, "anthropic", False) == "" and not good.requests
    only = upstream([EMPTY["anthropic"][False]])
    g = gw([chan(only, type="anthropic")])
    with pytest.raises(anthropic.APIStatusError) as e:     # none left: a 5xx clients retry
        _ask(g, "anthropic", False)
    assert e.value.status_code == 502 and "empty answer" in e.value.message


def test_11_a_converted_burst_leaves_in_fewer_deltas_and_a_paced_stream_event_by_event(
        gw, upstream):
    """What one read of an upstream stream brings is converted as one text delta (the encoder
    runs once, not once per event); events that come apart stay apart: the client gets each as
    it came, before the upstream sends the next."""
    pieces = [f"w{i} " for i in range(40)]
    burst = upstream([Reply(chunks=[b"".join(openai_stream_chunks(pieces=pieces))],
                            content_type="text/event-stream")])
    g = gw([chan(burst)])
    ask = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}
    with g.anthropic().messages.stream(**ask) as s:
        deltas = [e.delta.text for e in s if e.type == "content_block_delta"]
        final = s.get_final_message()
    assert "".join(deltas) == "".join(pieces) == final.content[0].text
    assert len(deltas) <= 4                      # one read, or a few: never one per event
    got = [threading.Event() for _ in range(3)]
    events = openai_stream_chunks(pieces=("a", "b", "c"))

    def paced():
        yield events[0] + events[1]             # the role and "a"
        for i, event in enumerate(events[2:4]):
            got[i].wait(10)                     # the client has the one before
            yield event
        yield b"".join(events[4:])
    step = upstream([Reply(chunks=paced(), content_type="text/event-stream")])
    g2 = gw([chan(step)])
    seen = []
    with g2.anthropic().messages.stream(**ask) as s:
        for e in s:
            if e.type == "content_block_delta":
                seen.append(e.delta.text)
                got[len(seen) - 1].set()
    assert seen == ["a", "b", "c"]


@pytest.mark.parametrize("client", ["openai", "anthropic"])      # passed through, converted
@pytest.mark.parametrize("hold", [True, False])
def test_11_a_held_stream_leaves_with_its_head_in_one_write(gw, upstream, monkeypatch, client,
                                                            hold):
    # Held until content, the head and what was held go out in one write (one send, one wake-up
    # of the client, on the path of the first token); not held, the head leaves alone at once,
    # before any event came.
    writes: list[bytes] = []
    write = ag.write_and_drain

    async def recording(writer, data, timeout=None):
        writes.append(bytes(data))
        await write(writer, data, timeout)
    monkeypatch.setattr(ag, "write_and_drain", recording)
    up = upstream([openai_stream_reply(pieces=("Hel", "lo"))])
    g = gw([chan(up)], settings={"empty_answer_fallback": hold})
    assert _ask(g, client, True) == "Hello"
    head = next(w for w in writes if w.startswith(b"HTTP/1.1 200"))
    first = b'"content": "Hel"' if client == "openai" else b"event: message_start"
    assert (first in head) is hold, head
    assert head.index(b"\r\n\r\n") < head.find(first) if hold else head.endswith(b"\r\n\r\n")


def test_11_empty_answer_hold_is_bounded(gw, upstream, monkeypatch):
    monkeypatch.setattr(ag, "EMPTY_HOLD_BYTES", 200)
    blank = Reply(chunks=openai_stream_chunks(pieces=("",) * 10),
                  content_type="text/event-stream")
    g, bad, good = _two_channels(gw, upstream, "openai", blank)
    assert _ask(g, "anthropic", True) == ""       # released past 200 bytes, not tried again
    assert not good.requests
    monkeypatch.setattr(ag, "EMPTY_HOLD_BYTES", 1 << 20)
    g, bad, good = _two_channels(gw, upstream, "openai", blank)
    assert _ask(g, "anthropic", True) == "hello"


def _health(g, name):
    status, _, body = g.request("GET", "/health?details=1")
    assert status == 200
    return next(c for c in json.loads(body)["channels"] if c["name"] == name)


class FakeClock:
    """A monotonic clock the test moves: ``Gateway.clock`` for cooldowns, rest and limits."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_11_failing_channel_cools_down_then_a_probe_restores_it(gw, upstream):
    bad = upstream([Reply(500, b'{"error":{"message":"boom"}}')])
    good = upstream([openai_chat_reply(text="backup")])
    g = gw([chan(bad, name="bad"), chan(good, name="good", priority=1)])
    g.gateway.clock = clock = FakeClock()
    c = g.openai()
    for _ in range(3):
        c.chat.completions.create(model="m", messages=[])
    assert len(bad.requests) == 3 and _health(g, "bad")["state"] == "cooldown"
    for _ in range(3):                                   # skipped while cooling down
        c.chat.completions.create(model="m", messages=[])
    assert len(bad.requests) == 3
    assert g.records(6)[-1]["tried"] == ["good"] and g.records(6)[-1]["skipped"] == ["bad"]
    clock.now += ag.COOLDOWN_SECONDS - 0.01                # not yet over: still skipped
    c.chat.completions.create(model="m", messages=[])
    assert len(bad.requests) == 3
    clock.now += 0.02                                   # the cooldown has run out
    bad.replies = [openai_chat_reply(text="healed")]
    assert c.chat.completions.create(model="m", messages=[]).choices[0].message.content == \
        "healed"                                        # the half-open probe
    assert _health(g, "bad")["state"] == "ok" and _health(g, "bad")["consecutive_failures"] == 0
    status, _, body = g.request("GET", "/health?details=1", headers={"Authorization": None})
    assert status == 401                                # details need a token
    assert "channels" not in json.loads(g.request("GET", "/health")[2])


def test_11_rate_limited_channel_honours_retry_after(gw, upstream):
    busy = upstream([Reply(429, b'{"error":{"message":"slow"}}', headers={"Retry-After": "120"})])
    good = upstream()
    g = gw([chan(busy, name="busy"), chan(good, name="good", priority=1)])
    g.openai().chat.completions.create(model="m", messages=[])
    h = _health(g, "busy")
    assert h["state"] == "cooldown" and 100 < h["cooldown_remaining_s"] <= 120


def test_11_several_keys_used_in_turn_and_a_refused_key_rests(gw, upstream):
    up = upstream()
    up.responder = lambda rec: Reply(401, b'{"error":{"message":"bad key"}}') \
        if rec["headers"]["authorization"] == "Bearer k-bad" else openai_chat_reply()
    g = gw([chan(up, name="multi", api_key="k-one", api_keys=["k-two", "k-bad"])])
    c = g.openai()
    for _ in range(6):
        c.chat.completions.create(model="m", messages=[])
    used = [r["headers"]["authorization"] for r in up.requests]
    assert used.count("Bearer k-bad") == 1                 # tried once, then it rests
    assert {"Bearer k-one", "Bearer k-two"} <= set(used)
    assert all(r["status"] == 200 for r in g.records(6))
    h = _health(g, "multi")
    assert h["keys"] == 3 and h["keys_resting"] == 1 and h["state"] == "ok"
    assert "k-bad" not in json.dumps(g.events())


def test_11_concurrency_limit_queue_and_rpm(gw, upstream):
    release = threading.Event()             # the running request answers once 2 are refused
    up = upstream([Reply(body=openai_chat_reply().body, gate=release)])
    g = gw([chan(up, name="one", max_concurrency=1)],
           tokens=[{"name": "main", "key": TOKEN}, {"name": "metered", "key": TOKEN2, "rpm": 2}])
    statuses: queue.Queue = queue.Queue()

    def call():
        status, _, body = g.request("POST", "/v1/chat/completions",
                                    {"model": "m", "messages": []})
        statuses.put(status)
    threads = [threading.Thread(target=call) for _ in range(7)]
    for t in threads:
        t.start()
    refused = [statuses.get(timeout=10) for _ in range(2)]   # while the first one is held
    release.set()
    for t in threads:
        t.join(20)
    results = refused + [statuses.get_nowait() for _ in range(5)]
    assert refused == [429, 429]
    assert results.count(200) == 5 and results.count(429) == 2   # 1 running + 4 queued
    c = g.openai(api_key=TOKEN2)
    c.chat.completions.create(model="m", messages=[])
    c.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.RateLimitError, match="2 requests per minute") as e:
        c.chat.completions.create(model="m", messages=[])
    assert int(e.value.response.headers["retry-after"]) > 0


# =================================================================================================
# 12. Server thread bridge
# =================================================================================================

def test_12_apply_config_takes_effect_without_restart(gw, upstream):
    a, b = upstream([openai_chat_reply(text="A")]), upstream([openai_chat_reply(text="B")])
    g = gw([chan(a, name="a")])
    assert g.openai().chat.completions.create(model="m", messages=[]).choices[0] \
        .message.content == "A"
    g.store.update_channel(1, base_url=b.url)
    g.thread.apply_config()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if g.openai().chat.completions.create(model="m", messages=[]).choices[0] \
                .message.content == "B":
            break
    else:
        pytest.fail("new base_url never took effect")
    events = g.events()
    assert ("state", "running") in events
    assert any(k == "request" for k, _ in events)


# -- hot reload of config.json --------------------------------------------------------------

def _wait_event(thread, pred, timeout):
    """The first bridge event that ``pred`` accepts within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            event = thread.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("the expected event never came") from None
        if pred(event):
            return event


def test_12_hand_edit_is_served_within_two_seconds_and_a_bad_one_keeps_the_last_good(
        gw, upstream):
    a, b = upstream([openai_chat_reply(text="A")]), upstream([openai_chat_reply(text="B")])
    g = gw([chan(a, name="a", models=["m-a"])])
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)   # kept alive across

    def ask(model):
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "x"}]}),
            {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    def health():
        return json.loads(g.request("GET", "/health?details=1")[2])

    assert ask("m-a")[0] == 200 and ask("m-b")[0] == 404
    started = time.monotonic()
    _hand_edit(g.store.path, lambda c: c["channels"].append(chan(b, name="b", models=["m-b"])))
    _wait_event(g.thread, lambda e: e[0] == "log" and "reloaded" in e[1], 2.0)
    status, body = ask("m-b")                         # same connection: nothing was dropped
    assert time.monotonic() - started < 2.0
    assert status == 200 and body["choices"][0]["message"]["content"] == "B"
    assert [c["name"] for c in g.store.data["channels"]] == ["a", "b"]
    assert "config_error" not in health()

    with open(g.store.path, "w") as f:
        f.write('{"channels": [}')
    _, text = _wait_event(g.thread, lambda e: e[0] == "log" and "not reloaded" in e[1], 2.0)
    assert "line 1 column 15" in text and "last good configuration" in text
    assert ask("m-b")[0] == 200 and ask("m-a")[0] == 200           # the last good config
    assert "line 1 column 15" in health()["config_error"]
    assert "config_error" not in json.loads(g.request("GET", "/health")[2])   # details only

    with open(g.store.path, "w") as f:
        json.dump({"settings": {"port": 0}, "channels": [chan(b, name="b", models=["m-a"])],
                   "tokens": [{"name": "main", "key": TOKEN}]}, f)
    _wait_event(g.thread, lambda e: e[0] == "log" and "reloaded" in e[1], 2.0)
    assert "config_error" not in health()
    assert ask("m-a")[1]["choices"][0]["message"]["content"] == "B"
    assert ask("m-b")[0] == 404
    conn.close()


def test_12_a_stream_in_flight_finishes_on_the_config_it_started_with(gw, upstream):
    reloaded = threading.Event()

    def held():                                       # the rest waits for the reload
        chunks = openai_stream_chunks(pieces=tuple("abcdefgh"))
        yield from chunks[:2]                         # the role, then "a": the answer began
        reloaded.wait(10)
        yield from chunks[2:]
    up = upstream([Reply(chunks=held(), content_type="text/event-stream")])
    g = gw([chan(up, name="a", models=["m"])])
    stream = g.openai().chat.completions.create(model="m", messages=[], stream=True)
    pieces = iter(stream)
    first = next(pieces)
    _hand_edit(g.store.path, lambda c: c.update(channels=[]))       # its channel is gone
    g.thread.reload()                                 # (no need to wait for the poll)
    _wait_event(g.thread, lambda e: e[0] == "config", 2.0)
    assert not g.gateway.records                      # reloaded while the stream still runs
    reloaded.set()
    text = "".join(ch.choices[0].delta.content or "" for ch in [first, *pieces] if ch.choices)
    assert text == "abcdefgh"                                        # nothing was cut off
    assert g.request("POST", "/v1/chat/completions", {"model": "m", "messages": []})[0] == 404


def test_12_reload_now_reads_the_file_without_waiting_for_the_poll(gw, upstream, monkeypatch):
    monkeypatch.setattr(ag, "CONFIG_POLL_SECONDS", 3600.0)     # only reload() can see the edit
    b = upstream([openai_chat_reply(text="B")])
    g = gw()
    _hand_edit(g.store.path, lambda c: c["channels"].append(chan(b, name="b", models=["m-b"])))
    g.thread.reload()                                # what the window does on SIGHUP
    _wait_event(g.thread, lambda e: e[0] == "config", 5.0)
    assert g.openai().chat.completions.create(model="m-b", messages=[]).choices[0] \
        .message.content == "B"


def test_12_bind_error_is_raised_to_the_caller(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"settings": {"port": busy.getsockname()[1]}}))
    store, _ = ag.ConfigStore.load(str(path))
    t = ag.GatewayThread(store)
    with pytest.raises(OSError):
        t.start()
    assert not t.running
    busy.close()


def _tasks(g) -> int:
    async def count():
        return len(asyncio.all_tasks())
    return g.thread.submit(count()).result(5)


def test_12_disconnecting_clients_free_everything(gw, upstream):
    """Hundreds of clients leave mid-stream and mid-request: upstream requests are cancelled,
    and sockets and tasks go back to where they were."""
    slow = upstream([Reply(chunks=openai_stream_chunks(pieces=("x",) * 50), delay=0.2,
                           content_type="text/event-stream")])
    hang = upstream([Reply(hang=3)])
    g = gw([chan(slow, name="slow", models=["slow"]), chan(hang, name="hang", models=["hang"])])
    g.request("GET", "/health")
    base_socks, base_tasks = _open_sockets(), _tasks(g)
    body = {"model": "slow", "stream": True, "messages": []}
    for round_ in range(4):
        socks = []
        for i in range(50):
            model = "hang" if i % 5 == 0 else "slow"
            data = json.dumps(dict(body, model=model)).encode()
            s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
                      b"Bearer " + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" %
                      len(data) + data)
            socks.append((model, s))
        for model, s in socks:
            if model == "slow":
                assert s.recv(20).startswith(b"HTTP/1.1 200")     # the stream has started
            s.close()
    deadline = time.monotonic() + 15          # the fakes' threads notice within their delays
    while time.monotonic() < deadline and (g.thread.server.connection_count() or _tasks(g) >
                                           base_tasks or _open_sockets() > base_socks + 2):
        time.sleep(0.05)
    assert g.thread.server.connection_count() == 0
    assert _tasks(g) <= base_tasks
    assert g.gateway.client.idle_count() <= 2                 # no half-read upstream kept
    assert _open_sockets() <= base_socks + 2
    recs = g.records(200)
    assert len(recs) == 200 and all(r["error"] == "client disconnected" for r in recs)


# =================================================================================================
# 13. Tk GUI: the real window under Xvfb (started here when DISPLAY is unset)
# =================================================================================================

def test_13_pieces_without_a_display():
    rec = {"id": 1, "time": 0, "method": "POST", "route": "/v1/messages", "model": "m",
           "channel": "b", "tried": ["a", "b"], "status": 200, "latency_ms": 12.4,
           "ttfb_ms": 3.0, "stream": True, "token": "laptop", "bytes_in": 10, "bytes_out": 20,
           "input_tokens": 5, "output_tokens": 7, "error": None,
           "failures": [{"channel": "a", "status": 429, "error": "slow down"}]}
    row = ag.format_record(rec)
    assert row[1:] == ("/v1/messages", "m", "b", "200", "12 ms", "5/7")
    detail = ag.record_detail(rec)
    assert "tried: a, b" in detail and "a: 429 slow down" in detail and "laptop" in detail
    assert ag.parse_mapping("claude-x = gpt-4o\n, fast=gpt-4o-mini") == {
        "claude-x": "gpt-4o", "fast": "gpt-4o-mini"}
    with pytest.raises(ValueError, match="client name = upstream name"):
        ag.parse_mapping("oops")
    good = {"host": "127.0.0.1", "port": "3001", "proxy": "", "max_body_mb": "8",
            "cors_origins": "http://a, http://b", "log_file": "r.jsonl"}
    assert ag.validate_settings_form(good)["cors_origins"] == ["http://a", "http://b"]
    for key, value, needle in (("port", "70000", "Port"), ("port", "x", "Port"),
                               ("host", " ", "Host"), ("proxy", "ftp://x", "Proxy"),
                               ("max_body_mb", "-1", "Max body")):
        with pytest.raises(ValueError, match=needle):
            ag.validate_settings_form(dict(good, **{key: value}))


def pump_until(app, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.root.update()
        app.pump()
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("the GUI never reached the expected state")


def test_13_without_xvfb_gui_tests_skip_with_a_reason_but_fail_in_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))                  # no Xvfb on it
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"needs a DISPLAY or Xvfb \(apt-get"):
        _need_xvfb()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Xvfb is missing"):
        _need_xvfb()
    fake = tmp_path / "Xvfb"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert _need_xvfb() is None                           # with Xvfb they simply run


def test_13_window_title_icon_and_tabs(app):
    a = app()
    assert "AI Gateway" in a.root.title()
    assert [a.notebook.tab(i, "text") for i in range(6)] == [
        "Dashboard", "Channels", "Tokens", "Usage", "Settings", "Logs"]
    assert a._icon.width() == 32
    assert a.dashboard.state.cget("text") == "● Stopped"


def test_13_add_channel_through_the_dialog(app):
    a = app()
    a.channels.add()
    d = a.channels.dialog
    d.vars["type"].set("anthropic")
    d._type_changed()
    assert d.vars["base_url"].get() == "https://api.anthropic.com"     # filled by the type
    d.vars["name"].set("claude")
    d.vars["api_key"].set("sk-ant-secret-value")
    assert d.key_entry.cget("show") == "•"                             # masked
    d.vars["models"].set("claude-*, opus")
    d.vars["api_keys"].set("sk-ant-second, sk-ant-third")
    assert d.more_keys.cget("show") == "•"
    d.vars["max_concurrency"].set("4")
    d.mapping.insert("1.0", "sonnet = claude-sonnet-4-5")
    d.vars["priority"].set("oops")
    d.save()
    assert "whole numbers" in d.error.cget("text") and not a.store.data["channels"]
    d.vars["priority"].set("3")
    d.save()
    saved = json.loads(open(a.store.path).read())["channels"]
    assert saved[0]["name"] == "claude" and saved[0]["models"] == ["claude-*", "opus"]
    assert saved[0]["model_mapping"] == {"sonnet": "claude-sonnet-4-5"}
    assert saved[0]["priority"] == 3 and saved[0]["type"] == "anthropic"
    assert saved[0]["api_keys"] == ["sk-ant-second", "sk-ant-third"]
    assert saved[0]["max_concurrency"] == 4
    assert "sk-ant-second" not in " ".join(map(str, a.channels.tree.item("1")["values"]))
    assert a.channels.tree.item("1")["values"][0] == "claude"
    a.channels.tree.selection_set("1")
    a.channels.duplicate()
    a.channels.tree.selection_set("1")
    a.channels.toggle()
    assert [c["name"] for c in a.store.data["channels"]] == ["claude", "claude (2)"]
    assert a.store.data["channels"][0]["enabled"] is False
    a.channels.tree.selection_set("2")
    a.channels.delete()
    assert [c["id"] for c in a.store.data["channels"]] == [1]


# Issue 12: the channel dialog's Claude thinking field
def test_13_channel_dialog_thinking_field(app):
    a = app()
    a.channels.add()
    d = a.channels.dialog
    box = next(w for w in d.top.winfo_children()[0].winfo_children()
               if w.winfo_class() == "TCombobox" and w.cget("values")
               and "adaptive" in str(w.cget("values")))
    assert box.get() == "auto"
    d.vars["name"].set("relay")
    box.set("adaptive")
    d.save()
    assert json.loads(open(a.store.path).read())["channels"][0]["thinking"] == "adaptive"


# Issue 14: the channel dialog's Preset drop-down
def test_13_channel_dialog_preset_fills_the_fields(app):
    a = app()
    a.channels.add()
    d = a.channels.dialog
    assert "" in d.preset_box.cget("values") and "mistral" in d.preset_box.cget("values")
    d.preset_box.set("mistral")
    d.preset_box.event_generate("<<ComboboxSelected>>")
    a.root.update()
    texts = _entry_texts(d.top)
    assert "mistral" in texts and "https://api.mistral.ai/v1" in texts
    assert json.loads(d.vars["quirks"].get())["tool_call_id"] == "mistral9"
    assert any(t.startswith('{"tool_call_id": "mistral9"') for t in texts)
    assert d.type_box.get() == "custom" and "Mistral" in d.preset_note.cget("text")
    d.preset_box.set("deepseek-anthropic")
    d.preset_box.event_generate("<<ComboboxSelected>>")
    a.root.update()
    assert d.type_box.get() == "anthropic"
    assert "https://api.deepseek.com/anthropic" in _entry_texts(d.top)
    d.vars["base_url"].set("http://127.0.0.1:9")                  # still the user's to edit
    d.vars["quirks"].set("[1]")
    d.save()
    assert "Quirks is a JSON object" in d.error.cget("text") and not a.store.data["channels"]
    d.vars["quirks"].set('{"drop_headers": ["x-extra"]}')
    d.save()
    saved = json.loads(open(a.store.path).read())["channels"][0]
    assert saved["preset"] == "deepseek-anthropic" and saved["type"] == "anthropic"
    assert saved["base_url"] == "http://127.0.0.1:9" and saved["name"] == "mistral"
    assert saved["quirks"]["drop_headers"] == ["x-extra"]           # the user's over the preset
    assert saved["quirks"]["cache_control"] == "strip"


def test_13_create_token_shows_the_key_once(app, upstream):
    a = app([chan(upstream(), name="oa", models=["gpt-4o"])])
    a.tokens.create()
    d = a.tokens.dialog
    d.name.set("ci-bot")
    d.models.selection_set(0)
    d.channels.selection_set(0)
    d.rpm.set("30")
    d.save()
    tok = a.store.data["tokens"][-1]
    assert tok["name"] == "ci-bot" and tok["key"].startswith("sk-gw-")
    assert tok["allowed_models"] == ["gpt-4o"] and tok["allowed_channels"] == ["oa"]
    assert tok["rpm"] == 30
    assert a.tokens.shown_key == tok["key"]
    pump_until(a, lambda: a.tokens.key_window.winfo_ismapped())
    assert _entry_texts(a.tokens.key_window) == [tok["key"]]              # what the box shows
    row = a.tokens.tree.item(str(tok["id"]))["values"]
    assert tok["key"] not in " ".join(map(str, row)) and row[1] == ag.mask_secret(tok["key"])
    a.tokens.tree.selection_set(str(tok["id"]))
    a.tokens.toggle()
    assert a.store.data["tokens"][-1]["enabled"] is False
    a.tokens.tree.selection_set(str(tok["id"]))
    a.tokens.edit()
    _hand_edit(a.store.path, lambda c: c["tokens"][-1].update(rpm=99))   # while it is open
    a.tokens.dialog.name.set("ci-bot-2")
    a.tokens.dialog.save()
    saved = json.loads(open(a.store.path).read())["tokens"][-1]
    assert (saved["name"], saved["rpm"], saved["enabled"]) == ("ci-bot-2", 99, False)


# -- what a new user sees in the first minutes ---------------------------------------------

def _widgets(w):
    yield w
    for child in w.winfo_children():
        yield from _widgets(child)


def _entry_texts(top):
    return [w.get() for w in _widgets(top) if w.winfo_class() == "TEntry"]


def _column_fits(tree, font_style):
    """Each heading fits its column as Tk measures the heading font, and so does each cell
    (up to the column cap) in the cell font."""
    head = ag.tkfont.Font(root=tree, font=ag.ttk.Style(tree).lookup("Treeview.Heading", "font"))
    cell = ag.tkfont.Font(root=tree, font=ag.ttk.Style(tree).lookup(font_style, "font"))
    for i, key in enumerate(tree["columns"]):
        width = tree.column(key, "width")
        assert width >= head.measure(tree.heading(key, "text")) + 12, key
        for item in tree.get_children():
            text = str(tree.item(item, "values")[i])
            assert width >= min(cell.measure(text) + 12, ag.GUI_COLUMN_MAX), (key, text)


def test_13_first_run_shows_the_new_key_in_a_centred_dialog(display, tmp_path):
    store, key = ag.ConfigStore.load(str(tmp_path / "config.json"))
    a = ag.App(store, host="127.0.0.1", start=False, new_key=key)
    try:
        top = a.tokens.key_window
        pump_until(a, lambda: top.winfo_ismapped())
        assert _entry_texts(top) == [key]
        a.root.clipboard_clear()
        next(w for w in _widgets(top) if w.winfo_class() == "TButton" and
             w.cget("text") == "Copy").invoke()
        assert a.root.clipboard_get() == key
        mid = (top.winfo_rootx() + top.winfo_width() / 2, top.winfo_rooty() +
               top.winfo_height() / 2)
        root_mid = (a.root.winfo_rootx() + a.root.winfo_width() / 2,
                    a.root.winfo_rooty() + a.root.winfo_height() / 2)
        assert abs(mid[0] - root_mid[0]) <= 2 and abs(mid[1] - root_mid[1]) <= 2
    finally:
        a.close()


def test_13_columns_fit_their_text_and_details_show_it_whole(app):
    a = app()
    a.notebook.select(a.channels.frame)
    pump_until(a, lambda: a.channels.hint.winfo_ismapped())
    assert a.channels.hint.cget("text").startswith("No channels yet. Click Add")
    a.dashboard.set_health([{"name": "a-rather-long-channel-name", "state": "cooldown",
                             "cooldown_remaining_s": 30}])
    a.dashboard.add_record({"id": 1, "time": time.time(), "method": "POST", "route": "/v1/x",
                            "model": "m", "channel": "a-rather-long-channel-name",
                            "status": 200, "latency_ms": 5.0, "ttfb_ms": None,
                            "failures": []})
    a.root.update()
    _column_fits(a.dashboard.health, "Treeview")
    error = "cannot connect to 127.0.0.1:9: connection refused " + "and more words " * 20
    a.store.add_channel(name="dead", base_url="http://127.0.0.1:9")
    a.channels.results[1] = f"✗ {error}"
    a.config_changed("added")
    a.root.update()
    assert not a.channels.hint.winfo_ismapped()
    _column_fits(a.channels.tree, "Treeview")
    a.channels.tree.selection_set("1")
    a.root.update()
    assert a.channels.detail.cget("text") == f"Last result of 'dead': ✗ {error}"
    rec = {"id": 2, "time": time.time(), "method": "POST", "route": "/v1/chat/completions",
           "model": "m", "channel": None, "tried": [], "status": 401, "latency_ms": 1.2,
           "ttfb_ms": None, "stream": False, "token": None, "bytes_in": 2, "bytes_out": 90,
           "input_tokens": None, "output_tokens": None, "error": "no token", "failures": []}
    a.logs.add_record(rec)
    a.logs.tree.selection_set("2")
    a.root.update()
    _column_fits(a.logs.tree, "Treeview")
    detail = a.logs.detail.get("1.0", "end")
    assert "first byte: —" in detail and "None" not in detail and "latency: 1 ms" in detail


def _luminance(widget, color):
    r, g, b = (v / 65535 for v in widget.winfo_rgb(color))
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_13_dark_theme_combobox_is_readable(app):
    a = app(settings={"theme": "dark"})
    a.notebook.select(a.settings.frame)
    a.root.update()
    box = next(w for w in _widgets(a.settings.frame) if w.winfo_class() == "TCombobox")
    assert box.get() == "dark" and "readonly" in box.state()
    style = ag.ttk.Style(box)
    fg = style.lookup("TCombobox", "foreground", box.state())
    bg = style.lookup("TCombobox", "fieldbackground", box.state())
    light, dark = sorted((_luminance(box, fg), _luminance(box, bg)), reverse=True)
    assert (light + 0.05) / (dark + 0.05) >= 4.5          # WCAG AA contrast for text
    assert _luminance(box, bg) < 0.1                      # a dark field in the dark theme


def test_13_dashboard_shows_the_gemini_base_url(app):
    a = app(start=True)
    pump_until(a, lambda: a.bridge.running and a.dashboard.url_vars["gemini"].get())
    shown = {}
    for label in _widgets(a.dashboard.frame):
        if label.winfo_class() == "TLabel" and "base URL" in str(label.cget("text")):
            row = label.grid_info()["row"]
            shown[label.cget("text")] = label.master.grid_slaves(row=row, column=1)[0].get()
    assert shown == {"OpenAI base URL": a.bridge.url + "/v1",
                     "Anthropic base URL / Claude Code": a.bridge.url,
                     "Gemini base URL / gemini-cli": a.bridge.url}


def test_13_channel_dialog_edits_headers_and_responses_api(app):
    a = app()
    a.channels.add()
    d = a.channels.dialog
    pump_until(a, lambda: d.top.winfo_ismapped())
    top, root = d.top, a.root
    assert abs(top.winfo_rootx() + top.winfo_width() / 2 -
               (root.winfo_rootx() + root.winfo_width() / 2)) <= 2
    d.vars["name"].set("router")
    d.headers.insert("1.0", "HTTP-Referer: https://example.com\nBad Name: x")
    d.save()
    assert "'Bad Name' is not a header name" in d.error.cget("text")
    d.headers.delete("1.0", "end")
    d.headers.insert("1.0", '{"X-Title": 5}')
    d.save()
    assert "JSON object of strings" in d.error.cget("text") and not a.store.data["channels"]
    d.headers.delete("1.0", "end")
    d.headers.insert("1.0", "HTTP-Referer: https://example.com\nX-Title: aigateway")
    next(w for w in _widgets(top) if w.winfo_class() == "TCheckbutton" and
         "responses" in w.cget("text")).invoke()
    d.save()
    saved = json.loads(open(a.store.path).read())["channels"][0]
    assert saved["headers"] == {"HTTP-Referer": "https://example.com", "X-Title": "aigateway"}
    assert saved["responses_api"] is True
    a.channels.tree.selection_set("1")
    a.channels.edit()
    d2 = a.channels.dialog
    assert d2.headers.get("1.0", "end").strip() == \
        "HTTP-Referer: https://example.com\nX-Title: aigateway"
    assert d2.vars["responses_api"].get() is True
    d2.headers.delete("1.0", "end")
    d2.headers.insert("1.0", '{"X-Title": "json form"}')
    _hand_edit(a.store.path, lambda c: c["channels"][0].update(priority=7))  # while it is open
    d2.save()
    assert a.store.data["channels"][0]["headers"] == {"X-Title": "json form"}
    assert json.loads(open(a.store.path).read())["channels"][0]["priority"] == 7


def test_13_the_window_follows_edits_of_the_file_and_keeps_both_sides(app, upstream,
                                                                      monkeypatch):
    monkeypatch.setattr(ag, "CONFIG_POLL_SECONDS", 0.1)       # four edits to follow, in order
    monkeypatch.setattr(ag, "CONFIG_SETTLE_SECONDS", 0.05)    # (still shorter than the poll)
    a = app([chan(upstream(), name="one")], start=True)
    pump_until(a, lambda: a.bridge.running)
    _hand_edit(a.store.path, lambda c: (c["channels"].append(chan(upstream(), name="two")),
                                        c["settings"].update(log_file="hand.jsonl")))
    pump_until(a, lambda: len(a.channels.tree.get_children()) == 2)
    assert [a.channels.tree.item(i, "values")[0] for i in a.channels.tree.get_children()] == \
        ["one", "two"]
    assert a.settings.vars["log_file"].get() == "hand.jsonl"
    a.bridge.stop()                                  # no watcher now: the save must merge
    _hand_edit(a.store.path, lambda c: c["settings"].update(proxy="http://127.0.0.1:1"))
    a.settings.vars["max_body_mb"].set("9")
    a.settings.vars["port"].set(str(dead_port()))          # the form takes no port 0
    a.settings.save()
    saved = json.loads(open(a.store.path).read())["settings"]
    assert saved["max_body_mb"] == 9 and saved["proxy"] == "http://127.0.0.1:1"
    assert saved["log_file"] == "hand.jsonl"
    assert a.settings.vars["proxy"].get() == "http://127.0.0.1:1"
    _hand_edit(a.store.path, lambda c: c["channels"].pop())      # still stopped: followed too
    pump_until(a, lambda: len(a.channels.tree.get_children()) == 1)
    with open(a.store.path, "w") as f:
        f.write("{")
    pump_until(a, lambda: "configuration not reloaded" in a.dashboard.activity.get("1.0", "end"))
    assert len(a.channels.tree.get_children()) == 1


def test_13_start_request_shows_in_logs_and_counters_then_stop(app, upstream):
    up = upstream([Reply(500, b'{"error":{"message":"down"}}'), openai_chat_reply(usage=(7, 3))])
    a = app([chan(up, name="bad"), chan(up, name="good", priority=1)])
    a.dashboard.start_button.invoke()
    pump_until(a, lambda: a.bridge.running and "Running" in a.dashboard.state.cget("text"))
    url = a.dashboard.url_vars["openai"].get()
    assert url.endswith("/v1")
    client = openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0, timeout=10,
                           http_client=openai.DefaultHttpxClient(verify=sdk_tls()))
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    pump_until(a, lambda: len(a.logs.tree.get_children()) == 1)
    assert a.dashboard.counters["requests"].get() == "1"
    assert a.dashboard.counters["tokens_in"].get() == "7"
    row = a.logs.tree.item(a.logs.tree.get_children()[0])["values"]
    assert row[3] == "good" and str(row[4]) == "200"
    a.logs.tree.selection_set(a.logs.tree.get_children()[0])
    a.logs.show_detail()
    detail = a.logs.detail.get("1.0", "end")
    assert "bad: 500 down" in detail and TOKEN not in detail
    health = {a.dashboard.health.item(i)["values"][0]: a.dashboard.health.item(i)["values"]
              for i in a.dashboard.health.get_children()}
    assert health["bad"][4] == 1 and str(health["good"][2]) == "200"
    a.logs.filter.set("nothing-matches")
    assert not a.logs.tree.get_children()
    a.logs.filter.set("")
    assert len(a.logs.tree.get_children()) == 1
    a.dashboard.set_health([{"name": "bad", "state": "cooldown", "cooldown_remaining_s": 12}])
    states = {a.dashboard.health.item(i)["values"][0]: a.dashboard.health.item(i)["values"][1]
              for i in a.dashboard.health.get_children()}
    assert states == {"bad": "cooldown 12 s", "good": "ok"}
    a.dashboard.stop_button.invoke()
    assert not a.bridge.running and "Stopped" in a.dashboard.state.cget("text")


# -- issue 13: captured bodies in the Logs tab, a channel's weight in its dialog ------------------

def test_13_logs_tab_shows_the_captured_bodies_masked(app, upstream):
    up = upstream([openai_chat_reply(text="captured answer")])
    a = app([chan(up, name="one")], settings={"debug_capture": 5})
    a.dashboard.start_button.invoke()
    pump_until(a, lambda: a.bridge.running and "Running" in a.dashboard.state.cget("text"))
    client = openai.OpenAI(base_url=a.dashboard.url_vars["openai"].get(), api_key=TOKEN,
                           max_retries=0, timeout=10)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "show me"}])
    pump_until(a, lambda: len(a.logs.tree.get_children()) == 1)
    a.logs.tree.selection_set(a.logs.tree.get_children()[0])
    a.logs.show_detail()
    shown = a.logs.bodies.get("1.0", "end")
    assert "── client request: POST /v1/chat/completions" in shown
    assert "── upstream answer 1: 200" in shown
    assert "show me" in shown and "captured answer" in shown
    assert f"Bearer {ag.mask_secret(TOKEN)}" in shown
    assert TOKEN not in shown and "sk-upstream-secret" not in shown
    a.logs.clear()
    assert a.logs.bodies.get("1.0", "end").strip() == ""


def test_13_channel_dialog_weight_field(app):
    a = app()
    a.channels.add()
    d = a.channels.dialog
    assert d.vars["weight"].get() == "1"
    d.vars["name"].set("weighted")
    d.vars["weight"].set("heavy")
    d.save()
    assert d.error.cget("text") == "Weight is a positive number, such as 1 or 3"
    d.vars["weight"].set("0")
    d.save()
    assert "weight: 0 is not a positive number" in d.error.cget("text")
    d.vars["weight"].set("2.5")
    d.save()
    assert json.loads(open(a.store.path).read())["channels"][0]["weight"] == 2.5


# -- the channel dialog's rows for Bedrock and Vertex (issue 14) ---------------------------------

def _type_rows(dialog):
    """(label, entry text, masked?) of each row the dialog shows for the chosen type."""
    frame = dialog.type_frame
    frame.update_idletasks()
    rows = {}
    for w in frame.winfo_children():
        info = w.grid_info()
        rows.setdefault(int(info["row"]), {})[int(info["column"])] = w
    return [(r[0].cget("text"), r[1].get(), r[1].cget("show") == "•")
            for _, r in sorted(rows.items())]


def result_of(dialog):
    """Whether Save closed the dialog with a saved channel (else its error line shows why)."""
    closed = not dialog.top.winfo_exists()
    return closed and dialog.result is not None


def test_13_channel_dialog_shows_the_fields_of_bedrock_and_vertex(app):
    a = app()
    a.channels.add()
    d = a.channels.dialog
    assert _type_rows(d) == []                           # an OpenAI channel has none
    d.vars["name"].set("aws")
    d.type_box.set("bedrock")
    d.type_box.event_generate("<<ComboboxSelected>>")
    assert [r[0] for r in _type_rows(d)] == ["AWS region", "Access key ID",
                                             "Secret access key", "Session token"]
    assert [r[2] for r in _type_rows(d)] == [False, False, True, True]
    d.save()
    assert "region: '' is not an AWS region" in d.error.cget("text")
    d.type_vars["region"].set("eu-west-3")
    d.type_vars["aws_access_key_id"].set("AKIDEXAMPLE")
    d.type_vars["aws_secret_access_key"].set("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    d.vars["show_key"].set(True)
    d._toggle_keys()
    assert _type_rows(d)[2] == ("Secret access key", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                False)
    d.save()
    assert result_of(d)
    saved = json.loads(open(a.store.path).read())["channels"][0]
    assert (saved["type"], saved["region"], saved["aws_access_key_id"], saved["base_url"]) == (
        "bedrock", "eu-west-3", "AKIDEXAMPLE", "")
    a.channels.add()
    d = a.channels.dialog
    d.vars["name"].set("gcp")
    d.type_box.set("vertex")
    d.type_box.event_generate("<<ComboboxSelected>>")
    assert _type_rows(d) == [("Project", "", False), ("Location", "global", False),
                             ("Service account", "", True)]
    d.type_vars["service_account"].set('{"type": "service_account"')
    d.save()
    assert d.error.cget("text") == "Service account is a file path or a JSON object"
    d.type_vars["service_account"].set("")
    d.vars["api_key"].set("AIza-express-key")
    d.save()
    assert result_of(d)
    saved = json.loads(open(a.store.path).read())["channels"][1]
    assert (saved["type"], saved["location"], saved["api_key"]) == (
        "vertex", "global", "AIza-express-key")


# -- control characters a client sent, as the window shows them ----------------------------------

def test_13_control_characters_in_a_model_name_show_escaped(app, upstream):
    up = upstream([Reply(500, b'{"error":{"message":"down"}}'), openai_chat_reply()])
    a = app([chan(up, name="bad"), chan(up, name="good", priority=1)])
    a.dashboard.start_button.invoke()
    pump_until(a, lambda: a.bridge.running)
    model = "m\nFORGED LINE\r\x1b[2J\u2028x"
    conn = http.client.HTTPConnection("127.0.0.1", a.bridge.server.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": model, "messages": []}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert conn.getresponse().status == 200
    conn.close()
    pump_until(a, lambda: len(a.logs.tree.get_children()) == 1)
    row = a.logs.tree.item(a.logs.tree.get_children()[0])["values"]
    assert row[2] == "m\\nFORGED LINE\\r\\x1b[2J\\u2028x"
    a.logs.tree.selection_set(a.logs.tree.get_children()[0])
    a.logs.show_detail()
    detail = a.logs.detail.get("1.0", "end")
    activity = a.dashboard.activity.get("1.0", "end")
    assert "model=m\\nFORGED LINE\\r\\x1b[2J" in detail.splitlines()[0]
    assert "failed for m\\nFORGED LINE\\r\\x1b[2J\\u2028x" in activity
    for text in (detail, activity):
        assert not any(c in text for c in "\r\x1b\u2028") and "\nFORGED" not in text
    a.dashboard.stop_button.invoke()


def test_13_channel_test_healthy_and_failing(app, upstream):
    up = upstream([openai_chat_reply(text="pong")])
    a = app([chan(up, name="ok", models=["gpt-4o"]),
             chan(f"http://127.0.0.1:{dead_port()}", name="dead", models=["gpt-4o"])])
    for cid in ("1", "2"):                 # the gateway is stopped: tests still run
        a.channels.tree.selection_set(cid)
        a.channels.test()
    pump_until(a, lambda: all(not r.startswith("testing") for r in a.channels.results.values())
               and len(a.channels.results) == 2)
    assert a.channels.results[1].startswith("✓") and "gpt-4o" in a.channels.results[1]
    assert a.channels.results[2].startswith("✗") and "cannot connect" in a.channels.results[2]
    assert json.loads(up.last()["body"])["messages"][0]["content"] == "ping"


def test_13_fetch_models_into_the_dialog(app, upstream):
    up = upstream([Reply(body=json.dumps({"data": [{"id": "m1"}, {"id": "m2"}]}).encode())])
    a = app()
    a.channels.add()
    d = a.channels.dialog
    d.vars["type"].set("custom")
    d.vars["name"].set("local")
    d.vars["base_url"].set(up.url + "/v1")
    d.fetch()
    pump_until(a, lambda: hasattr(d, "picker"))
    assert d.picker.listbox.get(0, "end") == ("m1", "m2")
    d.picker.listbox.selection_set(1)
    d.picker.use()
    assert d.vars["models"].get() == "m2"


def test_13_settings_validation_warning_and_restart_on_port_change(app):
    a = app(start=True)
    pump_until(a, lambda: a.bridge.running)
    first = a.bridge.url
    s = a.settings
    s.vars["port"].set("99999")
    s.save()
    assert "Port" in s.error.cget("text")
    s.vars["port"].set(str(dead_port()))
    s.vars["host"].set("0.0.0.0")
    s.flags["require_auth"].set(False)
    s.update_warning()
    assert "anyone on the network" in s.warning.cget("text")
    s.vars["host"].set("127.0.0.1")
    s.flags["require_auth"].set(True)
    s.theme.set("dark")
    s.save()
    pump_until(a, lambda: a.bridge.running)
    saved = json.loads(open(a.store.path).read())["settings"]
    assert saved["port"] == int(s.vars["port"].get()) and saved["theme"] == "dark"
    assert a.bridge.url != first and a.bridge.url.endswith(s.vars["port"].get())
    assert a.colors == ag.THEMES["dark"]


# -- the Usage tab (issue 13) ---------------------------------------------------------------------

def _rows(tree):
    return [tuple(str(v) for v in tree.item(i, "values")) for i in tree.get_children()]


def test_13_usage_tab_shows_the_history_limits_and_prices(app, tmp_path):
    clock = _Clock()
    clock.now = time.time()
    _write_usage(tmp_path / "usage.db", USAGE_SAMPLE, clock)
    a = app()
    a.store.update_token(1, limits={"requests_per_day": 10, "tokens_per_day": 5000})
    a.usage.range.set("7 days")
    a.notebook.select(a.usage.frame)              # opening the tab reads the database again
    a.root.update()
    u = a.usage
    assert _rows(u.trees["model"]) == [("gpt-x", "2", "2000/200", "25.0%", "0.0053"),
                                       ("claude-x", "2", "2000/0", "50.0%", "0.0025")]
    assert _rows(u.trees["channel"])[0] == ("oa", "2", "2000/200", "25.0%", "0.0053")
    assert [r[0] for r in _rows(u.trees["token"])] == ["main", "kid"]
    assert u.summary.cget("text") == "4 requests, 4000/200 tokens, cache hit 37.5%, $0.0077"
    caption = u.chart.itemcget(u.chart.find_withtag("caption")[0], "text")
    assert caption.startswith("cost per day (bars, peak $0.0030) and tokens per day")
    assert len(u.chart.find_withtag("cost")) == 3           # three days with a cost
    assert _rows(u.limits) == [("main", "requests_per_day", "1", "10", "never"),
                               ("main", "tokens_per_day", "1100", "5000", "never")]
    a.usage.range.set("90 days")
    a.usage.refresh()
    assert len(u.days) == 90 and _rows(u.trees["model"])[-1][0] == "old-x"
    # Prices: the built-in rows with their date, then one of ours added through the dialog.
    prices = _rows(u.prices)
    assert ("claude-opus-4-7*", "5", "25", "0.5", "6.25", "built-in 2026-12-03") in prices
    dialog = u.add_price()
    dialog.vars["pattern"].set("gpt-x")
    dialog.vars["input"].set("abc")
    dialog.save()
    assert dialog.error.cget("text") == "input: 'abc' is not a number"
    dialog.vars["input"].set("1.5")
    dialog.vars["output"].set("6")
    dialog.save()
    a.root.update()
    assert _rows(u.prices)[0] == ("gpt-x", "1.5", "6", "-", "-", "yours")
    assert json.loads((tmp_path / "config.json").read_text())["prices"] == {
        "gpt-x": {"input": 1.5, "output": 6.0}}
    u.prices.selection_set("y:gpt-x")
    u.remove_price()
    assert _rows(u.prices)[0][5].startswith("built-in")
    src = tmp_path / "api.json"
    src.write_text(json.dumps({"x": {"models": {"m1": {"id": "m1", "cost": {"input": 1,
                                                                            "output": 2}}}}}))
    u.import_file(str(src))
    assert _rows(u.prices)[0] == ("m1", "1", "2", "-", "-", "yours")


def test_13_closing_the_window_stops_the_gateway_and_saves_its_size(app):
    a = app(start=True)
    pump_until(a, lambda: a.bridge.running)
    port = a.bridge.server.port
    a.close()
    assert not a.bridge.running
    assert json.loads(open(a.store.path).read())["settings"]["window"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_13_a_refused_start_is_shown_not_raised(display, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"settings": {"port": 0, "require_auth": False}}))
    store, _ = ag.ConfigStore.load(str(path))
    a = ag.App(store, host="0.0.0.0", start=True)
    try:
        a.root.update()
        assert not a.bridge.running and "Stopped" in a.dashboard.state.cget("text")
        assert "allow_unauthenticated_remote" in a.dashboard.activity.get("1.0", "end")
    finally:
        a.close()


# =================================================================================================
# 14. Command line and main()
# =================================================================================================

def _cli(*args, env=None, **kw):
    """``python aigateway.py ARGS`` in a new process: the real entry point, for the tests that
    need a running headless gateway or signals. The rest run main() in this process (``_run``):
    a start costs a Python start-up."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, "aigateway.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_child_env(env), **kw)


def _child_env(env=None) -> dict:
    """The environment for a Python child: with a bytecode cache outside the tree, so that the
    modules it imports (aigateway for ``-c`` children) are compiled once per run, not per start,
    even where PYTHONDONTWRITEBYTECODE is set."""
    out = dict(os.environ, PYTHONPYCACHEPREFIX=PYCACHE, **(env or {}))
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    return out


PYCACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"aigateway-tests-pycache-{os.getuid()}")


def _wait_health(port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.communicate()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("gateway did not answer /health")


def test_14_headless_first_run_prints_token_once_and_stops_on_sigterm(tmp_path, upstream):
    cfg = tmp_path / "config.json"
    port = dead_port()
    p = _cli("--headless", "--port", str(port), env={"AIGATEWAY_CONFIG": str(cfg)})
    try:
        _wait_health(port, p)
        key = json.loads(cfg.read_text())["tokens"][0]["key"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert conn.getresponse().status == 200
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
    finally:
        p.kill()
    assert p.returncode == 0
    assert out.count(key) == 1 and "shown only this once" in out
    assert key not in err and "GET /v1/models" in out
    p2 = _cli("--headless", "--port", str(port), "--config", str(cfg))
    try:
        _wait_health(port, p2)
        p2.send_signal(signal.SIGINT)
        out2, _ = p2.communicate(timeout=15)
    finally:
        p2.kill()
    assert key not in out2 and p2.returncode == 0


def test_14_headless_access_line_escapes_what_a_client_sent(tmp_path, upstream):
    up = upstream([Reply(500, b'{"error":{"message":"down"}}')])
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"settings": {"enable_fallback": False},
                               "channels": [chan(up, name="one")],
                               "tokens": [{"name": "main", "key": TOKEN}]}))
    port = dead_port()
    p = _cli("--headless", "--port", str(port), "--config", str(cfg))
    try:
        _wait_health(port, p)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        model = "m\n12:00:00 POST /v1/chat/completions gpt -> one 200 1ms\r\x1b[2K\u2028"
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": model}),
                     {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert conn.getresponse().status == 500
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
    finally:
        p.kill()
    lines = [ln for ln in out.splitlines() if "/v1/chat/completions" in ln]
    assert len(lines) == 1 and " 500 " in lines[0]
    assert "m\\n12:00:00 POST" in lines[0] and "\\r\\x1b[2K\\u2028" in lines[0]
    failed = [ln for ln in err.splitlines() if "failed for" in ln]
    assert len(failed) == 1 and "m\\n12:00:00" in failed[0]
    assert not any(c in out + err for c in "\r\x1b\u2028")


def _count_rows(path):
    conn = sqlite3.connect(str(path), timeout=10)
    try:
        return conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    except sqlite3.OperationalError:           # the table is not made yet
        return 0
    finally:
        conn.close()


def test_14_usage_db_survives_kill_9_under_load(tmp_path, upstream):
    up = upstream([openai_chat_reply(usage=(50, 5))])
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"channels": [chan(up, name="one")],
                               "tokens": [{"name": "main", "key": TOKEN}]}))
    port = dead_port()
    p = _cli("--headless", "--port", str(port), "--config", str(cfg))
    stop = threading.Event()

    def load():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stop.is_set():
            try:
                conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m"}),
                             {"Authorization": f"Bearer {TOKEN}", "Host": "localhost",
                              "Content-Type": "application/json"})
                conn.getresponse().read()
            except OSError:
                return
    try:
        _wait_health(port, p)
        workers = [threading.Thread(target=load, daemon=True) for _ in range(6)]
        for w in workers:
            w.start()
        served = 0
        for line in p.stdout:                  # an access line follows each queued row
            served += "/v1/chat/completions" in line
            if served >= 300 and served % 20 == 0 and _count_rows(tmp_path / "usage.db"):
                break                          # some batches are written, more are coming
        p.send_signal(signal.SIGKILL)          # in the middle of the load
        p.wait(timeout=10)
    finally:
        stop.set()
        p.kill()
        p.communicate(timeout=10)
    conn = sqlite3.connect(str(tmp_path / "usage.db"))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows, tokens = conn.execute("SELECT COUNT(*), SUM(input_tokens) FROM requests").fetchone()
        assert rows > 0 and tokens == rows * 50
        daily = conn.execute("SELECT SUM(requests) FROM daily").fetchone()[0]
        assert daily == rows                 # the rollup was written in the same transactions
    finally:
        conn.close()


def test_14_invalid_config_and_busy_port_exit_2(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"channels": [{"type": "nope"}]}')
    rc, out, err = _run("--headless", "--config", str(cfg))
    assert rc == 2 and "channels[0].type" in err and str(cfg) in err
    assert cfg.read_text() == '{"channels": [{"type": "nope"}]}'
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg.write_text("{}")
    rc, out, err = _run("--headless", "--config", str(cfg), "--port", str(busy.getsockname()[1]))
    busy.close()
    assert rc == 2 and "cannot listen" in err and "--port" in err


def test_14_serving_starts_with_the_collector_tuned(tmp_path, monkeypatch):
    """The run command freezes what start-up made and raises the collector's thresholds before
    it serves (tune_collector), headless or not; the subcommands leave the collector alone."""
    served = []
    monkeypatch.setattr(ag, "run_headless", lambda *a, **k: served.append(
        (gc.get_threshold(), gc.get_freeze_count())) or 0)
    gc.set_threshold(700, 10, 10)
    rc, out, err = _run("--headless", "--config", str(tmp_path / "config.json"))
    assert rc == 0, err
    [(thresholds, frozen)] = served
    assert thresholds == ag.GC_THRESHOLDS and frozen > 0
    tuned = []
    monkeypatch.setattr(ag, "tune_collector", lambda: tuned.append(True))
    rc, out, err = _run("--config", str(tmp_path / "config.json"), "tokens", "list")
    assert rc == 0 and "default" in out and tuned == []


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX only")
def test_14_sighup_reloads_a_headless_gateway_and_reports_a_bad_edit(tmp_path, upstream):
    b = upstream([openai_chat_reply(text="B")])
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"channels": [], "tokens": [{"name": "main", "key": TOKEN}]}))
    port = dead_port()
    code = ("import sys, aigateway as ag; ag.CONFIG_POLL_SECONDS = 3600; "   # only SIGHUP now
            "sys.exit(ag.main(sys.argv[1:]))")
    p = subprocess.Popen([sys.executable, "-c", code, "--headless", "--config", str(cfg),
                          "--port", str(port)], cwd=HERE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=_child_env())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in p.stderr], daemon=True).start()

    def stderr_until(needle):
        deadline = time.monotonic() + 10
        while True:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if needle in line:
                return line

    def get(path):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        return json.loads(conn.getresponse().read())
    try:
        _wait_health(port, p)
        assert get("/v1/models")["data"] == []
        _hand_edit(str(cfg), lambda c: c["channels"].append(chan(b, name="b", models=["m-b"])))
        p.send_signal(signal.SIGHUP)
        stderr_until("configuration reloaded")
        assert [m["id"] for m in get("/v1/models")["data"]] == ["m-b"]
        cfg.write_text('{"channels": "oops"}')
        p.send_signal(signal.SIGHUP)
        line = stderr_until("not reloaded")
        assert "channels: is not a list" in line and "last good configuration" in line
        assert "channels: is not a list" in get("/health?details=1")["config_error"]
        assert [m["id"] for m in get("/v1/models")["data"]] == ["m-b"]
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
    finally:
        p.kill()
        p.wait(5)


def test_14_version():
    rc, out, _ = _run("--version")
    assert rc == 0 and ag.__version__ in out


# -- start-up errors: one line naming the path or the host and the fix, exit status 2 ----------

def _start_fails(*args, env=None):
    rc, out, err = _run(*args, env=env)
    assert rc == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aigateway: "), err
    return out, lines[0]


def test_14_start_errors_name_the_path_and_the_fix(tmp_path):
    # The suite runs as root, whom chmod 0555 does not stop; unwritable places are /sys (where
    # even root cannot create a file), a path under a regular file (ENOTDIR) and a directory
    # where a file should be (EISDIR).
    _, line = _start_fails("--headless", "--config", "/sys/aigateway-test.json")
    assert "cannot create /sys/aigateway-test.json (Permission denied)" in line
    assert "exists and is writable" in line and "--config PATH" in line
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _, line = _start_fails("--headless", "--config", str(blocker / "config.json"))
    assert f"{blocker / 'config.json'}: cannot read the file (Not a directory)" in line
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"settings": {"port": 0}}))
    (tmp_path / "config.json.lock").mkdir()
    for env in ({}, {"DISPLAY": ":4321"}):                 # headless, and the window's start
        _, line = _start_fails("--config", str(cfg), *(["--headless"] if not env else []),
                               env=env)
        assert f"cannot create the lock file {cfg}.lock (Is a directory)" in line
    (tmp_path / "config.json.lock").rmdir()
    cfg.write_text(json.dumps({"settings": {"port": 0, "log_requests": True,
                                            "log_file": "a-file/requests.jsonl"}}))
    _, line = _start_fails("--headless", "--config", str(cfg))
    assert f"cannot open the request log {blocker / 'requests.jsonl'} (Not a directory)" in line
    assert "settings.log_file" in line and "log_requests" in line


@pytest.mark.parametrize("host,needle", [
    ("999.1.1.1", "cannot listen on 999.1.1.1: it is not an address or a name"),
    ("no-such-host.invalid", "cannot listen on no-such-host.invalid: it is not an address"),
    ("192.0.2.1", "cannot listen on 192.0.2.1: it is not an address of this machine"),
])
def test_14_bad_host_blames_the_host(tmp_path, host, needle):
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    _, line = _start_fails("--headless", "--config", str(cfg), "--host", host, "--port", "0")
    assert needle in line and "--host" in line and "port" not in line.split(";")[0]


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_14_bad_port_is_a_usage_error(tmp_path, port):
    rc, out, err = _run("--headless", "--config", str(tmp_path / "c.json"), "--port", port)
    assert rc == 2 and err.startswith("usage: aigateway")
    assert "argument --port:" in err and not (tmp_path / "c.json").exists()


def test_14_first_run_text_and_help_name_every_way_to_send_the_token(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg = tmp_path / "config.json"
    rc, out, err = _run("--headless", "--config", str(cfg), "--port", str(busy.getsockname()[1]))
    busy.close()
    key = json.loads(cfg.read_text())["tokens"][0]["key"]
    assert rc == 2 and out.count(key) == 1
    for way in ("Authorization: Bearer <token>", "x-api-key: <token>",
                "x-goog-api-key: <token>", "?key=<token>"):
        assert way in out
    assert "held" not in err and "cannot listen on 127.0.0.1:" in err
    rc, out, _ = _run("--help")
    assert rc == 0 and "Gemini's native API" in out and "channels add" in out


def test_14_bad_host_in_the_window_blames_the_host(display, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"settings": {"port": 0}}))
    store, _ = ag.ConfigStore.load(str(path))
    a = ag.App(store, host="999.1.1.1", start=True)
    try:
        a.root.update()
        text = a.dashboard.activity.get("1.0", "end")
        assert not a.bridge.running and "999.1.1.1: it is not an address or a name" in text
        assert "Another program" not in text
    finally:
        a.close()


def test_14_any_origin_with_auth_off_is_warned_about_at_start(gw):
    g = gw(settings={"cors_origins": ["*"], "require_auth": False})
    logs = [p for k, p in g.events() if k == "log"]
    assert any('cors_origins has "*" and require_auth is off' in line for line in logs)
    quiet = gw(settings={"cors_origins": ["*"]})
    assert not any("cors_origins" in p for k, p in quiet.events() if k == "log")


# -- management subcommands: channels, tokens, config check --------------------------------------

def _run(*args, stdin="", env=None):
    """main(ARGS) in this process, as ``python aigateway.py ARGS`` runs it, with ``stdin`` as
    its input and ``env`` added to the environment: its exit status (argparse's SystemExit
    too), stdout and stderr. An exception it lets out fails the test, as does a traceback."""
    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in env or {}}
    saved_gc = gc.get_threshold()           # a start that gets as far as serving tunes them
    saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = ag.main(list(args))
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.stdin = saved_stdin
        gc.set_threshold(*saved_gc)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert "Traceback" not in err.getvalue() + out.getvalue(), err.getvalue()
    return rc, out.getvalue(), err.getvalue()


# -- usage and prices subcommands (issue 13) ------------------------------------------------------

def _usage_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"tokens": [{"name": "main", "key": TOKEN}]}))
    clock = _Clock()
    clock.now = time.time()
    _write_usage(tmp_path / "usage.db", USAGE_SAMPLE, clock)
    return str(cfg)


def test_14_usage_subcommand_in_each_format(tmp_path):
    cfg = _usage_config(tmp_path)
    rc, out, err = _run("usage", "--config", cfg, "--since", "7d", "--by", "model")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("usage since ") and lines[0].endswith("by model; ~ = estimated")
    assert lines[1].split() == ["MODEL", "REQUESTS", "ERRORS", "INPUT", "OUTPUT", "CACHE",
                                "READ", "CACHE", "WRITE", "REASONING", "CACHE", "HIT", "COST",
                                "$"]
    assert [ln.split() for ln in lines[2:]] == [
        ["gpt-x", "2", "0", "2000", "200", "500", "0", "0", "25.0%", "0.0053"],
        ["claude-x", "2", "1", "2000", "0", "1000", "0", "0", "50.0%", "0.0025"],
        ["TOTAL", "4", "1", "4000", "200", "1500", "0", "0", "37.5%", "0.0077"]]
    rc, out, _ = _run("usage", "--config", cfg, "--since", "90d", "--by", "token",
                      "--format", "csv")
    assert rc == 0 and out.splitlines() == [
        "token,requests,errors,input_tokens,output_tokens,cache_read_tokens,"
        "cache_write_tokens,reasoning_tokens,cost,cost_estimated,cache_hit_rate",
        "main,4,1,3005,105,1500,0,0,0.00481,False,0.4992",
        "kid,1,0,1000,100,0,0,0,0.003,False,0.0"]
    rc, out, _ = _run("usage", "--config", cfg, "--by", "channel", "--format", "json")
    body = json.loads(out)
    assert rc == 0 and [(r["channel"], r["requests"]) for r in body["rows"]] == [
        ("oa", 2), ("an", 2)]
    assert body["totals"]["cost"] == 0.00775
    rc, out, err = _run("usage", "--config", cfg, "--since", "last week")
    assert rc == 2 and out == "" and "is not a period: write 7d, 30d" in err


def test_14_tokens_limits_and_expiry_options(tmp_path):
    cfg = str(tmp_path / "config.json")
    rc, _, _ = _run("tokens", "create", "--config", cfg, "--name", "kid", "--limits",
                    '{"requests_per_day": 50, "cost_per_month": 2.5}', "--expires-at",
                    "2027-06-30")
    assert rc == 0
    tok = json.loads(open(cfg).read())["tokens"][1]
    assert (tok["limits"], tok["expires_at"]) == (
        {"requests_per_day": 50, "cost_per_month": 2.5}, "2027-06-30")
    rc, _, err = _run("tokens", "edit", "kid", "--config", cfg, "--limits", '{"rpd": 1}')
    assert rc == 2 and "'rpd' is not a limit; use only requests_per_day" in err
    rc, _, err = _run("tokens", "edit", "kid", "--config", cfg, "--limits", "[1]")
    assert rc == 2 and "'[1]' is not a JSON object" in err
    rc, out, _ = _run("tokens", "edit", "kid", "--config", cfg, "--limits", "{}",
                      "--expires-at", "")
    tok = json.loads(open(cfg).read())["tokens"][1]
    assert rc == 0 and (tok["limits"], tok["expires_at"]) == ({}, "")


def test_14_prices_import_from_a_models_dev_file(tmp_path):
    cfg = _usage_config(tmp_path)
    src = tmp_path / "api.json"
    src.write_text(json.dumps({
        "openai": {"id": "openai", "models": {
            "gpt-x": {"id": "gpt-x", "cost": {"input": 1.5, "output": 6, "cache_read": 0.1}},
            "no-cost": {"id": "no-cost"}}},
        "anthropic": {"id": "anthropic", "models": {
            "claude-x": {"id": "claude-x", "cost": {"input": 3, "output": 15,
                                                    "cache_read": 0.3, "cache_write": 3.75,
                                                    "reasoning": 15}}}}}))
    rc, out, err = _run("prices", "import", str(src), "--config", cfg)
    assert (rc, err) == (0, "") and out == f"imported 2 prices into {cfg}\n"
    prices = json.loads(open(cfg).read())["prices"]
    assert prices == {"gpt-x": {"input": 1.5, "output": 6.0, "cache_read": 0.1},
                      "claude-x": {"input": 3.0, "output": 15.0, "cache_read": 0.3,
                                   "cache_write": 3.75}}
    src.write_text('{"openai": {"models": {}}}')
    rc, _, err = _run("prices", "import", str(src), "--config", cfg)
    assert rc == 2 and "names no model with a cost" in err



def test_14_prices_import_from_a_url(tmp_path, upstream):
    cfg = _usage_config(tmp_path)
    up = upstream([Reply(body=json.dumps({"models": {"m2": {"id": "m2", "cost": {
        "input": 0.5, "output": 1}}}}).encode())])
    rc, out, err = _run("prices", "import", f"{up.url}/api.json", "--config", cfg)
    assert (rc, err) == (0, "") and out.startswith("imported 1 prices")
    assert up.last()["path"] == "/api.json" and up.last()["method"] == "GET"
    assert json.loads(open(cfg).read())["prices"] == {"m2": {"input": 0.5, "output": 1.0}}
    up.replies = [Reply(404, b"{}")]
    rc, _, err = _run("prices", "import", f"{up.url}/api.json", "--config", cfg)
    assert rc == 2 and f"{up.url}/api.json answered 404" in err


def test_14_channels_add_bedrock_and_vertex_from_the_command_line(tmp_path, rsa_pem):
    cfg = str(tmp_path / "config.json")
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    rc, out, _ = _run("--config", cfg, "channels", "add", "--name", "aws", "--type", "bedrock",
                      "--region", "eu-west-3", "--aws-access-key-id", "AKIDEXAMPLE",
                      "--aws-secret-access-key", "-", stdin=secret + "\n")
    assert rc == 0 and out == "added channel 'aws' (id 1)\n"
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(service_account_info(rsa_pem[1])))
    rc, out, _ = _run("--config", cfg, "channels", "add", "--name", "gcp", "--type", "vertex",
                      "--project", "proj-1", "--location", "us-east5",
                      "--service-account", str(key_file))
    assert rc == 0
    aws, gcp = json.loads(open(cfg).read())["channels"]
    assert (aws["region"], aws["aws_access_key_id"], aws["aws_secret_access_key"]) == (
        "eu-west-3", "AKIDEXAMPLE", secret)
    assert (gcp["project"], gcp["location"], gcp["service_account"]) == (
        "proj-1", "us-east5", str(key_file))
    rc, table, _ = _run("--config", cfg, "channels", "list")
    rc2, listed, _ = _run("--config", cfg, "channels", "list", "--json")
    assert rc == rc2 == 0 and secret not in table + listed
    assert "https://bedrock-runtime.eu-west-3.amazonaws.com" in table
    assert "https://us-east5-aiplatform.googleapis.com" in table
    assert json.loads(listed)[0]["aws_secret_access_key"] == ag.mask_secret(secret)
    rc, _, err = _run("--config", cfg, "channels", "edit", "aws", "--region", "mars-1")
    assert rc == 2 and "channels[0].region: 'mars-1' is not an AWS region" in err
    rc, help_text, _ = _run("channels", "add", "--help")
    assert "--aws-session-token" in help_text and "bedrock channels" in help_text


def test_14_channels_add_list_edit_remove(tmp_path):
    cfg = str(tmp_path / "config.json")
    rc, out, err = _run("channels", "add", "--config", cfg, "--name", "oa", "--type", "openai",
                        "--api-key", "sk-upstream-SECRET-1", "--models", "gpt-4o,gpt-4o-mini",
                        "--priority", "1")
    assert rc == 0 and out == "added channel 'oa' (id 1)\n"
    first_key = json.loads(open(cfg).read())["tokens"][0]["key"]
    assert err.count(first_key) == 1 and "shown only this once" in err     # file was created
    rc, out, _ = _run("--config", cfg, "channels", "add", "--name", "local", "--type", "custom",
                      "--base-url", "http://127.0.0.1:8000/v1", "--api-key", "-",
                      "--model-mapping", "fast=qwen2.5:7b", "--timeout", "30", "--disabled",
                      "--set", "verify_tls=false", "--set", 'headers={"X-Api-Key": "hdr-SECRET"}',
                      stdin="sk-upstream-SECRET-2\n")
    assert rc == 0 and "id 2" in out
    data = json.loads(open(cfg).read())
    oa, local = data["channels"]
    assert oa["models"] == ["gpt-4o", "gpt-4o-mini"] and oa["priority"] == 1
    assert oa["api_key"] == "sk-upstream-SECRET-1"
    assert local["api_key"] == "sk-upstream-SECRET-2"
    assert local["model_mapping"] == {"fast": "qwen2.5:7b"} and local["timeout"] == 30
    assert local["enabled"] is False and local["verify_tls"] is False
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    rc, table, _ = _run("--config", cfg, "channels", "list")
    rc2, listed, _ = _run("--config", cfg, "channels", "list", "--json")
    assert rc == rc2 == 0
    assert table.splitlines()[0].split() == ["ID", "NAME", "TYPE", "ENABLED", "PRIORITY",
                                             "BASE", "URL", "MODELS", "KEY"]
    assert "oa" in table and "sk-ups…ET-1" in table and "gpt-4o,gpt-4o-mini" in table
    channels = json.loads(listed)
    assert [c["id"] for c in channels] == [1, 2] and channels[1]["api_key"] == "sk-ups…ET-2"
    assert channels[1]["headers"] == {"X-Api-Key": "**********"}
    for secret in ("SECRET-1", "SECRET-2", "hdr-SECRET"):
        assert secret not in table + listed
    rc, out, _ = _run("--config", cfg, "channels", "edit", "LOCAL", "--enabled", "--name",
                      "vllm", "--models", "")
    assert rc == 0 and out == "changed channel 'vllm' (id 2)\n"
    rc, out, _ = _run("--config", cfg, "channels", "edit", "1", "--priority", "5", "--type",
                      "gemini")
    assert rc == 0 and json.loads(open(cfg).read())["channels"][0]["base_url"] == \
        "https://generativelanguage.googleapis.com"            # the default follows the type
    rc, out, _ = _run("--config", cfg, "channels", "remove", "oa")
    assert rc == 0 and out == "removed channel 'oa' (id 1)\n"
    data = json.loads(open(cfg).read())
    assert [(c["id"], c["name"], c["enabled"], c["models"]) for c in data["channels"]] == [
        (2, "vllm", True, [])]
    before = open(cfg).read()
    for args, needle in [
        (("channels", "edit", "nope", "--priority", "1"), "no channel 'nope' in "),
        (("channels", "remove", "7"), "no channel '7'"),
        (("channels", "add", "--name", "VLLM", "--type", "ollama"), "channels[1].name"),
        (("channels", "edit", "2", "--base-url", "ftp://x"), "channels[0].base_url"),
        (("channels", "edit", "2", "--set", "timeout=0"), "channels[0].timeout"),
        (("channels", "edit", "2", "--set", "timeout=Infinity"), "channels[0].timeout"),
    ]:
        rc, out, err = _run("--config", cfg, *args)
        assert rc == 2 and needle in err and out == "", (args, err)
    for args, needle in [
        (("channels", "add", "--name", "x", "--type", "bogus"), "argument --type: invalid"),
        (("channels", "add", "--type", "openai"), "the following arguments are required: --name"),
        (("channels", "edit", "2", "--priority", "high"), "argument --priority: invalid int"),
        (("channels", "edit", "2", "--timeout", "-3"), "argument --timeout: -3 is not a posit"),
        (("channels", "edit", "2", "--timeout", "inf"), "argument --timeout: inf is not a posit"),
        (("channels", "edit", "2", "--enabled", "--disabled"), "not allowed with argument"),
        (("channels", "frobnicate"), "invalid choice: 'frobnicate'"),
        (("channels",), "the following arguments are required: ACTION"),
    ]:
        rc, out, err = _run("--config", cfg, *args)
        assert rc == 2 and err.startswith("usage: aigateway") and needle in err, (args, err)
    assert open(cfg).read() == before                         # nothing refused was written


# Issue 14: `aigateway presets` and `channels add --preset`
def test_14_presets_lists_every_preset_and_channels_add_takes_one(tmp_path):
    rc, out, _ = _run("presets")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["PRESET", "TYPE", "BASE", "URL", "NOTES"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert list(rows) == list(ag.PRESETS)
    assert rows["zhipu"][1:3] == ["custom", "https://open.bigmodel.cn/api/paas/v4"]
    assert "tool_call_id=mistral9," in rows["mistral"]
    assert "no model list" in out and "drop_headers=anthropic-beta," in out
    rc, out, _ = _run("presets", "--json")
    assert rc == 0 and json.loads(out) == ag.PRESETS
    cfg = str(tmp_path / "config.json")
    rc, out, _ = _run("--config", cfg, "channels", "add", "--name", "m", "--preset", "mistral")
    assert rc == 0 and out == "added channel 'm' (id 1)\n"
    ch = json.loads(open(cfg).read())["channels"][0]
    assert ch["preset"] == "mistral" and ch["type"] == "custom"
    assert ch["base_url"] == "https://api.mistral.ai/v1" and ch["quirks"]["tool_call_id"]
    rc, _, err = _run("--config", cfg, "channels", "add", "--name", "n")
    assert rc == 2 and "needs --type or --preset" in err
    rc, _, err = _run("--config", cfg, "channels", "add", "--name", "n", "--preset", "nope")
    assert rc == 2 and "invalid choice: 'nope'" in err


def test_14_tokens_create_list_disable_enable_remove(tmp_path, upstream):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"channels": [{"name": "a", "type": "ollama"},
                                            {"name": "b", "type": "ollama"}],
                               "tokens": [{"name": "main", "key": TOKEN}]}))
    rc, out, err = _run("--config", str(cfg), "tokens", "create", "--name", "ci", "--models",
                        "gpt-*,claude-*", "--channels", "B,1", "--rpm", "30")
    assert rc == 0
    key = out.strip()
    assert key.startswith("sk-gw-") and out == key + "\n" and key not in err
    assert "shown only this once" in err and "x-goog-api-key" in err
    tok = json.loads(cfg.read_text())["tokens"][1]
    assert tok == {"name": "ci", "allowed_models": ["gpt-*", "claude-*"],
                   "allowed_channels": ["b", 1], "rpm": 30, "key": key, "id": 2,
                   "enabled": True, "limits": {}, "expires_at": ""}
    rc, table, _ = _run("--config", str(cfg), "tokens", "list")
    rc2, listed, _ = _run("--config", str(cfg), "tokens", "list", "--json")
    assert rc == rc2 == 0 and key not in table + listed and TOKEN not in table + listed
    assert "ci" in table and ag.mask_secret(key) in table and "b,1" in table
    assert [t["key"] for t in json.loads(listed)] == [ag.mask_secret(TOKEN), ag.mask_secret(key)]
    for action, enabled in (("disable", False), ("enable", True), ("disable", False)):
        rc, out, _ = _run("--config", str(cfg), "tokens", action, "ci")
        assert rc == 0 and out == f"{action}d token 'ci' (id 2)\n"
        assert json.loads(cfg.read_text())["tokens"][1]["enabled"] is enabled
    store, _ = ag.ConfigStore.load(str(cfg))
    t = ag.GatewayThread(store, host="127.0.0.1", port=0)
    t.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", t.server.port, timeout=10)
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert conn.getresponse().status == 401                    # disabled from the CLI
    finally:
        t.stop()
    rc, out, _ = _run("--config", str(cfg), "tokens", "edit", "2", "--name", "ci2", "--rpm", "0")
    assert rc == 0 and out == "changed token 'ci2' (id 2)\n"
    rc, out, err = _run("--config", str(cfg), "tokens", "create", "--name", "x", "--channels",
                        "nope")
    assert rc == 2 and "no channel 'nope'" in err and out == ""
    rc, out, _ = _run("--config", str(cfg), "tokens", "remove", "ci2")
    assert rc == 0 and [t["name"] for t in json.loads(cfg.read_text())["tokens"]] == ["main"]
    rc, out, err = _run("--config", str(cfg), "tokens", "enable", "ci2")
    assert rc == 2 and "no token 'ci2'" in err and "tokens list" in err
    rc, out, err = _run("--config", str(tmp_path / "missing.json"), "tokens", "list")
    assert rc == 2 and "does not exist" in err and not (tmp_path / "missing.json").exists()


def test_14_an_edit_that_cannot_be_saved_is_one_line_and_changes_nothing(tmp_path, monkeypatch,
                                                                          capsys):
    # As root nothing but the kernel refuses a write, so the failing save is atomic_write
    # raising EROFS, as a folder on a read-only mount would.
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"channels": [{"name": "a", "type": "ollama"}]}))
    before = cfg.read_text()

    def read_only(path, data):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(ag, "atomic_write", read_only)
    assert ag.main(["--config", str(cfg), "channels", "remove", "a"]) == 2
    err = capsys.readouterr().err
    assert err == (f"aigateway: cannot save {cfg} (Read-only file system); make it writable, or "
                   f"choose another file with --config PATH\n")
    assert cfg.read_text() == before


def test_14_channels_test_sends_a_real_request(tmp_path, upstream):
    good = upstream([openai_chat_reply(text="pong")])
    bad = upstream([Reply(401, b'{"error": {"message": "Incorrect API key provided"}}')])
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"channels": [chan(good, name="good", models=["m1"]),
                                            chan(bad, name="bad", models=["m2"])]}))
    rc, out, err = _run("--config", str(cfg), "channels", "test", "good")
    assert rc == 0 and out.startswith("ok: channel 'good' answered m1 in ") and "'pong'" in out
    sent = json.loads(good.requests[0]["body"])
    assert sent["model"] == "m1" and good.requests[0]["path"] == "/v1/chat/completions"
    rc, out, err = _run("--config", str(cfg), "channels", "test", "2")
    assert rc == 1 and "channel 'bad' failed" in err and "Incorrect API key" in err
    assert "sk-upstream-secret" not in out + err


def test_14_config_check_names_every_problem(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"settings": {"port": 70000, "tls_cert": "c.pem",
                                            "tls_key": "k.pem"},
                               "channels": [{"type": "bogus"}, {"name": "x", "timeout": 0}],
                               "tokens": [{"key": "short"}]}))
    rc, out, err = _run("config", "check", "--config", str(cfg))
    lines = out.splitlines()
    assert rc == 2 and [line.split(": ")[2] for line in lines[:-1]] == [
        "settings.port", "channels[0].type", "channels[1].timeout", "tokens[0].key"]
    assert lines[-1].endswith("4 problems; aigateway will not start with this file")
    cfg.write_text(json.dumps({"settings": {"tls_cert": "c.pem", "tls_key": "k.pem",
                                            "host": "0.0.0.0"},
                               "channels": [{"name": "a", "type": "openai"}],
                               "tokens": [{"key": TOKEN, "allowed_channels": ["a", 9]}]}))
    rc, out, err = _run("config", "check", "--config", str(cfg))
    assert rc == 2 and "settings.tls_cert: 'c.pem' does not exist" in out
    assert "warning: " in out and "tokens[0].allowed_channels: 9 is no channel" in out
    assert "channels[0].api_key" in out and "0.0.0.0 is reachable" in out
    cfg.write_text(json.dumps({"channels": [{"name": "a", "type": "ollama"}],
                               "tokens": [{"key": TOKEN}]}))
    rc, out, err = _run("config", "check", "--config", str(cfg))
    assert rc == 0 and out == f"{cfg}: valid (1 channel, 1 token)\n"
    cfg.write_text('{"settings": {"port": 1,}}')
    rc, out, err = _run("config", "check", "--config", str(cfg))
    assert rc == 2 and "line 1 column 25" in out


def test_14_old_app_config_starts_and_behaves_as_it_says(tmp_path, upstream):
    openai_up = upstream([openai_chat_reply(text="from OpenAI")])
    deepseek_up = upstream([openai_chat_reply(text="from DeepSeek")])
    port = dead_port()
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(old_app_config(port, openai_up.url + "/v1",
                                             deepseek_up.url + "/v1"), indent=2))
    p = _cli("--headless", "--config", str(cfg))
    try:
        _wait_health(port, p)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = json.dumps({"model": "shared", "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/v1/chat/completions", body=body, headers={
            "Authorization": f"Bearer {OLD_APP_KEY}", "Content-Type": "application/json",
            "Origin": "https://chat.example"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        # The token allows channel id 2 only: DeepSeek answers although OpenAI comes first.
        assert resp.status == 200 and answer["choices"][0]["message"]["content"] == \
            "from DeepSeek"
        assert resp.getheader("Access-Control-Allow-Origin") == "*"
        assert openai_up.requests == [] and deepseek_up.requests[0]["path"] == \
            "/v1/chat/completions"
        assert deepseek_up.requests[0]["headers"]["authorization"] == \
            "Bearer sk-old-second-SECRET"
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "https://chat.example", "Access-Control-Request-Method": "POST"})
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("Access-Control-Allow-Origin") == "*"
        conn.request("POST", "/v1/chat/completions", body=body.replace("shared", "gpt-4o"),
                     headers={"Authorization": f"Bearer {OLD_APP_KEY}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (403, 404) and openai_up.requests == []
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
    finally:
        p.kill()
    assert p.returncode == 0
    assert "0.0.0.0 is reachable from other machines; every client needs a gateway token" in err
    assert "'GLM (web)'" in err and "unsupported_channels" in err
    assert json.loads(cfg.read_text())["settings"]["enable_cors"] is True  # file not rewritten



# -- start-up cache: "python aigateway.py" runs the module from cached bytecode ------------------

def _app_copy(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(os.path.join(HERE, "aigateway.py"), app / "aigateway.py")
    return app


def _run_app(app, tmp_path, *args, cmd=None, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "AIGATEWAY_NO_CACHE", "PYTHONPYCACHEPREFIX")}
    env.update({"XDG_CACHE_HOME": str(tmp_path / "xdg"), **extra})
    return subprocess.run(cmd or [sys.executable, str(app / "aigateway.py"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def _pycs(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.pyc"))


def test_14_run_command_starts_from_the_cache_and_recompiles_an_edited_file(tmp_path):
    app = _app_copy(tmp_path)
    first = _run_app(app, tmp_path, "--version")
    assert (first.returncode, first.stdout) == (0, f"aigateway {ag.__version__}\n"), first.stderr
    pyc = app / "__pycache__" / f"aigateway.{sys.implementation.cache_tag}.pyc"
    assert _pycs(app) == [str(pyc.relative_to(app))] and _pycs(tmp_path / "app") == _pycs(app)
    assert not (tmp_path / "xdg").exists()
    # a second start runs what the cache holds: swap in code that says so, same header
    import marshal
    head = pyc.read_bytes()[:16]
    pyc.write_bytes(head + marshal.dumps(compile(
        "print('from the cache'); main = int", "x", "exec")))
    second = _run_app(app, tmp_path, "--version")
    assert (second.returncode, second.stdout) == (0, "from the cache\n"), second.stderr
    # an edited file (new size) is compiled again and the cache rewritten
    with open(app / "aigateway.py", "a") as f:
        f.write("\n# edited\n")
    third = _run_app(app, tmp_path, "--version")
    assert (third.returncode, third.stdout) == (0, f"aigateway {ag.__version__}\n"), third.stderr
    size = (app / "aigateway.py").stat().st_size
    assert pyc.read_bytes()[12:16] == size.to_bytes(4, "little")


def test_14_run_command_caches_in_the_user_dir_without_bytecode_writing(tmp_path):
    app = _app_copy(tmp_path)
    run = _run_app(app, tmp_path, "--version", PYTHONDONTWRITEBYTECODE="1")
    assert (run.returncode, run.stdout) == (0, f"aigateway {ag.__version__}\n"), run.stderr
    assert _pycs(app) == []
    cached = _pycs(tmp_path / "xdg")
    assert len(cached) == 1 and cached[0].startswith("aigateway" + str(app))


def test_14_run_command_from_a_read_only_directory(tmp_path):
    app = _app_copy(tmp_path)
    ro = tmp_path / "ro"
    app.rename(ro)
    (ro / "__pycache__").write_bytes(b"")
    os.chmod(ro, 0o555)
    try:
        # the __pycache__ beside it cannot be made (refused here even for root: a file is in
        # the way), so the cache goes to the user dir. (Not PYTHONPYCACHEPREFIX=a file: that
        # would have the child compile every standard module it imports too, ~0.5 s a run.)
        run = _run_app(ro, tmp_path, "--version")
        assert (run.returncode, run.stdout) == (0, f"aigateway {ag.__version__}\n"), run.stderr
        assert _pycs(ro) == [] and len(_pycs(tmp_path / "xdg")) == 1
        # nowhere to write at all: the plain run still works
        run = _run_app(ro, tmp_path, "--version", XDG_CACHE_HOME=str(ro / "aigateway.py"))
        assert (run.returncode, run.stdout) == (0, f"aigateway {ag.__version__}\n"), run.stderr
    finally:
        os.chmod(ro, 0o755)


def test_14_frozen_builds_python_m_and_the_off_switch_skip_the_cache(tmp_path):
    app = _app_copy(tmp_path)
    path = str(app / "aigateway.py")
    frozen = _run_app(app, tmp_path, cmd=[
        sys.executable, "-c", "import runpy, sys; sys.frozen = True; "
        f"sys.argv = [{path!r}, '--version']; runpy.run_path({path!r}, run_name='__main__')"])
    off = _run_app(app, tmp_path, "--version", AIGATEWAY_NO_CACHE="1")
    # "python -m aigateway" is an import (Python's own cache rules): no second interpreter
    module = _run_app(app, tmp_path, cmd=[sys.executable, "-m", "aigateway", "--version"],
                      PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(app))
    for run in (frozen, off, module):
        assert (run.returncode, run.stdout) == (0, f"aigateway {ag.__version__}\n"), run.stderr
    assert _pycs(tmp_path) == []


def test_14_second_instance_on_the_same_config_says_so(tmp_path):
    cfg = tmp_path / "config.json"
    port = dead_port()
    first = _cli("--headless", "--config", str(cfg), "--port", str(port))
    try:
        _wait_health(port, first)
        rc, out, err = _run("--headless", "--config", str(cfg), "--port", str(dead_port()))
        assert rc == 2 and f"pid {first.pid}" in err and "--config" in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=15)


def test_14_remote_without_auth_needs_an_explicit_setting(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"settings": {"require_auth": False}}))
    rc, out, err = _run("--headless", "--config", str(cfg), "--host", "0.0.0.0", "--port",
                        str(dead_port()))
    assert rc == 2 and "allow_unauthenticated_remote" in err
    cfg.write_text(json.dumps({"settings": {"require_auth": False, "host": "0.0.0.0"}}))
    with pytest.raises(ag.ConfigError, match="allow_unauthenticated_remote"):
        ag.ConfigStore.load(str(cfg))


def test_14_https_for_the_gateway_itself(tmp_path, cert_files):
    d = tmp_path
    shutil.copy(cert_files[0], d / "c.pem")
    shutil.copy(cert_files[1], d / "k.pem")
    g = GW(d / "config.json", {"tls_cert": "c.pem", "tls_key": "k.pem"})
    try:
        assert g.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(d / "c.pem"))
        ctx.check_hostname = False
        conn = http.client.HTTPSConnection("127.0.0.1", g.port, context=ctx, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()                # else stopping waits a second for its TLS close_notify
    finally:
        g.stop()


# -- fake AWS Bedrock and Google Vertex AI upstreams ---------------------------------------------
# Each checks a request as the cloud would before it answers, and records it with what it made
# of it (rec["op"], rec["model"], rec["json"]). The rules, as their providers state them:
# Bedrock auth: SigV4 over the received method, URL, signed headers and body, recomputed with
#   botocore's own signer (signing name "bedrock", the request's X-Amz-Date; a stamp more than 5
#   minutes off is refused, "Signature expired"), or a Bedrock API key as a Bearer token (AWS
#   Bedrock user guide, "API keys").
# InvokeModel with Claude (AWS Bedrock user guide, "Anthropic Claude Messages API"; the anthropic
#   SDK's lib/bedrock/_client.py builds the same): anthropic_version "bedrock-2023-05-31", the
#   model in the path and neither "model" nor "stream" in the body (Bedrock's 400 is "extraneous
#   key [model] is not permitted"), betas as the anthropic_beta list, and only the betas Bedrock
#   knows: others are a 400 "invalid beta flag" (anthropics/claude-code#49370, #56595; the list
#   LiteLLM keeps from the AWS docs, BerriAI/litellm#19875, and its anthropic_beta_headers_
#   config.json, bedrock column). The stream is event-stream ``chunk`` events, each {"bytes":
#   base64 of one Messages stream event} (API reference, PayloadPart). No operation here has a
#   query string (the service model gives them only URI and header members).
# Converse: the input shape of the bedrock-runtime service model (botocore's validator on
#   botocore/data/bedrock-runtime/*/service-2.json), a conversation that starts with a user turn
#   and alternates roles, toolConfig present whenever toolUse/toolResult blocks are (Bedrock's
#   ValidationException quoted in vxcontrol/pentagi#196), and each toolUse answered by a
#   toolResult in the next user turn.
# Vertex auth: a service account's JWT bearer grant at its token_uri (Google's "Using OAuth 2.0
#   for Server to Server Applications": RS256, iss, scope, aud = token_uri, iat, exp <= iat +
#   3600), then "Authorization: Bearer <that token>"; or an API key in x-goog-api-key on express
#   mode's project-less URLs (Vertex AI in express mode, REST reference).
# Claude on Vertex (Google Cloud, "Use Claude models"; the anthropic SDK's lib/vertex/
#   _client.py): ...publishers/anthropic/models/{m}:rawPredict or :streamRawPredict, body with
#   anthropic_version "vertex-2023-10-16", no "model", "stream": true on streamRawPredict; the
#   answer is the Messages API's own JSON or SSE. Betas come in the anthropic-beta header, and
#   a flag Vertex does not take is a 400 "Unexpected value(s) `...` for the `anthropic-beta`
#   header" (anthropics/claude-code#21625, #34802; the flags it takes: LiteLLM's
#   anthropic_beta_headers_config.json, vertex_ai column).
# Gemini on Vertex: generateContent / streamGenerateContent?alt=sse with the request fields of
#   the v1 REST reference (an unknown one is "Invalid JSON payload received. Unknown name");
#   Gemini 3 wants each functionCall part sent back with its thoughtSignature (ai.google.dev/
#   gemini-api/docs/thought-signatures).
# The model behind every fake: with a tool result last, "DONE <result>"; offered tools, a call of
# the coding CLI's shell tool (SHELL_TOOLS) or else the first tool; else "hello from <where>";
# with reasoning (Claude asked to think, Converse, Gemini) before the answer.
AWS_KEY_ID, AWS_SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
AWS_SESSION = "FQoGZXIvYXdzEXAMPLE//token"
BEDROCK_API_KEY = "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl"
BEDROCK_BETAS = frozenset((
    "computer-use-2024-10-22", "computer-use-2025-01-24", "token-efficient-tools-2025-02-19",
    "interleaved-thinking-2025-05-14", "output-128k-2025-02-19", "dev-full-thinking-2025-05-14",
    "context-1m-2025-08-07", "context-management-2025-06-27", "effort-2025-11-24",
    "tool-search-tool-2025-10-19", "tool-examples-2025-10-29", "compact-2026-01-12",
    "computer-use-2025-11-24", "dangerous-tool-use-2026-09-03",
    "fine-grained-tool-streaming-2025-05-14", "thinking-binding-controls-2026-08-01",
    "thinking-display-updates-2026-08-18", "mid-conversation-output-config-2026-07-01",
    "mid-conversation-tool-changes-2026-07-01"))
VERTEX_BETAS = frozenset((
    "compact-2026-01-12", "compact-2026-09-04", "computer-use-2025-01-24",
    "computer-use-2025-11-24", "context-1m-2025-08-07", "context-management-2025-06-27",
    "dangerous-tool-use-2026-09-03", "interleaved-thinking-2025-05-14",
    "per-turn-control-2026-07-01", "thinking-binding-controls-2026-08-01",
    "thinking-display-updates-2026-08-18", "tool-search-tool-2025-10-19",
    "web-search-2025-03-05"))
_BEDROCK_OP = re.compile(r"/model/([^/?]+)/(invoke|invoke-with-response-stream|converse|"
                         r"converse-stream)\Z")
_SIGV4_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<scope>\d{8}/[^,]+),"
                         r" SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=[0-9a-f]{64}")
_VERTEX_OP = re.compile(r"/v1(?:/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+))?"
                        r"/publishers/(?P<publisher>google|anthropic)/models/(?P<model>[^/:]+):"
                        r"(?P<method>generateContent|streamGenerateContent|rawPredict|"
                        r"streamRawPredict)(?P<query>\?.*)?\Z")
_GEMINI_FIELDS = frozenset(("contents", "systemInstruction", "tools", "toolConfig", "labels",
                            "safetySettings", "generationConfig", "cachedContent",
                            "modelArmorConfig"))


def cloud_script(result, names, where):
    """(text, (tool, args) or None): what the fakes' model answers (see above)."""
    if result is not None:
        return f"DONE {result.strip()[:300]}", None
    tool = next((n for n in SHELL_TOOLS if n in names), None) or (names[0] if names else None)
    if tool:
        return "", (tool, SHELL_TOOLS.get(tool, {"city": "Paris"}))
    return f"hello from {where}", None


def _aws_error(status, kind, message):
    """An AWS REST-JSON error: the type in x-amzn-ErrorType, {"message"} as the body."""
    return Reply(status, json.dumps({"message": message}).encode(),
                 headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/"})


def _google_error(status, state, message):
    return Reply(status, json.dumps({"error": {"code": status, "message": message,
                                               "status": state}}).encode())


def _botocore_signature(rec, url, region, token, stamp):
    """The Authorization botocore's SigV4Auth computes for the received request, signed at the
    request's own X-Amz-Date over the headers it says it signed."""
    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials

    class AtStamp(botocore.auth.SigV4Auth):
        def add_auth(self, request):        # SigV4Auth.add_auth with the given time
            request.context["timestamp"] = stamp
            self._modify_request_before_signing(request)
            canonical = self.canonical_request(request)
            self._inject_signature_to_request(
                request, self.signature(self.string_to_sign(request, canonical), request))
    signed = _SIGV4_AUTH.fullmatch(rec["headers"]["authorization"])["signed"].split(";")
    req = botocore.awsrequest.AWSRequest(
        method=rec["method"], url=url + rec["path"], data=rec["body"],
        headers={k: v for k, v in rec["headers"].items() if k in signed})
    AtStamp(botocore.credentials.Credentials(AWS_KEY_ID, AWS_SECRET, token), "bedrock",
            region).add_auth(req)
    return req.headers["Authorization"]


def _bedrock_auth_problem(rec, url, region, api_key, token):
    auth = rec["headers"].get("authorization", "")
    if api_key is not None:
        return None if auth == f"Bearer {api_key}" else "The API key is invalid"
    m = _SIGV4_AUTH.fullmatch(auth)
    if m is None or m["key"] != AWS_KEY_ID:
        return "The security token included in the request is invalid"
    stamp = rec["headers"].get("x-amz-date", "")
    if not re.fullmatch(r"\d{8}T\d{6}Z", stamp) or abs(time.time() - calendar.timegm(
            time.strptime(stamp, "%Y%m%dT%H%M%SZ"))) > 300:
        return "Signature expired"
    if m["scope"] != f"{stamp[:8]}/{region}/bedrock/aws4_request" or \
            not {"host", "x-amz-date"} <= set(m["signed"].split(";")) or \
            rec["headers"].get("x-amz-security-token") != token:
        return "Credential should be scoped to a valid region and service"
    if _botocore_signature(rec, url, region, token, stamp) != auth:
        return "The request signature we calculated does not match the signature you provided"
    return None


def _converse_shape():
    if not _CONVERSE_SHAPE:
        import botocore.session
        model = botocore.session.get_session().get_service_model("bedrock-runtime")
        _CONVERSE_SHAPE.append(model.operation_model("Converse").input_shape)
    return _CONVERSE_SHAPE[0]


_CONVERSE_SHAPE: list = []


def _converse_problem(body, model):
    import botocore.exceptions
    import botocore.validate
    try:
        botocore.validate.validate_parameters(dict(body, modelId=model), _converse_shape())
    except botocore.exceptions.ParamValidationError as exc:
        return str(exc)
    msgs = body["messages"]
    if not msgs or msgs[0]["role"] != "user":
        return "A conversation must start with a user message."
    if any(a["role"] == b["role"] for a, b in zip(msgs, msgs[1:])):
        return "A conversation must alternate between user and assistant roles."
    used = [b for m in msgs for b in m["content"] if "toolUse" in b or "toolResult" in b]
    if used and not body.get("toolConfig"):
        return ("The toolConfig field must be defined when using toolUse and toolResult "
                "content blocks.")
    for i, (a, b) in enumerate(zip(msgs, msgs[1:])):
        calls = {c["toolUse"]["toolUseId"] for c in a["content"] if "toolUse" in c}
        answered = {c["toolResult"]["toolUseId"] for c in b["content"] if "toolResult" in c}
        if a["role"] == "assistant" and calls != answered:
            return (f"Expected toolResult blocks at messages.{i + 1}.content for the "
                    f"following Ids: {', '.join(sorted(calls - answered))}")
    return None


def _claude_text(content):
    return content if isinstance(content, str) else " ".join(
        c.get("text", "") for c in content if isinstance(c, dict))


def claude_turn(fake, body, where):
    """(blocks, stop reason) of the fake Claude, or a 400 Reply when the history breaks Claude's
    thinking rule: with thinking on, the assistant turn that called tools must start with the
    thinking block it came with, signature unchanged (Anthropic's 400 as quoted by
    test_11's claude_opus_4_7)."""
    msgs = body["messages"]
    thinking = (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    called = [m for m in msgs if m["role"] == "assistant" and isinstance(m["content"], list)
              and any(b.get("type") == "tool_use" for b in m["content"])]
    if thinking and called and (called[-1]["content"][0].get("type") != "thinking" or
                                called[-1]["content"][0].get("signature") not in fake.signed):
        return _anthropic_error("messages.1.content.0.type: Expected `thinking` or "
                                "`redacted_thinking`, but found `tool_use`. When `thinking` is "
                                "enabled, a final `assistant` message must start with a "
                                "thinking block"), None
    last = msgs[-1]["content"]
    result = next((_claude_text(b["content"]) for b in last if isinstance(b, dict) and
                   b.get("type") == "tool_result"), None) if isinstance(last, list) else None
    text, call = cloud_script(result, [t.get("name") for t in body.get("tools") or []], where)
    blocks = []
    if thinking:
        fake.signed.append(f"sig-{where}-{len(fake.requests)}")
        blocks.append({"type": "thinking", "thinking": f"thinking on {where}",
                       "signature": fake.signed[-1]})
    if call:
        blocks.append({"type": "tool_use", "id": f"toolu_{len(fake.requests):02d}",
                       "name": call[0], "input": call[1]})
    else:
        blocks.append({"type": "text", "text": text})
    return blocks, "tool_use" if call else "end_turn"


def claude_name(model):
    """The model name Claude's answers carry on a cloud: Anthropic's own, with its date
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0" and "claude-sonnet-4-5@20250929" answer as
    "claude-sonnet-4-5-20250929"; Bedrock's ids start "msg_bdrk_", AWS Bedrock user guide,
    "Anthropic Claude Messages API", response)."""
    name = re.sub(r"^(?:[a-z]+\.)?anthropic\.", "", model.rsplit("/", 1)[-1])
    return re.sub(r"-v\d+(?::\d+)?$", "", name).replace("@", "-")


def claude_events(blocks, stop, model):
    """The Messages API stream events of an answer: each block in two deltas (thinking: its
    text, then its signature_delta)."""
    def delta(i, kind, key, value):
        return {"type": "content_block_delta", "index": i, "delta": {"type": kind, key: value}}
    out = [{"type": "message_start", "message": {
        "id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": claude_name(model),
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 21, "output_tokens": 1}}}]
    for i, b in enumerate(blocks):
        empty = {"thinking": dict(b, thinking="", signature=""), "text": dict(b, text=""),
                 "tool_use": dict(b, input={})}[b["type"]]
        out.append({"type": "content_block_start", "index": i, "content_block": empty})
        if b["type"] == "thinking":
            out += [delta(i, "thinking_delta", "thinking", b["thinking"]),
                    delta(i, "signature_delta", "signature", b["signature"])]
        elif b["type"] == "text":
            half = len(b["text"]) // 2
            out += [delta(i, "text_delta", "text", b["text"][:half]),
                    delta(i, "text_delta", "text", b["text"][half:])]
        else:
            args = json.dumps(b["input"])
            out += [delta(i, "input_json_delta", "partial_json", args[:5]),
                    delta(i, "input_json_delta", "partial_json", args[5:])]
        out.append({"type": "content_block_stop", "index": i})
    return out + [{"type": "message_delta", "delta": {"stop_reason": stop,
                                                      "stop_sequence": None},
                   "usage": {"output_tokens": 9}}, {"type": "message_stop"}]


def claude_message(blocks, stop, model):
    return {"id": "msg_bdrk_01", "type": "message", "role": "assistant",
            "model": claude_name(model), "content": blocks, "stop_reason": stop,
            "stop_sequence": None, "usage": {"input_tokens": 21, "output_tokens": 9}}


def converse_turn(body, model):
    """(content blocks, stopReason) of the fake Converse model: reasoning, then the script."""
    last = body["messages"][-1]["content"]
    results = [c["text"] for b in last if "toolResult" in b for c in b["toolResult"]["content"]
               if "text" in c]
    names = [t["toolSpec"]["name"] for t in (body.get("toolConfig") or {}).get("tools", [])]
    text, call = cloud_script(" ".join(results) if results else None, names, model)
    blocks = [{"reasoningContent": {"reasoningText": {"text": f"reasoning in {model}"}}}]
    if call:
        return blocks + [{"toolUse": {"toolUseId": f"tooluse_{len(body['messages'])}",
                                      "name": call[0], "input": call[1]}}], "tool_use"
    return blocks + [{"text": text}], "end_turn"


def converse_events(blocks, stop, tail=()):
    """ConverseStream's events for ``blocks``, as event-stream messages, then ``tail``."""
    out = [es_event("messageStart", {"role": "assistant"})]
    for i, b in enumerate(blocks):
        if "toolUse" in b:
            use = b["toolUse"]
            args = json.dumps(use["input"])
            out.append(es_event("contentBlockStart", {"contentBlockIndex": i, "start": {
                "toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}}}))
            deltas = [{"toolUse": {"input": args[:4]}}, {"toolUse": {"input": args[4:]}}]
        elif "text" in b:
            deltas = [{"text": b["text"][:3]}, {"text": b["text"][3:]}]
        else:
            deltas = [{"reasoningContent": {"text": b["reasoningContent"]["reasoningText"][
                "text"]}}]
        out += [es_event("contentBlockDelta", {"contentBlockIndex": i, "delta": d})
                for d in deltas]
        out.append(es_event("contentBlockStop", {"contentBlockIndex": i}))
    out += list(tail) or [es_event("messageStop", {"stopReason": stop}), es_event("metadata", {
        "usage": {"inputTokens": 30, "outputTokens": 8, "totalTokens": 38},
        "metrics": {"latencyMs": 12}})]
    return out


def bedrock_fake(upstream, *, region="us-east-1", api_key=None, token=AWS_SESSION, tail=()):
    """A fake bedrock-runtime endpoint (the rules above). ``tail``: event-stream messages that
    end a ConverseStream answer instead of messageStop and metadata (an exception event)."""
    fake = upstream()
    fake.signed = []

    def respond(rec):
        why = _bedrock_auth_problem(rec, fake.url, region, api_key, token)
        if why:
            return _aws_error(403, "UnrecognizedClientException" if api_key else
                              "InvalidSignatureException", why)
        m = _BEDROCK_OP.fullmatch(rec["path"])
        if rec["method"] != "POST" or m is None:
            return _aws_error(404, "UnknownOperationException", "Unknown operation")
        model, op = urllib.parse.unquote(m[1]), m[2]
        body = rec["json"] = json.loads(rec["body"])
        rec["model"], rec["op"] = model, op
        if op.startswith("converse"):
            why = _converse_problem(body, model)
            if why:
                return _aws_error(400, "ValidationException", why)
            blocks, stop = converse_turn(body, model)
            if op == "converse-stream":
                return Reply(chunks=converse_events(blocks, stop, tail),
                             content_type="application/vnd.amazon.eventstream")
            return Reply(body=json.dumps({
                "output": {"message": {"role": "assistant", "content": blocks}},
                "stopReason": stop, "usage": {"inputTokens": 30, "outputTokens": 8,
                                              "totalTokens": 38},
                "metrics": {"latencyMs": 12}}).encode())
        if not ("claude" in model or "anthropic." in model):
            return _aws_error(400, "ValidationException", f"{model} does not take the "
                                                          f"Anthropic Messages body")
        extra = sorted(set(body) & {"model", "stream"})
        betas = body.get("anthropic_beta", [])
        if body.get("anthropic_version") != "bedrock-2023-05-31" or extra:
            return _aws_error(400, "ValidationException", "Malformed input request: #: "
                              f"extraneous key [{(extra or ['anthropic_version'])[0]}] is not "
                              "permitted")
        if not isinstance(betas, list) or not set(betas) <= BEDROCK_BETAS:
            return _aws_error(400, "ValidationException", "invalid beta flag")
        blocks, stop = claude_turn(fake, body, "bedrock")
        if stop is None:
            return blocks
        if op == "invoke":
            return Reply(body=json.dumps(claude_message(blocks, stop, model)).encode())
        events = claude_events(blocks, stop, model)
        events[-1]["amazon-bedrock-invocationMetrics"] = {"inputTokenCount": 21,
                                                          "outputTokenCount": 9}
        return Reply(chunks=[bedrock_chunk(e) for e in events],
                     content_type="application/vnd.amazon.eventstream")
    fake.responder = respond
    return fake


def bedrock_chan(fake, **kw):
    """A Bedrock channel on ``fake``: SigV4 with temporary credentials unless api_key is set."""
    c = {"name": kw.pop("name", "bedrock"), "type": "bedrock", "region": "us-east-1",
         "base_url": fake.url, "api_key": ""}
    if "api_key" not in kw:
        c.update(aws_access_key_id=AWS_KEY_ID, aws_secret_access_key=AWS_SECRET,
                 aws_session_token=AWS_SESSION)
    c.update(kw)
    return c


def gemini_turn(fake, body, model):
    """The fake Gemini's parts: a thought, then the script; a call carries a thoughtSignature
    (bytes, base64 in JSON). None when a Gemini 3 history lost a signature."""
    turns = body["contents"]
    for c in turns:
        for p in c["parts"]:
            if model.startswith("gemini-3") and "functionCall" in p and \
                    p.get("thoughtSignature") not in fake.signed:
                return None
    results = [json.dumps(p["functionResponse"]["response"]) for p in turns[-1]["parts"]
               if "functionResponse" in p]
    names = [d["name"] for t in body.get("tools") or [] for d in t.get("functionDeclarations",
                                                                        [])]
    text, call = cloud_script(" ".join(results) if results else None, names, f"vertex {model}")
    if (body.get("generationConfig") or {}).get("responseMimeType") == "application/json":
        text, call = json.dumps({"reasoning": "simple", "model_choice": "flash",
                                 "complexity_score": 1, "complexity_reasoning": "simple",
                                 "next_speaker": "user"}), None
    parts = [{"text": f"thinking on vertex {model}", "thought": True}]
    if call:
        fake.signed.append(ag.base64.b64encode(f"gsig-{len(fake.requests)}".encode()).decode())
        parts.append({"functionCall": {"name": call[0], "args": call[1]},
                      "thoughtSignature": fake.signed[-1]})
    else:
        parts.append({"text": text})
    return parts


def vertex_fake(upstream, public_key=None, *, api_key=None, refuse_tokens=False):
    """A fake Vertex AI (the rules above) with its OAuth token endpoint at /token. It records
    the tokens it issued in ``fake.issued``."""
    fake = upstream()
    fake.issued, fake.signed = [], []

    def token(rec):
        form = dict(urllib.parse.parse_qsl(rec["body"].decode(), strict_parsing=True))
        head, claims = verify_jwt(public_key, form["assertion"])
        assert rec["headers"]["content-type"] == "application/x-www-form-urlencoded"
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        assert head == {"alg": "RS256", "typ": "JWT", "kid": "kid-123"}
        assert claims["iss"] == "gw@p.iam.gserviceaccount.com"
        assert claims["aud"] == f"{fake.url}/token"
        assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
        assert abs(claims["iat"] - time.time()) < 300 and claims["exp"] - claims["iat"] <= 3600
        if refuse_tokens:
            return Reply(400, json.dumps({
                "error": "invalid_grant", "error_description": "Invalid JWT: Token must be a "
                "short-lived token (60 minutes) and in a reasonable timeframe. Check your iat "
                "and exp values in the JWT claim."}).encode())
        fake.issued.append(f"ya29.vertex-{len(fake.issued)}")
        return Reply(body=json.dumps({"access_token": fake.issued[-1], "expires_in": 3599,
                                      "token_type": "Bearer"}).encode())

    def respond(rec):
        if rec["path"] == "/token":
            return token(rec)
        m = _VERTEX_OP.fullmatch(rec["path"])
        if m is None:
            return _google_error(404, "NOT_FOUND", f"{rec['path'][:80]} was not found")
        h = rec["headers"]
        express = m["project"] is None
        if express and (api_key is None or h.get("x-goog-api-key") != api_key or
                        m["publisher"] != "google") or not express and (
                h.get("authorization") not in [f"Bearer {t}" for t in fake.issued]):
            return _google_error(401, "UNAUTHENTICATED", "Request had invalid authentication "
                                                         "credentials.")
        body = rec["json"] = json.loads(rec["body"])
        model = rec["model"] = urllib.parse.unquote(m["model"])
        rec["op"] = m["method"]
        if m["publisher"] == "anthropic":
            streams = m["method"] == "streamRawPredict"
            if body.get("anthropic_version") != "vertex-2023-10-16" or "model" in body or \
                    bool(body.get("stream")) != streams or m["method"] not in (
                    "rawPredict", "streamRawPredict"):
                return _google_error(400, "INVALID_ARGUMENT", "the rawPredict body is wrong")
            refused = [b for b in map(str.strip, h.get("anthropic-beta", "").split(","))
                       if b and b not in VERTEX_BETAS]
            if refused:
                flags = ", ".join(f"`{b}`" for b in refused)
                return _anthropic_error(f"Unexpected value(s) {flags} for the `anthropic-beta`"
                                        f" header. Please consult our "
                                        f"documentation at docs.anthropic.com or try again "
                                        f"without the header.")
            blocks, stop = claude_turn(fake, body, "vertex")
            if stop is None:
                return blocks
            if not streams:
                return Reply(body=json.dumps(claude_message(blocks, stop, model)).encode())
            return Reply(chunks=[f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                                 for e in claude_events(blocks, stop, model)],
                         content_type="text/event-stream")
        unknown = sorted(set(body) - _GEMINI_FIELDS)
        if unknown or m["method"] not in ("generateContent", "streamGenerateContent"):
            return _google_error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. "
                                                          f"Unknown name {unknown[:1]}")
        parts = gemini_turn(fake, body, model)
        if parts is None:
            return _google_error(400, "INVALID_ARGUMENT", "Function call is missing a "
                                                          "thought_signature in functionCall "
                                                          "parts.")
        usage = {"promptTokenCount": 30, "candidatesTokenCount": 8, "thoughtsTokenCount": 4}
        whole = {"candidates": [{"content": {"role": "model", "parts": parts},
                                 "finishReason": "STOP"}], "usageMetadata": usage}
        if m["method"] == "generateContent":
            return Reply(body=json.dumps(whole).encode())
        chunks = [{"candidates": [{"content": {"role": "model", "parts": [p]}}]}
                  for p in parts[:-1]] + [whole | {"candidates": [dict(
                      whole["candidates"][0], content={"role": "model", "parts": parts[-1:]})]}]
        if m["query"] == "?alt=sse":
            return Reply(chunks=[f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks],
                         content_type="text/event-stream")
        return Reply(body=json.dumps(chunks).encode())
    fake.responder = respond
    return fake


def vertex_chan(fake, rsa_pem=None, **kw):
    """A Vertex channel on ``fake``: the service account's JSON object (its token_uri at the
    fake) unless api_key is set."""
    c = {"name": kw.pop("name", "vertex"), "type": "vertex", "base_url": fake.url,
         "api_key": "", "location": "global"}
    if "api_key" not in kw:
        c.update(project="gw-project", service_account=service_account_info(rsa_pem[1],
                                                                   f"{fake.url}/token"))
    c.update(kw)
    return c



# =================================================================================================
# End-to-end: the real coding CLIs (Codex, gemini-cli, Claude Code) through the gateway.
# .ci/run installs them with npm into .ci/node_modules; a machine without them skips
# these, CI never does.
# =================================================================================================

CLI_BIN = os.path.join(HERE, ".ci", "node_modules", ".bin")
SHELL_TOOLS = {"exec_command": {"cmd": "echo cli-ok"},
               "Bash": {"command": "echo cli-ok", "description": "print a word"},
               "run_shell_command": {"command": "echo cli-ok", "description": "print a word"}}


def _cli_bin(name):
    path = os.path.join(CLI_BIN, name)
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"the {name} CLI is missing: .ci/run installs it")
        pytest.skip(f"the {name} CLI is not installed (see .ci/run)")
    return path


def cli_upstream(rec):
    """An OpenAI-compatible model that runs the CLI's shell tool once, then answers with what
    the tool printed; JSON when a JSON answer is asked for (gemini-cli's router)."""
    body = json.loads(rec["body"])
    msgs = body.get("messages") or [{}]
    tools = [t["function"]["name"] for t in body.get("tools") or []]
    shell = next((t for t in SHELL_TOOLS if t in tools), None)
    call = None
    if msgs[-1].get("role") == "tool":
        text = f"DONE {str(msgs[-1].get('content'))[:300]}"
    elif body.get("response_format"):
        text = json.dumps({"reasoning": "simple", "model_choice": "flash",
                           "complexity_score": 1, "complexity_reasoning": "simple"})
    elif shell:
        text, call = "", {"index": 0, "id": "call_cli", "type": "function", "function": {
            "name": shell, "arguments": json.dumps(SHELL_TOOLS[shell])}}
    else:
        text = "hello from the gateway"
    usage = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
    if not body.get("stream"):
        msg = {"role": "assistant", "content": text or None}
        if call:
            msg["tool_calls"] = [{k: v for k, v in call.items() if k != "index"}]
        return Reply(body=json.dumps({"id": "c", "object": "chat.completion", "created": 1,
                                      "model": body["model"], "usage": usage, "choices": [{
                                          "index": 0, "message": msg, "finish_reason":
                                          "tool_calls" if call else "stop"}]}).encode())
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
    deltas = [{"role": "assistant", "content": ""}] + ([{"content": text}] if text else []) + \
        ([{"tool_calls": [call]}] if call else [])
    chunks = [dict(base, choices=[{"index": 0, "delta": d, "finish_reason": None}])
              for d in deltas]
    chunks.append(dict(base, choices=[{"index": 0, "delta": {},
                                       "finish_reason": "tool_calls" if call else "stop"}]))
    chunks.append(dict(base, choices=[], usage=usage))
    return Reply(chunks=[f"data: {json.dumps(c)}\n\n".encode() for c in chunks] +
                 [b"data: [DONE]\n\n"], content_type="text/event-stream")


def _run_cli(args, env, cwd, timeout=120):
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("OPENAI", "ANTHROPIC", "GEMINI", "GOOGLE", "CODEX"))}
    full_env.update(env)
    p = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


def _tool_result_seen(up, needle="cli-ok"):
    return any(needle in json.dumps(json.loads(r["body"]).get("messages", [])[-1:])
               for r in up.requests if r["method"] == "POST")


# A stdio MCP server (JSON-RPC 2.0, one message a line: the MCP stdio transport) with one tool.
MCP_ECHO_SERVER = r"""
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    result = {}
    if msg["method"] == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {
            "tools": {}}, "serverInfo": {"name": "probe", "version": "1"}}
    elif msg["method"] == "tools/list":
        result = {"tools": [{"name": "echo_words", "description": "Echo words back",
                             "inputSchema": {"type": "object", "required": ["words"],
                                             "properties": {"words": {"type": "string"}}}}]}
    elif msg["method"] == "tools/call":
        result = {"content": [{"type": "text",
                               "text": "mcp-said " + msg["params"]["arguments"]["words"]}]}
    print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}), flush=True)
"""


def test_15_codex_runs_its_shell_then_an_mcp_tool_through_a_converting_channel(gw, upstream,
                                                                               tmp_path):
    """One ``codex exec`` (one start of the CLI for both): its shell tool loop, then a tool of
    a stdio MCP server, all on the Responses API through a channel that converts to Chat."""
    codex = _cli_bin("codex")
    up = upstream()
    strict = strict_upstream("openai")

    def respond(rec):
        """The shell first; then search for the MCP tool (Codex defers MCP tools behind its
        tool_search for the models of its catalog) and call it once it is loaded; then answer
        with what both returned."""
        body = json.loads(rec["body"])
        names = [t["function"]["name"] for t in body.get("tools") or []]
        results = [str(m.get("content")) for m in body["messages"] if m["role"] == "tool"]
        checked = strict(rec)                          # a tool name OpenAI refuses: its 400
        if checked.status != 200 or "tool_search" not in names:
            return checked
        if not results:
            return _answer_in("openai", body, rec, "", "exec_command",
                              SHELL_TOOLS["exec_command"])
        if "mcp-said" in results[-1]:
            return _answer_in("openai", body, rec, f"DONE {results[0][:300]} got {results[-1]}",
                              None)
        if "mcp__probe__echo_words" in names:
            return _answer_in("openai", body, rec, "", "mcp__probe__echo_words",
                              {"words": "docs-ok"})
        return _answer_in("openai", body, rec, "", "tool_search", {"query": "echo"})
    up.responder = respond
    g = gw([chan(up, type="custom", base_url=up.url + "/v1")])
    server = tmp_path / "mcp_echo.py"
    server.write_text(MCP_ECHO_SERVER)
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(
        f'model = "gpt-5.5"\nmodel_provider = "gw"\n\n[model_providers.gw]\n'
        f'name = "gw"\nbase_url = "{g.url}/v1"\nenv_key = "GW_TOKEN"\nwire_api = "responses"\n'
        f'\n[mcp_servers.probe]\ncommand = {json.dumps(sys.executable)}\n'
        f'args = [{json.dumps(str(server))}]\n')
    rc, out = _run_cli([codex, "exec", "--skip-git-repo-check",
                        "--dangerously-bypass-approvals-and-sandbox",
                        "print the word, then echo the word"],
                       {"HOME": str(home), "CODEX_HOME": str(home / ".codex"),
                        "GW_TOKEN": TOKEN}, tmp_path)
    assert rc == 0, out[-2000:]
    assert "DONE" in out and "cli-ok" in out            # the shell ran, its output came back
    assert _tool_result_seen(up)
    assert "probe/echo_words" in out and "got " in out and "mcp-said docs-ok" in out
    assert "Model metadata" not in out                   # a model in Codex's own catalog
    assert _tool_result_seen(up, "mcp-said docs-ok")
    assert all(r["route"] == "/v1/responses" and r["status"] == 200
               for r in g.records(4) if r["route"] != "/v1/models")


DOCS_TOOL = "mcp__workspace_documents_server__search_the_workspace_documents_by_title_and_body"


def _docs_step(names, results, short):
    """The model of Claude Code's MCP session: (tool, args) to call next, or None to answer.
    Bash first, then ToolSearch for the MCP tool, the tool once it is offered."""
    if not results:
        return "Bash", SHELL_TOOLS["Bash"]
    if len(results) == 1:
        return "ToolSearch", {"query": "select:" + DOCS_TOOL}
    if len(results) == 2 and short in names:
        return short, {"words": "docs-ok"}
    return None


# Per channel format: (tool names offered, tool results sent back) of a request body.
DOCS_READERS = {
    "openai": lambda body: ([t["function"]["name"] for t in body.get("tools") or []],
                            [str(m.get("content")) for m in body["messages"]
                             if m["role"] == "tool"]),
    "responses": lambda body: ([t["name"] for t in body.get("tools") or []],
                               [str(i["output"]) for i in body["input"]
                                if i.get("type") == "function_call_output"]),
    "gemini": lambda body: ([d["name"] for t in body.get("tools") or []
                             for d in t["functionDeclarations"]],
                            [p["functionResponse"] for c in body["contents"] for p in c["parts"]
                             if "functionResponse" in p])}


def _docs_upstream(upstream, ctype, short, seen):
    """A strict fake of format ``ctype`` playing the model of Claude Code's MCP session
    (_docs_step); ``seen`` gets each turn's (names, results); the last answer quotes the first
    and the last result."""
    up = upstream()
    strict = strict_upstream(ctype)

    def respond(rec):
        body = json.loads(rec["body"])
        names, results = DOCS_READERS[ctype](body)
        checked = strict(rec)                          # a tool name the provider refuses: 400
        if checked.status != 200 or "ToolSearch" not in names:
            return checked
        seen.append((names, results))
        step = _docs_step(names, results, short)
        if step:
            return _answer_in(ctype, body, rec, "", *step)
        return _answer_in(ctype, body, rec, f"DONE {str(results[0])[:300]} got "
                                            f"{str(results[-1])[:300]}", None)
    up.responder = respond
    return up


def _claude_code_docs_session(g, tmp_path):
    """(exit status, output) of one Claude Code run through gateway ``g`` with a stdio MCP
    server whose one tool's full name is DOCS_TOOL."""
    server = tmp_path / "mcp_docs.py"
    server.write_text(MCP_ECHO_SERVER.replace('"echo_words"',
                                              json.dumps(DOCS_TOOL.split("__")[2])))
    config = json.dumps({"mcpServers": {"workspace_documents_server": {
        "command": sys.executable, "args": [str(server)]}}})
    return _run_cli([_cli_bin("claude"), "-p", "print the word, then search the documents",
                     "--mcp-config", config, "--allowedTools", f"Bash,{DOCS_TOOL}",
                     "--model", "claude-sonnet-4-6"],
                    dict(CLAUDE_ENV, HOME=str(tmp_path), ANTHROPIC_BASE_URL=g.url,
                         ANTHROPIC_API_KEY=TOKEN), tmp_path)


def test_15_claude_code_runs_bash_then_finds_and_runs_an_mcp_tool_whose_name_passes_64(
        gw, upstream, tmp_path):
    """One Claude Code session through an OpenAI channel (one start of the CLI for all): its
    Bash tool loop, then an MCP tool whose full name passes OpenAI's 64 characters. Claude Code
    (2.1.332) lists MCP tools only after its client-run ToolSearch has loaded them (a
    ``tool_reference`` in the search's result, the tool itself with ``defer_loading``): the
    channel sees the tool, under a name OpenAI takes, from that turn on and not before."""
    full = DOCS_TOOL
    short = ag.channel_tool_name(full, "custom")
    turns: list[tuple] = []
    up = _docs_upstream(upstream, "openai", short, turns)
    g = gw([chan(up, type="custom", base_url=up.url + "/v1", max_tokens_cap=8192)])
    rc, out = _claude_code_docs_session(g, tmp_path)
    assert rc == 0, out[-2000:]
    assert "DONE" in out and "cli-ok" in out                   # Bash ran, its output came back
    assert _tool_result_seen(up)
    assert "got mcp-said docs-ok" in out                       # so did the MCP tool's
    # Offered only from the search's result on (2 turns without it, then with it), the deferred
    # placeholder never; the search's tool_reference reached the model as text.
    seen = [names for names, _ in turns]
    assert [short in names for names in seen] == [False, False, True, True], seen
    assert not any("DeferredToolPlaceholder" in names for names in seen)
    sent = [json.loads(r["body"]) for r in up.requests]
    # Every name the channel got as a name (tools, calls) is one it takes; the search's result
    # tells the model the name it can call (Claude Code's own text, the list of deferred tools
    # in a system reminder, keeps the full one, as the client wrote it).
    named = {t["function"]["name"] for b in sent for t in b.get("tools") or []} | {
        c["function"]["name"] for b in sent for m in b["messages"] for c in
        m.get("tool_calls") or []}
    assert short in named and full not in named, named
    results = [m["content"] for b in sent[-1:] for m in b["messages"] if m["role"] == "tool"]
    assert results[1] == f"Tool {short} is now available.", results[1][:300]
    wire = json.dumps(sent)
    assert "defer_loading" not in wire and "tool_reference" not in wire
    assert all(b["max_tokens"] <= 8192 for b in sent if "max_tokens" in b)
    # Claude Code's billing line (it sends one) stays with Anthropic: the system prompts are
    # the same from turn to turn.
    assert "x-anthropic-billing-header" not in wire
    assert len({json.dumps(b["messages"][0]) for b in sent}) == 1


def test_15_claude_code_finds_and_runs_a_long_mcp_tool_through_a_gemini_channel(gw, upstream,
                                                                                tmp_path):
    """The same session as above on a Gemini channel (its own 64-character rule, enforced by
    the strict fake): the search's result names the tool as Gemini was offered it."""
    short = ag.channel_tool_name(DOCS_TOOL, "gemini")
    turns: list[tuple] = []
    up = _docs_upstream(upstream, "gemini", short, turns)
    g = gw([chan(up, type="gemini", api_key="gm-key")])
    rc, out = _claude_code_docs_session(g, tmp_path)
    assert rc == 0, out[-2000:]
    assert "DONE" in out and "mcp-said docs-ok" in out
    search = turns[2][1][1]
    assert search["name"] == "ToolSearch"
    assert search["response"]["result"] == f"Tool {short} is now available."


def test_15_claude_code_runs_its_session_on_gpt_56_over_the_responses_api(gw, upstream,
                                                                        tmp_path):
    """The same session on an OpenAI channel whose model (gpt-5.6-sol, mapped from Claude
    Code's name) refuses function tools on Chat Completions: every turn goes to /v1/responses,
    calls and results paired by call_id (the strict fake refuses an unpaired result), and the
    search's result names the tool as the channel has it."""
    short = ag.channel_tool_name(DOCS_TOOL, "openai")
    turns: list[tuple] = []
    up = _docs_upstream(upstream, "responses", short, turns)
    g = gw([chan(up, type="openai", model_mapping={"claude-*": "gpt-5.6-sol"})])
    rc, out = _claude_code_docs_session(g, tmp_path)
    assert rc == 0, out[-2000:]
    assert "DONE" in out and "cli-ok" in out and "mcp-said docs-ok" in out
    assert {r["path"] for r in up.requests} == {"/v1/responses"}
    assert [short in names for names, _ in turns] == [False, False, True, True]
    assert turns[-1][1][1] == f"Tool {short} is now available."
    assert all(json.loads(r["body"])["model"] == "gpt-5.6-sol" for r in up.requests)


def test_15_claude_codes_own_model_names_reach_a_channel_mapped_by_a_pattern(gw, upstream,
                                                                              tmp_path):
    """Claude Code 2.1.332 asks for claude-opus-5-5 unless told (claude-sonnet-5-5 and
    claude-haiku-5-5 for its aliases): one pattern maps them all, as the README shows."""
    up = upstream()
    up.responder = lambda rec: _answer_in("openai", json.loads(rec["body"]), rec, "hello", None)
    g = gw([chan(up, type="custom", base_url=up.url + "/v1", models=["deepseek-v4-flash"],
                 model_mapping={"claude-*": "deepseek-v4-flash"})])
    for args in ([], ["--model", "haiku"]):
        rc, out = _run_cli([_cli_bin("claude"), "-p", "hi", *args],
                           dict(CLAUDE_ENV, HOME=str(tmp_path), ANTHROPIC_BASE_URL=g.url,
                                ANTHROPIC_API_KEY=TOKEN), tmp_path)
        assert rc == 0 and "hello" in out, out[-2000:]
    # (a streamed answer's record is written once its last byte is out: wait for both)
    assert [r["model"] for r in g.records(2)] == ["claude-opus-5-5", "claude-haiku-5-5"]
    assert {json.loads(r["body"])["model"] for r in up.requests} == {"deepseek-v4-flash"}


# Issue 12: Claude Code's own reading of a context overflow from another provider
def test_15_claude_code_sees_a_context_overflow_as_prompt_too_long(gw, upstream, tmp_path):
    claude = _cli_bin("claude")
    up = upstream([Reply(400, json.dumps(OVERFLOWS[4][1]).encode())])       # vLLM's wording
    g = gw([chan(up, type="custom", base_url=up.url + "/v1")])
    rc, out = _run_cli([claude, "-p", "hello", "--model", "claude-sonnet-4-5"],
                       {"HOME": str(tmp_path), "ANTHROPIC_BASE_URL": g.url,
                        "ANTHROPIC_API_KEY": TOKEN, "DISABLE_AUTOUPDATER": "1",
                        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}, tmp_path)
    # Claude Code took it for its own "prompt is too long" and read both numbers from it.
    assert rc != 0 and "Prompt is too long" in out, out[-2000:]
    assert "122946" in out and "16384" in out and "API Error" not in out


# Issue 12: Codex's reading of a context overflow from another provider
def test_15_codex_sees_a_context_overflow(gw, upstream, tmp_path):
    up = upstream([Reply(400, json.dumps(OVERFLOWS[0][1]).encode())])     # Anthropic's wording
    g = gw([chan(up, type="anthropic")])
    rc, out = _codex_run(g, tmp_path, "claude-opus-4-7", "hello")
    # Codex matched code context_length_exceeded: its own out-of-context message, no retries.
    assert rc != 0 and "ran out of room in the model's context window" in out, out[-2000:]
    assert len(up.requests) == 1


def _openai_tool_loop(c, model, stream, **kw):
    """The OpenAI SDK's tool loop: (the call it got, its reasoning, the final answer's text)."""
    def ask(messages):
        args = dict(model=model, messages=messages, tools=TOOLS, **kw)
        if not stream:
            msg = c.chat.completions.create(**args).choices[0].message
            return msg, (msg.model_extra or {}).get("reasoning_content") or ""
        with c.chat.completions.stream(**args) as s:
            reasoning = "".join((e.chunk.choices[0].delta.model_extra or {}).get(
                "reasoning_content") or "" for e in s if e.type == "chunk" and e.chunk.choices)
            return s.get_final_completion().choices[0].message, reasoning
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first, reasoning = ask(messages)
    call = first.tool_calls[0]
    messages += [first.model_dump(exclude_none=True, exclude={"parsed"}),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
    return call, reasoning, ask(messages)[0].content


def _claude_code_loop(g, tmp_path, model):
    """Claude Code's tool loop (Bash) with thinking on, streaming, through gateway ``g``."""
    rc, out = _run_cli([_cli_bin("claude"), "-p", "print the word", "--allowedTools", "Bash",
                        "--model", model],
                       dict(CLAUDE_ENV, HOME=str(tmp_path), ANTHROPIC_BASE_URL=g.url,
                            ANTHROPIC_API_KEY=TOKEN), tmp_path)
    assert rc == 0, out[-2000:]
    assert "DONE" in out and "cli-ok" in out
    return out


def _claude_code_turns(fake):
    """The fake's requests of Claude Code's tool loop: the call, then its result."""
    turns = [r for r in fake.requests if r.get("op") and r["json"].get("tools")]
    results = [r for r in turns if "cli-ok" in json.dumps(r["json"]["messages"][-1])]
    assert results, [r["json"]["messages"][-1] for r in turns]
    return results[-1]


def test_15_claude_code_through_bedrock_streams_thinking_and_runs_bash(gw, upstream, tmp_path):
    fake = bedrock_fake(upstream)
    # An alias mapped to an inference profile: the answers name the alias again, or Claude
    # Code would drop the thinking block it must send back (see AnthropicDialect.named).
    g = gw([bedrock_chan(fake, model_mapping={
        "claude-sonnet-4-5": "us.anthropic.claude-sonnet-4-5-20250929-v1:0"})])
    _claude_code_loop(g, tmp_path, "claude-sonnet-4-5")
    last = _claude_code_turns(fake)
    # Relayed to InvokeModelWithResponseStream, SigV4-signed, the thinking block Claude Code
    # got from the event stream sent back with its signature before the Bash call.
    assert last["op"] == "invoke-with-response-stream"
    assert last["model"] == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert last["json"]["thinking"]["type"] in ("enabled", "adaptive")
    called = last["json"]["messages"][-2]["content"]
    assert called[0]["type"] == "thinking" and called[0]["signature"] in fake.signed
    assert called[-1]["type"] == "tool_use" and called[-1]["name"] == "Bash"
    assert all(r["status"] == 200 for r in g.records(2))


def test_15_claude_code_through_vertex_streams_raw_predict(gw, upstream, rsa_pem, tmp_path):
    fake = vertex_fake(upstream, rsa_pem[0].public_key())
    g = gw([vertex_chan(fake, rsa_pem, model_mapping={
        "claude-sonnet-4-5-20250929": "claude-sonnet-4-5@20250929"})])
    _claude_code_loop(g, tmp_path, "claude-sonnet-4-5-20250929")
    last = _claude_code_turns(fake)
    assert last["path"] == ("/v1/projects/gw-project/locations/global/publishers/anthropic/"
                            "models/claude-sonnet-4-5%4020250929:streamRawPredict")
    assert last["headers"]["authorization"] == f"Bearer {fake.issued[0]}"
    assert last["json"]["anthropic_version"] == "vertex-2023-10-16"
    assert "model" not in last["json"] and last["json"]["stream"] is True
    # Only the beta flags Vertex takes went on (the fake refuses the others Claude Code sends).
    assert "interleaved-thinking-2025-05-14" in last["headers"]["anthropic-beta"].split(",")
    called = last["json"]["messages"][-2]["content"]
    assert called[0]["type"] == "thinking" and called[0]["signature"] in fake.signed
    assert len(fake.issued) == 1                      # one token for the whole session


def _codex_run(g, tmp_path, model, prompt):
    """(exit status, output) of ``codex exec`` through gateway ``g`` (the Responses API,
    streaming, no retries)."""
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "gw"\n\n[model_providers.gw]\n'
        f'name = "gw"\nbase_url = "{g.url}/v1"\nenv_key = "GW_TOKEN"\nwire_api = "responses"\n'
        f'request_max_retries = 0\nstream_max_retries = 0\n')
    return _run_cli([_cli_bin("codex"), "exec", "--skip-git-repo-check", prompt],
                    {"HOME": str(home), "CODEX_HOME": str(home / ".codex"), "GW_TOKEN": TOKEN},
                    tmp_path)


def _codex(g, tmp_path, model):
    """Codex's tool loop through gateway ``g``: it ran the shell tool and showed the answer."""
    rc, out = _codex_run(g, tmp_path, model, "print the word")
    assert rc == 0, out[-2000:]
    assert "DONE" in out and "cli-ok" in out
    return out


def test_15_codex_on_gpt_6_without_responses_api_runs_its_tool_loop(gw, upstream, tmp_path):
    """Codex on an OpenAI channel without responses_api (its requests are converted) for a
    model that refuses tools on Chat Completions: the conversion goes to /v1/responses, and
    Codex's shell call and its output pair up there by call_id (the strict fake's rule)."""
    def respond(rec):
        body = json.loads(rec["body"])
        if not rec["path"].endswith("/v1/responses"):
            return openai_now(rec)                     # Chat Completions: refuses the tools
        refused = _responses_refusal(body)
        if refused:
            return refused
        outputs = [i["output"] for i in body["input"] if i.get("type") == "function_call_output"]
        if not outputs:
            return _responses_answer(body, "", "exec_command", SHELL_TOOLS["exec_command"])
        return _responses_answer(body, f"DONE {outputs[-1][:300]}", None)
    up = upstream()
    up.responder = respond
    # (gpt-5.5 is in Codex's own catalog, so Codex sends it its tools; the channel maps it)
    g = gw([chan(up, type="openai", model_mapping={"gpt-5.5": "gpt-6-astra"})])
    _codex(g, tmp_path, "gpt-5.5")
    assert {r["path"] for r in up.requests} == {"/v1/responses"}
    assert {json.loads(r["body"])["model"] for r in up.requests} == {"gpt-6-astra"}
    assert len(up.requests) == 2


def test_15_codex_through_bedrock_converse_runs_its_tool_loop(gw, upstream, tmp_path):
    fake = bedrock_fake(upstream)
    g = gw([bedrock_chan(fake, model_mapping={"gpt-5-codex": "openai.gpt-oss-120b-1:0"})])
    _codex(g, tmp_path, "gpt-5-codex")
    turns = [r for r in fake.requests if r.get("op")]
    assert {(r["op"], r["model"]) for r in turns} == {("converse-stream",
                                                       "openai.gpt-oss-120b-1:0")}
    # The fake checked the shape and turn order; here: the call and its result went back.
    last = turns[-1]["json"]
    assert "exec_command" in [t["toolSpec"]["name"] for t in last["toolConfig"]["tools"]]
    assert last["messages"][-2]["content"][-1]["toolUse"]["name"] == "exec_command"
    result = last["messages"][-1]["content"][0]["toolResult"]
    assert "cli-ok" in json.dumps(result) and result["toolUseId"] == "tooluse_1"
    assert all(r["status"] == 200 for r in g.records(2) if r["route"] == "/v1/responses")


def test_15_codex_through_vertex_gemini_runs_its_tool_loop(gw, upstream, rsa_pem, tmp_path):
    fake = vertex_fake(upstream, rsa_pem[0].public_key())
    g = gw([vertex_chan(fake, rsa_pem)])
    _codex(g, tmp_path, "gemini-3-pro-preview")
    turns = [r for r in fake.requests if r.get("op")]
    assert {r["path"] for r in turns} == {
        "/v1/projects/gw-project/locations/global/publishers/google/models/"
        "gemini-3-pro-preview:streamGenerateContent?alt=sse"}
    # Gemini 3 got its call back with the thoughtSignature it came with (else a 400).
    contents = turns[-1]["json"]["contents"]
    call = next(p for c in contents for p in c["parts"] if "functionCall" in p)
    assert call["functionCall"]["name"] == "exec_command" and call["thoughtSignature"] in \
        fake.signed
    assert "cli-ok" in json.dumps(contents[-1])


def _gemini_cli(g, tmp_path, model):
    """gemini-cli's tool loop (run_shell_command, --yolo) through gateway ``g``."""
    home = tmp_path / "home"
    (home / ".gemini").mkdir(parents=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps(
        {"security": {"auth": {"selectedType": "gemini-api-key"}},
         "selectedAuthType": "gemini-api-key"}))
    rc, out = _run_cli([_cli_bin("gemini"), "-p", "print the word", "-m", model, "--yolo"],
                       {"HOME": str(home), "GEMINI_API_KEY": TOKEN,
                        "GOOGLE_GEMINI_BASE_URL": g.url, "GEMINI_CLI_TRUST_WORKSPACE": "true",
                        "GEMINI_CLI_NO_RELAUNCH": "true"}, tmp_path, timeout=180)
    assert rc == 0, out[-2000:]
    assert "DONE" in out and "cli-ok" in out


def test_15_gemini_cli_through_vertex_then_bedrock(gw, upstream, rsa_pem, tmp_path):
    """One gemini-cli run (one start of the CLI) through both clouds: its first turn relayed
    to Vertex as it came, with the service account's token; Vertex then fails (503) and the
    turn with the tool's result falls back to Bedrock, converted both ways (ConverseStream,
    SigV4), whose answer gemini-cli shows."""
    fake = vertex_fake(upstream, rsa_pem[0].public_key())
    relay = fake.responder

    def vertex(rec):
        if _VERTEX_OP.fullmatch(rec["path"]) and any(r.get("op") for r in fake.requests):
            return _google_error(503, "UNAVAILABLE", "The service is currently unavailable.")
        return relay(rec)
    fake.responder = vertex
    aws = bedrock_fake(upstream)
    g = gw([vertex_chan(fake, rsa_pem),
            bedrock_chan(aws, priority=1, model_mapping={     # the name gemini-cli sends
                name: "openai.gpt-oss-120b-1:0" for name in ("gemini-3-pro-preview",
                                                             "gemini-3.1-pro-preview")})],
           settings={"debug_capture": 20})
    _gemini_cli(g, tmp_path, "gemini-3-pro-preview")
    turns = [r for r in fake.requests if r.get("op")]
    assert len(turns) == 1
    assert turns[0]["headers"]["authorization"] == f"Bearer {fake.issued[0]}"
    assert "x-goog-api-key" not in turns[0]["headers"]
    assert re.fullmatch(r"/v1/projects/gw-project/locations/global/publishers/google/"
                        r"models/gemini-3[.\w-]*:streamGenerateContent\?alt=sse",
                        turns[0]["path"])
    # Relayed: the body the fake got is the one gemini-cli sent, byte for byte (the capture
    # holds both, the client's and the upstream's).
    records = g.records(2)
    texts = [g.gateway.capture.text(rec["id"]) for rec in records]
    assert any(t.count(turns[0]["body"].decode()) == 2 for t in texts)
    # The next turn: converted to ConverseStream with Vertex's call and the tool's output (the
    # fake checked its shape and signature), answered there and shown.
    [last] = [r for r in aws.requests if r.get("op")]
    assert (last["op"], last["model"]) == ("converse-stream", "openai.gpt-oss-120b-1:0")
    sent = last["json"]["messages"]
    assert sent[-2]["content"][-1]["toolUse"]["name"] == "run_shell_command"
    assert "cli-ok" in json.dumps(sent[-1]["content"][0]["toolResult"])
    final = records[-1]
    assert (final["channel"], final["status"], final["tried"]) == (
        "bedrock", 200, ["vertex", "bedrock"])
    assert [f["channel"] for f in final["failures"]] == ["vertex"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model, ops", [
    ("anthropic.claude-sonnet-4-5-20250929-v1:0", ("invoke", "invoke-with-response-stream")),
    ("openai.gpt-oss-120b-1:0", ("converse", "converse-stream"))])
def test_15_openai_sdk_tool_loop_through_bedrock_signed_with_sigv4(gw, upstream, model, ops,
                                                                    stream):
    fake = bedrock_fake(upstream)
    g = gw([bedrock_chan(fake)])
    call, reasoning, answer = _openai_tool_loop(g.openai(), model, stream,
                                                reasoning_effort="low")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather",
                                                                         {"city": "Paris"})
    assert answer == "DONE Sunny"
    got = fake.requests
    assert [(r["op"], r["model"]) for r in got] == [(ops[stream], model)] * 2
    assert all(r["headers"]["x-amz-security-token"] == AWS_SESSION for r in got)
    if "claude" in model:
        # Claude thought: the reasoning reached the client, and the signed thinking block went
        # back before the tool call (the fake refuses the turn otherwise).
        assert reasoning == "thinking on bedrock"
        assert got[0]["json"]["thinking"]["type"] == "enabled"
        assert got[1]["json"]["messages"][1]["content"][0] == {
            "type": "thinking", "thinking": "thinking on bedrock", "signature": fake.signed[0]}
    else:
        assert reasoning == f"reasoning in {model}"
        assert got[1]["json"]["messages"][2]["content"] == [{"toolResult": {
            "toolUseId": "tooluse_1", "content": [{"text": "Sunny"}], "status": "success"}}]
        assert got[1]["json"]["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"
    assert [r["status"] for r in g.records(2)] == [200, 200]


def test_15_bedrock_fake_streams_are_what_botocore_parses():
    import botocore.eventstream
    blocks = [{"type": "thinking", "thinking": "t", "signature": "s"},
              {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]
    events = claude_events(blocks, "tool_use", "m")
    for stream, expect in (
            (b"".join(bedrock_chunk(e) for e in events),
             [("chunk", {"bytes": ag.base64.b64encode(json.dumps(e).encode()).decode()})
              for e in events]),
            (b"".join(converse_events([{"text": "hello"}], "end_turn")),
             [("messageStart", {"role": "assistant"}),
              ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "hel"}}),
              ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo"}}),
              ("contentBlockStop", {"contentBlockIndex": 0}),
              ("messageStop", {"stopReason": "end_turn"}),
              ("metadata", {"usage": {"inputTokens": 30, "outputTokens": 8,
                                      "totalTokens": 38}, "metrics": {"latencyMs": 12}})])):
        buf = botocore.eventstream.EventStreamBuffer()
        buf.add_data(stream)
        messages = list(buf)
        assert [(m.headers[":event-type"], json.loads(m.payload)) for m in messages] == expect
        assert {m.headers[":message-type"] for m in messages} == {"event"}


def test_15_bedrock_api_key_and_the_anthropic_sdk_relayed_to_invoke_model(gw, upstream):
    fake = bedrock_fake(upstream, api_key=BEDROCK_API_KEY)
    g = gw([bedrock_chan(fake, api_key=BEDROCK_API_KEY,
                         model_mapping={"claude-sonnet-4-5": "us.anthropic.claude-sonnet-4-5-"
                                                             "20250929-v1:0"})])
    c = g.anthropic()
    # The beta API, as Claude Code uses it: /v1/messages?beta=true and an anthropic-beta header
    # with a flag Bedrock takes and one it would refuse the request for.
    with c.beta.messages.stream(model="claude-sonnet-4-5", max_tokens=2000,
                                tools=ANTHROPIC_TOOLS,
                                thinking={"type": "enabled", "budget_tokens": 1024},
                                messages=[{"role": "user", "content": "Weather?"}],
                                betas=["interleaved-thinking-2025-05-14",
                                       "prompt-caching-scope-2026-01-05"]) as s:
        first = s.get_final_message()
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    assert first.content[0].signature == fake.signed[0]
    sent = fake.requests[0]
    assert sent["headers"]["authorization"] == f"Bearer {BEDROCK_API_KEY}"
    assert "x-amz-date" not in sent["headers"] and "anthropic-beta" not in sent["headers"]
    assert sent["path"] == ("/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/"
                            "invoke-with-response-stream")
    assert sent["json"] == {"max_tokens": 2000, "tools": ANTHROPIC_TOOLS,
                            "thinking": {"type": "enabled", "budget_tokens": 1024},
                            "messages": [{"role": "user", "content": "Weather?"}],
                            "anthropic_version": "bedrock-2023-05-31",
                            "anthropic_beta": ["interleaved-thinking-2025-05-14"]}
    first.content = [b.model_dump(exclude_none=True) for b in first.content]
    done = c.messages.create(model="claude-sonnet-4-5", max_tokens=2000,
                             tools=ANTHROPIC_TOOLS,
                             thinking={"type": "enabled", "budget_tokens": 1024},
                             messages=[{"role": "user", "content": "Weather?"},
                                       {"role": "assistant", "content": first.content},
                                       {"role": "user", "content": [{
                                           "type": "tool_result", "tool_use_id":
                                           first.content[1]["id"], "content": "Sunny"}]}])
    assert done.content[-1].text == "DONE Sunny" and fake.requests[1]["op"] == "invoke"


@pytest.mark.parametrize("stream", [False, True])
def test_15_openai_sdk_tool_loop_through_vertex_with_a_service_account(gw, upstream, rsa_pem,
                                                                        stream):
    fake = vertex_fake(upstream, rsa_pem[0].public_key())
    g = gw([vertex_chan(fake, rsa_pem)])
    c = g.openai()
    for model, publisher in (("gemini-3-pro-preview", "google"),
                             ("claude-sonnet-4-5@20250929", "anthropic")):
        call, reasoning, answer = _openai_tool_loop(c, model, stream, reasoning_effort="low")
        assert call.function.name == "get_weather" and answer.startswith("DONE ")
        assert "Sunny" in answer and reasoning.startswith("thinking on vertex")
        method = {("google", False): "generateContent", ("google", True):
                  "streamGenerateContent?alt=sse", ("anthropic", False): "rawPredict",
                  ("anthropic", True): "streamRawPredict"}[publisher, stream]
        assert [r["path"] for r in fake.requests[-2:]] == [
            f"/v1/projects/gw-project/locations/global/publishers/{publisher}/models/"
            f"{urllib.parse.quote(model)}:{method}"] * 2
    # One token exchange served all four requests, each with it as the Bearer.
    chats = [r for r in fake.requests if r["path"] != "/token"]
    assert len(fake.requests) == 5 and fake.issued == ["ya29.vertex-0"]
    assert {r["headers"]["authorization"] for r in chats} == {"Bearer ya29.vertex-0"}
    assert fake.requests[2]["json"]["contents"][1]["parts"][-1]["thoughtSignature"] == \
        fake.signed[0]
    claude = fake.requests[3]["json"]
    assert claude["anthropic_version"] == "vertex-2023-10-16" and "model" not in claude


def test_15_openai_sdk_through_vertex_express_mode_with_an_api_key(gw, upstream):
    fake = vertex_fake(upstream, api_key="AQ.vertex-express-key")
    g = gw([vertex_chan(fake, api_key="AQ.vertex-express-key")])
    c = g.openai()
    r = c.chat.completions.create(model="gemini-2.5-flash",
                                  messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "hello from vertex gemini-2.5-flash"
    with c.chat.completions.stream(model="gemini-2.5-flash",
                                   messages=[{"role": "user", "content": "hi"}]) as s:
        assert s.get_final_completion().choices[0].message.content == \
            "hello from vertex gemini-2.5-flash"
    assert [r["path"] for r in fake.requests] == [
        "/v1/publishers/google/models/gemini-2.5-flash:generateContent",
        "/v1/publishers/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse"]
    assert all(r["headers"]["x-goog-api-key"] == "AQ.vertex-express-key" and
               "authorization" not in r["headers"] for r in fake.requests)


def test_15_bedrock_throttling_mid_stream_is_an_in_band_error(gw, upstream):
    fake = bedrock_fake(upstream, tail=[es_exception(
        "throttlingException", "Too many tokens, please wait before trying again.")])
    g = gw([bedrock_chan(fake)])
    got = []
    with pytest.raises(openai.APIError, match="Too many tokens, please wait") as e:
        with g.openai().chat.completions.create(
                model="amazon.nova-pro-v1:0", stream=True,
                messages=[{"role": "user", "content": "hi"}]) as s:
            for chunk in s:
                got.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert "throttlingException" in str(e.value)
    assert "".join(t or "" for t in got) == "hello from amazon.nova-pro-v1:0"
    rec = g.records()[-1]
    assert rec["status"] == 200 and "throttlingException" in rec["error"]


def test_15_vertex_token_refused_or_expired_falls_back_to_the_next_channel(gw, upstream, rsa_pem):
    fake = vertex_fake(upstream, rsa_pem[0].public_key(), refuse_tokens=True)
    backup = upstream([openai_chat_reply(text="from backup")])
    g = gw([vertex_chan(fake, rsa_pem), chan(backup, name="backup", priority=5)])
    r = g.openai().chat.completions.create(model="gemini-2.5-pro",
                                           messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "from backup"
    assert [r["path"] for r in fake.requests] == ["/token"]      # no chat without a token
    rec = g.records()[-1]
    assert rec["tried"] == ["vertex", "backup"] and rec["channel"] == "backup"
    # The refusal is the Vertex channel's failure, in its health, naming the grant error.
    events = json.dumps(g.events())
    assert "invalid_grant" in events and "Token must be a short-lived token" in events
    # A token Vertex no longer takes (expired, revoked): its 401 moves on to the next channel.
    fake2 = vertex_fake(upstream, rsa_pem[0].public_key())
    g2 = gw([vertex_chan(fake2, rsa_pem), chan(backup, name="backup", priority=5)])
    r = g2.openai().chat.completions.create(model="gemini-2.5-pro",
                                            messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "hello from vertex gemini-2.5-pro"
    fake2.issued.clear()
    r = g2.openai().chat.completions.create(model="gemini-2.5-pro",
                                            messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "from backup"
    assert g2.records(2)[-1]["tried"] == ["vertex", "backup"]


def test_15_the_cloud_fakes_refuse_what_the_clouds_refuse(gw, upstream, rsa_pem):
    """The fakes' checks bite: a wrong AWS secret, a wrong Bedrock API key, a wrong Vertex
    express key and a Gemini body with an unknown field reach the client as the cloud's
    refusals."""
    bedrock = bedrock_fake(upstream)
    vertex = vertex_fake(upstream, api_key="AQ.right")
    g = gw([bedrock_chan(bedrock, name="bad-secret", models=["amazon.nova-pro-v1:0"],
                         aws_secret_access_key="not-the-secret"),
            bedrock_chan(bedrock, name="bad-key", api_key="ABSKwrong",
                         models=["anthropic.claude-haiku-4-5-20251001-v1:0"]),
            vertex_chan(vertex, api_key="AQ.wrong", models=["gemini-2.5-flash"]),
            vertex_chan(vertex, name="vertex-ok", api_key="AQ.right",
                        models=["gemini-2.5-pro"])])
    c = g.openai()
    for model, status, why in (
            ("amazon.nova-pro-v1:0", 403, "The request signature we calculated does not match"),
            ("anthropic.claude-haiku-4-5-20251001-v1:0", 403, "security token included"),
            ("gemini-2.5-flash", 401, "invalid authentication credentials")):
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == status and why in str(e.value), (model, str(e.value))
    st, _, body = g.request("POST", "/v1beta/models/gemini-2.5-pro:generateContent", {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}], "thinking": {}})
    assert st == 400 and "Unknown name ['thinking']" in body.decode()

@pytest.mark.parametrize("stream", [False, True])
def test_15_genai_sdk_function_calling_through_bedrock_and_vertex(gw, upstream, rsa_pem,
                                                                   stream):
    bedrock = bedrock_fake(upstream)
    vertex = vertex_fake(upstream, rsa_pem[0].public_key())
    g = gw([bedrock_chan(bedrock, models=["gemini-2.5-pro"],
                         model_mapping={"gemini-2.5-pro": "openai.gpt-oss-120b-1:0"}),
            vertex_chan(vertex, rsa_pem, models=["gemini-3-flash-preview"])])
    c = _genai(g)
    config = genai_types.GenerateContentConfig(
        tools=_genai_tools(),
        automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True))
    for model, fake in (("gemini-2.5-pro", bedrock), ("gemini-3-flash-preview", vertex)):
        def ask(contents):
            if not stream:
                return c.models.generate_content(model=model, contents=contents,
                                                 config=config).candidates[0].content.parts
            return [p for ch in c.models.generate_content_stream(
                model=model, contents=contents, config=config)
                for p in ch.candidates[0].content.parts or []]
        contents = [genai_types.Content(role="user", parts=[genai_types.Part(text="weather?")])]
        parts = ask(contents)
        assert [(p.function_call.name, p.function_call.args) for p in parts
                if p.function_call] == [("get_weather", {"city": "Paris"})]
        assert any(p.thought and p.text for p in parts)          # the reasoning, as thought
        contents += [genai_types.Content(role="model", parts=parts), genai_types.Content(
            role="user", parts=[genai_types.Part.from_function_response(
                name="get_weather", response={"result": "sunny"})])]
        text = "".join(p.text or "" for p in ask(contents) if not p.thought)
        assert text.startswith("DONE ") and "sunny" in text
    converse = [r for r in bedrock.requests if r.get("op")]
    assert [r["op"] for r in converse] == ["converse-stream" if stream else "converse"] * 2
    gemini = [r for r in vertex.requests if r.get("op")]
    # Relayed to Vertex: the call went back with its signature (Gemini 3 refuses it without).
    assert gemini[1]["json"]["contents"][1]["parts"][-1]["thoughtSignature"] == vertex.signed[0]
    assert all(r["headers"]["authorization"] == "Bearer ya29.vertex-0" for r in gemini)


CLAUDE_ENV = {"DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
              "MAX_THINKING_TOKENS": "1024"}


# =================================================================================================
# Fuzzing (hypothesis): arbitrary input gives a result or the gateway's own error, and the
# decoders give the same result fed whole or in pieces
# =================================================================================================

def fuzz(strategies):
    """The test runs the decorated check on examples hypothesis draws from
    ``strategies(st)``, deterministically (``derandomize``: the same examples every run, no
    example database) and a bounded number of them. Hypothesis is imported when a fuzz test
    runs, not at collection."""
    def wrap(check):
        def test():
            HealthCheck, given, settings, st = _hypothesis()
            settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                     database=None, suppress_health_check=[HealthCheck.too_slow])(
                given(*strategies(st))(check))()
        test.__name__, test.__qualname__, test.__doc__ = \
            check.__name__, check.__qualname__, check.__doc__
        return test
    return wrap


FUZZ_EXAMPLES = 100


def _hypothesis():
    """hypothesis, imported without pytest's assert rewriting: pytest rewrites every module of a
    package that ships a pytest plugin, as hypothesis does, and without a bytecode cache
    (PYTHONDONTWRITEBYTECODE) that turns a one-second import into several. Its own asserts are
    not what these tests check."""
    if "hypothesis.strategies" not in sys.modules:
        hooks = [f for f in sys.meta_path if type(f).__name__ == "AssertionRewritingHook"]
        for hook in hooks:
            sys.meta_path.remove(hook)
        try:
            _import_for_good("hypothesis.strategies")
        finally:
            sys.meta_path[:0] = hooks
    from hypothesis import HealthCheck, given, settings, strategies
    return HealthCheck, given, settings, strategies


def json_values(st):
    return st.recursive(
        st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) |
        st.text(max_size=20),
        lambda children: st.lists(children, max_size=5) |
        st.dictionaries(st.sampled_from([
            "model", "messages", "role", "content", "type", "text", "tool_calls", "function",
            "arguments", "name", "id", "tools", "input", "parts", "contents", "system",
            "stream", "tool_use_id", "source", "image_url", "url", "data", "functionCall",
            "functionResponse", "args", "response", "choices", "delta", "message", "usage",
            "candidates", "index", "max_tokens", "tool_choice", "thinking", "reasoning",
            "output", "call_id", "finish_reason", "generationConfig", "systemInstruction",
            "error"]), children, max_size=6),
        max_leaves=30)


def _pieces(data: bytes, cuts: list[int]):
    points = sorted({c % (len(data) + 1) for c in cuts})
    prev = 0
    for p in points + [len(data)]:
        yield data[prev:p]
        prev = p


def _outcome(fn):
    try:
        return ("ok", fn())
    except ag.GatewayError as exc:
        return ("err", type(exc).__name__)


@fuzz(lambda st: [json_values(st)])
def test_fuzz_request_and_response_converters(value):
    body = value if isinstance(value, dict) else {"messages": value, "contents": value,
                                                  "input": value}
    for decode in (ag.openai_request_to_ir, ag.anthropic_request_to_ir,
                   ag.responses_request_to_ir, ag.gemini_request_to_ir):
        try:
            ir = decode(dict(body))
        except ag.GatewayError:
            continue
        for ctype in ag.CHANNEL_TYPES:
            try:
                ag.encode_upstream_chat(ctype, ir, "m", stream=True, max_tokens_cap=100)
            except ag.GatewayError as exc:
                assert exc.status == 400
        try:
            ag.estimate_tokens(ir)
        except ag.GatewayError:
            pass
    for decode in (ag.openai_response_to_ir, ag.anthropic_response_to_ir,
                   ag.gemini_response_to_ir, ag.ollama_response_to_ir):
        try:
            resp = decode(body)
        except ag.GatewayError:
            continue
        ir = ag.empty_request("m")
        for dialect in ag.DIALECTS.values():
            try:
                dialect.response(resp, "m", ir)
            except ag.GatewayError as exc:
                assert exc.status == 502


@fuzz(lambda st: [
    st.lists(st.sampled_from(_openai_tool_stream().split(b"\r\n\r\n")[:-1]), max_size=12),
    st.binary(max_size=40), st.lists(st.integers(0, 3000), max_size=10)])
def test_fuzz_stream_converters(events, junk, cuts):
    raw = b"\r\n\r\n".join(events) + junk
    for make_dec in (ag.OpenAIStreamDecoder, ag.AnthropicStreamDecoder, ag.GeminiStreamDecoder,
                     ag.OllamaStreamDecoder):
        for enc in (ag.OpenAIStreamEncoder("m", True), ag.AnthropicStreamEncoder("m"),
                    ag.ResponsesStreamEncoder("m", ag.empty_request("m")),
                    ag.GeminiStreamEncoder("m", {})):
            dec = make_dec()
            try:
                for piece in _pieces(raw, cuts):
                    enc.encode(dec.feed(piece))
                enc.encode(dec.close())
            except ag.GatewayError:
                pass


# Valid upstream answers and stream events of each channel type, for the fuzz tests below that
# put a value of another type somewhere in them (as a broken or hostile upstream would).
_VALID_ANSWERS = {
    "openai": {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "hello", "tool_calls": [{
                "id": "c", "type": "function", "function": {"name": "get",
                                                            "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 1}}},
    "anthropic": {"id": "msg", "type": "message", "role": "assistant", "model": "m",
                  "content": [{"type": "thinking", "thinking": "hm", "signature": "sig"},
                              {"type": "text", "text": "hello"},
                              {"type": "tool_use", "id": "t", "name": "get", "input": {"a": 1}}],
                  "stop_reason": "tool_use",
                  "usage": {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 1}},
    "gemini": {"candidates": [{"finishReason": "STOP", "content": {"role": "model", "parts": [
        {"text": "th", "thought": True}, {"text": "hello"},
        {"functionCall": {"name": "get", "args": {"a": 1}}, "thoughtSignature": "c2ln"}]}}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}, "modelVersion": "m"},
    "bedrock": {"output": {"message": {"role": "assistant", "content": [             # Converse
        {"reasoningContent": {"reasoningText": {"text": "hm", "signature": "sig"}}},
        {"reasoningContent": {"redactedContent": "b3BhcXVl"}}, {"text": "hello"},
        {"toolUse": {"toolUseId": "tu", "name": "get", "input": {"a": 1}}}]}},
        "stopReason": "tool_use", "usage": {"inputTokens": 5, "outputTokens": 2}},
    "ollama": {"model": "m", "created_at": "2026-01-01T00:00:00Z", "done": True,
               "done_reason": "stop", "prompt_eval_count": 5, "eval_count": 2,
               "message": {"role": "assistant", "content": "hello", "thinking": "t",
                           "tool_calls": [{"function": {"name": "get", "arguments": {"a": 1}}}]}},
}
_VALID_ANSWERS["responses"] = {   # the Responses API as an upstream (converts_to_responses)
    "id": "resp_1", "object": "response", "status": "completed", "model": "m", "output": [
        {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "t"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "hello", "annotations": []}]},
        {"type": "function_call", "call_id": "c", "name": "get", "arguments": "{}"}],
    "usage": {"input_tokens": 5, "output_tokens": 2,
              "input_tokens_details": {"cached_tokens": 1}}}
_VALID_EVENTS = {
    "openai": [{"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                              "content": ""}}]},
               {"id": "x", "choices": [{"index": 0, "delta": {"content": "hel"}}]},
               {"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [{
                   "index": 0, "id": "c", "type": "function",
                   "function": {"name": "get", "arguments": "{}"}}]},
                   "finish_reason": "tool_calls"}]},
               {"id": "x", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}],
    "anthropic": [
        {"type": "message_start", "message": {"id": "msg", "model": "m", "content": [],
                                              "usage": {"input_tokens": 5, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking",
                                                                      "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta",
                                                              "thinking": "hm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta",
                                                              "signature": "sig"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "t", "name": "get", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                              "partial_json": "{\"a\":1}"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
         "usage": {"output_tokens": 2}},
        {"type": "message_stop"}],
    "gemini": [{"candidates": [{"content": {"role": "model", "parts": [{"text": "hel"}]}}]},
               {"candidates": [{"finishReason": "STOP", "content": {"role": "model", "parts": [
                   {"functionCall": {"name": "get", "args": {}}}]}}],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}}],
    "ollama": [{"model": "m", "message": {"role": "assistant", "content": "hel"}, "done": False},
               {"model": "m", "message": {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get", "arguments": {}}}]}, "done": False},
               {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": "stop", "prompt_eval_count": 5, "eval_count": 2}],
    "responses": [
        {"type": "response.created", "response": {"id": "resp_1", "model": "m"}},
        {"type": "response.output_text.delta", "output_index": 0, "delta": "hel"},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "t"},
        {"type": "response.output_item.added", "output_index": 1, "item": {
            "type": "function_call", "call_id": "c", "name": "get", "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{}"},
        {"type": "response.output_item.done", "output_index": 1, "item": {
            "type": "function_call", "call_id": "c", "name": "get", "arguments": "{}"}},
        {"type": "response.completed", "response": {"usage": {"input_tokens": 5,
                                                              "output_tokens": 2}}}],
}
_ODD_VALUES = [None, True, 0, -1, 1.5, "", "x", [], [None], [[]], {}, {"type": None}, {"a": 1}]


def _with_odd_values(obj, picks):
    """``obj`` with the value at each picked path (an index into its paths, taken modulo their
    number) replaced by one of _ODD_VALUES."""
    obj = copy.deepcopy(obj)
    for where, odd in picks:
        paths, stack = [], [((), obj)]
        while stack:
            path, value = stack.pop()
            paths.append(path)
            items = value.items() if isinstance(value, dict) else \
                enumerate(value) if isinstance(value, list) else ()
            stack += [(path + (k,), v) for k, v in items]
        paths = [p for p in paths if p]
        if not paths:
            break
        path = paths[where % len(paths)]
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = copy.deepcopy(_ODD_VALUES[odd % len(_ODD_VALUES)])
    return obj


def _decoders(ctype):
    """upstream_decoders of a key of _VALID_ANSWERS ("responses": the Responses API's)."""
    return ag.upstream_decoders("openai", responses=True) if ctype == "responses" else \
        ag.upstream_decoders(ctype)


def _stream_bytes(ctype, events):
    if ctype == "ollama":
        return b"".join(json.dumps(e).encode() + b"\n" for e in events)
    named = ctype in ("anthropic", "responses")
    return b"".join((f"event: {e.get('type')}\n" if named and isinstance(e, dict) else "")
                    .encode() + b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


_PICKS = lambda st: st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 100)),  # noqa: E731
                             min_size=1, max_size=3)


@fuzz(lambda st: [st.integers(0, 100), _PICKS(st)])
def test_fuzz_streams_with_ill_typed_fields_end_in_a_502_or_convert(which, picks):
    """Every channel type's stream with one event's field of another type, through every client
    encoder, fed whole and one event per read: encoded bytes, or the gateway's 502; never
    another exception (a Gemini call named by a list once reached the Responses encoder)."""
    for ctype, valid in _VALID_EVENTS.items():
        events = list(valid)
        events[which % len(events)] = _with_odd_values(events[which % len(events)], picks)
        raw = _stream_bytes(ctype, events)
        for make_enc in (lambda: ag.OpenAIStreamEncoder("m", True),
                         lambda: ag.AnthropicStreamEncoder("m"),
                         lambda: ag.ResponsesStreamEncoder("m", ag.empty_request("m")),
                         lambda: ag.GeminiStreamEncoder("m", {})):
            for pieces in ([raw], [_stream_bytes(ctype, [e]) for e in events]):
                enc, dec = make_enc(), _decoders(ctype)[1]()
                try:
                    for piece in pieces:
                        assert isinstance(enc.encode(dec.feed(piece)), bytes)
                    enc.encode(dec.close())
                except ag.GatewayError as exc:
                    assert exc.status == 502, (ctype, exc.message)


def test_09_an_answer_failing_a_check_shared_with_requests_is_the_upstreams_502():
    """Found by the fuzz test below at 1,500 examples: an Anthropic answer with a tool_result
    block whose content is a number failed blocks_to_ir's request check, a 400, which blamed
    the client for the upstream's answer."""
    with pytest.raises(ag.GatewayError) as e:
        ag.anthropic_response_to_ir({"content": [{"type": "tool_result", "tool_use_id": "x",
                                                  "content": 5}]})
    assert e.value.status == 502 and e.value.message.startswith("malformed upstream answer")


def _client_types():
    """Each client dialect's answer type in its SDK (pydantic models: model_validate checks)."""
    import openai.types.chat as oc
    import openai.types.responses as orr
    from google.genai import types as gt
    return {ag.OPENAI: oc.ChatCompletion, ag.RESPONSES: orr.Response,
            ag.ANTHROPIC: anthropic.types.Message, ag.GEMINI: gt.GenerateContentResponse}


@fuzz(lambda st: [_PICKS(st)])
def test_fuzz_answers_with_ill_typed_fields_are_a_502_or_what_the_sdks_read(picks):
    """Every channel type's whole answer with fields of another type, converted for every client
    dialect: the gateway's 502, or an answer the client's own SDK types accept (pydantic
    validation of openai's ChatCompletion and Response, anthropic's Message, google-genai's
    GenerateContentResponse): nothing ill-typed is passed on."""
    types = _client_types()
    ir = ag.empty_request("m")
    ir["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    for ctype, valid in _VALID_ANSWERS.items():
        try:
            resp = _decoders(ctype)[0](_with_odd_values(valid, picks))
        except ag.GatewayError as exc:
            assert exc.status == 502
            continue
        for dialect, adapter in ag.DIALECTS.items():
            try:
                out = adapter.response(resp, "m", ir)
            except ag.GatewayError as exc:
                assert exc.status == 502
                continue
            types[dialect].model_validate(json.loads(ag.json_dumps(out)))


# Characters a string scanner can get wrong: escapes, quotes, halves of surrogate pairs.
TEMPLATE_CHARS = ["a", "é", "😀", "\n", "\x01", '"', "\\", "/", "\ud800", "\udc00", "\ud83d",
                  "\ude00", "\u2028"]


@fuzz(lambda st: [
    st.lists(st.tuples(st.text(st.sampled_from(TEMPLATE_CHARS) |
                               st.characters(blacklist_categories=()), max_size=8),
                       st.text(max_size=6), st.sampled_from(["text"] * 5 + ["finish", "tool",
                                                                      "junk"])),
             min_size=2, max_size=12),
    st.booleans(), st.booleans(), st.lists(st.integers(0, 4000), max_size=6)])
def test_fuzz_text_template_equals_strict_parse(items, ascii, pad_first, cuts):
    """Streams of text events (any text, lone surrogates and controls included, escaped or raw,
    with OpenAI's obfuscation padding), other events and broken ones, cut anywhere: the
    decoders give the same IR, or the same error, with and without the template."""
    openai, anthropic = [], []
    for text, pad, kind in items:
        chunk = _openai_text_chunk(text, obfuscation=pad)
        if pad_first:                               # the padding before the text's slot
            chunk = dict({"obfuscation": pad}, **chunk)
        delta = {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": text}}
        if kind == "finish":
            chunk["choices"][0]["finish_reason"] = "stop"
            delta["delta"]["type"] = "thinking_delta"
        elif kind == "tool":
            chunk["choices"][0]["delta"] = {"tool_calls": [{"index": 0, "id": "c", "type":
                                            "function", "function": {"name": "f",
                                                                     "arguments": text}}]}
            delta["index"] = 1
        surrogate = any("\ud800" <= c <= "\udfff" for c in text + pad)
        dumps = lambda o: json.dumps(o, ensure_ascii=ascii or surrogate)    # noqa: E731
        tail = ' "x"' if kind == "junk" else ""
        openai.append(f"data: {dumps(chunk)}{tail}\n\n")
        anthropic.append(f"event: content_block_delta\ndata: {dumps(delta)}{tail}\n\n")
    for make, events in ((ag.OpenAIStreamDecoder, openai), (ag.AnthropicStreamDecoder, anthropic)):
        raw = "".join(events).encode()
        reads = list(_pieces(raw, cuts))

        def decoded():      # a stream without its own id gets a random one: not compared
            out = _decode_all(make, reads)
            events = out[3] if out[0] == "error" else out
            events = [ev[:1] + ev[2:] if ev[0] == "start" else ev for ev in events]
            return out[:3] + (events,) if out[0] == "error" else events
        fast = decoded()
        saved, ag.TEMPLATE_LEARNS = ag.TEMPLATE_LEARNS, 0
        try:
            assert fast == decoded()
        finally:
            ag.TEMPLATE_LEARNS = saved


@fuzz(lambda st: [st.binary(max_size=300)])
def test_fuzz_request_head_parser(data):
    try:
        ag.parse_request_head(data)
    except ag.ProtocolError:
        pass


# Size lines as servers spell them, and as HTTP does not allow (int() takes "+5", "0x5", "1_0").
_SIZE_SPELLINGS = ("{:x}", "{:X}", "000{:x}", "{:x};ext=1", "{:x} ;e", "{:x}\n", " {:x}",
                   "+{:x}", "0x{:x}", "{:x}_0", "-{:x}", "{:x}g")


@fuzz(lambda st: [st.lists(st.tuples(
    st.binary(max_size=12).map(lambda b: b.replace(b"\0", b"\r\n")),     # CRLF in the data too
    st.integers(0, len(_SIZE_SPELLINGS) - 1), st.sampled_from([0, 0, 0, 0, 1, -1])), max_size=12),
    st.booleans(), st.lists(st.integers(0, 400), max_size=6)])
def test_fuzz_chunked_runs_read_at_once_agree_with_the_line_reader(chunks, end, cuts):
    """A run of chunks in one read is read inline (each size line checked strictly once, then
    looked up); fed one byte at a time every chunk goes through the line-by-line reader. Both
    must agree on every stream: well-formed ones give their data whole, anything else the same
    error or state."""
    wire = b"".join(_SIZE_SPELLINGS[k].format(len(p) + lie).encode() +
                    (b"" if _SIZE_SPELLINGS[k].endswith("\n") else b"\r\n") + p + b"\r\n"
                    for p, k, lie in chunks) + (b"0\r\nX-T: 1\r\n\r\nNEXT" if end else b"")
    def run(parts, tail=False):           # ``tail``: what the feed that ended had past it
        d = ag.ChunkedDecoder(502)
        out = b"".join(b"".join(d.feed(p)) for p in parts), d.done
        return out + (d.tail,) if tail else out
    whole = _outcome(lambda: run([wire], tail=True))
    short = whole if whole[0] == "err" else ("ok", whole[1][:2])
    assert short == _outcome(lambda: run([wire[i:i + 1] for i in range(len(wire))]))
    assert short == _outcome(lambda: run(list(_pieces(wire, cuts))))
    if all(k < 5 and lie == 0 and p for p, k, lie in chunks):     # well-formed, no last chunk
        assert whole == ("ok", (b"".join(p for p, _, _ in chunks), end,
                                b"NEXT" if end else b""))


@fuzz(lambda st: [st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n"]), max_size=30)])
def test_fuzz_sse_passthrough_cuts_after_the_last_blank_line_of_any_kind(parts):
    """A passed-through stream goes on whole events at a time: cut just past the last blank
    line, whichever of LF LF, CRLF CRLF or CR CR ends it, the same as searching for each."""
    buf = b"".join(parts)
    ends = [buf.rfind(sep) + len(sep) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r")
            if sep in buf]
    assert ag.sse_events_end(buf) == max(ends, default=0)
    pt = ag.SSEPassthrough()
    assert pt.feed(buf) == buf[:max(ends, default=0)]


@fuzz(lambda st: [st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=8)])
def test_fuzz_decoders_whole_equals_pieces(data, cuts):
    def run_chunked(parts):
        d = ag.ChunkedDecoder()
        return b"".join(b"".join(d.feed(p)) for p in parts), d.done, d.tail
    def run_sse(parts):
        d = ag.SSEDecoder()
        return [e for p in parts for e in d.feed(p)] + d.feed(b"", final=True)
    def run_nd(parts):
        d = ag.NDJSONDecoder()
        return [o for p in parts for o in d.feed(p)] + d.feed(b"", final=True)
    for run in (run_chunked, run_sse, run_nd):
        whole = _outcome(lambda: run([data]))
        split = _outcome(lambda: run(list(_pieces(data, cuts))))
        if run is run_chunked and whole[0] == "ok" and split[0] == "ok":
            assert whole[1][:2] == split[1][:2]
        else:
            assert whole == split
