"""Tests for aigateway.py. Sections mirror the module's sections (test_05_... tests section 5).

Fake upstreams run on stdlib http.server, record what they received and misbehave on demand.
End-to-end clients are the official openai and anthropic SDKs and stdlib http.client / sockets.
Every network test has a hard timeout (pytest-timeout, set in the README's test command).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import http.server
import json
import os
import queue
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib

import anthropic
import openai
import pytest

import aigateway as ag

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "sk-gw-test-token-0123456789"
TOKEN2 = "sk-gw-second-token-9876543210"


# =================================================================================================
# Fakes and fixtures
# =================================================================================================

class Reply:
    """What a fake upstream answers. ``chunks`` are written one by one with ``delay`` between
    them (chunked encoding unless ``close_delimited``); ``reset_after`` cuts the connection after
    that many chunks; ``hang`` sleeps before answering."""

    def __init__(self, status=200, body=b"", headers=None, chunks=None, delay=0.0, hang=0.0,
                 reset_after=None, close_delimited=False, content_type="application/json"):
        self.status, self.body, self.chunks, self.delay = status, body, chunks, delay
        self.headers = dict(headers or {})
        self.headers.setdefault("Content-Type", content_type)
        self.hang, self.reset_after, self.close_delimited = hang, reset_after, close_delimited


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


class FakeUpstream:
    """A stdlib ThreadingHTTPServer that records requests and answers from ``self.replies``
    (a list consumed in order; the last one repeats) or ``self.responder(record)``."""

    def __init__(self, replies=None, tls_context=None):
        self.requests: list[dict] = []
        self.replies = list(replies or [openai_chat_reply()])
        self.responder = None
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

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
                       "client_port": self.client_address[1]}
                with fake.lock:
                    fake.requests.append(rec)
                    if fake.responder is not None:
                        reply = fake.responder(rec)
                    else:
                        reply = fake.replies.pop(0) if len(fake.replies) > 1 else fake.replies[0]
                self._write(reply)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def _write(self, r: Reply):
                if r.hang:
                    time.sleep(r.hang)
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
                        time.sleep(r.delay)
                if not r.close_delimited:
                    self.wfile.write(b"0\r\n\r\n")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if tls_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
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
        self.thread = ag.GatewayThread(self.store, host="127.0.0.1", port=0)
        self.thread.start()
        self.url = self.thread.url
        self.port = self.thread.server.port

    @property
    def gateway(self) -> ag.Gateway:
        return self.thread.gateway

    def records(self):
        return list(self.gateway.records)

    def events(self):
        out = []
        while True:
            try:
                out.append(self.thread.events.get_nowait())
            except queue.Empty:
                return out

    def openai(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", TOKEN),
                             max_retries=0, timeout=kw.pop("timeout", 15), **kw)

    def anthropic(self, **kw):
        return anthropic.Anthropic(base_url=self.url, api_key=kw.pop("api_key", TOKEN),
                                   max_retries=0, timeout=kw.pop("timeout", 15), **kw)

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


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


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


def test_03_json_loads_raises_400():
    with pytest.raises(ag.GatewayError) as e:
        ag.json_loads(b"{nope")
    assert e.value.status == 400 and "not valid JSON" in e.value.message


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
])
def test_04_parse_request_head_rejects(head, status):
    with pytest.raises(ag.ProtocolError) as e:
        ag.parse_request_head(head)
    assert e.value.status == status


@pytest.mark.parametrize("headers,status", [
    ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], 400),
    ([("Content-Length", "abc")], 400),
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
    assert ag.keep_alive("HTTP/1.1", H()) and not ag.keep_alive("HTTP/1.0", H())
    assert not ag.keep_alive("HTTP/1.1", H([("Connection", "close")]))


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
                                  b"0\r\n\r\nextra", b"\r\n"])
def test_05_chunked_rejects_bad_sizes(data):
    with pytest.raises(ag.ProtocolError):
        d = ag.ChunkedDecoder()
        d.feed(data)
        if not d.done and data == b"\r\n":
            raise ag.ProtocolError(400, "empty size line accepted")


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


def test_05_ndjson_whole_and_bytewise():
    data = b'{"a":1}\r\n\n{"b":[2]}\n{"done":true}'
    assert ag.NDJSONDecoder().feed(data, final=True) == [{"a": 1}, {"b": [2]}, {"done": True}]
    d = ag.NDJSONDecoder()
    out = _feed_bytewise(d, data) + d.feed(b"", final=True)
    assert out == [{"a": 1}, {"b": [2]}, {"done": True}]
    with pytest.raises(ag.ProtocolError):
        ag.NDJSONDecoder().feed(b"not json\n")


def test_05_sse_passthrough_holds_partial_events_and_reads_usage():
    pt = ag.SSEPassthrough()
    events = b"".join(openai_stream_chunks(usage=(11, 4)))
    out = b""
    for i in range(0, len(events), 7):
        piece = pt.feed(events[i:i + 7])
        assert piece == b"" or piece.endswith(b"\n\n")
        out += piece
    assert out + pt.flush() == events
    assert (pt.input_tokens, pt.output_tokens) == (11, 4)
    pa = ag.SSEPassthrough()
    for c in anthropic_stream_chunks():
        pa.feed(c[:5])
        pa.feed(c[5:])
    assert (pa.input_tokens, pa.output_tokens) == (12, 7)


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


def test_07_first_byte_and_idle_timeouts(upstream):
    up = upstream([Reply(hang=3), Reply(chunks=[b"a", b"b"], delay=3)])

    async def go():
        t0 = time.monotonic()
        with pytest.raises(ag.UpstreamError) as e1:
            await _client_call(up.url, timeout=0.5)
        assert e1.value.status == 504 and time.monotonic() - t0 < 2.5
        with pytest.raises(ag.UpstreamError) as e2:
            await _client_call(up.url, timeout=1.0)
        assert e2.value.status == 504 and "silent" in e2.value.message
    run(go())


def test_07_connect_error_is_retryable_502():
    async def go():
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(f"http://127.0.0.1:{dead_port()}/v1")
        return e.value
    err = run(go())
    assert err.status == 502 and err.retryable and "cannot connect" in err.message


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_07_tls_verification_on_by_default_and_off_per_channel(upstream, self_signed):
    up = upstream([openai_chat_reply()], tls_context=self_signed)

    async def go():
        with pytest.raises(ag.UpstreamError) as e:
            await _client_call(up.url)
        assert e.value.status == 502 and "TLS" in e.value.message
        resp, body = await _client_call(up.url, verify_tls=False)
        assert resp.status == 200 and b"hello" in body
    run(go())


class _ProxyBase(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list = []
        threading.Thread(target=self.serve_forever, daemon=True).start()


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
        _, b1 = await _client_call(f"http://localhost:{up.port}/", proxy=f"socks5://127.0.0.1:{port}")
        _, b2 = await _client_call(f"http://localhost:{up.port}/",
                                   proxy=f"socks5h://u:pw@127.0.0.1:{port}")
        return b1, b2
    b1, b2 = run(go())
    assert b"via socks" in b1 and b"via socks" in b2
    assert ("connect", 1, "127.0.0.1", up.port) in proxy.seen          # resolved by us
    assert ("connect", 3, "localhost", up.port) in proxy.seen          # resolved by the proxy
    assert ("auth", b"u", b"pw") in proxy.seen
    proxy.shutdown()
