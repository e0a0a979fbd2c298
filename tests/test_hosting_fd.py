"""A hosted loop keeps ``fileno()`` honest after calls made between iterations.

The contract: ``loop.fileno()`` is readable whenever ``run_once(0)`` has
work.  A host (asyncio's ``add_reader``, a GUI loop) calls ``run_once(0)``
only when it is, so every public method that can be called from outside an
iteration and leaves work behind must make the fd readable by itself.  Each
test here makes one such call from outside any iteration and then drives the
loop exactly as a host does -- ``run_once(0)`` only when ``select`` says the
fd is readable -- until the effect is seen.  A missing wake-up fails at the
deadline with the name of the call; nothing sleeps and hopes.

epoll only: the select backend has no pollable fd (``fileno()`` raises).
"""

from __future__ import annotations

import select
import socket
import time

import pytest
from support import Factory, Peer, Recorder

import fastmux

pytestmark = pytest.mark.epoll_only

DEADLINE = 5.0


def drive_by_fd(loop, predicate, what, peers=(), timeout=DEADLINE):
    """Run ``loop.run_once(0)`` only when ``loop.fileno()`` is readable, as
    a host does, until ``predicate()``; the peers are read as they become
    readable.  AssertionError naming `what` at the deadline."""
    fd = loop.fileno()
    deadline = time.monotonic() + timeout
    while True:
        for p in peers:
            p.step()
        if predicate():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"after {what}: fileno() did not become readable although "
                f"run_once(0) had work (waited {timeout}s)")
        socks = [p.sock for p in peers if not p.done]
        r, w, _ = select.select([fd, *socks], [p.sock for p in peers if p.pending], [],
                                remaining)
        if fd in r:
            loop.run_once(0)


def settle(loop, quiet=0.1):
    """Let a hosted loop finish what it has: run while the fd is readable,
    until it stays quiet for `quiet` seconds (bounded)."""
    fd = loop.fileno()
    for _ in range(1000):
        r, _, _ = select.select([fd], [], [], quiet)
        if not r:
            return
        loop.run_once(0)
    raise AssertionError("the hosted loop never went quiet")


@pytest.fixture
def hosted_conn(loop):
    """A hosted loop with one accepted Lines connection: (factory, peer, conn)."""
    loop.fileno()
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    peer = Peer.connect(server.address)
    try:
        drive_by_fd(loop, lambda: fac.opened, "accept", [peer])
        yield fac, peer, fac[0].conn
    finally:
        peer.close()


def test_resume_reading_delivers_what_arrived_while_paused(loop, hosted_conn):
    fac, peer, conn = hosted_conn
    conn.pause_reading()
    peer.send(b"one\ntwo\n")
    settle(loop)
    assert fac[0].messages == []
    conn.resume_reading()
    drive_by_fd(loop, lambda: fac[0].messages == [b"one", b"two"], "resume_reading()", [peer])


def test_resume_reading_delivers_lines_already_buffered(loop):
    """Paused in on_message with more lines of the same read behind it: they
    go back to the core's buffer; resume_reading() from the host delivers
    them with no new byte from the peer."""

    class PauseFirst(Recorder):
        def on_message(self, conn, data):
            super().on_message(conn, data)
            if len(self.messages) == 1:
                conn.pause_reading()

    loop.fileno()
    fac = Factory(PauseFirst)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    peer = Peer.connect(server.address)
    try:
        peer.send(b"one\ntwo\nthree\n")
        drive_by_fd(loop, lambda: fac.opened and fac[0].messages, "the first line", [peer])
        settle(loop)
        assert fac[0].messages == [b"one"]
        fac[0].conn.resume_reading()
        drive_by_fd(loop, lambda: fac[0].messages == [b"one", b"two", b"three"],
                    "resume_reading() with lines buffered", [peer])
    finally:
        peer.close()


def test_set_framing_splits_buffered_bytes(loop, hosted_conn):
    fac, peer, conn = hosted_conn
    peer.send(b"abcdef")  # no newline: nothing to deliver under Lines()
    settle(loop)
    assert fac[0].messages == []
    conn.set_framing(fastmux.Fixed(3))
    drive_by_fd(loop, lambda: fac[0].messages == [b"abc", b"def"], "set_framing()", [peer])


def test_write_and_writelines(loop, hosted_conn):
    fac, peer, conn = hosted_conn
    conn.write(b"x\n")
    conn.writelines([b"y", b"\n"])
    drive_by_fd(loop, lambda: bytes(peer.received) == b"x\ny\n", "write()/writelines()", [peer])


def test_write_after_an_iteration_left_by_a_base_exception(loop):
    """A KeyboardInterrupt from a handler leaves run_once() half-way: the
    iteration is over all the same, so a write made after it must wake the
    host (the C write path once thought it was still inside the iteration,
    whose end would send it, and stayed silent)."""

    class Interrupting(Recorder):
        def on_message(self, conn, data):
            super().on_message(conn, data)
            if data == b"interrupt":
                raise KeyboardInterrupt

    loop.fileno()
    fac = Factory(Interrupting)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    peer = Peer.connect(server.address)
    try:
        drive_by_fd(loop, lambda: fac.opened, "accept", [peer])
        peer.send(b"interrupt\n")
        with pytest.raises(KeyboardInterrupt):
            drive_by_fd(loop, lambda: False, "the interrupting message", [peer])
        settle(loop)
        fac[0].conn.write(b"after\n")
        drive_by_fd(loop, lambda: bytes(peer.received) == b"after\n",
                    "write() after an interrupted iteration", [peer])
    finally:
        peer.close()


def test_close_flushes_then_runs_on_close(loop, hosted_conn):
    fac, peer, conn = hosted_conn
    conn.write(b"bye\n")
    conn.close()
    drive_by_fd(loop, lambda: fac[0].closed and peer.eof, "close()", [peer])
    assert bytes(peer.received) == b"bye\n"
    fac[0].assert_closed_once()


def test_abort_runs_on_close(loop, hosted_conn):
    fac, peer, conn = hosted_conn
    conn.abort()
    drive_by_fd(loop, lambda: fac[0].closed, "abort()", [peer])
    fac[0].assert_closed_once()


def test_shutdown_write_sends_queued_output_then_eof(loop, hosted_conn):
    fac, peer, conn = hosted_conn
    big = b"z" * (4 << 20)  # more than the socket buffers hold: needs EPOLLOUT
    conn.write(big)
    conn.shutdown_write()
    drive_by_fd(loop, lambda: peer.eof, "shutdown_write()", [peer])
    assert len(peer.received) == len(big)
    peer.send(b"still reading\n")
    drive_by_fd(loop, lambda: fac[0].messages == [b"still reading"],
                "a read after shutdown_write()", [peer])


def test_set_write_limits_then_drain(loop):
    loop.fileno()
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac)
    peer = Peer.connect(server.address, rcvbuf=4096)
    try:
        drive_by_fd(loop, lambda: fac.opened, "accept", [])
        conn = fac[0].conn
        conn.set_write_limits(high=1 << 20, low=1 << 18)
        conn.write(b"w" * (4 << 20))
        settle(loop)
        assert fac[0].drain_count == 0
        drive_by_fd(loop, lambda: fac[0].drain_count == 1 and len(peer.received) == 4 << 20,
                    "set_write_limits() and a full buffer", [peer])
    finally:
        peer.close()


def test_call_soon_and_call_later(loop):
    loop.fileno()
    got = []
    loop.call_soon(got.append, "soon")
    drive_by_fd(loop, lambda: got == ["soon"], "call_soon()")
    loop.call_later(0.02, got.append, "later")
    drive_by_fd(loop, lambda: got == ["soon", "later"], "call_later()")


def test_listen_after_hosting(loop):
    loop.fileno()
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    peer = Peer.connect(server.address)
    try:
        peer.send(b"hi\n")
        drive_by_fd(loop, lambda: fac.opened and fac[0].messages == [b"hi"], "listen()", [peer])
    finally:
        peer.close()


def test_connect_after_hosting(loop):
    loop.fileno()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    fac = Factory(Recorder)
    try:
        conn = loop.connect(lsock.getsockname(), fac, framing=fastmux.Lines())
        drive_by_fd(loop, lambda: fac.opened, "connect()")
        accepted, _ = lsock.accept()
        peer = Peer(accepted)
        try:
            peer.send(b"hello\n")
            drive_by_fd(loop, lambda: fac[0].messages == [b"hello"], "a read after connect()",
                        [peer])
            conn.close()
            drive_by_fd(loop, lambda: fac[0].closed and peer.eof, "close() of a client", [peer])
        finally:
            peer.close()
    finally:
        lsock.close()


def test_server_close_stops_accepting(loop):
    loop.fileno()
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac)
    address = server.address
    server.close()
    settle(loop)
    with pytest.raises(ConnectionRefusedError):
        Peer.connect(address)
    assert len(fac) == 0


def test_stop_wakes_the_host(loop):
    """stop() outside an iteration makes the fd readable, so a host that
    runs the loop notices at once."""
    loop.fileno()
    settle(loop)
    loop.stop()
    r, _, _ = select.select([loop.fileno()], [], [], DEADLINE)
    assert r, "stop() did not make fileno() readable"
    loop.run_once(0)
