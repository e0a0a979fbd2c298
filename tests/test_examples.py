"""The programs in examples/ run as a reader would run them, on both backends.

Each example is a complete program on the public API; these tests start it
as a subprocess (with this tree's fastmux first on the path), talk to it over
loopback and stop it with a signal.  Skipped where examples/ is not beside
tests/ (the install passes copy tests/ alone).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import DEADLINE

import fastmux

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="no examples/ beside tests/")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # The example's own directory comes first on its sys.path, not the cwd:
    # put the fastmux under test ahead of any installed one.
    root = str(Path(fastmux.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=DEADLINE, env=_env())


class Example:
    """An example server as a subprocess; its banner's first line gives the port."""

    def __init__(self, name: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(DEADLINE)
        m = re.search(r"(\d+\.\d+\.\d+\.\d+):(\d+)", line[0]) if line else None
        if m is None:
            self.stop()
            raise AssertionError(f"no host:port banner from {name}: {line}")
        self.banner = line[0]
        self.address = (m.group(1), int(m.group(2)))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                return self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)
                raise AssertionError("the example did not stop on a signal") from None
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()


def _recv_until(s: socket.socket, until: bytes) -> bytes:
    buf = b""
    while until not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def test_echo_server(backend):
    srv = Example("echo_server.py", "--backend", backend)
    try:
        assert f"({backend} backend)" in srv.banner
        with socket.create_connection(srv.address, timeout=DEADLINE) as s:
            s.sendall(b"hello\nworld\n")
            assert _recv_until(s, b"world\n") == b"hello\nworld\n"
    finally:
        rc = srv.stop()
    assert rc == 0


def test_echo_client_against_echo_server(backend):
    srv = Example("echo_server.py", "--backend", backend)
    try:
        out = _run("echo_client.py", "--port", str(srv.address[1]), "--count", "2000",
                   "--depth", "16", "--backend", backend)
        assert out.returncode == 0, out.stderr
        assert "2000 round trips" in out.stdout, out.stdout
    finally:
        rc = srv.stop(signal.SIGINT)
    assert rc == 0


def test_http_hello(backend):
    srv = Example("http_hello.py", "--backend", backend)
    try:
        with socket.create_connection(srv.address, timeout=DEADLINE) as s:
            # Two pipelined requests: keep-alive, then close.
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            buf = b""
            while chunk := s.recv(4096):
                buf += chunk
        assert buf.count(b"HTTP/1.1 200 OK\r\n") == 2, buf
        assert b"Connection: keep-alive" in buf and b"Connection: close" in buf
        assert buf.endswith(b"Hello, world!")
    finally:
        rc = srv.stop()
    assert rc == 0


def test_chat_server(backend):
    srv = Example("chat_server.py", "--backend", backend)
    try:
        with socket.create_connection(srv.address, timeout=DEADLINE) as a:
            assert b"joined\n" in _recv_until(a, b"joined\n")
            with socket.create_connection(srv.address, timeout=DEADLINE) as b:
                assert b"joined\n" in _recv_until(b, b"joined\n")
                assert b"joined\n" in _recv_until(a, b"joined\n")  # b's arrival
                a.sendall(b"hi all\n")
                assert _recv_until(b, b"hi all\n").endswith(b"] hi all\n")
    finally:
        rc = srv.stop()
    assert rc == 0


def test_asyncio_host(backend):
    if backend != "epoll":
        pytest.skip("hosting needs Loop.fileno(): epoll backend only")
    out = _run("asyncio_host.py")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["HELLO", "FROM", "ASYNCIO", "fastmux", "timer", "fired:",
                                  "True"], out.stdout


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")) if EXAMPLES.is_dir() else [],
                         ids=lambda p: p.name)
def test_examples_use_only_the_public_api(path):
    """A reader copies an example whole: it may not lean on fastmux's private modules."""
    import ast

    private = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        private += [n for n in names if n.startswith("fastmux.")]
    assert not private, f"{path.name} imports {private}"
