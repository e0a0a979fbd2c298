"""The benchmark's wing (fastmux.bench) as the command runs it: the command
parses, each server under test starts from its module and answers, and the
C pieces are found where the build puts them.  No timed run here."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from support import DEADLINE

import fastmux


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _loadgen_built() -> bool:
    return importlib.util.find_spec("fastmux.bench._loadgen") is not None


def test_bench_command_help():
    out = subprocess.run([sys.executable, "-m", "fastmux", "bench", "--help"],
                         capture_output=True, text=True, timeout=DEADLINE, env=_env())
    assert out.returncode == 0, out.stderr
    for option in ("--quick", "--servers", "--scenarios", "--json", "--strace"):
        assert option in out.stdout


def test_loadgen_is_built_with_the_core():
    # The build makes both cffi modules or neither (setup.py's cffi_modules).
    if importlib.util.find_spec("fastmux._core") is None:
        pytest.skip("no C core in this install")
    assert _loadgen_built(), "fastmux._core is built but fastmux.bench._loadgen is not"


@pytest.mark.parametrize("server, mode, send, want", [
    ("fastmux-select", "lines", b"a\nb\n", b"a\nb\n"),
    ("fastmux-epoll", "raw", b"x" * 64, b"x" * 64),
    ("c-et", "http", b"GET / HTTP/1.1\r\n\r\n", b"Hello, world!"),
    ("selectors-batch", "lines", b"a\nb\n", b"a\nb\n"),
    ("python-et", "http", b"GET / HTTP/1.1\r\n\r\n", b"Hello, world!"),
])
def test_bench_server_answers(server, mode, send, want):
    if server == "fastmux-epoll" and not fastmux.epoll_available():
        pytest.skip("no epoll core")
    if server == "c-et" and not _loadgen_built():
        pytest.skip("the load generator module is not built")
    proc = subprocess.Popen([sys.executable, "-m", "fastmux.bench.servers", server, mode, "-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(DEADLINE)
        m = re.match(rb"READY (\d+)", line[0]) if line else None
        assert m, f"no READY line: {line} {proc.stderr.read() if proc.poll() is not None else ''}"
        with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=DEADLINE) as s:
            s.sendall(send)
            buf = b""
            while not buf.endswith(want):
                chunk = s.recv(4096)
                assert chunk, f"EOF after {buf!r}"
                buf += chunk
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(DEADLINE)
        proc.stdout.close()
        proc.stderr.close()
