"""``python -m fastmux``: the help lists the commands; echo and http serve."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from support import DEADLINE


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fastmux", "--help"], capture_output=True,
                         text=True, timeout=DEADLINE, env=_env())
    assert out.returncode == 0, out.stderr
    for name in ("bench", "echo", "http"):
        assert re.search(rf"^\s+{name}\s", out.stdout, re.M), out.stdout
    sub = subprocess.run([sys.executable, "-m", "fastmux", "echo", "--help"],
                         capture_output=True, text=True, timeout=DEADLINE, env=_env())
    assert sub.returncode == 0, sub.stderr
    for option in ("--host", "--port", "--backend", "--workers"):
        assert option in sub.stdout


class Server:
    """A `python -m fastmux <cmd>` subprocess; killed at teardown if still up."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastmux", *args, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        # The first line tells the address; read it with a bounded wait.
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(DEADLINE)
        if not line or not line[0]:
            self.stop()
            raise AssertionError(f"no banner from {args}: {self.proc.stderr.read()}")
        self.banner = line[0]
        m = re.search(r"(\d+\.\d+\.\d+\.\d+):(\d+)", self.banner)
        assert m, self.banner
        self.address = (m.group(1), int(m.group(2)))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(DEADLINE)
            raise AssertionError("the server did not stop on a signal") from None
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()


def _talk(address, payload: bytes, until: bytes) -> bytes:
    with socket.create_connection(address, timeout=DEADLINE) as s:
        s.sendall(payload)
        buf = b""
        while not buf.endswith(until):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf


@pytest.mark.parametrize("workers", [1, 2])
def test_echo_command_serves_and_stops_on_sigterm(workers):
    srv = Server("echo", "--workers", str(workers))
    try:
        assert "echo on 127.0.0.1:" in srv.banner
        assert _talk(srv.address, b"hello\nworld\n", b"world\n") == b"hello\nworld\n"
    finally:
        rc = srv.stop()
    assert rc == 0


def test_http_command_serves_and_stops_on_sigint():
    srv = Server("http", "--backend", "select")
    try:
        assert "select backend" in srv.banner
        reply = _talk(srv.address, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                      b"Hello, world!")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"Hello, world!")
    finally:
        rc = srv.stop(signal.SIGINT)
    assert rc == 0


# --- bad input: one line on stderr, no traceback, a non-zero exit ------------------

def _run(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m fastmux ARGS` to completion (bounded: a command that
    serves instead of failing is killed at DEADLINE and the test fails)."""
    return subprocess.run([sys.executable, "-m", "fastmux", *args], capture_output=True,
                          text=True, timeout=DEADLINE, env=_env())


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_port_out_of_range_is_a_usage_error(port):
    out = _run("http", "--port", port)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert "--port" in out.stderr and port in out.stderr, out.stderr
    assert out.stdout == ""  # no banner: nothing was served


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert out.stdout == ""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use_prints_one_line(workers):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        out = _run("echo", "--port", port, "--workers", workers)
    _one_line_error(out, "echo:", f"127.0.0.1:{port}", "in use")


def test_host_not_local_prints_one_line():
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): a valid address, never a local one.
    out = _run("http", "--host", "192.0.2.1", "--port", "0")
    _one_line_error(out, "http:", "192.0.2.1")

