"""A real HTTP server on 127.0.0.1 that records what it receives (webhook tests, SDK tests)."""

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    url: str
    port: int
    received: list[Received] = field(default_factory=list)
    # What to answer: (status, body, extra headers, delay in seconds), per path or default.
    answers: dict[str, tuple[int, bytes, dict, float]] = field(default_factory=dict)
    default: tuple[int, bytes, dict, float] = (200, b"ok", {}, 0.0)

    def answer(self, status=200, body=b"ok", headers=None, delay=0.0, path=None):
        value = (status, body, headers or {}, delay)
        if path is None:
            self.default = value
        else:
            self.answers[path] = value

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


def _handler(receiver: Receiver):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the standard library's name
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            receiver.received.append(
                Received(self.path, dict(self.headers.items()), body, time.time())
            )
            status, answer, headers, delay = receiver.answers.get(self.path, receiver.default)
            if delay:
                time.sleep(delay)
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            except OSError:
                pass  # the client gave up (a timeout test)

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)
    port = server.server_address[1]
    recorder = Receiver(url=f"http://127.0.0.1:{port}", port=port)
    server.RequestHandlerClass = _handler(recorder)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield recorder
    server.shutdown()
    server.server_close()
