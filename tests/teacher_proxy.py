"""A fault-injecting HTTP proxy in front of a real OpenAI-compatible teacher (tests).

    python tests/teacher_proxy.py UPSTREAM_URL   # prints "proxy on http://127.0.0.1:PORT/v1"

Requests are forwarded to UPSTREAM_URL (`prealign serve`); by the CRC32 of a request's
(prompt, seed) modulo 8, the proxy instead:
  0: answers 429 with Retry-After: 0 the first time it sees the request;
  1: answers 500 the first time;
  2: stalls 5 s the first time (longer than the client's timeout), then forwards;
  3: forwards and returns the answer with a closing tag added at its start (malformed);
  4: answers 503 every time (a request the teacher never serves);
  5-7: forwards.
Counts of each fault are served at GET /faults (JSON).
"""

import collections
import http.server
import json
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

UPSTREAM = sys.argv[1].rstrip("/")
seen: collections.Counter = collections.Counter()
faults: collections.Counter = collections.Counter()
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def forward(self, method: str, body: bytes | None):
        request = urllib.request.Request(UPSTREAM + self.path.removeprefix("/v1"), data=body,
                                         method=method, headers={
                                             "Content-Type": "application/json",
                                             "Authorization": self.headers.get(
                                                 "Authorization", "")})
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def do_GET(self):
        if self.path == "/faults":
            with lock:
                self.reply(200, json.dumps(faults).encode())
            return
        self.reply(*self.forward("GET", None))

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = json.loads(body)
        key = json.dumps([request.get("prompt", request.get("messages")),
                          request.get("seed")], sort_keys=True)
        kind = zlib.crc32(key.encode()) % 8
        with lock:
            seen[key] += 1
            first = seen[key] == 1
        error = {"error": {"message": "injected", "type": "server_error"}}
        if kind == 0 and first:
            self.count("429")
            return self.reply(429, json.dumps(error).encode(), [("Retry-After", "0")])
        if kind == 1 and first:
            self.count("500")
            return self.reply(500, json.dumps(error).encode())
        if kind == 4:
            self.count("503")
            return self.reply(503, json.dumps(error).encode())
        if kind == 2 and first:
            self.count("stall")
            time.sleep(5)
        status, answer = self.forward("POST", body)
        if kind == 3 and status == 200:
            self.count("malformed")
            out = json.loads(answer)
            for choice in out["choices"]:
                if "text" in choice:
                    choice["text"] = "</human>" + choice["text"]
                else:
                    choice["message"]["content"] = "</human>" + choice["message"]["content"]
            answer = json.dumps(out).encode()
        self.reply(status, answer)

    def count(self, fault: str):
        with lock:
            faults[fault] += 1


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out
            super().handle_error(request, client_address)


if __name__ == "__main__":
    server = Server(("127.0.0.1", 0), Handler)
    print(f"proxy on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()
