"""The write path, end to end, on both backends.

With the accelerator built, ``Connection.write`` on the epoll backend is
csrc/speedups.c's Stream: it copies the bytes into the core's output queue
(``fm_queue``, csrc/stream.c), a write of SEND_NOW (16 KiB) or more goes at
once in one ``sendmsg`` together with what was queued before it, and
``fm_flush`` sends the rest at the end of the iteration.  The select backend
(and FASTMUX_NO_SPEEDUPS=1) keeps the Python path: ``_PyStream._wbuf``,
flushed by ``Loop._flush``.  Whatever the path, a peer must see exactly the
bytes written, in order; nothing written may stay referenced; close,
shutdown_write, abort, watermarks and max_write_buffer keep their rules.

Peers are plain sockets over loopback.  Slow peers read only from loop
timers, a bounded amount per tick (never from sleeps), and every wait is
bounded by a loop-timer watchdog plus a monotonic deadline, so a stall fails
instead of hanging.
"""

from __future__ import annotations

import array
import errno
import gc
import hashlib
import random
import socket
import sys
import time
import weakref

import pytest
from support import set_sockopt_on_fd

import fastmux
from fastmux._constants import DEFAULT_HIGH, DEFAULT_LOW, SEND_NOW

LOCAL = ("127.0.0.1", 0)
#: Upper bound of one wait in this file.  Tests take well under 2 s; the
#: bound only turns a stall into a failure.
LIMIT = 8.0
KIB = 1024
MIB = 1024 * 1024


# --- helpers -------------------------------------------------------------------

def drive(loop, done, what, *, limit=LIMIT, before=None, step=0.02):
    """run_once until done(); `before()` runs before every iteration (writes
    "between iterations").  A loop timer is the watchdog; a monotonic
    deadline backs it up in case timers themselves are broken."""
    fired = []
    watchdog = loop.call_later(limit, fired.append, True)
    hard = time.monotonic() + limit + 2.0
    try:
        while not done():
            if fired or time.monotonic() > hard:
                raise AssertionError(f"timed out after {limit}s waiting for {what}")
            if before is not None:
                before()
            loop.run_once(step)
    finally:
        watchdog.cancel()


def spin(loop, n=5, step=0.005):
    """A few bounded iterations: shows that something does NOT happen."""
    for _ in range(n):
        loop.run_once(step)


def small_sndbuf(conn, size=8 * KIB):
    """Shrink the kernel send buffer of a fastmux connection, so that its
    output really queues in fastmux."""
    set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def raw_peer(address, rcvbuf=4 * KIB):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(5)
        s.connect(address)
    except BaseException:
        s.close()
        raise
    s.setblocking(False)
    return s


def rst_close(sock):
    """Close with SO_LINGER 0: RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


class SlowReader:
    """Reads a plain socket from loop timers only: at most `per_tick` bytes
    every `interval` seconds.  Stops at EOF or an error."""

    def __init__(self, loop, sock, per_tick=16 * KIB, interval=0.001, on_tick=None):
        self.loop = loop
        self.sock = sock
        self.per_tick = per_tick
        self.interval = interval
        self.on_tick = on_tick
        self.received = bytearray()
        self.eof = False
        self.error = None
        self.handle = loop.call_later(interval, self._tick)

    @property
    def done(self):
        return self.eof or self.error is not None

    def _tick(self):
        budget = self.per_tick
        while budget > 0:
            try:
                data = self.sock.recv(min(budget, 64 * KIB))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.error = e
                break
            if not data:
                self.eof = True
                break
            self.received += data
            budget -= len(data)
        if self.on_tick is not None:
            self.on_tick()
        if not self.done:
            self.handle = self.loop.call_later(self.interval, self._tick)

    def stop(self):
        self.handle.cancel()


def drain_socket(sock, limit=LIMIT):
    """Read a plain socket to EOF or an error (blocking, bounded): returns
    (data, eof, error)."""
    sock.settimeout(limit)
    out = bytearray()
    try:
        while True:
            data = sock.recv(256 * KIB)
            if not data:
                return bytes(out), True, None
            out += data
    except socket.timeout:
        raise AssertionError(f"no EOF or error within {limit}s") from None
    except OSError as e:
        return bytes(out), False, e


def assert_same_stream(got, expected):
    """Equal by length and hash; on a mismatch, say where it starts."""
    if len(got) == len(expected) and \
            hashlib.sha256(got).digest() == hashlib.sha256(expected).digest():
        return
    n = min(len(got), len(expected))
    first = next((i for i in range(n) if got[i] != expected[i]), n)
    raise AssertionError(
        f"stream differs: got {len(got)} bytes, expected {len(expected)}; "
        f"first difference at offset {first}")


def assert_prefix(got, stream):
    """`got` is a prefix of `stream` (what a peer may see after an abort)."""
    assert len(got) <= len(stream), (len(got), len(stream))
    if got != stream[:len(got)]:
        first = next(i for i in range(len(got)) if got[i] != stream[i])
        raise AssertionError(f"received bytes are not a prefix of the stream "
                             f"(first difference at {first} of {len(got)})")


class Rec(fastmux.Handler):
    """Records the callbacks; `on_open_hook(conn)` and `on_message_hook`
    let a test act from inside the dispatch."""

    on_open_hook = None
    on_message_hook = None

    def __init__(self):
        self.conn = None
        self.messages = []
        self.events = []
        self.drains = []
        self.close_exc = "not closed"
        self.close_count = 0

    def on_open(self, conn):
        self.conn = conn
        self.events.append("open")
        if self.on_open_hook is not None:
            self.on_open_hook(conn)

    def on_message(self, conn, data):
        self.messages.append(data)
        self.events.append("message")
        if self.on_message_hook is not None:
            self.on_message_hook(conn, data)

    def on_eof(self, conn):
        self.events.append("eof")
        return None

    def on_drain(self, conn):
        self.events.append("drain")
        self.drains.append(conn.write_buffer_size)

    def on_close(self, conn, exc):
        self.events.append("close")
        self.close_count += 1
        self.close_exc = exc

    @property
    def closed(self):
        return self.close_count > 0


def accept_one(loop, handler, *, rcvbuf=4 * KIB, **listen_kw):
    """A server whose connections get `handler`, and one plain peer,
    accepted.  Returns (server, peer socket)."""
    server = loop.listen(LOCAL, lambda: handler, **listen_kw)
    sock = raw_peer(server.address, rcvbuf)
    try:
        drive(loop, lambda: handler.conn is not None, "accept")
    except BaseException:
        sock.close()
        raise
    return server, sock


# --- 1. byte order and completeness under backpressure -------------------------

class Plan:
    """A deterministic sequence of write steps.  Each step is a list of
    payloads (written with write() or, grouped, with writelines()) and the
    context it runs in:

    * "first": on_open (server side), or right after connect() returned,
      before the connection is up (client side);
    * "soon" / "later": a call_soon / call_later callback;
    * "between": by the test between two run_once calls;
    * "message": in on_message, after the peer sent a byte;
    * "drained": in a timer callback, once the peer has read everything
      written so far -- empty queues everywhere, so that small writes are
      held for the end of the iteration and a big one then goes at once
      behind them (fm__send_now with a non-empty iovec prefix).
    """

    def __init__(self, seed):
        rng = random.Random(seed)
        self.rng = rng
        self.steps = []
        # Coverage first: big writes right behind small ones of the same
        # iteration, in every context, with every type; the boundaries.
        fixed = [
            ("first", [("b", 10), ("b", 20), ("b", 200 * KIB)]),
            ("drained", [("b", 1), ("a", 50), ("m", 99), ("b", SEND_NOW)]),
            ("drained", [("b", 70), ("a", MIB), ("b", 3)]),
            ("drained", [("a", 15 * KIB), ("m", 64 * KIB), ("ma", 300 * KIB)]),
            ("drained", [("b", SEND_NOW - 1), ("b", SEND_NOW + 1), ("b", 5)]),
            ("between", [("b", 40), ("b", 60 * KIB)]),
            ("between", [("a", 2), ("ma", 33 * KIB), ("b", 1)]),
            ("soon", [("b", 100 * KIB), ("b", 9), ("m", 40 * KIB)]),
            ("later", [("a", 3 * KIB), ("b", 7 * KIB), ("b", 11 * KIB), ("ma", 20 * KIB)]),
            ("message", [("b", 12), ("b", 128 * KIB)]),
            ("drained", [("lines", 5), ("b", 70 * KIB)]),
            ("later", [("b", MIB)]),
            ("message", [("m", 1), ("a", 17 * KIB)]),
            ("drained", [("ms", 40), ("arr", 30 * KIB), ("b", 8), ("ms", 20 * KIB)]),
            ("between", [("arr", 400), ("arr", 5 * KIB), ("arr", SEND_NOW)]),
        ]
        self.steps.extend(fixed)
        modes = ["soon", "later", "between", "message", "drained"]
        for _ in range(22):
            mode = rng.choice(modes)
            payloads = []
            for _ in range(rng.randint(1, 6)):
                r = rng.random()
                if r < 0.45:
                    size = rng.randint(1, 100)
                elif r < 0.8:
                    size = rng.randint(1 * KIB, 15 * KIB)
                else:
                    size = rng.choice([SEND_NOW, rng.randint(SEND_NOW, 128 * KIB),
                                       rng.randint(SEND_NOW, 256 * KIB)])
                payloads.append((rng.choice(["b", "b", "a", "m", "ma", "ms", "arr"]), size))
            self.steps.append((mode, payloads))

    def payload(self, kind, size):
        """A fresh payload object of about `size` bytes: bytes ("b"),
        bytearray ("a"), a memoryview of a slice of bytes ("m") or of a
        bytearray ("ma"), a strided memoryview ("ms", not contiguous) or an
        array of 4-byte items ("arr": its len() counts items, not bytes)."""
        data = self.rng.randbytes(size)
        if kind == "b":
            return data
        if kind == "a":
            return bytearray(data)
        if kind == "ms":
            return memoryview(bytearray(data + data))[::2]
        if kind == "arr":
            return array.array("I", data[:size - size % 4] or b"\x00" * 4)
        pad = self.rng.randint(0, 7)
        if kind == "m":
            return memoryview(b"\x00" * pad + data + b"\x00")[pad:pad + size]
        return memoryview(bytearray(b"\x00" * pad + data))[pad:pad + size]


class Producer:
    """Runs a Plan against one connection and remembers what it wrote."""

    def __init__(self, loop, plan, peer_sock):
        self.loop = loop
        self.plan = plan
        self.peer = peer_sock
        self.conn = None
        self.expected = bytearray()
        self.next = 0
        self.between = None  # the step the driver runs before its next run_once
        self.message_step = None
        self.drained_poll = None
        self.reader = None
        self.max_queued = 0
        self.finished = False
        self.failure = None  # the first wrong byte the peer saw
        self.checked = 0  # bytes received and compared so far

    def write_step(self, payloads):
        conn = self.conn
        for kind, size in payloads:
            if kind == "lines":  # several small ones through writelines
                group = [self.plan.payload("b", self.plan.rng.randint(1, 100))
                         for _ in range(size)]
                self.expected += b"".join(group)
                conn.writelines(group)
                continue
            p = self.plan.payload(kind, size)
            self.expected += memoryview(p).tobytes()  # the content at call time
            conn.write(p)
            # write() copies: what the caller does with its buffer next
            # must not change what is sent.
            if isinstance(p, (bytearray, array.array)) or \
                    (isinstance(p, memoryview) and not p.readonly):
                p[0] ^= 0xFF
                p[-1] ^= 0xFF
        self.note_queued()

    def on_tick(self):
        """After each read: compare what arrived with what was written (a
        duplicated or lost chunk shows at once, with its offset) and note
        how much output fastmux held."""
        got, exp = self.reader.received, self.expected
        if self.failure is None and len(got) > self.checked:
            if len(got) > len(exp):
                self.failure = f"peer got {len(got)} bytes, only {len(exp)} written"
            elif got[self.checked:] != exp[self.checked:len(got)]:
                first = next(i for i in range(self.checked, len(got)) if got[i] != exp[i])
                self.failure = f"peer got a wrong byte at offset {first}"
            self.checked = len(got)
        self.note_queued()

    def note_queued(self):
        if self.conn is not None and not self.conn.closed:
            self.max_queued = max(self.max_queued, self.conn.write_buffer_size)

    def run_step(self):
        _, payloads = self.plan.steps[self.next]
        self.next += 1
        self.write_step(payloads)
        self.schedule()

    def schedule(self):
        if self.next >= len(self.plan.steps):
            self.finished = True
            return
        mode = self.plan.steps[self.next][0]
        if mode == "soon":
            self.loop.call_soon(self.run_step)
        elif mode == "later":
            self.loop.call_later(self.plan.rng.uniform(0, 0.003), self.run_step)
        elif mode == "between":
            self.between = self.run_step
        elif mode == "message":
            self.message_step = self.run_step
            self.peer.send(b"!")
        else:
            assert mode == "drained"
            self.drained_poll = self.loop.call_later(0.001, self.poll_drained, self.run_step)

    def poll_drained(self, then, since=None, seen=-1):
        """Call then() once the peer has read all that was written."""
        got = len(self.reader.received)
        if got == len(self.expected) and self.conn.write_buffer_size == 0:
            self.drained_poll = None
            then()
            return
        now = self.loop.time()
        if got != seen:
            since, seen = now, got
        elif now - since > 1.0:
            # Nothing arrives although the peer reads: bytes were lost.
            self.failure = (f"the peer is stuck at {got} of {len(self.expected)} bytes "
                            f"with {self.conn.write_buffer_size} queued")
            return
        self.drained_poll = self.loop.call_later(0.001, self.poll_drained, then, since, seen)

    def before_iteration(self):
        step, self.between = self.between, None
        if step is not None:
            step()

    def on_message(self, conn, data):
        step, self.message_step = self.message_step, None
        if step is not None:
            step()


@pytest.mark.parametrize("side", ["server", "client"])
def test_stream_is_exact_under_backpressure(backend, side):
    loop = fastmux.Loop(backend=backend)
    listener = peer = None
    try:
        handler = Rec()
        if side == "server":
            server = loop.listen(LOCAL, lambda: handler)
            peer = raw_peer(server.address)
        else:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KIB)
            listener.bind(LOCAL)
            listener.listen(1)

        plan = Plan(seed=1 if side == "server" else 2)
        prod = Producer(loop, plan, None)
        handler.on_message_hook = prod.on_message

        def opened(conn):
            if side == "server":
                prod.conn = conn
                small_sndbuf(conn)
                prod.run_step()  # the "first" step, inside the dispatch

        handler.on_open_hook = opened
        if side == "client":
            conn = loop.connect(listener.getsockname(), lambda: handler)
            prod.conn = conn
            small_sndbuf(conn)
            prod.run_step()  # before the connection is up: queued
            del conn
            listener.settimeout(5)
            peer, _ = listener.accept()
            peer.setblocking(False)
        prod.peer = peer
        prod.reader = SlowReader(loop, peer, per_tick=12 * KIB, on_tick=prod.on_tick)
        if side == "server":
            drive(loop, lambda: prod.conn is not None, "accept")
        drive(loop, lambda: prod.finished or prod.failure, "the plan to run",
              before=prod.before_iteration)
        assert prod.failure is None, prod.failure
        total = len(prod.expected)
        assert prod.next == len(plan.steps)
        prod.reader.per_tick = 256 * KIB
        all_read = []
        prod.poll_drained(lambda: all_read.append(True))
        drive(loop, lambda: all_read or prod.failure, "the peer to read everything")
        assert prod.failure is None, prod.failure
        conn = prod.conn
        conn.close()
        drive(loop, lambda: prod.reader.done and handler.closed, "EOF and on_close")
        prod.reader.stop()

        assert_same_stream(bytes(prod.reader.received), bytes(prod.expected))
        assert prod.reader.eof and prod.reader.error is None
        assert handler.close_count == 1 and handler.close_exc is None, handler.events
        assert total > 3 * MIB, total
        # The peer really was slow: output queued in fastmux, not just in
        # the kernel, so sends were partial.
        assert prod.max_queued > 256 * KIB, prod.max_queued
        assert loop.stats()["bytes_out"] == total  # nothing sent twice
        assert handler.messages and set(b"".join(handler.messages)) == {ord("!")}
    finally:
        loop.close()
        for s in (peer, listener):
            if s is not None:
                s.close()


# --- 2. nothing written stays referenced ---------------------------------------

ENDINGS = ("close", "abort", "reset", "loop.close")


def _objects(rng):
    """One connection's payloads: each kind, below and at/above SEND_NOW."""
    big_array = bytearray(rng.randbytes(40 * KIB))
    small_array = bytearray(rng.randbytes(70))
    return [
        rng.randbytes(50),                      # small bytes
        rng.randbytes(64 * KIB),                # big bytes (the no-copy path)
        small_array,
        big_array,
        memoryview(rng.randbytes(90))[3:80],    # small memoryview of bytes
        memoryview(big_array)[5:],              # big memoryview of a bytearray
        memoryview(small_array),
        rng.randbytes(SEND_NOW),                # exactly SEND_NOW
        rng.randbytes(33),                      # through writelines
        bytearray(rng.randbytes(17 * KIB)),     # through writelines
    ]


def _write_all(conn, objs):
    for o in objs[:8]:
        conn.write(o)
    conn.writelines(objs[8:])


def _run_and_close(backend, when, n_conns, rng):
    """Open n_conns connections to peers that never read, write every kind
    of object to each, end them in every way, close the loop.  Returns the
    written objects, their refcounts before the writes, and weakrefs to
    everything that should now be garbage."""
    loop = fastmux.Loop(backend=backend)
    socks = []
    conns = []
    refs = {"loop": weakref.ref(loop)}
    handlers = []

    def factory():
        h = Rec()
        h.on_open_hook = lambda conn: (small_sndbuf(conn, 4 * KIB), conns.append(conn))
        handlers.append(weakref.ref(h))
        return h

    objs = [_objects(rng) for _ in range(n_conns)]
    before = [[sys.getrefcount(o) for o in group] for group in objs]
    try:
        server = loop.listen(LOCAL, factory)
        refs["server"] = weakref.ref(server)
        for _ in range(n_conns):
            socks.append(raw_peer(server.address, rcvbuf=4 * KIB))
        drive(loop, lambda: len(conns) == n_conns, "accepts")
        # Peers are matched to connections by address.
        by_port = {s.getsockname()[1]: s for s in socks}
        peer_of = [by_port[c.peername[1]] for c in conns]
        ended = []

        def end(i):
            conn = conns[i]
            how = ENDINGS[i % len(ENDINGS)]
            if how == "close":
                conn.close()
            elif how == "abort":
                conn.abort()
            elif how == "reset":
                rst_close(peer_of[i])
            ended.append(i)

        def write_all(then_end):
            for i, conn in enumerate(conns):
                _write_all(conn, objs[i])
                if then_end:
                    end(i)

        loop.call_soon(write_all, when == "same-callback")
        spin(loop, 3)
        queued = sum(c.write_buffer_size for c in conns if not c.closed)
        if when == "after-iterations":
            # The peers do not read: most of it is still queued in fastmux.
            assert queued > n_conns * 64 * KIB, queued
            loop.call_soon(lambda: [end(i) for i in range(n_conns)])
        drive(loop, lambda: len(ended) == n_conns, "the endings")
        spin(loop, 5)
        # A closing connection whose peer never reads stays open (flushing)
        # until loop.close(); an aborted or reset one is closed by now.
        for i, conn in enumerate(conns):
            how = ENDINGS[i % len(ENDINGS)]
            if how in ("abort", "reset"):
                assert conn.handler.closed, (i, how, conn.handler.events)
        for conn in conns:
            refs.setdefault("conns", []).append(weakref.ref(conn))
        del conn
    finally:
        loop.close()
        for s in socks:
            s.close()
    refs["handlers"] = handlers
    return objs, before, refs


@pytest.mark.parametrize("when", ["after-iterations", "same-callback"])
def test_written_objects_are_not_kept_alive(backend, when):
    rng = random.Random(7)
    n_conns = 48  # a multiple of len(ENDINGS)
    objs, before, refs = _run_and_close(backend, when, n_conns, rng)
    gc.collect()
    after = [[sys.getrefcount(o) for o in group] for group in objs]
    for i, (b, a) in enumerate(zip(before, after)):
        assert a == b, f"connection {i}: refcounts before {b}, after {a}"
    # No buffer export survives either: every bytearray can be resized.
    for group in objs:
        for o in group:
            if isinstance(o, memoryview):
                o.release()
        for o in group:
            if isinstance(o, bytearray):
                o += b"x"
    assert refs["loop"]() is None, gc.get_referrers(refs["loop"]())
    assert refs["server"]() is None
    assert len(refs["conns"]) == n_conns and len(refs["handlers"]) == n_conns
    alive_conns = [r() for r in refs["conns"] if r() is not None]
    assert not alive_conns, alive_conns[:3]
    alive_handlers = [r() for r in refs["handlers"] if r() is not None]
    assert not alive_handlers, alive_handlers[:3]


# --- 3. close / shutdown_write / abort right after writes ----------------------

WHERE = ("on_message", "timer", "between")


def _act_in(loop, sock, handler, where, act):
    """Run act(conn) once, from `where`: on_message (the peer sends a byte),
    a timer callback, or between two iterations."""
    done = []

    def run(conn):
        if not done:
            done.append(True)
            act(conn)

    if where == "on_message":
        handler.on_message_hook = lambda conn, data: run(conn)
        sock.send(b"g")
    elif where == "timer":
        loop.call_later(0.001, run, handler.conn)
    else:
        run(handler.conn)
    drive(loop, lambda: done, f"the action ({where})")


#: What is queued when the callback writes, and what it writes:
#: "empty-small": nothing queued; small writes only, which the kernel takes
#:     whole at the end of the iteration (nothing left for EPOLLOUT);
#: "empty-mixed": nothing queued; small writes around big ones (16 KiB and
#:     more: sent at once on the C path) that overflow the kernel;
#: "backlog-mixed": 300 KiB from an earlier iteration wait for the socket.
STATES = ("empty-small", "empty-mixed", "backlog-mixed")


def _burst(rng, state):
    """One callback's writes."""
    if state == "empty-small":
        return [rng.randbytes(30), bytearray(rng.randbytes(900)), rng.randbytes(7),
                memoryview(rng.randbytes(100)), rng.randbytes(1)]
    return [rng.randbytes(30), rng.randbytes(5 * KIB), rng.randbytes(200 * KIB),
            rng.randbytes(7), bytearray(rng.randbytes(20 * KIB)), rng.randbytes(1),
            memoryview(rng.randbytes(SEND_NOW)), rng.randbytes(2)]


def _with_backlog(loop, handler, rng, state):
    """For "backlog-*": write 300 KiB in an earlier iteration, so that the
    burst lands behind output that waits for the socket."""
    if not state.startswith("backlog"):
        return b""
    data = rng.randbytes(300 * KIB)
    handler.conn.write(data)
    spin(loop, 3)
    assert handler.conn.write_buffer_size > 0
    return data


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("how", ["close", "shutdown_write"])
def test_close_or_shutdown_after_writes_delivers_all_then_eof(backend, how, where, state):
    rng = random.Random(f"{how}{where}{state}")
    loop = fastmux.Loop(backend=backend)
    sock = None
    try:
        handler = Rec()
        handler.on_open_hook = small_sndbuf
        _, sock = accept_one(loop, handler)
        expected = bytearray(_with_backlog(loop, handler, rng, state))
        raised = []

        def act(conn):
            for p in _burst(rng, state):
                expected.extend(bytes(p))
                conn.write(p)
            getattr(conn, how)()
            try:
                conn.write(b"too late")
            except fastmux.ConnectionClosed:
                raised.append(True)
            assert conn.closed is (how == "close")

        _act_in(loop, sock, handler, where, act)
        assert raised, f"write after {how}() did not raise ConnectionClosed"
        reader = SlowReader(loop, sock, per_tick=16 * KIB)
        drive(loop, lambda: reader.done, "the peer to see EOF")
        assert reader.error is None, reader.error
        assert_same_stream(bytes(reader.received), bytes(expected))
        if how == "shutdown_write":
            # Reading goes on after shutdown_write: the peer's bytes arrive,
            # then its EOF closes the connection.
            assert not handler.closed, handler.events
            n = len(handler.messages)
            sock.send(b"still reading")
            drive(loop, lambda: b"".join(handler.messages[n:]) == b"still reading",
                  "a message after shutdown_write")
            sock.shutdown(socket.SHUT_WR)
        drive(loop, lambda: handler.closed, "on_close")
        spin(loop, 3)
        assert handler.close_count == 1 and handler.close_exc is None, handler.events
        assert handler.events[-1] == "close"
        assert loop.stats()["bytes_out"] == len(expected)
    finally:
        loop.close()
        if sock is not None:
            sock.close()


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("where", WHERE)
def test_abort_after_writes_sends_nothing_more(backend, where, state):
    rng = random.Random(f"abort{where}{state}")
    loop = fastmux.Loop(backend=backend)
    sock = None
    try:
        handler = Rec()
        handler.on_open_hook = small_sndbuf
        _, sock = accept_one(loop, handler)
        stream = bytearray(_with_backlog(loop, handler, rng, state))
        sent_at_abort = []

        def act(conn):
            for p in _burst(rng, state):
                stream.extend(bytes(p))
                conn.write(p)
            sent_at_abort.append(loop.stats()["bytes_out"])
            conn.abort()
            assert conn.closed
            with pytest.raises(fastmux.ConnectionClosed):
                conn.write(b"x")

        _act_in(loop, sock, handler, where, act)
        drive(loop, lambda: handler.closed, "on_close")
        got, eof, err = drain_socket(sock)
        assert eof or isinstance(err, ConnectionResetError), (eof, err)
        spin(loop, 3)
        # What the kernel had by the abort may arrive; nothing queued after.
        assert_prefix(got, stream)
        assert len(got) <= sent_at_abort[0] < len(stream), (len(got), sent_at_abort, len(stream))
        assert loop.stats()["bytes_out"] == sent_at_abort[0]
        assert handler.close_count == 1 and handler.close_exc is None, handler.events
        assert handler.events[-1] == "close"
    finally:
        loop.close()
        if sock is not None:
            sock.close()


# --- 4. watermarks and max_write_buffer with one iteration's writes ------------

def _sizes_over_high(rng):
    """About 460 KiB in one callback: small writes, then big ones (bytes,
    bytearray, memoryview) among more small ones."""
    out = [rng.randbytes(10 * KIB) for _ in range(10)]
    out += [rng.randbytes(200 * KIB), rng.randbytes(40)]
    out += [rng.randbytes(KIB) for _ in range(5)]
    out += [bytearray(rng.randbytes(64 * KIB)), memoryview(rng.randbytes(20 * KIB)),
            rng.randbytes(3), rng.randbytes(SEND_NOW)]
    return out


N_OVER_HIGH = len(_sizes_over_high(random.Random(0)))


@pytest.mark.parametrize("limits", [None, (128 * KIB, 32 * KIB)], ids=["default", "128k-32k"])
def test_write_buffer_size_and_on_drain_after_one_iteration(backend, limits):
    high, low = limits or (DEFAULT_HIGH, DEFAULT_LOW)
    rng = random.Random(4)
    loop = fastmux.Loop(backend=backend)
    sock = None
    try:
        handler = Rec()
        handler.on_open_hook = small_sndbuf
        _, sock = accept_one(loop, handler)
        conn = handler.conn
        if limits:
            conn.set_write_limits(high, low)
        stream = bytearray()
        seen = []

        def sent():
            return loop.stats()["bytes_out"]

        def burst():
            out0 = sent()
            for p in _sizes_over_high(rng):
                stream.extend(bytes(p))
                conn.write(p)
                # Everything written is either sent or counted as queued.
                seen.append(conn.write_buffer_size)
                assert conn.write_buffer_size + sent() - out0 == len(stream)

        loop.call_soon(burst)
        spin(loop, 5)  # the peer does not read yet
        assert len(seen) == N_OVER_HIGH
        assert max(seen) > high
        assert conn.write_buffer_size > high, conn.write_buffer_size
        assert conn.write_buffer_size + sent() == len(stream)
        assert handler.drains == [], handler.events
        reader = SlowReader(loop, sock, per_tick=16 * KIB)
        drive(loop, lambda: len(reader.received) >= len(stream) and handler.drains,
              "the peer to read it all and on_drain")
        spin(loop, 5)
        assert handler.drains and handler.drains[0] <= low, handler.drains
        assert len(handler.drains) == 1, handler.drains
        assert conn.write_buffer_size == 0
        assert_same_stream(bytes(reader.received), bytes(stream))
        reader.stop()
    finally:
        loop.close()
        if sock is not None:
            sock.close()


def test_on_drain_once_when_big_writes_of_one_iteration_leave_at_once(backend):
    """Over `high` in one iteration through writes the kernel takes at
    once (SEND_NOW writes go inside write() on the C path): the queue was
    over high, then at low, so on_drain is owed -- once."""
    rng = random.Random(5)
    loop = fastmux.Loop(backend=backend)
    sock = None
    try:
        handler = Rec()
        _, sock = accept_one(loop, handler, rcvbuf=1 * MIB)
        conn = handler.conn
        conn.set_write_limits(8 * KIB, 2 * KIB)
        stream = bytearray()

        def burst():
            for p in (rng.randbytes(10), rng.randbytes(20 * KIB), rng.randbytes(5),
                      bytearray(rng.randbytes(SEND_NOW))):
                stream.extend(bytes(p))
                conn.write(p)

        loop.call_soon(burst)
        reader = SlowReader(loop, sock, per_tick=1 * MIB)
        drive(loop, lambda: len(reader.received) >= len(stream) and handler.drains,
              "all data and on_drain")
        spin(loop, 5)
        assert handler.drains == [0], handler.drains
        assert_same_stream(bytes(reader.received), bytes(stream))
        reader.stop()
    finally:
        loop.close()
        if sock is not None:
            sock.close()


@pytest.mark.parametrize("sizes", ["small", "big", "mixed", "under"])
def test_max_write_buffer_exceeded_in_one_iteration(backend, sizes):
    """One iteration's writes that leave more than max_write_buffer queued
    cut the peer off with WriteBufferFull ("under": they fit, nothing
    happens)."""
    rng = random.Random(sizes)
    limit = 256 * KIB
    if sizes == "small":  # all held for the end of the iteration (C path)
        chunks = [rng.randbytes(8 * KIB) for _ in range(128)]
    elif sizes == "big":  # each goes at once, the rest waits (C path)
        chunks = [rng.randbytes(64 * KIB) for _ in range(16)]
    elif sizes == "mixed":
        chunks = [rng.randbytes(rng.choice([50, 8 * KIB, 40 * KIB])) for _ in range(60)]
    else:
        chunks = [rng.randbytes(rng.choice([50, 8 * KIB, 40 * KIB])) for _ in range(5)]
    loop = fastmux.Loop(backend=backend)
    sock = None
    try:
        handler = Rec()
        handler.on_open_hook = small_sndbuf
        _, sock = accept_one(loop, handler, max_write_buffer=limit)
        stream = bytearray()
        outcomes = set()

        def burst(conn):
            for p in chunks:
                stream.extend(p)
                try:
                    conn.write(p)
                except fastmux.ConnectionClosed:
                    outcomes.add("ConnectionClosed")
                else:
                    outcomes.add("ok")

        loop.call_soon(burst, handler.conn)
        if sizes == "under":
            assert sum(map(len, chunks)) < limit
            spin(loop, 10)
            assert not handler.closed, handler.events
            assert outcomes == {"ok"}
            reader = SlowReader(loop, sock, per_tick=64 * KIB)
            drive(loop, lambda: len(reader.received) >= len(stream), "all data")
            assert_same_stream(bytes(reader.received), bytes(stream))
            reader.stop()
            return
        assert sum(map(len, chunks)) > 3 * limit
        drive(loop, lambda: handler.closed, "on_close")
        spin(loop, 3)
        assert handler.close_count == 1, handler.events
        assert isinstance(handler.close_exc, fastmux.WriteBufferFull), handler.close_exc
        assert "ok" in outcomes and outcomes <= {"ok", "ConnectionClosed"}, outcomes
        conn = handler.conn
        assert conn.closed and conn.write_buffer_size == 0
        with pytest.raises(fastmux.ConnectionClosed):
            conn.write(b"x")
        got, eof, err = drain_socket(sock)
        assert eof or isinstance(err, ConnectionResetError), (eof, err)
        assert_prefix(got, stream)
        assert len(got) < len(stream)
    finally:
        loop.close()
        if sock is not None:
            sock.close()


# --- 5. writes after a reset; writes of non-bytes -------------------------------

def _try_write(conn, data, outcomes, lines=False):
    """write (or writelines) and note the outcome; any exception other than
    ConnectionClosed propagates and fails the test."""
    try:
        if lines:
            conn.writelines(data)
        else:
            conn.write(data)
    except fastmux.ConnectionClosed:
        outcomes.append("ConnectionClosed")
    else:
        outcomes.append("ok")


@pytest.mark.parametrize("where", WHERE)
def test_write_after_peer_reset(backend, where):
    """The docs: write raises ConnectionClosed "after close(), abort(),
    shutdown_write() or a detected reset", and on_close gets the OSError of
    a reset.  Between the reset and on_close (the loop has not reported it)
    writes may be accepted and lost, or raise ConnectionClosed -- nothing
    else; once on_close has run, every write raises ConnectionClosed."""
    rng = random.Random(where)
    loop = fastmux.Loop(backend=backend)
    sock = None
    try:
        handler = Rec()
        _, sock = accept_one(loop, handler)
        outcomes = []

        def act(conn):
            rst_close(sock)
            for data in (rng.randbytes(10), rng.randbytes(64 * KIB), rng.randbytes(3)):
                _try_write(conn, data, outcomes)
            _try_write(conn, [bytearray(b"a"), memoryview(rng.randbytes(SEND_NOW))],
                       outcomes, lines=True)
            # The reset is not reported inside a callback or an API call.
            assert not handler.closed

        _act_in(loop, sock, handler, where, act)
        assert len(outcomes) == 4 and set(outcomes) <= {"ok", "ConnectionClosed"}, outcomes
        drive(loop, lambda: handler.closed, "on_close after the reset")
        spin(loop, 3)
        assert handler.close_count == 1 and handler.events[-1] == "close", handler.events
        assert isinstance(handler.close_exc, (ConnectionResetError, BrokenPipeError)), \
            repr(handler.close_exc)
        assert handler.close_exc.errno in (errno.ECONNRESET, errno.EPIPE)
        conn = handler.conn
        assert conn.closed and conn.write_buffer_size == 0 and conn.fileno() == -1
        for data in (b"x", b"", bytearray(b"y"), memoryview(b"z"), b"w" * (64 * KIB)):
            with pytest.raises(fastmux.ConnectionClosed):
                conn.write(data)
        with pytest.raises(fastmux.ConnectionClosed):
            conn.writelines([b"x"])
        conn.close()
        conn.abort()
        conn.shutdown_write()
        spin(loop, 3)
        assert handler.close_count == 1
    finally:
        loop.close()
        if sock is not None:
            sock.close()


NOT_BYTES = [1, 0, True, "text", "", None, 1.5, [1, 2], {}, object()]


@pytest.mark.parametrize("state", ["empty", "backlog"])
@pytest.mark.parametrize("where", ["timer", "between"])
def test_write_non_bytes_raises_type_error_and_queues_nothing(backend, where, state):
    rng = random.Random(f"{where}{state}")
    loop = fastmux.Loop(backend=backend)
    sock = None
    try:
        handler = Rec()
        handler.on_open_hook = small_sndbuf
        _, sock = accept_one(loop, handler)
        expected = bytearray()
        if state == "backlog":
            expected += _with_backlog(loop, handler, rng, "backlog-mixed")
        big = rng.randbytes(SEND_NOW)

        def act(conn):
            conn.write(b"before")
            expected.extend(b"before")
            for bad in NOT_BYTES:
                size = conn.write_buffer_size
                sent = loop.stats()["bytes_out"]
                with pytest.raises(TypeError):
                    conn.write(bad)
                with pytest.raises(TypeError):
                    conn.writelines([bad])
                assert conn.write_buffer_size == size, bad
                assert loop.stats()["bytes_out"] == sent, bad
            with pytest.raises(TypeError):
                conn.writelines(5)
            # writelines writes item by item: what precedes the bad item
            # is written, nothing after it.
            with pytest.raises(TypeError):
                conn.writelines([b"a", big, "b", b"c"])
            expected.extend(b"a" + big)
            conn.write(b"end")
            expected.extend(b"end")
            conn.close()

        _act_in(loop, sock, handler, where, act)
        reader = SlowReader(loop, sock, per_tick=64 * KIB)
        drive(loop, lambda: reader.done and handler.closed, "EOF and on_close")
        assert reader.eof, reader.error
        assert_same_stream(bytes(reader.received), bytes(expected))
        assert handler.close_count == 1 and handler.close_exc is None, handler.events
    finally:
        loop.close()
        if sock is not None:
            sock.close()
