"""End to end: ``uvicorn --loop fastmux:new_event_loop`` serving an ASGI app to
a real HTTP client (raw sockets on loopback).

Each server is a ``python -m uvicorn`` subprocess with ``FASTMUX_BACKEND`` set
(epoll, select) and an HTTP implementation (httptools, h11); the tests drive
it with keep-alive (several requests on one connection), pipelining (several
requests written in one send, responses read back in order) and POST bodies
(Content-Length and chunked).  The app answers with the type and backend of
the loop it runs on, its pid and where it imported fastmux from, so the tests
check that the server really ran on this fastmux's loop.  Every wait is
bounded; the server is stopped with SIGINT and must exit 0 with a clean log.

Needs uvicorn >= 0.36 (``--loop module:attr``), in fastmux's ``test`` extra;
without it the module is skipped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

import fastmux
from fastmux import _backend

if importlib.util.find_spec("uvicorn") is None:
    pytest.skip("uvicorn is not installed (it is in the test extra: pip install -e '.[test]')",
                allow_module_level=True)

#: Bound on each wait: server start-up, one response, shutdown.
TIMEOUT = 20.0

APP = '''
import asyncio, hashlib, json, os, sys

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    loop = asyncio.get_running_loop()
    payload = json.dumps({
        "loop": type(loop).__module__ + "." + type(loop).__qualname__,
        "backend": getattr(loop, "backend", None),
        "fastmux": sys.modules["fastmux"].__file__ if "fastmux" in sys.modules else None,
        "pid": os.getpid(),
        "method": scope["method"],
        "path": scope["path"],
        "query": scope["query_string"].decode(),
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
'''

_HTTP = ["httptools", "h11"]
_PARAMS = [(b, h) for b in ("epoll", "select") for h in _HTTP]


class UvicornProcess:
    """A ``python -m uvicorn`` subprocess on 127.0.0.1, port chosen by the kernel."""

    def __init__(self, tmp: Path, backend: str, http: str) -> None:
        self.backend = backend
        (tmp / "e2e_app.py").write_text(APP)
        self.log_path = tmp / "uvicorn.log"
        env = dict(os.environ)
        env["FASTMUX_BACKEND"] = backend
        # The child imports the same fastmux as this process (a source tree
        # or an install), and the app from tmp (--app-dir).
        fastmux_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastmux.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (fastmux_parent, env.get("PYTHONPATH")) if p)
        env.pop("PYTHONASYNCIODEBUG", None)
        cmd = [sys.executable, "-m", "uvicorn", "e2e_app:app", "--app-dir", str(tmp),
               "--loop", "fastmux:new_event_loop", "--http", http,
               "--host", "127.0.0.1", "--port", "0", "--no-access-log",
               "--timeout-graceful-shutdown", "5"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        pattern = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
        while True:
            m = pattern.search(self.log())
            if m:
                port = int(m.group(1))
                assert port != 0, "uvicorn reported port 0"
                return port
            if self.proc.poll() is not None:
                raise AssertionError(f"uvicorn exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"uvicorn did not start within {TIMEOUT}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> Tuple[int, str]:
        """SIGINT, as Ctrl+C: uvicorn shuts down gracefully.  Returns the exit
        code and the log; kills the process if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"uvicorn did not exit within {TIMEOUT}s of SIGINT:\n"
                                     f"{self.log()}") from None
        return self.proc.returncode, self.log()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


class Client:
    """A plain blocking HTTP/1.1 client socket with a timeout."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise AssertionError(f"server closed the connection; unread: {bytes(self.buf)!r}")
        self.buf += chunk

    def response(self) -> Tuple[int, Dict[str, str], bytes]:
        """Read one response (Content-Length framed): status, headers, body."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, _reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        self.buf = bytearray(rest)
        while len(self.buf) < length:
            self._fill()
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return int(status), headers, body

    def json(self) -> Dict[str, Any]:
        status, headers, body = self.response()
        assert status == 200, (status, body)
        assert headers.get("connection", "keep-alive") != "close", headers
        result: Dict[str, Any] = json.loads(body)
        return result


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def post_chunked(path: str, chunks: List[bytes]) -> bytes:
    out = [f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           f"Transfer-Encoding: chunked\r\n\r\n".encode()]
    for c in chunks:
        out.append(b"%x\r\n%s\r\n" % (len(c), c))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


@pytest.fixture(scope="module", params=_PARAMS, ids=[f"{b}-{h}" for b, h in _PARAMS])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornProcess]:
    backend, http = request.param
    if backend == "epoll" and not _backend.epoll_available():
        if os.environ.get("FASTMUX_EXPECT_BACKEND") == "epoll":
            pytest.fail("FASTMUX_EXPECT_BACKEND=epoll but the C core does not import")
        pytest.skip("epoll backend unavailable (C core not built)")
    if importlib.util.find_spec(http) is None:
        pytest.skip(f"{http} is not installed")
    proc = UvicornProcess(tmp_path_factory.mktemp(f"uvicorn-{backend}-{http}"), backend, http)
    try:
        yield proc
    finally:
        code, log = proc.stop()
        # A clean shutdown: exit 0, lifespan completed, nothing logged as an error.
        assert code == 0, f"uvicorn exited {code}:\n{log}"
        assert "Finished server process" in log, log
        assert "Traceback" not in log and "ERROR" not in log, log


def check_loop(info: Dict[str, Any], server: UvicornProcess) -> None:
    assert info["loop"] == "fastmux._aio.EventLoop", info
    assert info["backend"] == server.backend, info
    assert info["pid"] == server.proc.pid, info
    assert info["fastmux"] == os.path.abspath(fastmux.__file__), info


def test_runs_on_fastmux_loop(server: UvicornProcess) -> None:
    client = Client(server.port)
    try:
        client.send(get("/whoami"))
        check_loop(client.json(), server)
    finally:
        client.close()


def test_keep_alive(server: UvicornProcess) -> None:
    """Several requests one after another on one connection."""
    client = Client(server.port)
    try:
        for i in range(10):
            client.send(get(f"/keep/{i}?n={i}"))
            info = client.json()
            assert (info["method"], info["path"], info["query"]) == ("GET", f"/keep/{i}", f"n={i}")
            check_loop(info, server)
    finally:
        client.close()


def test_pipelined(server: UvicornProcess) -> None:
    """Twenty requests (GETs and POSTs) written in one send; the responses
    come back in order on the same connection.  Twice, on one connection."""
    client = Client(server.port)
    try:
        for round_ in range(2):
            requests: List[bytes] = []
            expected: List[Tuple[str, str, int]] = []
            for i in range(20):
                if i % 3 == 2:
                    body = bytes([i]) * (i * 100)
                    requests.append(post(f"/pipe/{round_}/{i}", body))
                    expected.append(("POST", f"/pipe/{round_}/{i}", len(body)))
                else:
                    requests.append(get(f"/pipe/{round_}/{i}"))
                    expected.append(("GET", f"/pipe/{round_}/{i}", 0))
            client.send(b"".join(requests))
            got = []
            for _ in requests:
                info = client.json()
                got.append((info["method"], info["path"], info["body_len"]))
            assert got == expected
            check_loop(info, server)
    finally:
        client.close()


@pytest.mark.parametrize("size", [0, 1, 65536, 1 << 20])
def test_post_body(server: UvicornProcess, size: int) -> None:
    """POST bodies, Content-Length framed (up to 1 MiB, many reads and
    ``more_body`` messages) then chunked, on one connection."""
    body = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    body = body[:size]
    client = Client(server.port)
    try:
        client.send(post("/upload", body))
        info = client.json()
        assert (info["method"], info["body_len"]) == ("POST", size)
        assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
        chunks = [body[i:i + 4096] for i in range(0, size, 4096)]
        client.send(post_chunked("/chunked", chunks))
        info = client.json()
        assert (info["path"], info["body_len"]) == ("/chunked", size)
        assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        client.close()


def test_many_connections(server: UvicornProcess) -> None:
    """Twenty connections open at once, requests interleaved across them."""
    clients: List[Client] = []
    try:
        for _ in range(20):
            clients.append(Client(server.port))
        for i, c in enumerate(clients):
            c.send(get(f"/conn/{i}"))
        for i, c in enumerate(reversed(clients)):
            info = c.json()
            assert info["path"] == f"/conn/{len(clients) - 1 - i}"
    finally:
        for c in clients:
            c.close()


def test_client_half_close(server: UvicornProcess) -> None:
    """A client that sends its request and then shuts down its write side
    still gets its response (then the server closes)."""
    client = Client(server.port)
    try:
        client.send(get("/half-close"))
        client.sock.shutdown(socket.SHUT_WR)
        status, _, body = client.response()
        assert status == 200
        assert json.loads(body)["path"] == "/half-close"
        rest: Optional[bytes] = client.sock.recv(1)
        assert rest == b""
    finally:
        client.close()
