"""SelectBackend: the Backend protocol in pure Python on the stdlib ``selectors``.

Why this backend behaves like the edge-triggered C core
    ``selectors.DefaultSelector`` (epoll, kqueue, poll or select) is used
    level-triggered: it reports an fd for as long as it is ready.  The C core
    is edge-triggered: it hears about an fd once and keeps its own ready list
    for every connection it stopped serving before EAGAIN.  The two agree on
    everything a caller can observe because this backend applies the very
    same rules on top of the level-triggered selector:

    * A connection is read at most READ_BUDGET bytes per poll, in READ_CHUNK
      recv calls, stopping early on a short read, EAGAIN or EOF.  A
      connection stopped by its budget, or whose messages did not fit in the
      batch (BATCH_MAX events), goes on ``self._ready`` and the next poll
      does not block.  Messages already split but left out of a full batch
      wait on the connection, which is not read again until they are out,
      so a flood of tiny messages cannot grow its input without bound.
      The selector would re-report most of those fds
      anyway, but not bytes already sitting in our own input buffer (after
      ``resume``, ``pushback`` or ``set_framing``), so the ready list is what
      makes those cases work, exactly as in C.
    * Where the C core simply ignores an edge (a paused connection, one that
      has seen EOF, one that is closing), a level-triggered selector would
      report the fd in every poll and the loop would spin.  So read interest
      is registered only while the connection is actually being read, and
      write interest only while output is queued or a connect is pending.
    * Listeners accept until EAGAIN with ACCEPT_BUDGET per poll.  Out of
      resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) the backlog is accepted and
      closed with the reserve fd, as in csrc/listen.c; without a reserve (or
      on another listener error) read interest is dropped for EMFILE_BACKOFF
      seconds, so a full fd table cannot make the loop spin.
    * Each fd is served at most once per poll, whether it was reported by the
      selector, is on the ready list, or both.

Lifecycle of an id
    A closed connection becomes a zombie: its socket is closed at once but its
    id stays taken, and every call on it is harmless.  When a poll hands out
    its EV_CLOSED the id is queued, and it returns to the free list only at
    the start of the following poll, so the loop never sees an id reused
    inside a batch it is still dispatching.  Listener and watch ids are freed
    the same way.

Events produced outside ``poll`` (an ``abort``, a failed inline ``send``, a
close that had nothing left to flush) wait in ``self._pending`` and lead the
next batch; ``has_pending`` reports them, so that poll does not block.
"""

from __future__ import annotations

import errno
import heapq
import os
import selectors
import socket
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple, Union

from ._backend import Batch
from ._constants import (
    ACCEPT_BUDGET,
    BATCH_MAX,
    DEFAULT_HIGH,
    DEFAULT_LOW,
    DISCARD_MAX,
    EMFILE_BACKOFF_MS,
    EV_ACCEPT,
    EV_CLOSED,
    EV_CONNECTED,
    EV_DRAIN,
    EV_EOF,
    EV_MSG,
    EV_WATCH,
    FR_DELIM,
    FR_FIXED,
    FR_LENGTH,
    FR_RAW,
    R_ERROR,
    R_IDLE,
    R_NONE,
    R_TOOLARGE,
    R_WBUFFULL,
    READ_BUDGET,
    READ_CHUNK,
)
from ._framing import (
    Delimiter,
    Fixed,
    Framing,
    LengthPrefixed,
    Raw,
    split_until_error,
)

__all__ = ["SelectBackend"]

#: Seconds a listener stops accepting after EMFILE/ENFILE (and other
#: resource errors), so that an exhausted fd table cannot make us spin.
EMFILE_BACKOFF = EMFILE_BACKOFF_MS / 1000.0

# Unread input discarded before a graceful close (DISCARD_MAX bytes), so
# that close() sends a FIN rather than a RST (which could destroy the output
# just flushed); bounded so that a fire-hose peer cannot hold the loop.

_MSG_NOSIGNAL: int = getattr(socket, "MSG_NOSIGNAL", 0)
_EV_R = selectors.EVENT_READ
_EV_W = selectors.EVENT_WRITE

# accept() errors that concern only the connection being accepted (it died
# in the backlog, or Linux passed a pending network error through accept):
# skip it and accept the next one.
_ACCEPT_SKIP = frozenset(
    getattr(errno, name)
    for name in ("ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT",
                 "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP",
                 "ENETUNREACH", "EPERM", "ECONNRESET")
    if hasattr(errno, name)
)
# accept() errors that mean the process or system is out of resources.
_ACCEPT_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

# One event in the making: kind, id, start, end, payload (EV_MSG only).
_Event = Tuple[int, int, int, int, Optional[bytes]]


class _Conn:
    """A connection slot.  ``live`` is False once it is a zombie."""

    __slots__ = (
        "cid", "sock", "fd", "spec", "inbuf", "framed", "too_large", "outbuf",
        "connecting", "paused",
        "eof_seen", "eof_done", "err", "closing", "shut_req", "shut_done",
        "over_high", "drain_due", "high", "low", "max_wbuf", "idle", "deadline",
        "listener", "mask", "live", "msg_poll",
    )

    def __init__(self, cid: int, sock: socket.socket, spec: Framing,
                 connecting: bool) -> None:
        self.cid = cid
        self.sock = sock
        self.fd = sock.fileno()
        self.spec = spec
        self.inbuf = bytearray()  # bytes read but not yet framed
        # Messages framed but not yet delivered because the batch was full;
        # they precede inbuf.  Kept so that a backlog is split only once.
        self.framed: Deque[bytes] = deque()
        self.too_large = False  # an oversized message follows `framed`
        self.outbuf = bytearray()  # the output queue
        self.connecting = connecting
        self.paused = False
        self.eof_seen = False  # the peer's FIN has been read
        self.eof_done = False  # EV_EOF has been emitted for it
        self.err = 0  # a read error waiting for earlier messages to go out
        self.closing = False  # close(): flushing, then closing
        self.shut_req = False  # shutdown(): SHUT_WR once the queue is empty
        self.shut_done = False
        self.over_high = False  # queue exceeded `high`; EV_DRAIN owed
        # send() drained the queue between polls: EV_DRAIN goes out from the
        # next poll's ready list, unless close() comes first (FM_C_DRAIN_DUE).
        self.drain_due = False
        self.high = DEFAULT_HIGH
        self.low = DEFAULT_LOW
        self.max_wbuf = 0
        self.idle = 0.0
        self.deadline = 0.0
        self.listener: Optional[_Listener] = None
        self.mask = 0  # the events currently registered with the selector
        self.live = True
        self.msg_poll = 0  # the poll that last emitted a message of it


class _Listener:
    """A borrowed listening fd; the backend never closes it."""

    __slots__ = ("lid", "fd", "family", "type", "proto", "spec", "max_conns",
                 "max_wbuf", "idle", "open", "resume_at", "mask", "live")

    def __init__(self, lid: int, fd: int, family: int, type_: int, proto: int,
                 spec: Framing, max_conns: int) -> None:
        self.lid = lid
        self.fd = fd
        self.family = family
        self.type = type_
        self.proto = proto
        self.spec = spec
        self.max_conns = max_conns
        self.max_wbuf = 0
        self.idle = 0.0
        self.open = 0  # connections from this listener still open
        self.resume_at: Optional[float] = None  # backing off after EMFILE
        self.mask = 0
        self.live = True


class _Watch:
    """A foreign fd watched for WATCH_READ/WATCH_WRITE (level-triggered, not
    owned).  The WATCH_* bits are selectors' EVENT_* values."""

    __slots__ = ("wid", "fd", "events", "live")

    def __init__(self, wid: int, fd: int, events: int) -> None:
        self.wid = wid
        self.fd = fd
        self.events = events
        self.live = True


class _Wake:
    """Selector tag of the wake-up socket's read end."""

    __slots__ = ()


_Tag = Union[_Conn, _Listener, _Watch, _Wake]


class _Ids:
    """Small-int slot allocator; freed ids are reused smallest first."""

    __slots__ = ("_free", "_next")

    def __init__(self) -> None:
        self._free: List[int] = []
        self._next = 0

    def take(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._next += 1
        return self._next - 1

    def give(self, i: int) -> None:
        heapq.heappush(self._free, i)


def _make_spec(kind: int, max_size: int, n: int, sep: bytes,
               little_endian: bool) -> Framing:
    """The Framing value that the C core's fm_framing_new arguments describe."""
    if kind == FR_RAW:
        return Raw()
    if kind == FR_DELIM:
        return Delimiter(sep, max_size=max_size)
    if kind == FR_LENGTH:
        return LengthPrefixed(n, "little" if little_endian else "big", max_size=max_size)
    if kind == FR_FIXED:
        return Fixed(n)
    raise ValueError(f"unknown framing kind {kind}")


def _errno_of(exc: OSError) -> int:
    return exc.errno if exc.errno else errno.EIO


class SelectBackend:
    """The pure-Python backend; see the module docstring and ``_backend``."""

    name = "select"

    def __init__(self) -> None:
        self._sel: selectors.BaseSelector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = self._wake_pair()
        self._wake_tag = _Wake()
        self._sel.register(self._wake_r.fileno(), _EV_R, self._wake_tag)
        # A spare fd for the EMFILE trick (as csrc/listen.c): when the fd
        # table is full, close it, accept-and-close the backlog, reopen it.
        self._reserve = self._open_reserve()

        self._specs: List[Framing] = []
        self._conns: Dict[int, _Conn] = {}  # live connections and zombies
        self._listeners: Dict[int, _Listener] = {}
        self._watches: Dict[int, _Watch] = {}
        self._cids = _Ids()
        self._lids = _Ids()
        self._wids = _Ids()
        # Ids to return to their allocator at the start of the next poll.
        self._free_cids: List[int] = []
        self._free_lids: List[int] = []
        self._free_wids: List[int] = []

        # The ready lists: dicts used as insertion-ordered sets.
        self._ready: Dict[int, _Conn] = {}
        self._ready_l: Dict[int, _Listener] = {}
        self._idle: Dict[int, _Conn] = {}  # connections with an idle timeout

        # The batch being built (only inside poll) and the events waiting
        # for the next one.
        self._in_poll = False
        self._rview = memoryview(bytearray(READ_CHUNK))  # the one recv buffer
        self._ev: List[int] = []  # (kind, id, start, end) per event, flat
        self._messages_in = 0
        self._parts: List[bytes] = []
        self._off = 0
        self._pending: Deque[_Event] = deque()
        self._now = time.monotonic()
        self._closed = False

        self._accepted = 0
        self._rejected = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._reads = 0
        self._writes = 0
        self._polls = 0
        self._emfile = 0
        self._open = 0

    # ------------------------------------------------------------------ loop

    @staticmethod
    def _wake_pair() -> Tuple[socket.socket, socket.socket]:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        return r, w

    def fast_path(self) -> None:
        """No native message loop: the loop dispatches ``poll``'s batch."""
        return None

    def poll(self, timeout: float | None) -> Batch:
        """Wait up to `timeout` seconds (None: forever), do all ready I/O and
        return the batch ``(n, ev, blob)`` (see _backend.py)."""
        if self._closed:
            return 0, [], b""
        # The loop has dispatched the previous batch: the ids it closed are
        # now safe to reuse.
        for cid in self._free_cids:
            del self._conns[cid]
            self._cids.give(cid)
        for lid in self._free_lids:
            self._lids.give(lid)
        for wid in self._free_wids:
            self._wids.give(wid)
        self._free_cids = []
        self._free_lids = []
        self._free_wids = []
        self._polls += 1
        self._ev = []
        self._parts = []
        self._off = 0
        self._in_poll = True
        try:
            # Events queued since the last poll happened first.
            while self._pending and len(self._ev) < 4 * BATCH_MAX:
                self._put(*self._pending.popleft())
            ready = self._sel.select(self._wait_time(timeout))
            self._now = now = time.monotonic()
            self._reenable_listeners(now)
            self._dispatch(ready)
            self._check_idle(now)
        finally:
            self._in_poll = False
        ev = self._ev
        self._ev = []
        blob = b"".join(self._parts)
        self._parts = []
        return len(ev) >> 2, ev, blob

    def _wait_time(self, timeout: float | None) -> float | None:
        """How long select may block: not at all if there is work already,
        never past a listener's back-off or a connection's idle deadline."""
        if self._ev or self._pending or self._ready or self._ready_l:
            return 0.0
        deadline: float | None = None
        for lis in self._listeners.values():
            if lis.resume_at is not None and (deadline is None or lis.resume_at < deadline):
                deadline = lis.resume_at
        for c in self._idle.values():
            if not c.connecting and (deadline is None or c.deadline < deadline):
                deadline = c.deadline
        if deadline is None:
            return timeout
        left = max(0.0, deadline - time.monotonic())
        return left if timeout is None else min(max(timeout, 0.0), left)

    def _dispatch(self, ready: List[Tuple[selectors.SelectorKey, int]]) -> None:
        """Serve what select reported plus the ready lists, each fd once."""
        readable: List[_Conn] = []
        flush_later: List[_Conn] = []
        listeners: Dict[int, _Listener] = self._ready_l
        self._ready_l = {}
        for key, mask in ready:
            tag = key.data
            if isinstance(tag, _Conn):
                if not tag.live:
                    continue  # closed earlier in this poll
                if mask & _EV_W:
                    if tag.connecting:
                        self._on_connected(tag)
                    elif tag.outbuf:
                        # As fm__conn_io: a readable connection is read
                        # before it is flushed (its messages come before
                        # the EV_DRAIN of that flush) -- unless it is on the
                        # ready list, which reads it after the flush.
                        if mask & _EV_R and tag.cid not in self._ready:
                            flush_later.append(tag)
                        else:
                            self._flush(tag)
                if mask & _EV_R and tag.live:
                    readable.append(tag)
            elif isinstance(tag, _Listener):
                if tag.live:
                    listeners[tag.lid] = tag
            elif isinstance(tag, _Watch):
                # Level-triggered by contract: a watch left out of a full
                # batch is simply reported again by the next select.
                bits = mask & tag.events
                if tag.live and bits and self._room() > 0:
                    self._emit(EV_WATCH, tag.wid, bits, 0)
            else:
                self._drain_wake()
        for lis in listeners.values():
            if lis.live and lis.resume_at is None:
                self._accept(lis)
        todo = self._ready
        self._ready = {}
        for c in readable:
            todo.setdefault(c.cid, c)
        for c in todo.values():
            self._service(c)
        for c in flush_later:
            if c.live and c.outbuf:
                self._flush(c)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass  # BlockingIOError: drained

    def has_pending(self) -> bool:
        """True if the next poll has work without waiting."""
        return bool(self._pending or self._ready or self._ready_l)

    def wakeup(self) -> None:
        """Make a blocked (or the next) poll return; safe from any thread."""
        try:
            self._wake_w.send(b"\0")
        except OSError:
            # BlockingIOError: the pipe is full, so a wake-up is pending
            # anyway; any other error means the backend is closed.
            pass

    def set_timer(self, deadline: float | None) -> None:
        """No-op: without fileno() the loop passes its timeout to poll."""

    def fileno(self) -> int:
        raise NotImplementedError("the select backend has no pollable fd")

    # ---------------------------------------------------------- the batch

    def _room(self) -> int:
        """Events that still fit in this batch (0 outside poll or once spilled)."""
        if not self._in_poll or self._pending:
            return 0
        return BATCH_MAX - (len(self._ev) >> 2)

    def _put(self, kind: int, ident: int, start: int, end: int,
             payload: Optional[bytes]) -> None:
        """Append one event to the batch being built."""
        if payload is not None:
            start = self._off
            self._off += len(payload)
            end = self._off
            self._parts.append(payload)
            self._messages_in += 1
        elif kind == EV_CLOSED:
            self._free_cids.append(ident)
        self._ev += (kind, ident, start, end)

    def _emit(self, kind: int, ident: int, start: int, end: int,
              payload: Optional[bytes] = None) -> None:
        """Emit an event now if it fits, else queue it for the next poll;
        once anything is queued, everything after it is too, so order holds."""
        if self._room() > 0:
            self._put(kind, ident, start, end, payload)
        else:
            self._pending.append((kind, ident, start, end, payload))

    # ------------------------------------------------------------- framing

    def framing_new(self, kind: int, max_size: int, n: int, sep: bytes,
                    little_endian: bool) -> int:
        """Register a framing; returns its id, or -EINVAL for bad values."""
        try:
            spec = _make_spec(kind, max_size, n, bytes(sep), little_endian)
        except (ValueError, TypeError):
            return -errno.EINVAL
        self._specs.append(spec)
        return len(self._specs) - 1

    def _spec(self, fid: int) -> Optional[Framing]:
        if 0 <= fid < len(self._specs):
            return self._specs[fid]
        return None

    # ----------------------------------------------------------- listeners

    def listener_add(self, fd: int, framing: int, max_connections: int) -> int:
        """Accept on `fd` (borrowed: never closed); returns the listener id."""
        spec = self._spec(framing)
        if spec is None:
            return -errno.EINVAL
        # A temporary socket object only to learn the family/type; detach()
        # hands the fd back without closing it.
        try:
            probe = socket.socket(fileno=fd)
        except OSError as exc:
            return -_errno_of(exc)
        family, type_, proto = probe.family, probe.type, probe.proto
        probe.detach()
        # Accepting until EAGAIN needs a non-blocking listener.
        os.set_blocking(fd, False)
        lid = self._lids.take()
        lis = _Listener(lid, fd, family, type_, proto, spec, max_connections)
        try:
            self._sel.register(fd, _EV_R, lis)
        except (KeyError, ValueError, OSError):
            self._lids.give(lid)
            return -errno.EEXIST
        lis.mask = _EV_R
        self._listeners[lid] = lis
        return lid

    def listener_set(self, lid: int, max_write_buffer: int, idle_timeout: float) -> None:
        """Options given to connections accepted from now on."""
        lis = self._listeners.get(lid)
        if lis is not None:
            lis.max_wbuf = max_write_buffer
            lis.idle = idle_timeout

    def listener_remove(self, lid: int) -> None:
        """Stop accepting on the listener; its fd is left open."""
        lis = self._listeners.pop(lid, None)
        if lis is None:
            return
        self._set_mask(lis, 0)
        lis.live = False
        self._ready_l.pop(lid, None)
        self._free_lids.append(lid)

    def _reenable_listeners(self, now: float) -> None:
        for lis in self._listeners.values():
            if lis.resume_at is not None and lis.resume_at <= now:
                lis.resume_at = None
                self._set_mask(lis, _EV_R)
                self._ready_l[lis.lid] = lis

    def _accept(self, lis: _Listener) -> None:
        """Accept until EAGAIN, at most ACCEPT_BUDGET, while the batch has room."""
        # A short-lived socket object around the borrowed fd, detached in
        # `finally` so that nothing (not even an exception or the garbage
        # collector) can close the caller's listener.
        lsock = socket.socket(lis.family, lis.type, lis.proto, fileno=lis.fd)
        try:
            budget = ACCEPT_BUDGET
            while True:
                if budget <= 0 or self._room() <= 0:
                    # Stopped before EAGAIN: remember it, as the C core must.
                    self._ready_l[lis.lid] = lis
                    return
                budget -= 1
                try:
                    sock, _ = lsock.accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    code = _errno_of(exc)
                    if code in _ACCEPT_SKIP:
                        continue
                    if code in _ACCEPT_EXHAUSTED:  # as fm__listener_io
                        self._emfile += 1
                        if self._shed_backlog(lsock):
                            return
                    # Out of fds/memory, or the fd is no longer a listener:
                    # a level-triggered selector would report it again at
                    # once, so stop listening for a while instead of spinning.
                    lis.resume_at = time.monotonic() + EMFILE_BACKOFF
                    self._set_mask(lis, 0)
                    return
                self._on_accepted(lis, sock)
        finally:
            lsock.detach()

    @staticmethod
    def _open_reserve() -> int:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def _shed_backlog(self, lsock: socket.socket) -> bool:
        """Out of fds: close the reserve fd, accept and close every pending
        connection (the peers see an orderly close, not a hang), reopen the
        reserve.  False if there was no reserve fd (back off instead)."""
        if self._reserve < 0:
            self._reserve = self._open_reserve()
            return False
        os.close(self._reserve)
        self._reserve = -1
        try:
            while True:
                try:
                    s, _ = lsock.accept()
                except InterruptedError:
                    continue
                except OSError as exc:
                    if _errno_of(exc) in _ACCEPT_SKIP:
                        continue
                    break
                s.close()
                self._rejected += 1
        finally:
            self._reserve = self._open_reserve()
        return True

    def _on_accepted(self, lis: _Listener, sock: socket.socket) -> None:
        if 0 <= lis.max_conns <= lis.open:
            # At max_connections: refuse by closing at once; the loop is
            # not told (FM_R_REJECTED is never reported).
            self._rejected += 1
            sock.close()
            return
        try:
            # Python's accept already gives a close-on-exec socket.
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self._nodelay(sock)
        c = self._new_conn(sock, lis.spec, False)
        c.listener = lis
        lis.open += 1
        self._accepted += 1
        c.max_wbuf = lis.max_wbuf
        self._set_idle(c, lis.idle)
        self._emit(EV_ACCEPT, c.cid, lis.lid, c.fd)

    # --------------------------------------------------------- connections

    @staticmethod
    def _nodelay(sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP after all (e.g. SCTP); nothing to tune

    def _new_conn(self, sock: socket.socket, spec: Framing, connecting: bool) -> _Conn:
        cid = self._cids.take()
        c = _Conn(cid, sock, spec, connecting)
        self._conns[cid] = c
        self._open += 1
        self._update(c)
        return c

    def _live(self, cid: int) -> Optional[_Conn]:
        c = self._conns.get(cid)
        return c if c is not None and c.live else None

    def conn_add(self, fd: int, framing: int, connecting: bool) -> int:
        """Take ownership of a connected (or connecting) socket fd."""
        spec = self._spec(framing)
        if spec is None:
            return -errno.EINVAL
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            return -_errno_of(exc)
        try:
            sock.setblocking(False)
            os.set_inheritable(fd, False)
        except OSError as exc:
            sock.detach()  # not ours after a failed add
            return -_errno_of(exc)
        self._nodelay(sock)
        try:
            c = self._new_conn(sock, spec, connecting)
        except (KeyError, ValueError, OSError):
            sock.detach()
            return -errno.EEXIST
        return c.cid

    def conn_set(self, cid: int, max_write_buffer: int, idle_timeout: float) -> None:
        c = self._live(cid)
        if c is not None:
            c.max_wbuf = max_write_buffer
            self._set_idle(c, idle_timeout)

    def _set_idle(self, c: _Conn, idle: float) -> None:
        c.idle = idle if idle > 0 else 0.0
        if c.idle:
            c.deadline = time.monotonic() + c.idle
            self._idle[c.cid] = c
        else:
            self._idle.pop(c.cid, None)

    def _update(self, c: _Conn) -> None:
        """Register exactly the interest that matters now, so that the
        level-triggered selector never reports an fd we would ignore."""
        want = 0
        if c.live:
            if c.connecting:
                want = _EV_W
            else:
                if not (c.paused or c.eof_seen or c.closing or c.err):
                    want = _EV_R
                if c.outbuf:
                    want |= _EV_W
        self._set_mask(c, want)

    def _set_mask(self, obj: Union[_Conn, _Listener], want: int) -> None:
        if want == obj.mask:
            return
        if obj.mask == 0:
            self._sel.register(obj.fd, want, obj)
        elif want == 0:
            self._sel.unregister(obj.fd)
        else:
            self._sel.modify(obj.fd, want, obj)
        obj.mask = want

    def _release(self, c: _Conn) -> None:
        """Close the fd and make `c` a zombie (its id is freed later)."""
        self._set_mask(c, 0)
        c.live = False
        c.sock.close()
        c.inbuf = bytearray()
        c.framed.clear()
        c.outbuf = bytearray()
        self._open -= 1
        if c.listener is not None:
            c.listener.open -= 1
            c.listener = None
        self._ready.pop(c.cid, None)
        self._idle.pop(c.cid, None)

    def _kill(self, c: _Conn, err: int, reason: int) -> None:
        """Close now and report EV_CLOSED(err, reason)."""
        if c.live:
            self._release(c)
            self._emit(EV_CLOSED, c.cid, err, reason)

    def _check_idle(self, now: float) -> None:
        expired = [c for c in self._idle.values()
                   if not c.connecting and c.deadline <= now]
        for c in expired:
            self._kill(c, 0, R_IDLE)

    # -------------------------------------------------------------- reading

    def _service(self, c: _Conn) -> None:
        """Read, frame and report one connection, as the C core's drain does."""
        if not c.live:
            return
        if c.drain_due:
            # Owed by send() (fm__conn_process): before any read, and even
            # while paused; a closing connection gets no EV_DRAIN.
            if self._room() <= 0:
                self._ready[c.cid] = c
                return
            c.drain_due = False
            if not c.closing:
                self._emit(EV_DRAIN, c.cid, 0, 0)
        if c.paused or c.closing or c.connecting:
            return
        if self._room() <= 0:
            self._ready[c.cid] = c
            return
        # A backlog of framed messages (left by a full batch) goes first,
        # and nothing is read until it is out: that bounds the input
        # buffered per connection.
        if (c.framed or c.too_large) and not self._frame(c):
            return
        more = False
        if not (c.eof_seen or c.err):
            more = self._read(c)
        if not self._frame(c):
            return
        if c.err:
            self._kill(c, c.err, R_ERROR)
            return
        if c.eof_seen and not c.eof_done:
            if self._room() <= 0:
                self._ready[c.cid] = c
                return
            # Every complete message is out: drop the incomplete tail.
            c.inbuf = bytearray()
            c.eof_done = True
            self._emit(EV_EOF, c.cid, 0, 0)
            return
        if more:
            self._ready[c.cid] = c

    def _read(self, c: _Conn) -> bool:
        """Read up to READ_BUDGET bytes; True if stopped by the budget (the
        connection may have more and goes on the ready list)."""
        sock = c.sock
        buf = c.inbuf
        budget = READ_BUDGET
        got = 0
        more = False
        while True:
            want = min(READ_CHUNK, budget)
            try:
                # Into one reused buffer: recv(256 KiB) would allocate (and
                # with glibc often mmap and munmap) a large bytes per read.
                n = sock.recv_into(self._rview, want)
            except BlockingIOError:
                break
            except OSError as exc:
                c.err = _errno_of(exc)
                self._update(c)
                break
            self._reads += 1
            if not n:
                c.eof_seen = True
                self._update(c)
                break
            buf += self._rview[:n]
            got += n
            budget -= n
            if n < want:
                break  # a short read proves the socket is drained
            if budget <= 0:
                more = True
                break
        if got:
            self._bytes_in += got
            if c.idle:
                c.deadline = self._now + c.idle
        return more

    def _frame(self, c: _Conn) -> bool:
        """Emit the complete messages in c.framed, then c.inbuf.  False if
        the connection is done for this poll: it was closed, or the batch
        filled up (then it is on the ready list)."""
        if not c.framed and not c.too_large and c.inbuf:
            msgs, used, err = split_until_error(c.spec, bytes(c.inbuf))
            del c.inbuf[:used]
            c.framed.extend(msgs)
            c.too_large = err is not None
        framed = c.framed
        if framed:
            room = self._room()
            put = self._put
            cid = c.cid
            while framed and room > 0:
                put(EV_MSG, cid, 0, 0, framed.popleft())
                room -= 1
            c.msg_poll = self._polls
            if framed:
                self._ready[cid] = c
                return False
        if c.too_large:
            if c.msg_poll == self._polls:
                # As csrc/framing.c: the loop has not dispatched the messages
                # before it, and a handler may switch the framing on one of
                # them (an HTTP header, then Fixed(content_length)).  The
                # verdict waits for the next poll, with the rest buffered;
                # set_framing re-splits it, otherwise it is refused then.
                self._ready[cid] = c
                return False
            self._kill(c, 0, R_TOOLARGE)
            return False
        return True

    def _unframe(self, c: _Conn) -> None:
        """Turn undelivered messages back into raw input, in front of inbuf,
        so they can be re-framed (new framing, pushed-back bytes)."""
        if c.framed:
            raw = b"".join(c.spec._unsplit(m) for m in c.framed)
            c.inbuf[:0] = raw
            c.framed.clear()
        c.too_large = False

    def _make_ready(self, c: _Conn) -> None:
        # A paused connection waits for resume(), which readies it anyway;
        # readying it now would only cost the loop one idle, non-blocking poll.
        if not c.paused:
            self._ready[c.cid] = c

    def pause(self, cid: int) -> None:
        c = self._live(cid)
        if c is not None and not c.paused:
            c.paused = True
            if not c.drain_due:  # an owed EV_DRAIN still goes out
                self._ready.pop(cid, None)
            self._update(c)

    def resume(self, cid: int) -> None:
        """Read again; buffered bytes are framed by the next poll even if
        no new byte arrives (no edge would come for them)."""
        c = self._live(cid)
        if c is not None and not c.closing:
            c.paused = False
            self._update(c)
            self._ready[cid] = c

    def set_framing(self, cid: int, framing: int) -> None:
        """Frame the bytes not yet framed with `framing` from now on."""
        c = self._live(cid)
        spec = self._spec(framing)
        if c is not None and spec is not None and not c.closing:
            self._unframe(c)
            c.spec = spec
            self._make_ready(c)

    def pushback(self, cid: int, data: bytes, reemit_eof: bool) -> None:
        """Put `data` back in front of the unframed input and re-frame it."""
        c = self._live(cid)
        if c is None or c.closing:
            return
        self._unframe(c)
        c.inbuf[:0] = data
        if reemit_eof and c.eof_done:
            c.eof_done = False
        self._make_ready(c)

    # -------------------------------------------------------------- writing

    def send_many(self, items: List[Tuple[int, bytes]]) -> List[int]:
        """``send`` for each ``(cid, data)`` (the loop's end-of-iteration
        flush); the results, in order."""
        return [self.send(cid, data) for cid, data in items]

    def send(self, cid: int, data: bytes) -> int:
        """Queue `data` and try to send it now; returns the bytes still
        queued, or -errno if the connection cannot send any more."""
        c = self._conns.get(cid)
        if c is None:
            return -errno.EBADF
        if not c.live or c.closing or c.shut_req:
            return -errno.EPIPE
        if not data:
            return len(c.outbuf)
        was_empty = not c.outbuf
        c.outbuf += data
        # The watermark is checked before the inline send: the caller has
        # counted these bytes as queued (and may be waiting for EV_DRAIN
        # because of them) even if the send below takes most of them.
        if len(c.outbuf) > c.high:
            c.over_high = True
        if was_empty and not c.connecting:
            err = self._flush(c)
            if err:
                return -err
        if 0 < c.max_wbuf < len(c.outbuf):
            # The peer does not read: drop the output and close.
            self._kill(c, 0, R_WBUFFULL)
            return -errno.ENOBUFS
        self._update(c)
        return len(c.outbuf)

    def _flush(self, c: _Conn) -> int:
        """Send queued output until the socket is full; returns the errno
        that closed the connection, or 0."""
        sock = c.sock
        out = c.outbuf
        while out:
            try:
                n = sock.send(out, _MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                code = _errno_of(exc)
                self._kill(c, code, R_ERROR)
                return code
            self._writes += 1
            self._bytes_out += n
            short = n < len(out)
            del out[:n]
            if short:
                break  # the send buffer is full; wait for writability
        self._after_write(c)
        return 0

    def _after_write(self, c: _Conn) -> None:
        if c.over_high and len(c.outbuf) <= c.low:
            c.over_high = False
            if not self._in_poll:
                # From send(): owed, delivered by the next poll (see _service).
                c.drain_due = True
                self._ready[c.cid] = c
            elif not c.closing:  # as fm__after_flush: none while closing
                self._emit(EV_DRAIN, c.cid, 0, 0)
        if not c.outbuf and not c.connecting:
            if c.closing:
                self._finish_close(c)
                return
            if c.shut_req and not c.shut_done:
                c.shut_done = True
                try:
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # already reset: the read side reports it
        self._update(c)

    def _on_connected(self, c: _Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._kill(c, err, R_ERROR)
            return
        c.connecting = False
        if c.idle:
            c.deadline = self._now + c.idle
        self._emit(EV_CONNECTED, c.cid, 0, 0)
        if c.outbuf:
            self._flush(c)
        else:
            self._after_write(c)

    def set_write_limits(self, cid: int, high: int, low: int) -> None:
        c = self._live(cid)
        if c is not None:
            c.high = high
            c.low = low
            if len(c.outbuf) > high:
                c.over_high = True

    def write_buffer_size(self, cid: int) -> int:
        c = self._live(cid)
        return len(c.outbuf) if c is not None else -errno.EBADF

    # -------------------------------------------------------------- closing

    def close(self, cid: int) -> None:
        """Stop reading, flush the queue, then close (EV_CLOSED follows)."""
        c = self._live(cid)
        if c is None or c.closing:
            return
        c.closing = True
        c.inbuf = bytearray()
        c.framed.clear()
        c.too_large = False
        self._ready.pop(cid, None)
        if c.outbuf or c.connecting:
            self._update(c)  # read interest off; flushed on writability
        else:
            self._finish_close(c)

    def _finish_close(self, c: _Conn) -> None:
        # Unread input would make close() send a RST, which can destroy the
        # output just flushed before the peer reads it: discard it first.
        left = DISCARD_MAX
        try:
            while left > 0:
                data = c.sock.recv(min(READ_CHUNK, left))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass  # BlockingIOError (drained) or a reset: nothing to save
        self._kill(c, 0, R_NONE)

    def abort(self, cid: int) -> None:
        """Close now, dropping queued output; EV_CLOSED(0, R_NONE) follows."""
        c = self._live(cid)
        if c is not None:
            self._kill(c, 0, R_NONE)

    def shutdown(self, cid: int) -> None:
        """shutdown(SHUT_WR) once the queue is empty; later sends fail."""
        c = self._live(cid)
        if c is None or c.closing or c.shut_req:
            return
        c.shut_req = True
        if not c.outbuf and not c.connecting:
            self._after_write(c)

    # -------------------------------------------------------------- watches

    def watch_add(self, fd: int, events: int) -> int:
        """Report EV_WATCH in every poll while `fd` is ready for `events`."""
        wid = self._wids.take()
        w = _Watch(wid, fd, events)
        try:
            self._register_watch(w)
        except (KeyError, ValueError) as e:
            self._wids.give(wid)
            raise OSError(errno.EEXIST, f"fd {fd} cannot be watched: {e}") from None
        except OSError:
            self._wids.give(wid)
            raise
        self._watches[wid] = w
        return wid

    def watch_set(self, wid: int, events: int) -> None:
        w = self._watches.get(wid)
        if w is None:
            return
        try:
            self._sel.unregister(w.fd)
        except (KeyError, ValueError, OSError):
            pass
        w.events = events
        self._register_watch(w)

    def _register_watch(self, w: _Watch) -> None:
        # selectors cannot hold an fd with no interest: a parked watch
        # (events 0) stays out of the selector until it wants something.
        if w.events:
            self._sel.register(w.fd, w.events, w)

    def watch_remove(self, wid: int) -> None:
        w = self._watches.pop(wid, None)
        if w is None:
            return
        w.live = False
        try:
            self._sel.unregister(w.fd)
        except (KeyError, ValueError, OSError):
            pass  # the fd was closed behind our back
        self._free_wids.append(wid)

    # ---------------------------------------------------------------- misc

    def stats(self) -> dict[str, int]:
        return {
            "accepted": self._accepted,
            "rejected": self._rejected,
            "bytes_in": self._bytes_in,
            "bytes_out": self._bytes_out,
            "reads": self._reads,
            "writes": self._writes,
            "polls": self._polls,
            "emfile": self._emfile,
            "messages_in": self._messages_in,
            "connections_open": self._open,
        }

    def after_fork(self) -> None:
        """In a child: a fresh selector and wake-up pair, everything re-registered
        (the inherited ones are shared with the parent)."""
        if self._closed:
            return
        try:
            self._sel.close()
        except OSError:
            pass
        for s in (self._wake_r, self._wake_w):
            s.close()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = self._wake_pair()
        self._sel.register(self._wake_r.fileno(), _EV_R, self._wake_tag)
        for c in self._conns.values():
            if c.live:
                c.mask = 0
                self._update(c)
        for lis in self._listeners.values():
            lis.mask = 0
            if lis.resume_at is None:
                self._set_mask(lis, _EV_R)
        for w in self._watches.values():
            self._register_watch(w)

    def close_all(self) -> None:
        """Close every connection fd and the backend's own fds; idempotent.
        No events are produced (the loop has aborted what it cares about)."""
        if self._closed:
            return
        self._closed = True
        for c in self._conns.values():
            if c.live:
                c.live = False
                c.sock.close()
                if c.listener is not None:
                    c.listener.open -= 1
                    c.listener = None
        self._open = 0
        self._ready.clear()
        self._ready_l.clear()
        self._idle.clear()
        self._pending.clear()
        for lis in self._listeners.values():
            lis.live = False  # borrowed: the fd stays open
        for w in self._watches.values():
            w.live = False
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
