"""Micro benchmarks of fastmux's hot paths (pytest-benchmark).

    pytest benchmarks/ --benchmark-only

They are benchmarks, not tests: the normal ``pytest`` run only looks in
tests/ (testpaths), and this conftest refuses to collect anything here
without --benchmark-only, so a ``pytest tests benchmarks`` run does not
spend minutes timing.  Each benchmark that handles several messages per
round sets ``extra_info["messages"]``; the summary at the end divides by it
and prints ns per message, and the dispatch overhead the issue targets.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional

import pytest

import fastmux

BACKENDS = ["epoll", "select"] if fastmux.epoll_available() else ["select"]


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> Optional[bool]:
    try:
        only = config.getoption("benchmark_only")
    except ValueError:  # pytest-benchmark is not installed
        only = False
    if only:
        return None
    return collection_path.suffix == ".py" and collection_path.name != "conftest.py"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Pair:
    """A loop whose connection is one end of a socketpair; `peer` is the
    other end, a plain blocking socket driven by the benchmark."""
    loop: fastmux.Loop
    conn: fastmux.Connection
    peer: socket.socket
    received: List[int] = field(default_factory=lambda: [0])


class Echo(fastmux.Handler):
    """Answers each message with one write, counting messages."""

    def __init__(self, counter: List[int]) -> None:
        self.counter = counter

    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        self.counter[0] += 1
        conn.write(data)


def make_pair(backend: str, framing: fastmux.Framing) -> Iterator[Pair]:
    loop = fastmux.Loop(backend=backend)
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (mine, peer):  # room for a whole round in the kernel buffers
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    counter = [0]
    opened: List[bool] = []

    class Opened(Echo):
        def on_open(self, conn: fastmux.Connection) -> None:
            opened.append(True)

    conn = loop.connect(None, lambda: Opened(counter), framing=framing, sock=mine)
    for _ in range(100):
        if opened:
            break
        loop.run_once(0.01)
    assert opened, "the socketpair connection never opened"
    try:
        yield Pair(loop, conn, peer, counter)
    finally:
        peer.close()
        loop.close()


@pytest.fixture
def pair64(backend: str) -> Iterator[Pair]:
    """64-byte messages (Fixed(64))."""
    yield from make_pair(backend, fastmux.Fixed(64))


def recv_exactly(sock: socket.socket, buf: bytearray, n: int) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:n])
        if k == 0:
            raise ConnectionError("peer closed")
        got += k


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    per_msg = {}
    lines = []
    for b in session.benchmarks:
        n = b.extra_info.get("messages")
        if not n or b.stats is None:
            continue
        ns = b.stats.median * 1e9 / n
        per_msg[b.name] = ns
        lines.append(f"  {b.name:<55} {ns:9.1f} ns per message (median, {n}/round)")
    if not lines:
        return
    terminalreporter.write_sep("-", "fastmux: per message")
    for line in lines:
        terminalreporter.write_line(line)
    for be in BACKENDS:
        d = per_msg.get(f"test_dispatch_16x64[{be}]")
        f = per_msg.get("test_syscall_floor_16x64")
        h = per_msg.get("test_handler_alone_16x64")
        if d is not None and f is not None and h is not None:
            terminalreporter.write_line(
                f"  {be}: dispatch overhead above the syscalls and the handler's own "
                f"call: {d - f - h:.1f} ns per message (issue target for epoll: <= 150)")
