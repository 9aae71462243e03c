"""A real HTTP server on 127.0.0.1 that records what it receives (webhook tests, SDK tests)."""

import socket
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

    def wait_for(self, path: str, seconds: float = 10) -> None:
        """Until a request for `path` has come (recorded as it comes, before any delay)."""
        deadline = time.monotonic() + seconds
        while not self.on(path):
            assert time.monotonic() < deadline, f"no request for {path} within {seconds} s"
            time.sleep(0.01)


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


@dataclass
class TrickleReceiver:
    """A raw-socket receiver that answers 200 with its headers at once, then its body one byte
    every `interval` seconds for `lasts` seconds (a slow or hostile receiver: each read gets a
    byte well within any per-read timeout); records each request's time and
    Switchyard-Delivery-Id."""

    url: str
    interval: float = 0.25
    lasts: float = 5.0  # then it hangs up, the body unfinished
    requests: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _trickle(conn, recorder: TrickleReceiver) -> None:
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
        recorder.requests.append((time.monotonic(), headers.get("Switchyard-Delivery-Id", "")))
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            until = time.monotonic() + recorder.lasts
            while time.monotonic() < until:
                if recorder.stop.wait(recorder.interval):
                    return
                conn.sendall(b".")
        except OSError:
            pass  # the sender gave up


@pytest.fixture
def trickle_receiver():
    listener = socket.create_server(("127.0.0.1", 0))
    recorder = TrickleReceiver(url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    listener.settimeout(0.2)  # to notice the end of the test

    def serve():
        while not recorder.stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=_trickle, args=(conn, recorder), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield recorder
    recorder.stop.set()
    listener.close()
