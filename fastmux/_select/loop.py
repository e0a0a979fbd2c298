"""SelectBackend, the loop: the twin of csrc/loop.c.

poll and the batch it returns, the ready lists, the wake-up socket,
watches, after_fork and close_all; the connections are served by
stream.py (csrc/stream.c) and the listeners by listen.py (csrc/listen.c).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple, Union

from .._backend import Batch
from .._constants import (
    BATCH_MAX,
    EV_CLOSED,
    EV_WATCH,
    FR_DELIM,
    FR_FIXED,
    FR_LENGTH,
    FR_RAW,
    READ_CHUNK,
)
from .._framing import Delimiter, Fixed, Framing, LengthPrefixed, Raw
from .internal import _EV_R, _EV_W, _Conn, _Event, _Ids, _Listener, _Wake, _Watch
from .listen import ListenPart
from .stream import StreamPart

__all__ = ["SelectBackend"]


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



class SelectBackend(StreamPart, ListenPart):
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

    def fast_path(self, conns: list[Any]) -> None:
        """No native message loop: the loop dispatches ``poll``'s batch."""
        return None

    def poll(self, timeout: float | None) -> Batch:
        """Wait up to `timeout` seconds (None: forever), do all ready I/O and
        return the batch ``(n, ev, blob)`` (see _backend.py)."""
        if self._closed:
            return 0, [], b""
        self._poll_begin()
        self._in_poll = True
        try:
            self._flush_dying()
            ready = self._sel.select(self._wait_time(timeout))
            self._now = now = time.monotonic()
            self._reenable_listeners(now)
            self._dispatch(ready)
            self._idle_sweep(now)
        finally:
            self._in_poll = False
        ev = self._ev
        self._ev = []
        blob = b"".join(self._parts)
        self._parts = []
        return len(ev) >> 2, ev, blob

    def _poll_begin(self) -> None:
        """Start a poll: free the ids closed in the last batch, empty the
        batch (the first half of fm__poll_begin)."""
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

    def _flush_dying(self) -> None:
        """Events queued since the last poll happened first: they lead the
        batch (fm__flush_dying; ``_pending`` is the twin of the dying list,
        and also holds whatever did not fit in a full batch)."""
        while self._pending and len(self._ev) < 4 * BATCH_MAX:
            self._put(*self._pending.popleft())

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
                self._listener_io(lis)
        self._run_ready(readable)
        for c in flush_later:
            if c.live and c.outbuf:
                self._flush(c)

    def _run_ready(self, readable: List[_Conn]) -> None:
        """Serve the ready list, then the connections select reported
        readable that are not on it (fm__run_ready; the C core reads those
        in fm__conn_io, here they join the list so each is served once)."""
        todo = self._ready
        self._ready = {}
        for c in readable:
            todo.setdefault(c.cid, c)
        for c in todo.values():
            self._conn_process(c)

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

    # ------------------------------------------------------------ interest

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
