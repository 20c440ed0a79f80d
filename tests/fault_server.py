"""An OpenAI-compatible chat server for tests and benchmarks: canned answers, fixed latency, and
scripted faults (429 with Retry-After, 5xx, stalls, connection resets, garbage bodies).

It is a real HTTP/1.1 server on 127.0.0.1 (the standard library's threading server), so the
client under test goes through its real connection pool, timeouts and retries. Faults are
scripted by marker: a request whose raw body contains a marker takes the next fault from that
marker's list (then answers normally once the list is used up), e.g.

    ChatServer(faults={"PAIR-7": ["429:1", "500", "reset"]})

Fault codes: `ok`, `429:<s>` (Retry-After in seconds), `429-date:<s>` (Retry-After as an HTTP
date), `500`, `503`, `400`, `stall:<s>` (answer only after s seconds), `reset` (TCP RST, no
response), `garbage` (200 with a body that is not JSON), `nochoices` (200, JSON without
choices). Every answer carries a tag, the first 12 hex digits of sha256 of the request's
messages and seed, so a test can tell which requests produced which stored texts.

    python tests/fault_server.py --latency-s 0.25 [--port 0]   # prints "PORT <n>", serves
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def request_tag(body: dict[str, Any]) -> str:
    """The tag of a chat request: sha256 of its messages and seed, 12 hex digits."""
    payload = json.dumps([body.get("messages"), body.get("seed")], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def canned_answer(body: dict[str, Any]) -> str:
    """A valid answer for either generation step, tagged with the request's tag."""
    tag = request_tag(body)
    text = json.dumps(body.get("messages"))
    if "JSON list" in text:
        return json.dumps(
            [
                f"the same scene with a blue hat {tag}",
                f"this one but at night {tag}",
                f"similar view covered in snow {tag}",
            ]
        )
    return (
        "Both images share a similar subject and a calm outdoor setting; however, the source "
        "image shows it on a sunny day, whereas the target image shows it in heavy rain with "
        f"people walking by. [{tag}]"
    )


@dataclass
class Served:
    """One request the server saw: its tag, the fault applied, when."""

    tag: str
    fault: str
    at: float


@dataclass
class ChatServer:
    """See the module docstring. Use as a context manager or call start()/stop()."""

    latency_s: float = 0.0
    faults: dict[str, list[str]] = field(default_factory=dict)
    responder: Callable[[dict[str, Any]], str] = canned_answer
    port: int = 0
    # False: answers carry no `usage` (as some proxies and older servers send them).
    usage: bool = True
    served: list[Served] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ChatServer:
        owner = self

        class Handler(_ChatHandler):
            server_owner = owner

        server = _Server(("127.0.0.1", self.port), Handler)
        server.handle_error = lambda request, address: None  # resets and stalls are on purpose
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def next_fault(self, raw: str) -> str:
        with self._lock:
            for marker, plan in self.faults.items():
                if marker in raw and plan:
                    return plan.pop(0)
        return "ok"

    def record(self, tag: str, fault: str) -> None:
        with self._lock:
            self.served.append(Served(tag, fault, time.monotonic()))

    def answered_tags(self) -> list[str]:
        """Tags of requests answered with a valid completion."""
        with self._lock:
            return [s.tag for s in self.served if s.fault == "ok"]

    def count(self, fault: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.served if fault is None or s.fault == fault)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # listen() backlog: the default of 5 drops simultaneous connects, which the client then
    # retries after a 1 s SYN timeout; that would look like slow answers.
    request_queue_size = 1024


class _ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm on, the body waits
    # for the client's delayed ACK (~40 ms), which would look like server latency.
    disable_nagle_algorithm = True
    server_owner: ChatServer

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        if self.path.endswith("/health"):
            self._send(200, b'{"status":"ok"}')
        else:
            self._send(200, b'{"object":"list","data":[{"id":"test-model","object":"model"}]}')

    def do_POST(self) -> None:
        owner = self.server_owner
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, b'{"error":"body is not JSON"}')
            return
        tag = request_tag(body)
        fault = owner.next_fault(raw)
        owner.record(tag, fault)
        if owner.latency_s:
            time.sleep(owner.latency_s)
        kind, _, arg = fault.partition(":")
        if kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if kind == "stall":
            time.sleep(float(arg))
            kind = "ok"
        if kind == "429":
            self._send(429, b'{"error":"slow down"}', {"Retry-After": arg or "1"})
        elif kind == "429-date":
            when = formatdate(time.time() + float(arg), usegmt=True)
            self._send(429, b'{"error":"slow down"}', {"Retry-After": when})
        elif kind in ("500", "503", "400"):
            self._send(int(kind), b'{"error":"scripted failure"}')
        elif kind == "garbage":
            self._send(200, b"<html>upstream proxy error</html>{{{")
        elif kind == "nochoices":
            self._send(200, b'{"object":"chat.completion","choices":[]}')
        else:
            self._send(200, _completion(body, owner.responder(body), owner.usage))


def _completion(body: dict[str, Any], text: str, usage: bool = True) -> bytes:
    prompt_words = len(json.dumps(body.get("messages")).split())
    completion: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
    }
    if usage:
        completion["usage"] = {
            "prompt_tokens": prompt_words,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_words + len(text.split()),
        }
    return json.dumps(completion).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description="fixed-latency OpenAI-compatible test server")
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ChatServer(latency_s=args.latency_s, port=args.port).start()
    print(f"PORT {server.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
