"""Backend conformance: the same scripted peers against both backends.

The design promises that the C epoll core and the pure-Python select backend
produce the same batches.  These tests hold them to it below the Loop: each
scenario drives a Backend object directly (``make_backend``), polls it,
issues the backend calls its script says -- some of them in reaction to an
event, as the Loop would in a handler -- and records the ordered event stream
as ``(kind, connection index, payload)`` tuples.  The stream of one backend
must equal the other's, event for event.

Normalisation
    * How many polls a script takes is timing, not behaviour: every step polls
      until the script's condition holds and the streams are compared whole.
      The order of events of one connection and every payload must match.
    * Connection ids are the backends' own slot numbers: they are mapped to
      the order of first appearance (an accept, or the script's conn_add).
    * A batch is split by the backend, not by the script; the harness handles
      ``pause``/``set_framing`` inside a batch as the Loop does (messages later
      in that batch, and an EOF, are pushed back as raw bytes), so that what
      is recorded does not depend on where a batch ended.

Peers record what they see as ``peer-*`` events, in script order.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import pytest
from support import DEADLINE, Peer, pattern, set_sockopt_on_fd

from fastmux import Delimiter, Fixed, LengthPrefixed, Lines, Raw
from fastmux._backend import epoll_available, make_backend
from fastmux._constants import (
    EV_ACCEPT,
    EV_CLOSED,
    EV_CONNECTED,
    EV_DRAIN,
    EV_EOF,
    EV_MSG,
    R_ERROR,
    R_IDLE,
    R_NONE,
    R_TOOLARGE,
    R_WBUFFULL,
)
from fastmux._framing import Framing, split

KINDS = {EV_MSG: "msg", EV_ACCEPT: "accept", EV_CONNECTED: "connected", EV_EOF: "eof",
         EV_CLOSED: "closed", EV_DRAIN: "drain"}
REASONS = {R_NONE: "none", R_ERROR: "error", R_TOOLARGE: "toolarge",
           R_WBUFFULL: "wbuffull", R_IDLE: "idle"}

Event = tuple  # (kind, connection index, payload)


class Harness:
    """One backend, its listeners and peers, and the recorded event stream.

    A script calls the backend through the methods below, naming connections
    by index; ``react`` (if set) is called for every event as it is
    dispatched, like a handler, and may call them too."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.b: Any = make_backend(name)
        self.trace: list[Event] = []
        self.cids: list[int] = []  # connection index -> backend id
        self.fds: list[int] = []  # connection index -> its fd (the backend's)
        self.index: dict[int, int] = {}  # live backend id -> connection index
        self.spec: list[Framing] = []  # connection index -> current framing
        self.closed: set[int] = set()
        self.fids: dict[Framing, int] = {}
        self.lsocks: list[socket.socket] = []  # borrowed by the backend
        self.lids: dict[int, int] = {}  # backend listener id -> listener index
        self.lspec: list[Framing] = []
        self.peers: list[Peer] = []
        self.reading: set[int] = set()  # peers that read what arrives
        self.socks: list[socket.socket] = []  # other sockets to close
        self.react: Optional[Callable[["Harness", str, int, Any], None]] = None
        self.in_batch = False
        # Connections re-framing or paused inside a batch: [old framing,
        # messages to push back, EOF to push back].
        self.deferred: dict[int, list[Any]] = {}

    # --- setup -------------------------------------------------------------

    def fid(self, spec: Framing) -> int:
        if spec not in self.fids:
            self.fids[spec] = self.b.framing_new(spec._kind, spec._max, spec._n, spec._sep,
                                                 spec._little)
            assert self.fids[spec] >= 0
        return self.fids[spec]

    def listen(self, spec: Optional[Framing] = None, max_connections: int = -1) -> int:
        spec = Raw() if spec is None else spec
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsocks.append(s)
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        lid = self.b.listener_add(s.fileno(), self.fid(spec), max_connections)
        assert lid >= 0
        self.lids[lid] = len(self.lspec)
        self.lspec.append(spec)
        return len(self.lspec) - 1

    def connect(self, listener: int = 0, *, reading: bool = True, **kw: Any) -> int:
        """A plain-socket peer of `listener`; returns its peer index."""
        p = Peer.connect(self.lsocks[listener].getsockname(), **kw)
        self.peers.append(p)
        if reading:
            self.reading.add(len(self.peers) - 1)
        return len(self.peers) - 1

    def conn_add(self, sock: socket.socket, spec: Framing, connecting: bool) -> int:
        """Hand `sock` to the backend; returns its connection index."""
        fd = sock.detach()
        cid = self.b.conn_add(fd, self.fid(spec), connecting)
        assert cid >= 0
        return self._new_index(cid, spec, fd)

    def _new_index(self, cid: int, spec: Framing, fd: int) -> int:
        self.index[cid] = len(self.cids)
        self.cids.append(cid)
        self.fds.append(fd)  # the backend's: only looked at, never closed here
        self.spec.append(spec)
        return len(self.cids) - 1

    def close(self) -> None:
        self.b.close_all()
        for s in self.lsocks + self.socks:
            s.close()
        for p in self.peers:
            p.close()

    # --- polling -------------------------------------------------------------

    def poll_once(self, timeout: float = 0.01) -> int:
        n, ev, blob = self.b.poll(timeout)
        self.in_batch = True
        try:
            for i in range(n):
                self._event(ev[4 * i], ev[4 * i + 1], ev[4 * i + 2], ev[4 * i + 3], blob)
        finally:
            self.in_batch = False
        deferred, self.deferred = self.deferred, {}
        for i, (spec, msgs, eof) in deferred.items():
            raw = b"".join(spec._unsplit(m) for m in msgs)
            if i not in self.closed and (raw or eof):
                self.b.pushback(self.cids[i], raw, eof)
        return n

    def _event(self, kind: int, ident: int, start: int, end: int, blob: bytes) -> None:
        name = KINDS[kind]
        payload: Any = None
        if kind == EV_ACCEPT:
            i = self._new_index(ident, self.lspec[self.lids[start]], end)
            payload = self.lids[start]
        else:
            i = self.index[ident]
            if kind == EV_MSG:
                payload = bytes(blob[start:end])
                if i in self.deferred:
                    self.deferred[i][1].append(payload)
                    return
            elif kind == EV_EOF and i in self.deferred:
                self.deferred[i][2] = True
                return
            elif kind == EV_CLOSED:
                del self.index[ident]
                self.closed.add(i)
                self.deferred.pop(i, None)
                payload = (errno.errorcode.get(start, start) if start else 0, REASONS[end])
        self.trace.append((name, i, payload))
        if self.react is not None:
            self.react(self, name, i, payload)

    def poll_until(self, pred: Callable[[], Any], what: str,
                   timeout: float = DEADLINE) -> None:
        """Poll (stepping the peers) until pred() is true."""
        deadline = time.monotonic() + timeout
        while True:
            for j, p in enumerate(self.peers):
                p.flush()
                if j in self.reading:
                    p.pump()
            if pred():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: timed out waiting for {what}")
            self.poll_once()

    def spin(self, polls: int = 5) -> None:
        """A few polls: for things that must NOT happen (the trace shows it)."""
        for _ in range(polls):
            self.poll_until(lambda: True, "nothing")
            self.poll_once()

    def settle(self) -> None:
        """Poll until nothing more happens (three quiet polls in a row)."""
        quiet = 0
        deadline = time.monotonic() + DEADLINE
        while quiet < 3 and time.monotonic() < deadline:
            for p in self.peers:
                p.flush()
            quiet = 0 if self.poll_once() or self.b.has_pending() else quiet + 1

    # --- what the script asks of the backend ---------------------------------

    def cid(self, i: int) -> int:
        return self.cids[i]

    def _defer(self, i: int) -> None:
        if self.in_batch and i not in self.deferred:
            self.deferred[i] = [self.spec[i], [], False]

    def pause(self, i: int) -> None:
        self._defer(i)
        self.b.pause(self.cid(i))

    def resume(self, i: int) -> None:
        self.b.resume(self.cid(i))

    def set_framing(self, i: int, spec: Framing) -> None:
        self._defer(i)
        self.spec[i] = spec
        self.b.set_framing(self.cid(i), self.fid(spec))

    def send(self, i: int, data: bytes) -> int:
        return int(self.b.send(self.cid(i), data))

    def wait_hangup(self, i: int) -> None:
        """Wait (bounded) until the kernel reports connection i's socket
        reset or hung up; poll(2) on the fd changes nothing in it."""
        p = select.poll()
        p.register(self.fds[i], select.POLLERR | select.POLLHUP)
        assert p.poll(DEADLINE * 1000), f"{self.name}: no hang-up on connection {i}"

    def small_sndbuf(self, i: int) -> None:
        """Make the server side of connection i buffer little, so that a
        peer that does not read leaves output queued in the backend."""
        set_sockopt_on_fd(self.fds[i], socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    # --- reading the trace ---------------------------------------------------

    def count(self, kind: str, i: Optional[int] = None) -> int:
        return sum(1 for k, j, _ in self.trace if k == kind and (i is None or j == i))

    def msgs(self, i: int) -> list[bytes]:
        return [p for k, j, p in self.trace if k == "msg" and j == i]

    def got(self, i: int) -> int:
        return sum(len(m) for m in self.msgs(i))

    def bytes_in(self) -> int:
        return int(self.b.stats()["bytes_in"])

    def note(self, kind: str, i: int, payload: Any = None) -> None:
        """Record what a peer (or the script) observed."""
        self.trace.append(("peer-" + kind, i, payload))

    def peer_done(self, j: int) -> bool:
        return self.peers[j].done


def _short(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_short(y) for y in x) + ")"
    if isinstance(x, bytes) and len(x) > 64:
        return f"<{len(x)} bytes {hashlib.sha1(x).hexdigest()[:10]}: {x[:24]!r}...>"
    return repr(x)


def assert_same(a: list[Event], b: list[Event], names: tuple[str, str] = ("epoll", "select")
                ) -> None:
    """The two streams agree: per connection index (peer notes included),
    the same events in the same order.  How the events of different
    connections interleave depends on the order the kernel reports them in,
    so it is not compared.  On a difference, name the first one."""
    for i in sorted({e[1] for e in a} | {e[1] for e in b}):
        x = [e for e in a if e[1] == i]
        y = [e for e in b if e[1] == i]
        for n, (ex, ey) in enumerate(zip(x, y)):
            assert ex == ey, (f"connection {i}, event {n}: {names[0]} {_short(ex)} != "
                              f"{names[1]} {_short(ey)}; before it: {_short(x[max(0, n - 3):n])}")
        assert len(x) == len(y), (f"connection {i}: {names[0]} has {len(x)} events, "
                                  f"{names[1]} {len(y)}; the extra: {_short(x[len(y):] or y[len(x):])}")


# --- scenarios -------------------------------------------------------------------
# Each drives a Harness and returns the expected stream (or None when only the
# comparison between the backends is specified).

def _partial(spec: Framing, stream: bytes, cuts: list[int]):
    def run(h: Harness) -> list[Event]:
        h.listen(spec)
        p = h.connect()
        h.poll_until(lambda: h.count("accept") == 1, "accept")
        prev = 0
        for cut in cuts + [len(stream)]:
            h.peers[p].send(stream[prev:cut])
            h.poll_until(lambda: h.bytes_in() >= cut, f"{cut} bytes read")
            prev = cut
        expected, _ = split(spec, stream)
        h.poll_until(lambda: len(h.msgs(0)) >= len(expected), "all messages")
        return [("accept", 0, 0)] + [("msg", 0, m) for m in expected]
    return run


def _pipelined(spec: Framing, msgs: list[bytes]):
    def run(h: Harness) -> list[Event]:
        h.listen(spec)
        p = h.connect()
        h.peers[p].send(b"".join(spec._unsplit(m) for m in msgs))
        h.poll_until(lambda: len(h.msgs(0)) >= len(msgs), "all messages")
        return [("accept", 0, 0)] + [("msg", 0, m) for m in msgs]
    return run


def half_close(h: Harness) -> list[Event]:
    """Data, then the peer's FIN: messages, EOF (the tail dropped); the
    connection stays writable; shutdown() after the reply sends our FIN."""
    h.listen(Lines())
    p = h.connect()
    h.peers[p].send(b"a\nb\ntail")
    h.peers[p].shutdown_write()
    h.poll_until(lambda: h.count("eof", 0), "EOF")
    assert h.send(0, b"reply after EOF") == 0
    h.b.shutdown(h.cid(0))
    h.poll_until(lambda: h.peer_done(p), "the peer sees our FIN")
    h.note("received", p, bytes(h.peers[p].received))
    h.b.close(h.cid(0))
    h.poll_until(lambda: h.count("closed", 0), "closed")
    return [("accept", 0, 0), ("msg", 0, b"a"), ("msg", 0, b"b"), ("eof", 0, None),
            ("peer-received", 0, b"reply after EOF"), ("closed", 0, (0, "none"))]


def reset_after_read(h: Harness) -> list[Event]:
    """The peer resets after its data was read: CLOSED(ECONNRESET)."""
    h.listen(Lines())
    p = h.connect()
    h.peers[p].send(b"x\ny\n")
    h.poll_until(lambda: len(h.msgs(0)) == 2, "messages")
    h.peers[p].reset()
    h.poll_until(lambda: h.count("closed", 0), "closed")
    return [("accept", 0, 0), ("msg", 0, b"x"), ("msg", 0, b"y"),
            ("closed", 0, ("ECONNRESET", "error"))]


def reset_unread(h: Harness) -> None:
    """Data and RST both queued before the first poll: whatever the kernel
    gives, both backends must report it the same way."""
    h.listen(Lines())
    p = h.connect()
    h.peers[p].send(b"x\ny\npart")
    h.peers[p].reset()
    h.poll_until(lambda: h.count("closed"), "closed")


def send_after_reset(h: Harness) -> list[Event]:
    """A send to a reset peer fails and closes the connection."""
    h.listen(Lines())
    p = h.connect()
    h.poll_until(lambda: h.count("accept"), "accept")
    h.peers[p].reset()
    h.wait_hangup(0)
    rc = h.send(0, b"into the void")
    h.note("send-failed", 0, rc < 0)
    h.poll_until(lambda: h.count("closed", 0), "closed")
    return [("accept", 0, 0), ("peer-send-failed", 0, True),
            ("closed", 0, ("ECONNRESET", "error"))]


BIG = pattern(1 << 20, seed=3)


def _slow_reader(close: bool):
    def run(h: Harness) -> list[Event]:
        """The server writes more than the socket buffers hold; the peer
        reads only later.  DRAIN once the queue falls to `low` -- but not if
        the connection was closed meanwhile (it flushes and closes)."""
        h.listen(Raw())
        p = h.connect(reading=False, rcvbuf=4096)
        h.poll_until(lambda: h.count("accept"), "accept")
        h.small_sndbuf(0)
        left = h.send(0, BIG)
        h.note("queued", 0, left > 0)
        if close:
            h.b.close(h.cid(0))
        h.spin()
        h.reading.add(p)
        h.poll_until(lambda: len(h.peers[p].received) == len(BIG), "the peer has it all")
        h.note("received", p, bytes(h.peers[p].received) == BIG)
        if not close:
            h.poll_until(lambda: h.count("drain", 0), "drain")
            h.b.close(h.cid(0))
        h.poll_until(lambda: h.count("closed", 0) and h.peer_done(p), "closed")
        # The DRAIN (or CLOSED) comes with the flush that leaves at most
        # `low` queued, so before the peer can have read the last byte.
        if close:
            return [("accept", 0, 0), ("peer-queued", 0, True), ("closed", 0, (0, "none")),
                    ("peer-received", 0, True)]
        return [("accept", 0, 0), ("peer-queued", 0, True), ("drain", 0, None),
                ("peer-received", 0, True), ("closed", 0, (0, "none"))]
    return run


def drain_inline_then_close(h: Harness) -> list[Event]:
    """A send over the high watermark that the kernel takes at once owes a
    DRAIN -- which a close() before the next poll cancels."""
    h.listen(Raw())
    p = h.connect()
    h.poll_until(lambda: h.count("accept"), "accept")
    h.send(0, b"d" * (80 * 1024))  # > high (64 KiB), < the loopback buffers
    h.b.close(h.cid(0))
    h.poll_until(lambda: h.count("closed", 0) and h.peer_done(p), "closed")
    h.note("received", p, len(h.peers[p].received))
    return [("accept", 0, 0), ("closed", 0, (0, "none")), ("peer-received", 0, 80 * 1024)]


def drain_inline(h: Harness) -> list[Event]:
    """The same without the close: the DRAIN comes in the next poll, before
    the messages read in it."""
    h.listen(Lines())
    p = h.connect()
    h.poll_until(lambda: h.count("accept"), "accept")
    h.send(0, b"d" * (80 * 1024))
    h.peers[p].send(b"after\n")
    h.poll_until(lambda: h.count("msg", 0), "message")
    return [("accept", 0, 0), ("drain", 0, None), ("msg", 0, b"after")]


def drain_and_message_in_one_poll(h: Harness) -> list[Event]:
    """Readable and writable in the same poll: the connection is read before
    it is flushed, so its message comes before the DRAIN of that flush."""
    h.listen(Lines())
    p = h.connect(reading=False, rcvbuf=4096)
    h.poll_until(lambda: h.count("accept"), "accept")
    h.small_sndbuf(0)
    h.send(0, BIG[:256 * 1024])
    h.spin(3)  # the peer reads nothing: the queue stays
    q = h.b.write_buffer_size(h.cid(0))
    h.note("queued", 0, q > 0)
    h.b.set_write_limits(h.cid(0), q - 1, q - 1)  # any progress drains
    h.peers[p].send(b"m\n")  # readable ...
    h.peers[p].pump()  # ... and, with room in the buffers again, writable
    h.reading.add(p)
    h.poll_until(lambda: h.count("drain", 0) and h.count("msg", 0), "message and drain")
    return [("accept", 0, 0), ("peer-queued", 0, True), ("msg", 0, b"m"), ("drain", 0, None)]


def write_buffer_full(h: Harness) -> list[Event]:
    h.listen(Raw())
    h.connect(reading=False, rcvbuf=4096)
    h.poll_until(lambda: h.count("accept"), "accept")
    h.small_sndbuf(0)
    h.b.conn_set(h.cid(0), 64 * 1024, 0.0)
    h.note("send", 0, h.send(0, BIG))
    h.poll_until(lambda: h.count("closed", 0), "closed")
    return [("accept", 0, 0), ("peer-send", 0, -errno.ENOBUFS), ("closed", 0, (0, "wbuffull"))]


def _oversize(spec: Framing, data: bytes, good: list[bytes]):
    def run(h: Harness) -> list[Event]:
        h.listen(spec)
        h.connect()
        h.peers[0].send(data)
        h.poll_until(lambda: h.count("closed", 0), "closed")
        return ([("accept", 0, 0)] + [("msg", 0, m) for m in good]
                + [("closed", 0, (0, "toolarge"))])
    return run


def oversize_split(h: Harness) -> list[Event]:
    """An endless line over several reads is refused once it is certain."""
    h.listen(Lines(max_size=100))
    p = h.connect()
    h.peers[p].send(b"ok\n" + b"x" * 60)
    h.poll_until(lambda: h.bytes_in() >= 63, "first part")
    h.peers[p].send(b"x" * 60)
    h.poll_until(lambda: h.count("closed", 0), "closed")
    return [("accept", 0, 0), ("msg", 0, b"ok"), ("closed", 0, (0, "toolarge"))]


def pause_resume(h: Harness) -> list[Event]:
    """Paused on the first message of a batch: the rest of it, the bytes
    that arrive while paused and the EOF wait for resume()."""
    h.listen(Lines())
    p = h.connect()

    def react(h: Harness, kind: str, i: int, payload: Any) -> None:
        if payload == b"a":
            h.pause(i)
    h.react = react
    h.peers[p].send(b"a\nb\nc\n")
    h.poll_until(lambda: h.count("msg", 0), "first message")
    h.peers[p].send(b"d\npart")
    h.peers[p].shutdown_write()
    h.spin()
    h.note("paused", 0, len(h.msgs(0)))
    h.resume(0)
    h.poll_until(lambda: h.count("eof", 0), "EOF")
    # Paused with messages buffered and the EOF seen: EOF again after them.
    h.b.close(h.cid(0))
    h.poll_until(lambda: h.count("closed", 0), "closed")
    return [("accept", 0, 0), ("msg", 0, b"a"), ("peer-paused", 0, 1),
            ("msg", 0, b"b"), ("msg", 0, b"c"), ("msg", 0, b"d"), ("eof", 0, None),
            ("closed", 0, (0, "none"))]


def pause_before_data(h: Harness) -> list[Event]:
    """Paused from the start: nothing is read; resume delivers it all."""
    h.listen(LengthPrefixed(2))
    p = h.connect()
    h.react = lambda h, kind, i, payload: h.pause(i) if kind == "accept" else None
    h.poll_until(lambda: h.count("accept"), "accept")
    h.peers[p].send(b"\x00\x03abc\x00\x00\x00\x01z")
    h.spin()
    h.note("paused", 0, h.count("msg"))
    h.react = None
    h.resume(0)
    h.poll_until(lambda: h.count("msg", 0) == 3, "messages")
    return [("accept", 0, 0), ("peer-paused", 0, 0), ("msg", 0, b"abc"), ("msg", 0, b""),
            ("msg", 0, b"z")]


def set_framing_mid_stream(h: Harness) -> list[Event]:
    """Lines, then Fixed(n) after a 'fixed n' line, then Lines again: all in
    one write, so the switch applies to bytes read in the same read."""
    h.listen(Lines())
    p = h.connect()

    def react(h: Harness, kind: str, i: int, payload: Any) -> None:
        if kind != "msg":
            return
        if isinstance(h.spec[i], Lines) and payload.startswith(b"fixed "):
            h.set_framing(i, Fixed(int(payload.split()[1])))
        elif isinstance(h.spec[i], Fixed):
            h.set_framing(i, Lines())
    h.react = react
    h.peers[p].send(b"one\nfixed 5\nab\ncdtwo\nfixed 3\n\n\n\nthree\n")
    h.poll_until(lambda: h.count("msg", 0) == 7, "messages")
    return [("accept", 0, 0)] + [("msg", 0, m) for m in (b"one", b"fixed 5", b"ab\ncd", b"two",
                                                         b"fixed 3", b"\n\n\n", b"three")]


def set_framing_smaller_limit(h: Harness) -> list[Event]:
    """A switch to a framing with a smaller max_size applies to what is
    buffered: a line already longer than it is refused."""
    h.listen(Lines())
    p = h.connect()
    h.react = lambda h, kind, i, payload: (h.set_framing(i, Lines(max_size=4))
                                           if payload == b"small" else None)
    h.peers[p].send(b"small\nlonger than four\nok\n")
    h.poll_until(lambda: h.count("closed", 0), "closed")
    return [("accept", 0, 0), ("msg", 0, b"small"), ("closed", 0, (0, "toolarge"))]


def _http(body_size: int, requests: int = 2):
    def run(h: Harness) -> list[Event]:
        """The README's HTTP pattern: headers by Delimiter(max_size=8192),
        then Fixed(content-length) for the body, set in reaction to the
        header -- with header and body (larger than max_size) sent in one
        write, and a second request pipelined behind."""
        head = Delimiter(b"\r\n\r\n", max_size=8192)
        h.listen(head)
        p = h.connect()

        def react(h: Harness, kind: str, i: int, payload: Any) -> None:
            if kind != "msg":
                return
            if h.spec[i] == head:
                h.set_framing(i, Fixed(int(payload.split(b"Content-Length: ")[1])))
            else:
                h.set_framing(i, head)
        h.react = react
        bodies = [pattern(body_size, seed=k) for k in range(requests)]
        heads = [b"POST /%d HTTP/1.1\r\nContent-Length: %d" % (k, body_size)
                 for k in range(requests)]
        h.peers[p].send(b"".join(hd + b"\r\n\r\n" + bd for hd, bd in zip(heads, bodies)))
        h.poll_until(lambda: h.count("msg", 0) == 2 * requests or h.count("closed"),
                     "the requests")
        return [("accept", 0, 0)] + [("msg", 0, m) for hb in zip(heads, bodies) for m in hb]
    return run


def listener_accept(h: Harness) -> list[Event]:
    """Two listeners; max_connections refuses the third peer of the first
    (it sees EOF, the backend reports nothing); accepts in arrival order."""
    h.listen(Lines(), max_connections=2)
    h.listen(Raw())
    a = [h.connect(0) for _ in range(3)]
    h.poll_until(lambda: h.count("accept") == 2 and h.peer_done(a[2]), "accepts")
    b = h.connect(1)
    h.poll_until(lambda: h.count("accept") == 3, "accept on the second listener")
    for j in a[:2] + [b]:
        h.peers[j].send(b"hi %d\n" % j)
    h.poll_until(lambda: h.count("msg") == 3, "messages")
    h.note("refused", a[2], (h.peers[a[2]].eof, bytes(h.peers[a[2]].received)))
    # A freed place is taken by the next peer.
    h.b.close(h.cid(0))
    h.poll_until(lambda: h.count("closed", 0), "closed")
    h.connect(0)
    h.poll_until(lambda: h.count("accept") == 4, "accept after a close")
    h.note("rejected", -1, h.b.stats()["rejected"])
    return [("accept", 0, 0), ("accept", 1, 0), ("accept", 2, 1),
            ("msg", 0, b"hi 0"), ("msg", 1, b"hi 1"), ("msg", 2, b"hi 3\n"),
            ("peer-refused", 2, (True, b"")), ("closed", 0, (0, "none")), ("accept", 3, 0),
            ("peer-rejected", -1, 1)]


def connect_out(h: Harness) -> list[Event]:
    """conn_add(connecting=True): data sent before the connect completes is
    queued; CONNECTED, then the reply.  A refused connect: CLOSED(ECONNREFUSED)."""
    srv = socket.socket()
    h.socks.append(srv)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(srv.getsockname())
    i = h.conn_add(s, Lines(), True)
    h.send(i, b"early\n")
    h.poll_until(lambda: h.count("connected", i), "connected")
    other, _ = srv.accept()
    h.socks.append(other)
    other.settimeout(DEADLINE)
    h.note("received", i, other.recv(100))
    other.sendall(b"pong\n")
    h.poll_until(lambda: h.count("msg", i), "reply")
    # Refused: a port with nobody listening (the server socket, closed).
    port = srv.getsockname()
    srv.close()
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(port)
    j = h.conn_add(s, Lines(), True)
    h.poll_until(lambda: h.count("closed", j), "refused")
    return [("connected", 0, None), ("peer-received", 0, b"early\n"), ("msg", 0, b"pong"),
            ("closed", 1, ("ECONNREFUSED", "error"))]


def abort_and_close(h: Harness) -> list[Event]:
    """abort() drops the queue, close() flushes it; both report CLOSED(0)."""
    h.listen(Raw())
    a = h.connect(reading=False, rcvbuf=4096)
    b = h.connect()
    h.poll_until(lambda: h.count("accept") == 2, "accepts")
    h.small_sndbuf(0)
    h.send(0, BIG)
    h.send(1, b"bye")
    h.b.abort(h.cid(0))
    h.b.close(h.cid(1))
    h.note("after", 0, (h.send(0, b"x") < 0, h.send(1, b"x") < 0))
    h.reading.add(a)
    h.poll_until(lambda: h.count("closed") == 2 and h.peer_done(a) and h.peer_done(b), "closed")
    h.note("received", b, bytes(h.peers[b].received))
    return [("accept", 0, 0), ("accept", 1, 0), ("peer-after", 0, (True, True)),
            ("closed", 0, (0, "none")), ("closed", 1, (0, "none")),
            ("peer-received", 1, b"bye")]


def emfile(h: Harness) -> list[Event]:
    """Out of fds: the backlog is accepted and closed with the reserve fd
    (peers see EOF), the established connection is served on, and accepting
    resumes once fds are free.  RLIMIT_NOFILE is lowered in this process,
    only around the polls that hit it, and always restored."""
    h.listen(Lines())
    first = h.connect()
    h.poll_until(lambda: h.count("accept"), "accept")
    storm = [h.connect() for _ in range(5)]  # in the backlog now
    probe = os.dup(0)  # the lowest free fd: with the limit there, none is free
    os.close(probe)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        h.poll_until(lambda: h.b.stats()["rejected"] >= len(storm), "the backlog shed",
                     timeout=5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    h.poll_until(lambda: all(h.peer_done(j) for j in storm), "the storm sees EOF")
    for j in storm:
        h.note("shed", j, (h.peers[j].eof, h.peers[j].error is None))
    st = h.b.stats()
    h.note("stats", -1, (st["rejected"], st["emfile"] >= 1, st["accepted"]))
    h.peers[first].send(b"still here\n")
    h.poll_until(lambda: h.count("msg", 0), "served on")
    h.connect()
    h.poll_until(lambda: h.count("accept") == 2, "accepting again")
    return ([("accept", 0, 0)] + [("peer-shed", j, (True, True)) for j in storm]
            + [("peer-stats", -1, (5, True, 1)), ("msg", 0, b"still here"), ("accept", 1, 0)])


def accept_fault(h: Harness) -> list[Event]:
    """The process's first accept4() fails with the errno that the shim of
    test_accept_resource_errors injects: out of resources, the backlog is
    accepted and closed (the peers see EOF), then accepting goes on."""
    h.listen(Lines())
    storm = [h.connect() for _ in range(3)]
    h.poll_until(lambda: all(h.peer_done(j) for j in storm) or h.count("accept") == 3,
                 "the backlog handled")
    for j in storm:
        h.note("shed", j, h.peers[j].eof)
    st = h.b.stats()
    h.note("stats", -1, (st["rejected"], st["emfile"]))
    p = h.connect()
    h.peers[p].send(b"hello\n")
    h.poll_until(lambda: h.count("msg"), "accepting again")
    return ([("peer-shed", j, True) for j in storm]
            + [("peer-stats", -1, (3, 1)), ("accept", 0, 0), ("msg", 0, b"hello")])


SCENARIOS = {
    "partial-lines": _partial(Lines(), b"hello\nworld\n\nx\r\n", [3, 7, 8, 12]),
    "partial-delimiter": _partial(Delimiter(b"\r\n\r\n"), b"GET /\r\n\r\nab\r\n\r\n",
                                  [5, 6, 7, 8, 10]),
    "partial-length": _partial(LengthPrefixed(4), b"\x00\x00\x00\x05hello\x00\x00\x00\x00"
                               b"\x00\x00\x00\x01z", [1, 3, 6, 9, 11, 15]),
    "partial-fixed": _partial(Fixed(4), b"abcdefghijkl", [1, 5, 6, 11]),
    "pipelined-lines": _pipelined(Lines(), [b"m%d" % k for k in range(3000)]),
    "pipelined-length": _pipelined(LengthPrefixed(2, "little"),
                                   [pattern(k % 300, seed=k) for k in range(2000)]),
    "pipelined-fixed": _pipelined(Fixed(7), [b"%07d" % k for k in range(5000)]),
    "half-close": half_close,
    "reset-after-read": reset_after_read,
    "reset-unread": reset_unread,
    "send-after-reset": send_after_reset,
    "slow-reader": _slow_reader(close=False),
    "slow-reader-closed": _slow_reader(close=True),
    "drain-inline": drain_inline,
    "drain-inline-then-close": drain_inline_then_close,
    "drain-and-message-in-one-poll": drain_and_message_in_one_poll,
    "write-buffer-full": write_buffer_full,
    "oversize-line": _oversize(Lines(max_size=16), b"ok\n" + b"x" * 100 + b"\n", [b"ok"]),
    "oversize-first": _oversize(Lines(max_size=16), b"x" * 100, []),
    "oversize-length": _oversize(LengthPrefixed(2, max_size=10),
                                 b"\x00\x02ok\x00\x0bhello world", [b"ok"]),
    "oversize-split": oversize_split,
    "pause-resume": pause_resume,
    "pause-before-data": pause_before_data,
    "set-framing": set_framing_mid_stream,
    "set-framing-smaller-limit": set_framing_smaller_limit,
    "http-16k": _http(16 * 1024),
    "http-2m": _http(2 * 1024 * 1024, requests=1),
    "listener-accept": listener_accept,
    "connect": connect_out,
    "abort-and-close": abort_and_close,
    "emfile": emfile,
}


def run_scenario(name: str, scenario: Callable[[Harness], Any]) -> tuple[list[Event], Any]:
    """Run `scenario` on backend `name`: (the stream, the expected stream).
    A scenario that fails part-way ends its stream with an "error" event,
    so the comparison still shows where the backends parted."""
    h = Harness(name)
    expected = None
    try:
        try:
            expected = scenario(h)
            h.settle()
        except AssertionError as exc:
            h.trace.append(("error", -1, str(exc).replace(name, "<backend>")))
    finally:
        h.close()
    return h.trace, expected


needs_epoll = pytest.mark.skipif(not epoll_available(), reason="needs the C core to compare")


@needs_epoll
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_backends_agree(scenario: str) -> None:
    epoll, expected = run_scenario("epoll", SCENARIOS[scenario])
    select, _ = run_scenario("select", SCENARIOS[scenario])
    assert_same(epoll, select)
    if expected is not None:
        assert_same(epoll, expected, ("both backends", "the script's expectation"))


# --- accept() out of resources, injected ---------------------------------------

# Fails the first accept4() of the process with $FM_TEST_ACCEPT_ERRNO.  Both
# the C core and CPython's socket.accept() call accept4(), so one shim
# injects the same fault into both backends.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>

typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static accept4_fn real;
    static int armed = 1;
    if (real == NULL)
        real = (accept4_fn)dlsym(RTLD_NEXT, "accept4");
    if (armed) {
        const char *e = getenv("FM_TEST_ACCEPT_ERRNO");
        armed = 0;
        if (e != NULL) {
            errno = atoi(e);
            return -1;
        }
    }
    return real(fd, addr, len, flags);
}
"""

CHILD = """
import sys
import test_conformance as t
print(repr(t.run_scenario(sys.argv[1], t.accept_fault)))
"""


@pytest.fixture(scope="module")
def accept_shim(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler and Linux for the accept4 shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"],
                   check=True, timeout=60)
    return str(d / "shim.so")


@needs_epoll
@pytest.mark.parametrize("code", ["EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"])
def test_accept_resource_errors(accept_shim: str, code: str) -> None:
    """Every accept() error that means "out of resources" sheds the backlog
    on both backends (csrc/listen.c's switch is the reference)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(os.environ, LD_PRELOAD=accept_shim,
               FM_TEST_ACCEPT_ERRNO=str(getattr(errno, code)),
               PYTHONPATH=os.pathsep.join([root, here]))
    traces = []
    for name in ("epoll", "select"):
        out = subprocess.run([sys.executable, "-c", CHILD, name], env=env, cwd=root,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        traces.append(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    (epoll, expected), (select, _) = traces
    assert_same(epoll, select)
    assert_same(epoll, expected, ("both backends", "the script's expectation"))
