#!/usr/bin/env python3
"""Make the README's screenshots from the real app with sample data, under Xvfb.

    python docs/screenshots.py        # needs Xvfb, xwd (x11-apps) and ImageMagick's convert

Starts a fake OpenAI-compatible upstream, opens the GUI on a private Xvfb display with sample
channels and tokens, sends a few requests through the gateway, and saves one PNG per tab here.
"""

import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop", "message": {
                               "role": "assistant", "content": "Hello!"}}],
                           "usage": {"prompt_tokens": 42, "completion_tokens": 9,
                                     "total_tokens": 51}}).encode()
        time.sleep(0.05)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    display = ":93"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1100x720x24"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    os.environ["DISPLAY"] = display
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    up = f"http://127.0.0.1:{server.server_address[1]}"
    import aigateway as ag
    path = os.path.join(tempfile.mkdtemp(), "config.json")
    with open(path, "w") as f:
        json.dump({"settings": {"port": 3000, "window": "1100x720+0+0"}, "channels": [
            {"name": "openai", "type": "custom", "base_url": up, "api_key": "sk-demo-123456789",
             "models": ["gpt-4o", "gpt-4o-mini"], "priority": 0},
            # Nothing leaves the machine: these two point at a closed loopback port.
            {"name": "anthropic", "type": "anthropic", "api_key": "sk-ant-demo-123456789",
             "base_url": "http://127.0.0.1:9", "models": ["claude-*"], "priority": 0},
            {"name": "gemini", "type": "gemini", "api_key": "AIza-demo-123456789",
             "base_url": "http://127.0.0.1:9", "models": ["gemini-*"], "priority": 5},
            {"name": "local-ollama", "type": "ollama", "models": ["qwen3-coder:30b"],
             "priority": 10, "enabled": False}],
            "tokens": [{"name": "laptop", "key": "sk-gw-demo-laptop-0123456789"},
                       {"name": "ci-bot", "key": "sk-gw-demo-ci-0123456789",
                        "allowed_models": ["gpt-4o-mini"]}]}, f)
    store, _ = ag.ConfigStore.load(path)
    app = ag.App(store, host="127.0.0.1", start=True)

    def pump(seconds):
        end = time.time() + seconds
        while time.time() < end:
            app.root.update()
            app.pump()
            time.sleep(0.02)
    pump(0.5)
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4o", "claude-x", "gpt-4o-mini"):
        req = urllib.request.Request(
            app.bridge.url + "/v1/chat/completions", method="POST",
            data=json.dumps({"model": model, "messages": [{"role": "user",
                                                          "content": "hi"}]}).encode(),
            headers={"Authorization": "Bearer sk-gw-demo-laptop-0123456789",
                     "Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except OSError:
            pass
    pump(1.0)
    app.logs.tree.selection_set(app.logs.tree.get_children()[0])
    titles = {app.notebook.tab(t, "text").lower(): t for t in app.notebook.tabs()}
    for name in ("dashboard", "channels", "tokens", "usage", "settings", "logs"):
        app.notebook.select(titles[name])
        pump(0.4)
        out = os.path.join(HERE, f"screenshot-{name}.png")
        subprocess.run(f"xwd -root -silent -display {display} | convert xwd:- -resize 75% "
                       f"-colors 96 {out}", shell=True, check=True)
        print("wrote", out)
    app.close()
    server.shutdown()
    xvfb.terminate()


if __name__ == "__main__":
    main()
