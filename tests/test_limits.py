"""Limits (issue 4): idle_timeout, max_connections, max_write_buffer,
max_size against hostile input, and loop.shutdown(timeout) -- both backends.

Assertions are on behaviour (which callbacks ran, with which exception, how
many bytes were taken); deadlines only guard against hangs."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from support import Echo, Factory, Recorder, pattern, run_until, spin

import fastmux
from fastmux import _constants


class LineEcho(Echo):
    suffix = b"\n"


# --- idle_timeout -------------------------------------------------------------

def test_idle_timeout_closes_silent_connection_only(loop, peers):
    fac = Factory(LineEcho)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines(), idle_timeout=0.3)
    silent = peers.connect(server.address)
    active = peers.connect(server.address)
    run_until(loop, lambda: len(fac) == 2)
    by_peer = {}
    # The active peer sends a line every 0.1 s for 1 s (> 3 timeouts).
    deadline = time.monotonic() + 1.0
    sent = 0
    while time.monotonic() < deadline:
        active.send(b"ping %d\n" % sent)
        sent += 1
        end = time.monotonic() + 0.1
        run_until(loop, lambda: time.monotonic() >= end, peers=[active, silent])
    run_until(loop, lambda: silent.done, peers=[silent, active], what="silent peer cut off")
    for h in fac.made:
        by_peer[bool(h.messages)] = h
    h_silent, h_active = by_peer[False], by_peer[True]
    h_silent.assert_closed_once(fastmux.IdleTimeout)
    assert isinstance(h_silent.close_exc, TimeoutError)
    assert isinstance(h_silent.close_exc, fastmux.FastmuxError)
    assert not h_active.closed, "a connection that keeps sending must not time out"
    run_until(loop, lambda: active.received.count(b"\n") == sent, peers=[active])
    assert not active.done


def test_idle_timeout_counts_inbound_bytes_only(loop, peers):
    """A connection the server keeps writing to, but which sends nothing,
    is idle: only inbound bytes reset the timer."""
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, idle_timeout=0.3)
    p = peers.connect(server.address)
    run_until(loop, lambda: fac.opened)
    h = fac[0]

    def tick():
        if not h.closed:
            h.conn.write(b"tick")
            loop.call_later(0.05, tick)

    tick()
    run_until(loop, lambda: h.closed, peers=[p], what="idle close despite outbound traffic")
    h.assert_closed_once(fastmux.IdleTimeout)
    assert len(p.received) > 0


def test_idle_timeout_on_connect(loop):
    """idle_timeout on loop.connect(): a server that never sends."""
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        fac = Factory(Recorder)
        t0 = time.monotonic()
        loop.connect(lsock.getsockname(), fac, idle_timeout=0.3)
        run_until(loop, lambda: fac[0].closed)
        assert time.monotonic() - t0 >= 0.25
        assert fac[0].opened
        fac[0].assert_closed_once(fastmux.IdleTimeout)
        acc, _ = lsock.accept()
        acc.close()
    finally:
        lsock.close()


def test_idle_timeout_many_distinct_values(loop, peers):
    """Connections with different timeouts (several listeners) each close
    at their own deadline, in order."""
    facs, servers = [], []
    for t in (0.2, 0.4, 0.6):
        f = Factory(Recorder)
        facs.append(f)
        servers.append(loop.listen(("127.0.0.1", 0), f, idle_timeout=t))
    for s in servers:
        peers.connect(s.address)
    run_until(loop, lambda: all(len(f) == 1 for f in facs))
    order = []
    for f in facs:
        h = f[0]
        h.on_close = (lambda h=h, old=h.on_close: lambda c, e: (order.append(h), old(c, e)))()
    run_until(loop, lambda: all(f[0].closed for f in facs), peers=peers.all)
    assert order == [f[0] for f in facs]
    for f in facs:
        f[0].assert_closed_once(fastmux.IdleTimeout)


# --- max_connections ---------------------------------------------------------

def test_max_connections_rejects_beyond_limit(loop, peers):
    fac = Factory(LineEcho)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines(), max_connections=3)
    keep = [peers.connect(server.address) for _ in range(3)]
    run_until(loop, lambda: len(fac) == 3)
    extra = [peers.connect(server.address) for _ in range(4)]
    run_until(loop, lambda: all(p.done for p in extra), peers=extra, what="extra peers closed")
    assert len(fac) == 3, "the handler factory must not run for rejected connections"
    assert loop.stats()["rejected"] == 4
    for p in extra:
        assert p.received == b""
    # Existing connections are unaffected.
    for i, p in enumerate(keep):
        p.send(b"still %d\n" % i)
    run_until(loop, lambda: all(p.received == b"still %d\n" % i for i, p in enumerate(keep)),
              peers=keep)
    # A slot frees up: the next connection is accepted.
    keep[0].close()
    run_until(loop, lambda: fac[0].closed)
    p = peers.connect(server.address)
    run_until(loop, lambda: len(fac) == 4)
    p.send(b"new\n")
    run_until(loop, lambda: p.received == b"new\n", peers=[p])
    assert loop.stats()["rejected"] == 4


def test_max_connections_zero(loop, peers):
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, max_connections=0)
    ps = [peers.connect(server.address) for _ in range(3)]
    run_until(loop, lambda: all(p.done for p in ps), peers=ps)
    assert len(fac) == 0
    assert loop.stats()["rejected"] == 3


# --- max_write_buffer --------------------------------------------------------

class Firehose(Recorder):
    """Writes `chunk` bytes every iteration (call_soon) until closed."""

    chunk = 256 * 1024

    def on_open(self, conn):
        super().on_open(conn)
        self.written = 0
        self.max_seen = 0
        self._tick()

    def _tick(self):
        c = self.conn
        if c.closed:
            return
        c.write(b"x" * self.chunk)
        self.written += self.chunk
        self.max_seen = max(self.max_seen, c.write_buffer_size)
        c.loop.call_soon(self._tick)


def test_max_write_buffer_cuts_off_non_reading_peer(loop, peers):
    fac = Factory(Firehose)
    limit = 2 * 1024 * 1024
    server = loop.listen(("127.0.0.1", 0), fac, max_write_buffer=limit)
    p = peers.connect(server.address, rcvbuf=4096)
    run_until(loop, lambda: fac.opened and fac[0].closed, what="WriteBufferFull")
    h = fac[0]
    h.assert_closed_once(fastmux.WriteBufferFull)
    assert isinstance(h.close_exc, fastmux.FastmuxError)
    # Bounded: the queue never held much more than the limit plus one
    # iteration's writes.
    assert h.max_seen <= limit + 2 * Firehose.chunk
    assert loop.stats()["connections_open"] == 0
    p.close()


def test_default_max_write_buffer(loop, peers):
    assert fastmux.DEFAULT_MAX_WRITE_BUFFER == 64 * 1024 * 1024

    class Big(Firehose):
        chunk = 4 * 1024 * 1024

    fac = Factory(Big)
    server = loop.listen(("127.0.0.1", 0), fac)
    p = peers.connect(server.address, rcvbuf=4096)
    run_until(loop, lambda: fac.opened and fac[0].closed, timeout=30)
    fac[0].assert_closed_once(fastmux.WriteBufferFull)
    assert fac[0].written >= fastmux.DEFAULT_MAX_WRITE_BUFFER
    assert fac[0].max_seen <= fastmux.DEFAULT_MAX_WRITE_BUFFER + 2 * Big.chunk
    p.close()


def test_max_write_buffer_none_is_unlimited(loop, peers):
    """max_write_buffer=None: 8 MiB queued to a non-reader is kept."""

    class Once(Recorder):
        def on_open(self, conn):
            super().on_open(conn)
            conn.write(b"y" * (8 * 1024 * 1024))

    fac = Factory(Once)
    server = loop.listen(("127.0.0.1", 0), fac, max_write_buffer=None)
    p = peers.connect(server.address, rcvbuf=4096)
    run_until(loop, lambda: fac.opened)
    spin(loop, 10)
    assert not fac[0].closed
    run_until(loop, lambda: len(p.received) == 8 * 1024 * 1024, peers=[p], timeout=30)


def test_max_write_buffer_on_connect(loop):
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        fac = Factory(Firehose)
        loop.connect(lsock.getsockname(), fac, max_write_buffer=1024 * 1024)
        acc, _ = lsock.accept()
        try:
            acc.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            run_until(loop, lambda: fac.opened and fac[0].closed)
            fac[0].assert_closed_once(fastmux.WriteBufferFull)
        finally:
            acc.close()
    finally:
        lsock.close()


def test_write_buffer_full_does_not_touch_other_connections(loop, peers):
    fac = Factory(Firehose)
    server = loop.listen(("127.0.0.1", 0), fac, max_write_buffer=1024 * 1024)
    efac = Factory(LineEcho)
    eserver = loop.listen(("127.0.0.1", 0), efac, framing=fastmux.Lines())
    bad = peers.connect(server.address, rcvbuf=4096)
    good = peers.connect(eserver.address)
    good.send(b"hello\n")
    run_until(loop, lambda: fac.opened and fac[0].closed and good.received == b"hello\n",
              peers=[good])
    fac[0].assert_closed_once(fastmux.WriteBufferFull)
    assert not efac[0].closed
    bad.close()


# --- max_size against hostile input -------------------------------------------

def test_endless_line_cut_off_at_max_size(loop, peers):
    """max_size + 1 bytes with no separator are enough: the peer is cut off
    without the loop waiting for more data (it sends no more)."""
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines(max_size=1024))
    p = peers.connect(server.address)
    p.send(b"ok\n" + b"z" * 1025)
    run_until(loop, lambda: fac.opened and fac[0].closed, peers=[p])
    h = fac[0]
    assert h.messages == [b"ok"]
    h.assert_closed_once(fastmux.MessageTooLarge)


def test_exactly_max_size_line_is_fine(loop, peers):
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines(max_size=1024))
    p = peers.connect(server.address)
    p.send(b"z" * 1024)  # could still end with "\n"
    run_until(loop, lambda: fac.opened, peers=[p])
    spin(loop, 10, peers=[p])
    assert not fac[0].closed
    p.send(b"\n")
    run_until(loop, lambda: fac[0].messages == [b"z" * 1024], peers=[p])


def test_endless_stream_memory_bounded(loop, peers, threads):
    """A peer streaming 64 MiB without a separator is cut off after at most
    max_size plus one read budget: the loop does not buffer the stream."""
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines(max_size=64 * 1024))
    s = socket.create_connection(server.address)
    sent = [0]

    def blast():
        s.settimeout(10)
        chunk = b"q" * 65536
        try:
            for _ in range(1024):
                s.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass

    threads.start(blast)
    try:
        run_until(loop, lambda: fac.opened and fac[0].closed, timeout=30)
        fac[0].assert_closed_once(fastmux.MessageTooLarge)
        assert loop.stats()["bytes_in"] <= 64 * 1024 + 2 * _constants.READ_BUDGET
        threads.join_all()
        assert sent[0] < 64 * 1024 * 1024
    finally:
        s.close()


@pytest.mark.parametrize("header_size", [2, 4, 8])
def test_length_header_announcing_huge_message(loop, peers, header_size):
    """A header announcing 4 GiB (or 2**63) closes at once, with only the
    header sent; nothing is allocated for the announced size."""
    fac = Factory(Recorder)
    framing = fastmux.LengthPrefixed(header_size, max_size=1000)
    server = loop.listen(("127.0.0.1", 0), fac, framing=framing)
    p = peers.connect(server.address)
    huge = {2: 0xFFFF, 4: 0xFFFFFFFF, 8: 1 << 63}[header_size]
    fmt = {2: ">H", 4: ">I", 8: ">Q"}[header_size]
    p.send(struct.pack(fmt, 3) + b"abc" + struct.pack(fmt, huge))
    run_until(loop, lambda: any(h.closed for h in fac.made), peers=[p])
    h = [h for h in fac.made if h.closed][0]
    assert h.messages == [b"abc"]
    h.assert_closed_once(fastmux.MessageTooLarge)


@pytest.mark.parametrize("framing", [
    fastmux.Lines(max_size=100),
    fastmux.Delimiter(b"\r\n\r\n", max_size=100),
    fastmux.LengthPrefixed(4, max_size=100),
    fastmux.LengthPrefixed(1, max_size=100),
    fastmux.Fixed(7),
], ids=repr)
def test_garbage_input(loop, peers, framing):
    """Random garbage: every framing either delivers messages or cuts the
    peer off; the loop survives and bytes_in stays bounded by what was sent."""
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, framing=framing)
    garbage = pattern(200_000, seed=7)
    p = peers.connect(server.address)
    p.send(garbage)
    run_until(loop, lambda: fac.opened and (fac[0].closed or
                                             loop.stats()["bytes_in"] == len(garbage)),
              peers=[p])
    h = fac[0]
    if h.closed:
        h.assert_closed_once(fastmux.MessageTooLarge)
    for m in h.messages:
        assert len(m) <= 100 or isinstance(framing, fastmux.Fixed)
    # The loop is alive: a fresh connection still works.
    p2 = peers.connect(server.address)
    run_until(loop, lambda: len(fac) == 2, peers=[p2])


# --- shutdown -------------------------------------------------------------------

def test_shutdown_flushes_then_aborts_stuck(loop, peers):
    class Sender(Recorder):
        size = 0

        def on_open(self, conn):
            super().on_open(conn)
            conn.write(pattern(self.size, seed=self.size))

    class Small(Sender):
        size = 10_000

    class Huge(Sender):
        size = 32 * 1024 * 1024

    fsmall, fhuge = Factory(Small), Factory(Huge)
    s1 = loop.listen(("127.0.0.1", 0), fsmall)
    s2 = loop.listen(("127.0.0.1", 0), fhuge)
    good = peers.connect(s1.address)
    stuck = peers.connect(s2.address, rcvbuf=4096)
    run_until(loop, lambda: fsmall.opened and fhuge.opened)
    t0 = time.monotonic()
    loop.shutdown(timeout=0.5)
    took = time.monotonic() - t0
    assert took < 5, "shutdown must return soon after its deadline"
    assert fsmall[0].closed and fhuge[0].closed
    fsmall[0].assert_closed_once(None)
    assert fhuge[0].close_count == 1
    assert s1.closed and s2.closed
    with pytest.raises(OSError):
        socket.create_connection(s1.address, timeout=2).close()
    good.sock.settimeout(5)
    data = b""
    while True:
        chunk = good.sock.recv(65536)
        if not chunk:
            break
        data += chunk
    assert data == pattern(10_000, seed=10_000), "graceful close flushes queued output"
    stuck.sock.settimeout(5)
    got = 0
    try:
        while True:
            chunk = stuck.sock.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass
    assert got < Huge.size, "the stuck connection is aborted, not flushed"
    assert loop.stats()["connections_open"] == 0


def test_shutdown_from_callback(loop, peers):
    fac = Factory(LineEcho)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    ps = [peers.connect(server.address) for _ in range(3)]
    run_until(loop, lambda: len(fac) == 3)
    loop.call_soon(loop.shutdown, 1.0)
    run_until(loop, lambda: all(h.closed for h in fac.made), peers=ps)
    for h in fac.made:
        h.assert_closed_once(None)
    run_until(loop, lambda: all(p.eof for p in ps), peers=ps)
    assert server.closed
