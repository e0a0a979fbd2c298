"""The select backend's shared parts: the twin of csrc/internal.h.

The slot classes (a connection, a listener, a watch), the fields of the
backend that more than one module uses, and the prototypes of the methods
one module calls in another: as ``struct fm_loop`` and the prototypes of
internal.h couple the C files.  ``loop.SelectBackend`` puts the parts
together; see the package docstring.
"""

from __future__ import annotations

import errno
import heapq
import selectors
import socket
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple, Union

from .._constants import DEFAULT_HIGH, DEFAULT_LOW
from .._framing import Framing

_EV_R = selectors.EVENT_READ
_EV_W = selectors.EVENT_WRITE

# One event in the making: kind, id, start, end, payload (EV_MSG only).
_Event = Tuple[int, int, int, int, Optional[bytes]]


class _Conn:
    """A connection slot.  ``live`` is False once it is a zombie."""

    __slots__ = (
        "cid", "sock", "fd", "spec", "inbuf", "framed", "too_large", "outbuf",
        "connecting", "paused",
        "eof_seen", "eof_done", "err", "closing", "shut_req", "shut_done",
        "over_high", "drain_due", "high", "low", "max_wbuf", "idle", "deadline",
        "listener", "mask", "live", "msg_poll", "scan",
    )

    def __init__(self, cid: int, sock: socket.socket, spec: Framing,
                 connecting: bool) -> None:
        self.cid = cid
        self.sock = sock
        self.fd = sock.fileno()
        self.spec = spec
        self.inbuf = bytearray()  # bytes read but not yet framed
        # Delimiter: bytes at the start of inbuf known to hold no separator,
        # so a search resumes where it stopped (c->scan in csrc/stream.c).
        self.scan = 0
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


def _errno_of(exc: OSError) -> int:
    return exc.errno if exc.errno else errno.EIO



class Core:
    """The fields of SelectBackend that more than one module uses, and the
    prototypes of the methods a module calls in another (internal.h's
    ``struct fm_loop`` and prototypes).  ``loop.SelectBackend.__init__``
    sets the fields; each prototype is defined in the module named."""

    # The selector, the listeners' reserve fd (loop.py).
    _sel: selectors.BaseSelector
    _reserve: int
    # Slots and their ids; ids freed at the start of the next poll.
    _conns: Dict[int, _Conn]
    _listeners: Dict[int, _Listener]
    _cids: _Ids
    _lids: _Ids
    _free_lids: List[int]
    # The ready lists, and the connections with an idle timeout.
    _ready: Dict[int, _Conn]
    _ready_l: Dict[int, _Listener]
    _idle: Dict[int, _Conn]
    # The poll in progress: its time, its number, the one recv buffer.
    _in_poll: bool
    _now: float
    _polls: int
    _rview: memoryview
    # Counters (stats()).
    _accepted: int
    _rejected: int
    _bytes_in: int
    _bytes_out: int
    _reads: int
    _writes: int
    _emfile: int
    _open: int

    # loop.py (csrc/loop.c)

    def _room(self) -> int:
        raise NotImplementedError

    def _put(self, kind: int, ident: int, start: int, end: int,
             payload: Optional[bytes]) -> None:
        raise NotImplementedError

    def _emit(self, kind: int, ident: int, start: int, end: int,
              payload: Optional[bytes] = None) -> None:
        raise NotImplementedError

    def _spec(self, fid: int) -> Optional[Framing]:
        raise NotImplementedError

    def _set_mask(self, obj: Union[_Conn, _Listener], want: int) -> None:
        raise NotImplementedError

    # stream.py (csrc/stream.c)

    @staticmethod
    def _nodelay(sock: socket.socket) -> None:
        raise NotImplementedError

    def _conn_new(self, sock: socket.socket, spec: Framing, connecting: bool) -> _Conn:
        raise NotImplementedError

    def _set_idle(self, c: _Conn, idle: float) -> None:
        raise NotImplementedError
