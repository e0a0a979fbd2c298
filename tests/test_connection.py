"""Connection semantics on both backends: framing switches, limits,
half-close, reset, abort/close, backpressure, pause/resume, writes, info."""

from __future__ import annotations

import os
import random
import socket
import time

import pytest
from support import (
    DEADLINE,
    Echo,
    Factory,
    Recorder,
    dup_socket,
    get_sockopt_on_fd,
    pattern,
    run_until,
    set_sockopt_on_fd,
    spin,
)

import fastmux
from fastmux._constants import READ_BUDGET, SEND_NOW

LOCAL = ("127.0.0.1", 0)


def serve(loop, peers, cls=Recorder, framing=None, *args):
    """A server on a free port plus one connected, accepted plain peer."""
    fac = Factory(cls, *args)
    server = loop.listen(LOCAL, fac, framing=framing)
    p = peers.connect(server.address)
    run_until(loop, lambda: fac.opened, what="accept")
    return fac[0], p


# --- set_framing ----------------------------------------------------------------

class Http(Recorder):
    """Headers by delimiter, then a body whose length the headers give."""

    body_framing = staticmethod(fastmux.Fixed)

    def on_message(self, conn, data):
        super().on_message(conn, data)
        if data.startswith(b"POST"):
            n = int(data.rsplit(b"Content-Length: ", 1)[1])
            conn.set_framing(self.body_framing(n))
        else:
            conn.set_framing(fastmux.Delimiter(b"\r\n\r\n"))


def test_set_framing_headers_then_fixed_body_same_packet(loop, peers):
    h, p = serve(loop, peers, Http, fastmux.Delimiter(b"\r\n\r\n"))
    req = b"POST /a\r\nContent-Length: 5\r\n\r\nhello"
    req2 = b"POST /b\r\nContent-Length: 12\r\n\r\n\r\n\r\nbody\r\n\r\n"
    p.send(req + req2 + b"POST /c\r\nContent-Length: 1\r\n\r\n!")  # one send
    run_until(loop, lambda: len(h.messages) == 6, peers=[p])
    assert h.messages == [
        b"POST /a\r\nContent-Length: 5", b"hello",
        b"POST /b\r\nContent-Length: 12", b"\r\n\r\nbody\r\n\r\n",
        b"POST /c\r\nContent-Length: 1", b"!",
    ]


class HeaderThenLength(Recorder):
    def on_message(self, conn, data):
        super().on_message(conn, data)
        if data == b"LEN":
            conn.set_framing(fastmux.LengthPrefixed(2, "little"))
        elif data == b"RAW":
            conn.set_framing(fastmux.Raw())
        else:
            conn.set_framing(fastmux.Lines())


def test_set_framing_lines_then_length_prefixed(loop, peers):
    h, p = serve(loop, peers, HeaderThenLength, fastmux.Lines())
    p.send(b"LEN\n\x03\x00a\nbLEN\n\x00\x00x\n")
    run_until(loop, lambda: len(h.messages) == 5, peers=[p])
    assert h.messages == [b"LEN", b"a\nb", b"LEN", b"", b"x"]


class SwitchSeparator(Recorder):
    def on_message(self, conn, data):
        super().on_message(conn, data)
        if data == b"SWITCH":
            conn.set_framing(fastmux.Delimiter(b";"))


def test_set_framing_searches_the_buffered_tail_again(loop, peers):
    """The tail after the switch was searched for the old separator only:
    the new one is looked for from its start (the scan offset is reset)."""
    h, p = serve(loop, peers, SwitchSeparator, fastmux.Delimiter(b"|"))
    p.send(b"SWITCH|abc;def")  # one read: "abc;def" is searched for "|"
    run_until(loop, lambda: len(h.messages) == 2, peers=[p])
    p.send(b";")
    run_until(loop, lambda: len(h.messages) == 3, peers=[p])
    assert h.messages == [b"SWITCH", b"abc", b"def"]


def test_set_framing_to_raw_delivers_the_rest(loop, peers):
    h, p = serve(loop, peers, HeaderThenLength, fastmux.Lines())
    p.send(b"RAW\nrest of\nthe stream")
    run_until(loop, lambda: len(h.data) >= len(b"RAWrest of\nthe stream"), peers=[p])
    assert h.messages[0] == b"RAW"
    assert b"".join(h.messages[1:]) == b"rest of\nthe stream"


# --- max_size -------------------------------------------------------------------

def test_max_size_endless_line(loop, peers):
    h, p = serve(loop, peers, Recorder, fastmux.Lines(max_size=1000))
    p.send(b"ok\n")
    sent = 0
    # An endless line: keep sending until the server hangs up (bounded).
    deadline = time.monotonic() + DEADLINE
    while not h.closed:
        assert time.monotonic() < deadline, "not disconnected for an oversize line"
        if sent < 1 << 20 and p.pending == 0 and p.error is None:
            p.send(b"x" * 4096)
            sent += 4096
        loop.run_once(0.01)
        p.step()
    assert h.messages == [b"ok"]
    h.assert_closed_once(fastmux.MessageTooLarge)
    run_until(loop, lambda: p.done, peers=[p], what="peer sees the hang-up")
    with pytest.raises(fastmux.ConnectionClosed):
        h.conn.write(b"late")


def test_max_size_exactly_is_accepted(loop, peers):
    h, p = serve(loop, peers, Recorder, fastmux.Delimiter(b"\r\n", max_size=100))
    p.send(b"y" * 100 + b"\r\n")
    run_until(loop, lambda: h.messages, peers=[p])
    assert h.messages == [b"y" * 100]
    spin(loop, peers=[p])
    assert not h.closed and not p.done


@pytest.mark.parametrize("hs", [1, 2, 4, 8])
def test_max_size_length_header_announcing_more(loop, peers, hs):
    h, p = serve(loop, peers, Recorder, fastmux.LengthPrefixed(hs, max_size=100))
    # One good message, then only a header announcing 101 bytes: the server
    # must not wait for the payload.
    p.send((2).to_bytes(hs, "big") + b"ok" + (101).to_bytes(hs, "big"))
    run_until(loop, lambda: h.closed, peers=[p])
    assert h.messages == [b"ok"]
    h.assert_closed_once(fastmux.MessageTooLarge)
    run_until(loop, lambda: p.done, peers=[p])


# --- half-close -----------------------------------------------------------------

class ByeOnEof(Echo):
    suffix = b"\n"
    keep_open = None

    def on_eof(self, conn):
        super().on_eof(conn)
        conn.write(b"bye\n")
        return self.keep_open


def test_peer_half_close_server_still_writes(loop, peers):
    h, p = serve(loop, peers, ByeOnEof, fastmux.Lines())
    p.send(b"a\nb\n")
    p.shutdown_write()
    run_until(loop, lambda: p.eof, peers=[p], what="server closes after on_eof")
    assert bytes(p.received) == b"a\nb\nbye\n"
    run_until(loop, lambda: h.closed)
    assert [e[0] for e in h.events] == ["open", "message", "message", "eof", "close"]
    assert h.eof_count == 1
    h.assert_closed_once(None)


class KeepOpenOnEof(ByeOnEof):
    keep_open = True


def test_on_eof_returning_true_keeps_connection_open(loop, peers):
    h, p = serve(loop, peers, KeepOpenOnEof, fastmux.Lines())
    p.send(b"q\n")
    p.shutdown_write()
    run_until(loop, lambda: bytes(p.received) == b"q\nbye\n", peers=[p])
    spin(loop, 10, peers=[p])
    assert not h.closed and not h.conn.closed and not p.eof
    h.conn.write(b"later\n")  # still writable after the peer's EOF
    run_until(loop, lambda: p.received.endswith(b"later\n"), peers=[p])
    h.conn.close()
    run_until(loop, lambda: p.eof and h.closed, peers=[p])
    assert bytes(p.received) == b"q\nbye\nlater\n"
    h.assert_closed_once(None)
    assert h.eof_count == 1


class HalfCloser(Recorder):
    def on_open(self, conn):
        super().on_open(conn)
        conn.write(b"hi")
        conn.shutdown_write()
        self.closed_after_shutdown = conn.closed
        try:
            conn.write(b"x")
        except fastmux.ConnectionClosed as e:
            self.write_error = e
        else:
            self.write_error = None


def test_shutdown_write_peer_reads_eof_and_can_still_send(loop, peers):
    h, p = serve(loop, peers, HalfCloser, fastmux.Lines())
    assert isinstance(h.write_error, fastmux.ConnectionClosed)
    assert h.closed_after_shutdown is False
    run_until(loop, lambda: p.eof, peers=[p])
    assert bytes(p.received) == b"hi"
    p.send(b"still talking\n")
    run_until(loop, lambda: h.messages, peers=[p])
    assert h.messages == [b"still talking"]
    assert not h.closed
    p.shutdown_write()
    run_until(loop, lambda: h.closed, peers=[p])
    assert [e[0] for e in h.events] == ["open", "message", "eof", "close"]
    h.assert_closed_once(None)


# --- reset ----------------------------------------------------------------------

def test_peer_reset(loop, peers):
    h, p = serve(loop, peers, Recorder, fastmux.Lines())
    p.send(b"before\n")
    run_until(loop, lambda: h.messages, peers=[p])
    p.reset()
    run_until(loop, lambda: h.closed)
    assert h.messages == [b"before"]
    h.assert_closed_once(ConnectionResetError)
    assert h.conn.closed
    with pytest.raises(fastmux.ConnectionClosed):
        h.conn.write(b"after")


class Firehose(Recorder):
    """Queues 4 MiB at once behind a small kernel send buffer."""

    def on_open(self, conn):
        super().on_open(conn)
        set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        conn.write(b"z" * (4 << 20))


def test_peer_reset_with_queued_output(loop, peers):
    fac = Factory(Firehose)
    server = loop.listen(LOCAL, fac)
    p = peers.connect(server.address, rcvbuf=4096)
    run_until(loop, lambda: fac.opened)
    h = fac[0]
    spin(loop)
    assert h.conn.write_buffer_size > 0
    p.reset()
    run_until(loop, lambda: h.closed)
    h.assert_closed_once(OSError)  # ECONNRESET or EPIPE, whichever the kernel reports


class _Interleaver(Recorder):
    """Writes a seeded mix of small writes (held for the iteration's end)
    and big ones (sent at once behind them) through a small send buffer."""

    SIZES = (1, 100, 1, 100, 5000, SEND_NOW - 1, SEND_NOW, SEND_NOW + 1, 40000, 200000)

    def on_open(self, conn):
        super().on_open(conn)
        set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        self.sent = bytearray()
        self.port = conn.peername[1]

    def burst(self, rng):
        for _ in range(rng.choice((1, 2, 4, 12))):
            n = rng.choice(self.SIZES)
            data = bytes([len(self.sent) % 251]) * n
            how = rng.randrange(3)
            if how == 0:
                self.conn.write(data)
            elif how == 1:
                self.conn.write(bytearray(data))
            else:
                self.conn.writelines([data[: n // 3], memoryview(data)[n // 3:]])
            self.sent += data


def test_small_and_big_writes_interleaved_arrive_byte_exact(loop, peers):
    """Small writes coalesce until the iteration ends; a write of SEND_NOW
    bytes or more goes at once, behind them, in one sendmsg.  With a send
    buffer that keeps filling, a slowly reading peer must still receive
    exactly what was written, in order."""
    rng = random.Random(1234)
    fac = Factory(_Interleaver)
    server = loop.listen(LOCAL, fac)
    ps = [peers.connect(server.address, rcvbuf=rcv) for rcv in (4096, 16384, 65536, 1 << 20)]
    run_until(loop, lambda: len(fac.made) == len(ps))
    deadline = time.monotonic() + DEADLINE
    while any(len(h.sent) < 1_500_000 for h in fac.made):
        assert time.monotonic() < deadline, "timed out writing"
        for h in fac.made:
            # Mostly wait for the queue to empty: a burst's small writes are
            # then held for the end of the iteration and its big write meets
            # them and a send buffer already part full (sent whole, in part,
            # only some of the held bytes, or not at all).
            if len(h.sent) < 1_500_000 and (h.conn.write_buffer_size == 0 or
                                            rng.random() < 0.05):
                h.burst(rng)
        loop.run_once(0)
        for p in ps:
            if rng.random() < 0.5:
                p.step()
    for h in fac.made:
        h.conn.close()
    run_until(loop, lambda: all(p.done for p in ps) and all(h.closed for h in fac.made),
              peers=ps)
    by_port = {h.port: h for h in fac.made}
    for p in ps:
        h = by_port[p.sock.getsockname()[1]]
        assert p.error is None and p.eof
        assert len(p.received) == len(h.sent)
        assert p.received == h.sent
        h.assert_closed_once(None)


# --- abort and close ------------------------------------------------------------

class StopOnFirst(Recorder):
    how = "abort"

    def on_message(self, conn, data):
        super().on_message(conn, data)
        if len(self.messages) == 1:
            conn.write(b"reply\n")
            getattr(conn, self.how)()
            self.closed_at_once = conn.closed
            self.close_ran_inside = self.closed  # on_close must not run inside the call


class CloseOnFirst(StopOnFirst):
    how = "close"


@pytest.mark.parametrize("cls", [StopOnFirst, CloseOnFirst], ids=["abort", "close"])
def test_no_message_after_close_even_if_buffered(loop, peers, cls):
    h, p = serve(loop, peers, cls, fastmux.Lines())
    p.send(b"1\n2\n3\n")  # one packet: all three are in the same read
    p.shutdown_write()
    run_until(loop, lambda: h.closed and p.done, peers=[p])
    assert h.messages == [b"1"]
    assert h.closed_at_once is True
    assert h.close_ran_inside is False
    assert [e[0] for e in h.events] == ["open", "message", "close"]  # no on_eof either
    h.assert_closed_once(None)
    if cls is CloseOnFirst:  # close() flushes; abort() drops
        assert bytes(p.received) == b"reply\n" and p.eof


def test_abort_drops_queued_output(loop, peers):
    fac = Factory(Firehose)
    server = loop.listen(LOCAL, fac)
    p = peers.connect(server.address, rcvbuf=4096)
    run_until(loop, lambda: fac.opened)
    h = fac[0]
    spin(loop)
    assert h.conn.write_buffer_size > 0
    h.conn.abort()
    assert h.conn.closed
    assert not h.closed, "on_close must not run synchronously inside abort()"
    run_until(loop, lambda: h.closed and p.done, peers=[p])
    assert len(p.received) < 4 << 20
    h.assert_closed_once(None)


def test_on_close_exactly_once(loop, peers):
    h, p = serve(loop, peers)
    conn = h.conn
    assert conn.closed is False
    conn.close()
    assert conn.closed is True
    conn.abort()
    conn.close()
    conn.abort()
    assert h.close_count == 0
    spin(loop, 10, peers=[p])
    run_until(loop, lambda: p.done, peers=[p])
    spin(loop, 10, peers=[p])
    h.assert_closed_once(None)
    for method in (conn.write, lambda d: conn.writelines([d])):
        with pytest.raises(fastmux.ConnectionClosed):
            method(b"x")


def test_write_after_abort_raises(loop, peers):
    h, p = serve(loop, peers)
    h.conn.abort()
    with pytest.raises(fastmux.ConnectionClosed) as ei:
        h.conn.write(b"x")
    assert isinstance(ei.value, ConnectionError)
    run_until(loop, lambda: h.closed)


@pytest.mark.stress
def test_graceful_close_flushes_10mib_to_slow_reader(loop, threads):
    total = 10 << 20
    data = pattern(total, 10)

    class Sender(Recorder):
        def on_open(self, conn):
            super().on_open(conn)
            # A small send buffer so the output really queues in fastmux.
            set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            mv = memoryview(data)
            for i in range(0, total, 1 << 20):
                conn.write(mv[i:i + (1 << 20)])
            conn.close()

    fac = Factory(Sender)
    server = loop.listen(LOCAL, fac)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    client.settimeout(DEADLINE)
    received = bytearray()
    eof = []
    try:
        client.connect(server.address)

        def slow_reader():
            reads = 0
            while True:
                if reads < 100:
                    time.sleep(0.002)  # slow at first: the queue builds up
                chunk = client.recv(65536)
                if not chunk:
                    eof.append(True)
                    return
                received.extend(chunk)
                reads += 1

        threads.start(slow_reader)
        max_queued = 0

        def done():
            nonlocal max_queued
            if fac.made and not fac[0].closed and fac[0].conn is not None:
                max_queued = max(max_queued, fac[0].conn.write_buffer_size)
            return fac.made and fac[0].closed

        run_until(loop, done, timeout=60)
        threads.join_all(60)
    finally:
        client.close()
    assert eof, "no EOF after the flushed output"
    assert len(received) == total
    assert bytes(received) == data
    assert max_queued > 1 << 20, f"output never queued (max {max_queued} bytes)"
    fac[0].assert_closed_once(None)


# --- backpressure ---------------------------------------------------------------

def test_on_drain_once_after_high_watermark(loop, peers):
    total = 2 << 20
    data = pattern(total, 3)

    class Big(Recorder):
        def on_open(self, conn):
            super().on_open(conn)
            set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            conn.set_write_limits(256 * 1024, 64 * 1024)
            conn.write(data)

        def on_drain(self, conn):
            super().on_drain(conn)
            self.size_at_drain = conn.write_buffer_size

    fac = Factory(Big)
    server = loop.listen(LOCAL, fac)
    p = peers.connect(server.address, rcvbuf=8192)
    run_until(loop, lambda: fac.opened)
    h = fac[0]
    spin(loop, 5)  # the peer does not read yet
    assert h.conn.write_buffer_size > 256 * 1024
    assert h.drain_count == 0
    run_until(loop, lambda: len(p.received) >= total, peers=[p], timeout=30)
    run_until(loop, lambda: h.drain_count >= 1, peers=[p])
    spin(loop, 5, peers=[p])
    assert bytes(p.received) == data
    assert h.drain_count == 1
    assert h.size_at_drain <= 64 * 1024
    assert h.conn.write_buffer_size == 0


def test_on_drain_when_one_iterations_writes_exceeded_high(loop, peers):
    """write_buffer_size went over `high` through writes of one iteration,
    all of which the kernel then took at once: the queue fell to `low`, so
    on_drain runs (a producer that waits for it would stall otherwise)."""

    class Burst(Recorder):
        def on_open(self, conn):
            super().on_open(conn)
            conn.set_write_limits(4096, 1024)
            conn.write(b"w" * 3000)
            conn.write(b"w" * 3000)
            self.size_after_writes = conn.write_buffer_size

    fac = Factory(Burst)
    server = loop.listen(LOCAL, fac)
    p = peers.connect(server.address)
    run_until(loop, lambda: len(p.received) == 6000, peers=[p])
    h = fac[0]
    assert h.size_after_writes > 4096
    run_until(loop, lambda: h.drain_count, timeout=2, peers=[p],
              what="on_drain after write_buffer_size exceeded high and fell to 0")
    spin(loop, 3, peers=[p])
    assert h.drain_count == 1


def test_write_buffer_size_counts_unsent_bytes(loop, peers):
    fac = Factory(Firehose)
    server = loop.listen(LOCAL, fac)
    peers.connect(server.address, rcvbuf=4096)
    run_until(loop, lambda: fac.opened)
    conn = fac[0].conn
    spin(loop, 5)  # kernel buffers are full; the rest is queued
    before = conn.write_buffer_size
    assert before > 0
    conn.write(b"a" * 1000)
    assert conn.write_buffer_size == before + 1000
    conn.writelines([b"b" * 10, bytearray(20)])
    assert conn.write_buffer_size == before + 1030
    spin(loop, 3)
    assert conn.write_buffer_size >= before  # nothing was read by the peer


@pytest.mark.stress
def test_backpressure_bounds_memory(loop, peers):
    total, chunk, high, low = 4 << 20, 16 * 1024, 64 * 1024, 16 * 1024
    data = pattern(total, 4)

    class Producer(Recorder):
        def __init__(self, lp):
            super().__init__()
            self.lp = lp
            self.sent = 0
            self.max_seen = 0
            self.drain_sizes = []

        def on_open(self, conn):
            super().on_open(conn)
            set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            conn.set_write_limits(high, low)
            self.fill(conn)

        def on_drain(self, conn):
            super().on_drain(conn)
            self.drain_sizes.append(conn.write_buffer_size)
            self.fill(conn)

        def fill(self, conn):
            if conn.closed:
                return
            # Write while under the high watermark (a cap guards the loop).
            for _ in range(high // chunk + 2):
                if self.sent >= total or conn.write_buffer_size > high:
                    break
                conn.write(data[self.sent:self.sent + chunk])
                self.sent += chunk
                self.max_seen = max(self.max_seen, conn.write_buffer_size)
            if self.sent >= total:
                conn.close()
            elif conn.write_buffer_size <= high:
                self.lp.call_soon(self.fill, conn)  # no drain will come: go on

    fac = Factory(Producer, loop)
    server = loop.listen(LOCAL, fac)
    p = peers.connect(server.address, rcvbuf=8192)
    run_until(loop, lambda: p.eof, peers=[p], timeout=20,
              what="all data (a stall here: on_drain never came)")
    h = fac[0]
    assert bytes(p.received) == data
    assert h.max_seen <= high + chunk, h.max_seen
    assert h.drain_count >= 1
    assert max(h.drain_sizes) <= low, h.drain_sizes
    run_until(loop, lambda: h.closed)
    h.assert_closed_once(None)


# --- pause / resume ---------------------------------------------------------------

class PauseOnFirst(Recorder):
    def on_message(self, conn, data):
        super().on_message(conn, data)
        if len(self.messages) == 1:
            conn.pause_reading()


def test_pause_stops_already_buffered_messages(loop, peers):
    h, p = serve(loop, peers, PauseOnFirst, fastmux.Lines())
    p.send(b"1\n2\n3\n4\n")  # one packet, one read
    run_until(loop, lambda: h.messages, peers=[p])
    spin(loop, 10, peers=[p])
    assert h.messages == [b"1"]
    h.conn.resume_reading()  # no new byte will arrive
    run_until(loop, lambda: len(h.messages) == 4)
    assert h.messages == [b"1", b"2", b"3", b"4"]
    assert not h.closed


def test_pushed_back_messages_are_searched_again(loop, peers):
    """Messages handed back by a pause land in front of a tail already
    searched for the separator: the search starts over from the front."""
    h, p = serve(loop, peers, PauseOnFirst, fastmux.Lines())
    p.send(b"1\n2\nrest")  # one read: "2\n" is pushed back before "rest"
    run_until(loop, lambda: h.messages, peers=[p])
    spin(loop, 5, peers=[p])
    h.conn.resume_reading()
    run_until(loop, lambda: len(h.messages) == 2, peers=[p])
    p.send(b"\n")
    run_until(loop, lambda: len(h.messages) == 3, peers=[p])
    assert h.messages == [b"1", b"2", b"rest"]


def test_eof_waits_while_paused(loop, peers):
    h, p = serve(loop, peers, PauseOnFirst, fastmux.Lines())
    p.send(b"1\n2\n")
    p.shutdown_write()
    run_until(loop, lambda: h.messages, peers=[p])
    spin(loop, 10, peers=[p])
    assert [e[0] for e in h.events] == ["open", "message"]
    h.conn.resume_reading()
    run_until(loop, lambda: h.closed, peers=[p])
    assert [e[0] for e in h.events] == ["open", "message", "message", "eof", "close"]
    assert h.messages == [b"1", b"2"]
    h.assert_closed_once(None)


def test_pause_before_data_then_resume(loop, peers):
    class PauseOnOpen(Recorder):
        def on_open(self, conn):
            super().on_open(conn)
            conn.pause_reading()
            conn.pause_reading()  # twice is harmless

    h, p = serve(loop, peers, PauseOnOpen, fastmux.Lines())
    p.send(b"a\nb\n")
    spin(loop, 10, peers=[p])
    assert h.messages == []
    assert loop.stats()["messages_in"] == 0
    h.conn.resume_reading()
    h.conn.resume_reading()
    run_until(loop, lambda: len(h.messages) == 2, peers=[p])
    assert h.messages == [b"a", b"b"]


# --- writes -----------------------------------------------------------------------

def test_write_bytes_like_copied_at_call_time(loop, peers):
    h, p = serve(loop, peers)
    ba = bytearray(b"abc")
    h.conn.write(ba)
    ba[:] = b"XYZ"
    src = bytearray(b"0123456789")
    mv = memoryview(src)[2:5]
    h.conn.write(mv)
    src[2:5] = b"###"
    h.conn.write(memoryview(b"wxyz")[1:])
    h.conn.write(b"")
    run_until(loop, lambda: len(p.received) >= 9, peers=[p])
    spin(loop, peers=[p])
    assert bytes(p.received) == b"abc234xyz"


def test_writelines(loop, peers):
    h, p = serve(loop, peers)
    parts = [b"a", bytearray(b"bc"), memoryview(b"def"), b""]
    h.conn.writelines(iter(parts))
    parts[1][:] = b"!!"
    run_until(loop, lambda: len(p.received) >= 6, peers=[p])
    assert bytes(p.received) == b"abcdef"


class LineEcho(Echo):
    suffix = b"\n"


def test_many_writes_in_one_iteration_arrive_in_order(loop, peers):
    h, p = serve(loop, peers, LineEcho, fastmux.Lines())
    expected = b"".join(b"%d\n" % i for i in range(16))
    p.send(expected)  # 16 pipelined requests, answered by 16 write() calls
    run_until(loop, lambda: len(p.received) >= len(expected), peers=[p])
    assert bytes(p.received) == expected
    assert loop.stats()["messages_in"] == 16


# --- info -------------------------------------------------------------------------

def test_peername_sockname_fileno(loop, peers):
    fac = Factory()
    server = loop.listen(LOCAL, fac)
    p = peers.connect(server.address)
    run_until(loop, lambda: fac.opened)
    conn = fac[0].conn
    assert tuple(conn.peername[:2]) == p.sock.getsockname()
    assert tuple(conn.sockname[:2]) == tuple(server.address[:2])
    fd = conn.fileno()
    assert isinstance(fd, int) and fd >= 0
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    s = dup_socket(fd)
    try:
        assert s.getpeername() == p.sock.getsockname()
    finally:
        s.close()


def test_tcp_nodelay_nonblocking_cloexec(loop):
    sfac = Factory()
    server = loop.listen(LOCAL, sfac)
    cfac = Factory()
    client = loop.connect(server.address, cfac)
    run_until(loop, lambda: sfac.opened and cfac.opened)
    for conn in (sfac[0].conn, client):
        fd = conn.fileno()
        assert get_sockopt_on_fd(fd, socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert os.get_blocking(fd) is False
        assert os.get_inheritable(fd) is False


def test_unix_peer_info(loop, peers, tmp_path):
    path = str(tmp_path / "info.sock")
    fac = Factory()
    loop.listen(path, fac)
    peers.connect(path)
    run_until(loop, lambda: fac.opened)
    assert fac[0].conn.sockname == path
    assert os.get_blocking(fac[0].conn.fileno()) is False


# --- fairness: the read budget and the ready list ---------------------------------

def test_read_budget_and_ready_list(loop, peers):
    """A fire-hose peer does not starve a quiet one, and the rest of its data
    is read on later iterations although no new byte (no new edge) arrives."""

    class Big(Recorder):
        def on_open(self, conn):
            super().on_open(conn)
            set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    fac = Factory(Big)
    server = loop.listen(LOCAL, fac)
    big = peers.connect(server.address, sndbuf=4 << 20)
    run_until(loop, lambda: len(fac.opened) == 1)
    small = peers.connect(server.address)
    run_until(loop, lambda: len(fac.opened) == 2)
    hbig, hsmall = fac[0], fac[1]
    # Fill the kernel buffers while the loop does not run.
    chunk = b"B" * 65536
    presend = 0
    while presend < 4 << 20:
        try:
            presend += big.sock.send(chunk)
        except BlockingIOError:
            break
    assert presend > 2 * READ_BUDGET, f"kernel buffered only {presend} bytes"
    small.send(b"small")
    run_until(loop, lambda: hsmall.data == b"small", what="the quiet peer is served")
    assert len(hbig.data) < presend, "the fire hose was drained before the quiet peer"
    # No more bytes arrive: the core's ready list must finish the job, and a
    # connection on it must not make the poll block.
    for _ in range(presend // READ_BUDGET + 20):
        if len(hbig.data) >= presend:
            break
        t0 = time.monotonic()
        loop.run_once(3.0)
        assert time.monotonic() - t0 < 2.0, "run_once blocked with a connection on the ready list"
    assert len(hbig.data) == presend
