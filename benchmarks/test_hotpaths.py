"""Hot paths of fastmux on both backends, in-process over socketpairs.

Figures per message are printed at the end of the run (see conftest.py).
"""

from __future__ import annotations

import socket
from typing import Any, List

import pytest
from conftest import BACKENDS, Pair, recv_exactly

import fastmux
from fastmux import _framing

MSG = bytes(range(64))
BATCH = MSG * 16  # 16 messages of 64 B arrive in one read


def _run_until(p: Pair, target: int) -> None:
    for _ in range(1000):  # bounded: a lost message fails, never hangs
        if p.received[0] >= target:
            return
        p.loop.run_once(0)
    raise AssertionError("messages were not delivered")


def test_dispatch_16x64(benchmark: Any, pair64: Pair) -> None:
    """16 messages per read, each answered by one conn.write: the peer
    sends 1 KiB, the loop reads, frames, dispatches 16 on_message calls and
    sends the 16 answers in one send; the peer reads them back."""
    p = pair64
    buf = bytearray(len(BATCH))

    def one_round() -> None:
        target = p.received[0] + 16
        p.peer.sendall(BATCH)
        _run_until(p, target)
        recv_exactly(p.peer, buf, len(BATCH))

    benchmark.extra_info["messages"] = 16
    benchmark(one_round)
    assert bytes(buf) == BATCH


def test_syscall_floor_16x64(benchmark: Any) -> None:
    """The same socket operations with no loop: what dispatch cannot go
    below (peer send, one epoll_wait -- any event loop makes one per
    iteration --, server recv, server send, peer recv), plus the 16 slices
    a Python server needs to hold the messages."""
    import select

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ep = select.epoll()
    ep.register(b.fileno(), select.EPOLLIN | select.EPOLLET)
    buf = bytearray(len(BATCH))
    try:
        def one_round() -> None:
            a.sendall(BATCH)
            ep.poll(0)
            data = b.recv(65536)
            msgs = [data[i:i + 64] for i in range(0, len(data), 64)]
            b.sendall(b"".join(msgs))
            recv_exactly(a, buf, len(BATCH))

        benchmark.extra_info["messages"] = 16
        benchmark(one_round)
    finally:
        ep.close()
        a.close()
        b.close()


def test_handler_alone_16x64(benchmark: Any) -> None:
    """The handler's own cost: 16 calls of on_message(conn, data) whose
    body is one method call (the write), with the write itself a no-op."""

    class Stub:
        __slots__ = ()

        def write(self, data: bytes) -> None:
            pass

    class H:
        def on_message(self, conn: Any, data: bytes) -> None:
            conn.write(data)

    on_message = H().on_message
    conn = Stub()
    msgs = [MSG] * 16

    def one_round() -> None:
        for m in msgs:
            on_message(conn, m)

    benchmark.extra_info["messages"] = 16
    benchmark(one_round)


def test_write_16x64(benchmark: Any, pair64: Pair) -> None:
    """16 conn.write calls of 64 B, one loop iteration to flush them (one
    send), the peer reads them."""
    p = pair64
    buf = bytearray(len(BATCH))
    write = p.conn.write

    def one_round() -> None:
        for _ in range(16):
            write(MSG)
        p.loop.run_once(0)
        recv_exactly(p.peer, buf, len(BATCH))

    benchmark.extra_info["messages"] = 16
    benchmark(one_round)


LINES = (b"x" * 63 + b"\n") * (1 << 14)  # 1 MiB of 64 B lines


def test_framer_python(benchmark: Any) -> None:
    """The pure-Python reference framer over 1 MiB of 64 B lines."""
    spec = fastmux.Lines()
    benchmark.extra_info["messages"] = 1 << 14
    msgs, consumed = benchmark(_framing.split, spec, LINES)
    assert len(msgs) == 1 << 14 and consumed == len(LINES)


@pytest.mark.skipif("epoll" not in BACKENDS, reason="the C core is not built")
def test_framer_c(benchmark: Any) -> None:
    """The C framer (csrc/framing.c) over the same buffer, messages as bytes."""
    from fastmux._epoll import c_split

    spec = fastmux.Lines()
    benchmark.extra_info["messages"] = 1 << 14
    msgs, consumed, toolarge = benchmark(c_split, spec._kind, spec._max, spec._n, spec._sep,
                                         spec._little, LINES)
    assert len(msgs) == 1 << 14 and consumed == len(LINES) and not toolarge


def test_call_later_cancel(benchmark: Any, backend: str) -> None:
    """Schedule a timer and cancel it (the idle-timeout pattern)."""
    with fastmux.Loop(backend=backend) as loop:
        def noop() -> None:
            pass

        def one() -> None:
            loop.call_later(10.0, noop).cancel()

        benchmark(one)


def test_call_soon_100(benchmark: Any, backend: str) -> None:
    """100 call_soon callbacks run by one loop iteration."""
    with fastmux.Loop(backend=backend) as loop:
        ran: List[int] = [0]

        def cb() -> None:
            ran[0] += 1

        def one_round() -> None:
            for _ in range(100):
                loop.call_soon(cb)
            loop.run_once(0)

        benchmark.extra_info["messages"] = 100
        benchmark(one_round)
        assert ran[0] > 0
