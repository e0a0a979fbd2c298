"""The loop: handler dispatch, callbacks, timers, signals -- written once.

Everything here runs on top of the Backend protocol (_backend.py), so the
epoll core and the select backend share one implementation of every rule a
user can observe.  ``Loop.run_once`` is the specification of an iteration;
read it first.
"""

from __future__ import annotations

import collections
import errno as _errno
import heapq
import logging
import os
import signal
import socket
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple, Union

from ._backend import Backend, FastPath, make_backend
from ._checks import (
    MAX_COUNT,
    check_bytes,
    check_callable,
    check_connect_args,
    check_int,
    check_listen_args,
    check_number,
    check_seconds,
)
from ._constants import (
    DEFAULT_MAX_WRITE_BUFFER,
    EV_ACCEPT,
    EV_CLOSED,
    EV_CONNECTED,
    EV_DRAIN,
    EV_EOF,
    EV_MSG,
    EV_WATCH,
    R_ERROR,
    R_IDLE,
    R_TOOLARGE,
    R_WBUFFULL,
    WATCH_READ,
)
from ._errors import ConnectionClosed, IdleTimeout, MessageTooLarge, WriteBufferFull
from ._framing import Framing, Raw
from ._sockets import (
    Address,
    bound_socket,
    connecting_socket,
    unix_inode,
    unlink_socket_path,
)
from ._speedups_load import speedups

logger = logging.getLogger("fastmux")

HandlerFactory = Callable[[], "Handler"]

_DEFAULT_FRAMING = Raw()


class Handler:
    """Base class for connection handlers; every method is optional.

    ``handler_factory`` (often the subclass itself) is called with no
    arguments once per connection, so a handler instance may keep
    per-connection state.  Callbacks run on the loop's thread, never from
    inside an API call."""

    def on_open(self, conn: "Connection") -> None:
        """The connection is established (accepted, or a connect succeeded)."""

    def on_message(self, conn: "Connection", data: bytes) -> None:
        """One complete message, as split by the connection's framing."""

    def on_eof(self, conn: "Connection") -> Optional[bool]:
        """The peer closed its sending side, after its last message.

        Return True to keep the connection open (it stays writable);
        otherwise it is closed once queued output is flushed."""
        return None

    def on_drain(self, conn: "Connection") -> None:
        """Queued output fell to the low watermark after exceeding the high one."""

    def on_close(self, conn: "Connection", exc: Optional[BaseException]) -> None:
        """The connection is closed; runs exactly once, last.  `exc` is None
        after a local close/abort, a clean EOF or ``loop.close()``; else the
        OSError, MessageTooLarge, WriteBufferFull, IdleTimeout or the
        handler's own exception that ended it."""


class Handle:
    """A scheduled callback; ``cancel()`` stops it from running."""

    __slots__ = ("_fn", "_args", "_cancelled", "_loop")

    def __init__(self, fn: Callable[..., Any], args: Tuple[Any, ...], loop: "Loop") -> None:
        self._fn = fn
        self._args = args
        self._cancelled = False
        self._loop = loop

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def _run(self) -> None:
        try:
            self._fn(*self._args)
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": f"exception in callback {self._fn!r}",
                "exception": exc,
                "handle": self,
            })

    def __repr__(self) -> str:
        state = " cancelled" if self._cancelled else ""
        return f"<{type(self).__name__} {self._fn!r}{state}>"


class TimerHandle(Handle):
    """A callback scheduled at ``when`` (``loop.time()`` clock)."""

    __slots__ = ("when", "_seq")

    def __init__(self, when: float, seq: int, fn: Callable[..., Any],
                 args: Tuple[Any, ...], loop: "Loop") -> None:
        super().__init__(fn, args, loop)
        self.when = when
        self._seq = seq

    def __lt__(self, other: "TimerHandle") -> bool:
        return (self.when, self._seq) < (other.when, other._seq)

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._loop._timer_cancelled()


class Server:
    """A listening socket.  ``close()`` stops accepting; connections already
    accepted stay open."""

    def __init__(self, loop: "Loop", sock: socket.socket, lid: int,
                 factory: HandlerFactory, framing: Framing, unix_path: Optional[str]) -> None:
        self._loop = loop
        self._sock = sock
        self._lid = lid
        self._factory = factory
        self.framing = framing
        self._unix_path = unix_path
        self._unix_ino = unix_inode(unix_path)
        self.address: Address = sock.getsockname()
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self._sock.fileno()

    def close(self) -> None:
        """Stop accepting (idempotent).  A Unix socket path is removed."""
        if self.closed:
            return
        self.closed = True
        if not self._loop._closed:
            self._loop._backend.listener_remove(self._lid)
        self._loop._servers.pop(self._lid, None)
        self._sock.close()
        if self._unix_path:
            unlink_socket_path(self._unix_path, self._unix_ino)

    def __repr__(self) -> str:
        return f"<fastmux.Server {self.address!r}{' closed' if self.closed else ''}>"


class _PyStream:
    """The pure-Python base of ``Connection``: its hot fields and its write
    path.  With the accelerator built, ``fastmux._speedups.Stream``
    (csrc/speedups.c) takes its place, with the same fields as C members and
    a write that goes straight into the C core's queue."""

    __slots__ = ("_loop", "_on_message", "_wbuf", "_core", "_cid", "_queued", "_closed",
                 "_wclosed", "_deliver", "_msg_call", "_msg_fn", "_msg_err",
                 "_tw_slow", "_tw_pause", "_tw_high", "_tw_ok")

    _loop: "Loop"
    _on_message: Callable[["Connection", bytes], None]
    _wbuf: List[bytes]
    _core: Optional[FastPath]
    _cid: int
    _queued: int
    _closed: bool
    _wclosed: bool
    _deliver: bool
    # The C dispatch's shortcut (csrc/speedups.c): _msg_call(_msg_fn, data)
    # instead of _on_message(conn, data).  The Python dispatch ignores them.
    _msg_call: Optional[Callable[..., Any]]
    _msg_fn: Optional[Callable[..., Any]]
    _msg_err: Optional[Callable[[BaseException], None]]
    # The asyncio transport's C write (Stream._twrite) and its gate.
    _tw_slow: Optional[Callable[[Any], None]]
    _tw_pause: Optional[Callable[[], None]]
    _tw_high: int
    _tw_ok: bool

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queue `data` (any bytes-like; its content is taken now).

        Everything written during one loop iteration leaves in one send at
        the end of it.  Raises ConnectionClosed after close(), abort(),
        shutdown_write() or a detected reset."""
        if self._wclosed:
            raise ConnectionClosed("write on a closed connection")
        if type(data) is not bytes:
            data = check_bytes(data, "data")
        if not data:
            return
        wb = self._wbuf
        if not wb:
            loop = self._loop
            loop._dirty.append(self)  # type: ignore[arg-type]
            if loop._hosted and not loop._in_iteration:
                loop._backend.wakeup()
        wb.append(data)

    def writelines(self, lines: Iterable[Union[bytes, bytearray, memoryview]]) -> None:
        """Write each item of `lines` (no separator is added)."""
        for line in lines:
            self.write(line)

    def _bind(self, core: Optional[FastPath]) -> None:
        self._core = core

    def _twrite(self, data: Any) -> None:
        """Stream._twrite's twin: with no core to write into, the
        transport's own write (``_tw_slow``) does it all."""
        if self._tw_slow is None:
            raise RuntimeError("fastmux: _twrite without a transport")
        self._tw_slow(data)


if TYPE_CHECKING:
    _StreamBase = _PyStream  # the C Stream has the same fields and methods
else:
    _StreamBase = speedups.Stream if speedups is not None else _PyStream


class Connection(_StreamBase):
    """One stream connection.  Created by the loop; see ``Handler``."""

    __slots__ = (
        "_fd", "handler", "_paused", "_framing", "_defer_framing",
        "_deferred", "_deferred_eof", "_opened", "_exc", "_peername", "_sockname",
        "_connect_timer", "_family", "__weakref__",
    )

    def __init__(self, loop: "Loop", cid: int, fd: int, framing: Framing) -> None:
        self._loop = loop
        self._cid = cid
        self._fd = fd
        self._wbuf = []
        self._msg_call = self._msg_fn = self._msg_err = None
        self._tw_slow = self._tw_pause = None
        self._tw_high = 0
        self._tw_ok = False
        self._bind(loop._fast)  # writes go to the C core's queue, if it has one
        # What the backend held after this connection's last send (an
        # upper bound: the socket may have taken more since), < 0 once it
        # cannot send.  Flow control reads it without asking the backend.
        self._queued = 0
        self._closed = False  # close()/abort() called, or the connection ended
        self._wclosed = False  # no more writes: closed or shut down
        self._deliver = True  # messages go to on_message now
        self._paused = False
        self._framing = framing
        self._defer_framing: Optional[Framing] = None
        self._deferred: Optional[List[bytes]] = None
        self._deferred_eof = False
        self._opened = False
        self._exc: Optional[BaseException] = None
        self._peername: Any = None
        self._sockname: Any = None
        self._connect_timer: Optional[TimerHandle] = None
        self._family = 0
        self.handler: Handler = Handler()
        self._on_message = self.handler.on_message

    def _set_handler(self, handler: Handler) -> None:
        self.handler = handler
        self._on_message = handler.on_message

    # -- writing ---------------------------------------------------------
    # write() and writelines() are the base's (_PyStream or the C Stream).

    def _mark_dirty(self) -> None:
        """The C Stream's write on the Python path (select backend): the
        first write of an iteration puts the connection on the flush list."""
        loop = self._loop
        loop._dirty.append(self)
        if loop._hosted and not loop._in_iteration:
            loop._backend.wakeup()

    def _flush_now(self) -> None:
        core = self._core
        if core is not None:
            if self._cid >= 0:
                self._queued = core.flush_conn(self._cid)
            return
        wb = self._wbuf
        if wb and self._cid >= 0:
            data = wb[0] if len(wb) == 1 else b"".join(wb)
            self._loop._messages_out += len(wb)
            self._queued = self._loop._backend.send(self._cid, data)
        wb.clear()

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet sent."""
        pending = sum(map(len, self._wbuf))
        if self._cid < 0:
            return pending
        queued = self._loop._backend.write_buffer_size(self._cid)
        return pending + (queued if queued > 0 else 0)

    def set_write_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        """Watermarks for ``on_drain`` (default 64 KiB and high // 4)."""
        if high is not None:
            high = check_int(high, "high", 0, MAX_COUNT)
        if low is not None:
            low = check_int(low, "low", 0, MAX_COUNT)
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low <= high, got high={high} low={low}")
        if self._cid >= 0:
            self._loop._backend.set_write_limits(self._cid, high, low)

    # -- closing ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once close() or abort() was called or the connection ended."""
        return self._closed

    def close(self) -> None:
        """Flush queued output, then close.  ``on_close`` runs later."""
        if self._closed:
            return
        if self._cid >= 0:
            self._flush_now()
            self._loop._backend.close(self._cid)
        self._end()

    def abort(self) -> None:
        """Close now, dropping queued output.  ``on_close`` runs later."""
        if self._closed and self._cid < 0:
            return
        self._end()
        if self._cid >= 0:
            self._loop._backend.abort(self._cid)

    def shutdown_write(self) -> None:
        """Send EOF (SHUT_WR) once queued output is flushed; reading goes on."""
        if self._wclosed:
            return
        self._flush_now()
        self._wclosed = True
        if self._cid >= 0:
            self._loop._backend.shutdown(self._cid)

    # -- reading ---------------------------------------------------------

    def pause_reading(self) -> None:
        """Deliver no more messages (not even ones already read) until
        ``resume_reading()``."""
        if self._paused or self._closed:
            return
        self._paused = True
        self._start_deferring()
        self._loop._backend.pause(self._cid)

    def resume_reading(self) -> None:
        """Deliver buffered messages and read again."""
        if not self._paused or self._closed:
            return
        self._paused = False
        if self._deferred is None:
            self._deliver = True
        self._loop._backend.resume(self._cid)

    def set_framing(self, framing: Framing) -> None:
        """Split the bytes not yet delivered with `framing` from now on."""
        if not isinstance(framing, Framing):
            raise TypeError(f"expected a framing spec, got {framing!r}")
        if self._closed:
            return
        fid = self._loop._framing_id(framing)
        if self._loop._in_batch:
            # Messages later in this batch were split the old way: hand them
            # back as raw bytes so the core splits them the new way.
            self._start_deferring()
        self._framing = framing
        self._loop._backend.set_framing(self._cid, fid)

    def _end(self) -> None:
        """What every way of ending shares: no more writes, no deliveries,
        output not yet handed to the backend dropped."""
        self._closed = True
        self._wclosed = True
        self._deliver = False
        self._wbuf.clear()

    def _start_deferring(self) -> None:
        self._deliver = False
        if self._deferred is None and self._loop._in_batch:
            self._defer_framing = self._framing
            self._deferred = []
            self._loop._deferring.append(self)

    def _defer(self, data: bytes) -> None:
        if self._deferred is None:
            self._start_deferring()
        assert self._deferred is not None and self._defer_framing is not None
        self._deferred.append(self._defer_framing._unsplit(data))

    def _push_back(self) -> None:
        raw = b"".join(self._deferred or ())
        eof = self._deferred_eof
        self._deferred = None
        self._deferred_eof = False
        self._defer_framing = None
        if self._cid >= 0 and not self._closed:
            if raw or eof:
                self._loop._backend.pushback(self._cid, raw, eof)
            self._deliver = not self._paused

    # -- introspection -----------------------------------------------------

    def _sockinfo(self, peer: bool) -> Any:
        if self._fd < 0 or self._cid < 0:
            return None
        try:
            s = socket.socket(fileno=self._fd)
        except OSError:
            return None  # the core has closed it already (CLOSED not yet seen)
        try:
            return s.getpeername() if peer else s.getsockname()
        except OSError:
            return None
        finally:
            s.detach()

    @property
    def peername(self) -> Any:
        """The peer's address (None if unknown or closed before asked)."""
        if self._peername is None:
            self._peername = self._sockinfo(True)
        return self._peername

    @property
    def sockname(self) -> Any:
        """The local address."""
        if self._sockname is None:
            self._sockname = self._sockinfo(False)
        return self._sockname

    def fileno(self) -> int:
        """The socket's fd, or -1 once closed.  Do not read or write it."""
        return self._fd if self._cid >= 0 and not self._closed else -1

    @property
    def loop(self) -> "Loop":
        return self._loop

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<fastmux.Connection fd={self._fd} {state}>"


_all_loops: "weakref.WeakSet[Loop]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for loop in list(_all_loops):
        loop._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Loop:
    """An event loop for stream servers and clients.

    ``backend`` is "auto" (epoll when the C core is there, else select;
    the FASTMUX_BACKEND environment variable overrides auto), "epoll" or
    "select".  Raises BackendUnavailable for a backend this host lacks."""

    def __init__(self, backend: str = "auto") -> None:
        self._backend: Backend = make_backend(backend)
        self.backend: str = self._backend.name
        self._conns: List[Optional[Connection]] = []
        # The backend's native hot path, if it has one (see FastPath).
        self._fast: Optional[FastPath] = self._backend.fast_path(self._conns)
        self._live: Dict[int, Connection] = {}  # id(conn) -> conn, until on_close
        self._servers: Dict[int, Server] = {}
        self._ready: Deque[Handle] = collections.deque()
        self._timers: List[TimerHandle] = []
        self._timer_seq = 0  # timers made so far; orders equal deadlines
        self._timers_cancelled = 0
        self._armed_deadline: Optional[float] = None
        self._dirty: List[Connection] = []
        self._deferring: List[Connection] = []
        self._framing_ids: Dict[Framing, int] = {}
        self._running = False
        self._stopping = False
        self._closed = False
        self._forked = False
        self._in_iteration = False
        self._in_batch = False
        self._hosted = False
        self._exception_handler: Optional[Callable[["Loop", Dict[str, Any]], None]] = None
        self._signal_handlers: Dict[int, Tuple[Callable[..., Any], Tuple[Any, ...], Any]] = {}
        self._sig_rsock: Optional[socket.socket] = None
        self._sig_wsock: Optional[socket.socket] = None
        self._sig_wid = -1
        self._sig_old_wakeup = -1
        # Watched foreign fds: watch id -> callback(ready WATCH_* bits).
        self._watchers: Dict[int, Callable[[int], None]] = {}
        self._messages_out = 0
        _all_loops.add(self)

    # -- the iteration -------------------------------------------------------

    def run_once(self, timeout: Optional[float] = None) -> int:
        """Run one iteration; wait at most `timeout` seconds (None: until
        something happens).  Returns the number of events and callbacks
        dispatched.

        1. Send output written since the last iteration.
        2. Poll: wait for I/O (not at all if callbacks are ready or the core
           has work of its own), at most until the earliest timer.
        3. Dispatch the batch of I/O events to handlers.
        4. Run the timers that are due.
        5. Run the callbacks that were ready when the iteration began.
        6. Send everything written during this iteration: one send per
           connection.
        """
        if timeout is not None and not (type(timeout) is float and -1e18 < timeout < 1e18):
            check_number(timeout, "timeout")  # (the test above lets only finite floats by)
        self._check_usable()
        if self._in_iteration:
            raise RuntimeError("run_once() called from inside an iteration (a handler or callback)")
        self._in_iteration = True
        try:
            if self._dirty:
                self._flush()
            ready = self._ready
            ntodo = len(ready)
            seq_limit = self._timer_seq  # timers made from here on wait
            if ntodo or self._stopping:
                timeout = 0
            elif self._timers:
                due = self._timers[0].when - time.monotonic()
                if due <= 0:
                    timeout = 0
                elif timeout is None or due < timeout:
                    timeout = due
            fast = self._fast
            if fast is not None:
                ran = self._iterate_fast(fast, timeout)
            else:
                n, ev, blob = self._backend.poll(timeout)
                ran = n
                if n:
                    self._dispatch(ev, blob)
            if self._timers:
                ran += self._run_timers(seq_limit)
            for _ in range(ntodo):
                h = ready.popleft()
                if not h._cancelled:
                    h._run()
                    ran += 1
            if self._dirty:
                self._flush()
        finally:
            if self._fast is not None:
                # Send what the iteration wrote; also when a handler's
                # BaseException leaves early (the core then knows the
                # iteration is over, and wakes a host for later writes).
                self._fast.finish()
            self._in_iteration = False
        if self._hosted:
            self._keep_fd_honest()
        return ran

    def _run_io(self, timeout: Optional[float]) -> None:
        """An iteration with only I/O to do, on the fast path: what
        run_once does when no callback is ready and no timer is set, minus
        the final ``_fast.finish()`` (the caller's: a host such as
        fastmux's asyncio loop runs its own callbacks first)."""
        self._check_usable()
        if self._in_iteration:
            raise RuntimeError("run_once() called from inside an iteration (a handler or callback)")
        fast = self._fast
        assert fast is not None
        self._in_iteration = True
        try:
            self._iterate_fast(fast, timeout)
        finally:
            self._in_iteration = False

    def _iterate_fast(self, fast: FastPath, timeout: Optional[float]) -> int:
        """Steps 1-4 of run_once on the fast path: send what was queued,
        poll, dispatch the batch.  Returns the number of events."""
        self._in_batch = True
        try:
            n, j, exc = fast.iterate(timeout)
            if j < n or exc is not None:
                self._dispatch_fast(fast, n, j, exc)
        finally:
            self._end_batch()
        return n

    def _dispatch(self, ev: Any, blob: bytes) -> None:
        conns = self._conns
        self._in_batch = True
        it = iter(ev)
        try:
            for k, cid, s, e in zip(it, it, it, it):
                if k == EV_MSG:  # the hot path
                    c = conns[cid]
                    if c._deliver:
                        try:
                            c._on_message(c, blob[s:e])
                        except Exception as exc:
                            self._handler_failed(c, exc, "on_message")
                    elif not c._closed:
                        c._defer(blob[s:e])
                else:
                    self._event(k, cid, s, e)
        finally:
            self._end_batch()

    def _dispatch_fast(self, fast: FastPath, n: int, i: int,
                       exc: Optional[Exception]) -> None:
        """The rest of a batch ``fast.iterate`` stopped in at event i: the
        fast path delivers EV_MSG events exactly as _dispatch does and hands
        every other event back to _event.  The caller ends the batch."""
        conns = self._conns
        dispatch = fast.dispatch
        event = fast.event
        while True:
            if exc is not None:
                c = conns[event(i - 1)[1]]
                assert c is not None  # it was just handed a message
                self._handler_failed(c, exc, "on_message")
            elif i < n:
                self._event(*event(i))
                i += 1
            if i >= n:
                return
            i, exc = dispatch(i)

    def _end_batch(self) -> None:
        """After a batch: hand the messages deferred by pause_reading or
        set_framing back to the backend, as raw bytes to re-frame."""
        self._in_batch = False
        if self._deferring:
            deferring, self._deferring = self._deferring, []
            for c in deferring:
                c._push_back()

    def _event(self, kind: int, cid: int, start: int, end: int) -> None:
        if kind == EV_ACCEPT:
            self._accepted(cid, start, end)
            return
        if kind == EV_WATCH:
            watcher = self._watchers.get(cid)
            if watcher is not None:
                watcher(start)
            return
        c = self._conns[cid] if cid < len(self._conns) else None
        if c is None:
            return
        if kind == EV_CLOSED:
            self._conn_closed(c, start, end)
        elif kind == EV_EOF:
            if c._closed:
                return
            if not c._deliver:
                # Paused or re-framing: the EOF goes back with the messages.
                c._start_deferring()
                c._deferred_eof = True
                return
            try:
                keep = c.handler.on_eof(c)
            except Exception as exc:
                self._handler_failed(c, exc, "on_eof")
                return
            if not keep:
                c.close()
        elif kind == EV_CONNECTED:
            if c._connect_timer is not None:
                c._connect_timer.cancel()
                c._connect_timer = None
            if c._closed:
                return
            c._opened = True
            try:
                c.handler.on_open(c)
            except Exception as exc:
                self._handler_failed(c, exc, "on_open")
        elif kind == EV_DRAIN:
            if not c._closed:
                try:
                    c.handler.on_drain(c)
                except Exception as exc:
                    self._handler_failed(c, exc, "on_drain")

    def _accepted(self, cid: int, lid: int, fd: int) -> None:
        server = self._servers.get(lid)
        framing = server.framing if server is not None else _DEFAULT_FRAMING
        c = self._adopt(Connection(self, cid, fd, framing))
        if server is None:  # closed while the accept was in flight
            c.abort()
            return
        try:
            c._set_handler(server._factory())
        except Exception as exc:
            self._handler_failed(c, exc, "handler_factory")
            return
        c._opened = True
        try:
            c.handler.on_open(c)
        except Exception as exc:
            self._handler_failed(c, exc, "on_open")

    def _adopt(self, c: Connection) -> Connection:
        """Enter a new connection in the id table and the live set."""
        conns, cid = self._conns, c._cid
        if cid >= len(conns):
            conns.extend([None] * (cid + 1 - len(conns)))
        conns[cid] = c
        self._live[id(c)] = c
        return c

    def _conn_closed(self, c: Connection, err: int, reason: int) -> None:
        self._conns[c._cid] = None
        c._cid = -1
        c._end()
        if c._connect_timer is not None:
            c._connect_timer.cancel()
            c._connect_timer = None
        exc = c._exc
        if exc is None:
            if reason == R_ERROR:
                exc = OSError(err, os.strerror(err))  # maps to ConnectionResetError etc.
            elif reason == R_TOOLARGE:
                exc = MessageTooLarge(
                    f"peer sent a message over max_size ({c._framing!r}); disconnected")
            elif reason == R_WBUFFULL:
                exc = WriteBufferFull("queued output exceeded max_write_buffer; disconnected")
            elif reason == R_IDLE:
                exc = IdleTimeout("no data within idle_timeout; disconnected")
        self._run_on_close(c, exc)

    def _run_on_close(self, c: Connection, exc: Optional[BaseException]) -> None:
        if self._live.pop(id(c), None) is None:
            return
        try:
            c.handler.on_close(c, exc)
        except Exception as e:
            self.call_exception_handler({
                "message": "exception in on_close", "exception": e, "connection": c})

    def _handler_failed(self, c: Connection, exc: Exception, where: str) -> None:
        self.call_exception_handler({
            "message": f"exception in {type(c.handler).__name__}.{where}",
            "exception": exc,
            "connection": c,
        })
        if c._exc is None:
            c._exc = exc
        c.abort()

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        out = []
        sent = []
        nout = 0
        for c in dirty:
            wb = c._wbuf
            if wb:
                if c._cid >= 0:
                    nout += len(wb)
                    out.append((c._cid, wb[0] if len(wb) == 1 else b"".join(wb)))
                    sent.append(c)
                wb.clear()
        self._messages_out += nout
        if out:
            for c, queued in zip(sent, self._backend.send_many(out)):
                c._queued = queued

    def _run_timers(self, seq_limit: int) -> int:
        """Run the due timers made before this iteration began (one made
        during it, even with delay 0, runs in the next)."""
        timers = self._timers
        now = time.monotonic()
        ran = 0
        while timers and timers[0].when <= now and timers[0]._seq < seq_limit:
            h = heapq.heappop(timers)
            if h._cancelled:
                self._timers_cancelled -= 1
                continue
            h._run()
            ran += 1
        return ran

    def _keep_fd_honest(self) -> None:
        """Hosted: make the epoll fd readable whenever run_once(0) has work."""
        if self._ready or self._dirty:
            self._backend.wakeup()
        deadline = self._timers[0].when if self._timers else None
        if deadline != self._armed_deadline:
            self._armed_deadline = deadline
            self._backend.set_timer(deadline)

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        """Run until ``stop()`` is called."""
        self._check_usable()
        if self._running or self._in_iteration:
            raise RuntimeError("the loop is already running")
        self._running = True
        self._stopping = False
        fast = self._fast
        try:
            while not self._stopping:
                if (fast is not None and not self._ready and not self._timers
                        and not self._dirty and not self._hosted):
                    # Only I/O to do: run_once without its Python body.
                    self._run_io(None)
                    fast.finish()
                else:
                    self.run_once()
        finally:
            if fast is not None and not self._closed:
                fast.finish()  # an exception may have left _run_io early
            self._running = False
            self._stopping = False

    def stop(self) -> None:
        """Make ``run()`` return after the current iteration.  Safe to call
        from another thread: a loop blocked in its poll is woken."""
        self._stopping = True
        if not self._closed:
            # Even inside an iteration: "inside" may be another thread's
            # view of a loop that is blocked in its poll right now.
            self._backend.wakeup()

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def time(self) -> float:
        """The loop's clock: ``time.monotonic()``."""
        return time.monotonic()

    def close(self) -> None:
        """Abort every connection (their ``on_close`` runs with exc None),
        close every server, release every fd.  Idempotent; RuntimeError
        while the loop runs."""
        if self._closed:
            return
        if self._running or self._in_iteration:
            raise RuntimeError("cannot close a running loop")
        self._closed = True
        for server in list(self._servers.values()):
            server.close()
        if self._forked:
            self._live.clear()
        for c in list(self._live.values()):
            c._end()
            c._cid = -1
            self._run_on_close(c, c._exc)
        self._live.clear()
        self._conns.clear()
        self._dirty.clear()
        self._ready.clear()
        self._timers.clear()
        self._teardown_signals()
        if not self._forked:
            self._backend.close_all()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection gracefully (queued output
        is flushed), and abort the ones still flushing after `timeout`
        seconds.  Outside ``run()`` this runs the loop until every
        ``on_close`` has run; from a callback it starts the shutdown and
        returns (the loop keeps running; stop it when you like)."""
        check_seconds(timeout, "timeout", zero_ok=True)
        self._check_usable()
        for server in list(self._servers.values()):
            server.close()
        for c in list(self._live.values()):
            c.close()
        if self._running or self._in_iteration:
            self.call_later(timeout, self._abort_all)
            return
        deadline = time.monotonic() + timeout
        while self._live and time.monotonic() < deadline:
            self.run_once(max(0.0, min(0.1, deadline - time.monotonic())))
        if self._live:
            self._abort_all()
            # Aborts complete on the next poll; bounded in case of a bug.
            for _ in range(100):
                if not self._live:
                    break
                self.run_once(0.01)

    def _abort_all(self) -> None:
        for c in list(self._live.values()):
            c.abort()

    def __del__(self) -> None:
        # A loop dropped without close(): release the core's fds and memory
        # (connections are not told; that needs close()).
        if not getattr(self, "_closed", True) and not self._forked:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)
            self._closed = True
            try:
                self._backend.close_all()
            except Exception:
                pass

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the loop is closed")
        if self._forked:
            raise RuntimeError("this loop was inherited across fork(); make a new one")

    def _after_fork(self) -> None:
        if self._closed:
            return
        self._forked = True
        if self._fast is not None:
            # The child must not write into the parent's connections through
            # the inherited core: writes take the Python path (and stay put).
            self._fast.detach()
        self._backend.after_fork()
        for s in self._servers.values():
            s._sock.close()
            s._unix_path = None  # the parent's path: never unlink it from the child
        for sock in (self._sig_rsock, self._sig_wsock):
            if sock is not None:
                sock.close()

    # -- callbacks and timers --------------------------------------------------

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> Handle:
        """Run ``fn(*args)`` in the next iteration (FIFO).  TypeError if `fn`
        is not callable."""
        if not callable(fn):  # the builtin first: call_soon is a hot path
            check_callable(fn, "fn")
        self._check_usable()
        h = Handle(fn, args, self)
        self._ready.append(h)
        if self._hosted and not self._in_iteration:
            self._backend.wakeup()
        return h

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> Handle:
        """Like call_soon, from any thread; wakes a blocked loop."""
        if not callable(fn):
            check_callable(fn, "fn")
        if self._closed:
            raise RuntimeError("the loop is closed")
        h = Handle(fn, args, self)
        self._ready.append(h)  # deque.append is atomic
        self._backend.wakeup()
        return h

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``fn(*args)`` no earlier than `delay` seconds from now.
        TypeError if `fn` is not callable or `delay` not a number."""
        check_number(delay, "delay")
        check_callable(fn, "fn")
        return self.call_at(time.monotonic() + delay, fn, *args)

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``fn(*args)`` no earlier than ``loop.time() == when``."""
        check_number(when, "when")
        check_callable(fn, "fn")
        self._check_usable()
        seq = self._timer_seq
        self._timer_seq = seq + 1
        h = TimerHandle(when, seq, fn, args, self)
        heapq.heappush(self._timers, h)
        if self._hosted and not self._in_iteration:
            self._keep_fd_honest()
        return h

    def _timer_cancelled(self) -> None:
        self._timers_cancelled += 1
        # Drop cancelled timers when they are most of the heap.
        if self._timers_cancelled > 64 and self._timers_cancelled * 2 > len(self._timers):
            # In place: _run_timers may be iterating over this very list.
            self._timers[:] = [h for h in self._timers if not h._cancelled]
            heapq.heapify(self._timers)
            self._timers_cancelled = 0

    # -- errors ----------------------------------------------------------------

    def set_exception_handler(
            self, handler: Optional[Callable[["Loop", Dict[str, Any]], None]]) -> None:
        """Call ``handler(loop, context)`` for exceptions in handlers and
        callbacks; None restores the default (log to "fastmux")."""
        if handler is not None and not callable(handler):
            raise TypeError("the exception handler must be callable or None")
        self._exception_handler = handler

    def default_exception_handler(self, context: Dict[str, Any]) -> None:
        exc = context.get("exception")
        exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        extra = {k: v for k, v in context.items() if k not in ("message", "exception")}
        logger.error("%s %s", context.get("message", "unhandled exception"),
                     extra or "", exc_info=exc_info)

    def call_exception_handler(self, context: Dict[str, Any]) -> None:
        if self._exception_handler is None:
            self.default_exception_handler(context)
            return
        try:
            self._exception_handler(self, context)
        except Exception as e:
            logger.error("exception in the exception handler", exc_info=e)
            self.default_exception_handler(context)

    # -- servers and connections -----------------------------------------------

    def _framing_id(self, framing: Framing) -> int:
        fid = self._framing_ids.get(framing)
        if fid is None:
            fid = self._backend.framing_new(framing._kind, framing._max, framing._n,
                                            framing._sep, framing._little)
            self._framing_ids[framing] = fid
        return fid

    def listen(self, address: Optional[Address], handler_factory: HandlerFactory, *,
               framing: Optional[Framing] = None, backlog: int = 1024,
               reuse_port: bool = False, sock: Optional[socket.socket] = None,
               max_connections: Optional[int] = None,
               idle_timeout: Optional[float] = None,
               max_write_buffer: Optional[int] = DEFAULT_MAX_WRITE_BUFFER) -> Server:
        """Listen on `address` -- ``(host, port)`` (port 0 to 65535; 0: any
        free port) or a Unix socket path -- or on the bound socket `sock`.

        A Unix socket path is ``bytes``, an ``os.PathLike`` or a ``str``
        containing a "/" (``"./app.sock"``); any other str, such as
        ``"localhost:8080"``, is refused with ValueError rather than becoming
        a socket file.  Host names are resolved with getaddrinfo, which
        blocks.  Each accepted connection gets ``handler_factory()`` (a
        callable), then ``on_open``.  `max_connections` (an int >= 0; default
        None, unlimited): beyond it new connections are accepted and closed
        at once.  `idle_timeout` (seconds > 0; default None, no timeout): a
        connection silent that long is closed with IdleTimeout.
        `max_write_buffer` (bytes >= 1, default 64 MiB; None: unlimited): see
        WriteBufferFull.  `backlog`: an int >= 0, for listen(2).

        Every argument is checked before a socket is made: TypeError or
        ValueError naming the argument; OSError from resolving or binding."""
        self._check_usable()
        check_listen_args(address, handler_factory, framing, sock=sock, backlog=backlog,
                          max_connections=max_connections, idle_timeout=idle_timeout,
                          max_write_buffer=max_write_buffer)
        framing = framing if framing is not None else _DEFAULT_FRAMING
        unix_path = None
        if sock is None:
            if address is None:
                raise ValueError("listen() needs an address or sock=")
            sock, unix_path = bound_socket(address, reuse_port)
            try:
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
        else:
            if sock.type != socket.SOCK_STREAM:
                raise ValueError("sock must be a SOCK_STREAM socket")
            try:
                sock.listen(backlog)
            except OSError:
                pass  # already listening
        sock.setblocking(False)
        fid = self._framing_id(framing)
        maxc = -1 if max_connections is None else int(max_connections)
        lid = self._backend.listener_add(sock.fileno(), fid, maxc)
        mwb = int(max_write_buffer or 0)
        idle = float(idle_timeout or 0.0)
        self._backend.listener_set(lid, mwb, idle)
        server = Server(self, sock, lid, handler_factory, framing, unix_path)
        self._servers[lid] = server
        return server

    def connect(self, address: Optional[Address], handler_factory: HandlerFactory, *,
                framing: Optional[Framing] = None, timeout: Optional[float] = None,
                sock: Optional[socket.socket] = None,
                idle_timeout: Optional[float] = None,
                max_write_buffer: Optional[int] = DEFAULT_MAX_WRITE_BUFFER) -> Connection:
        """Connect to `address` without blocking (name resolution does
        block).  ``on_open`` runs once connected; a failed or timed-out
        connect reaches ``on_close(conn, exc)`` without ``on_open``.  Writes
        made before then are queued.  `sock`: an already connected (or
        connecting) socket to use instead.

        `address` follows listen()'s rule (a Unix path is bytes, a PathLike
        or a str with a "/").  `timeout`, `idle_timeout` (seconds > 0) and
        `max_write_buffer` (bytes >= 1) take None for no limit.  Every
        argument is checked before the handler or a socket is made:
        TypeError or ValueError naming the argument."""
        self._check_usable()
        check_connect_args(address, handler_factory, framing, sock=sock, timeout=timeout,
                           idle_timeout=idle_timeout, max_write_buffer=max_write_buffer)
        framing = framing if framing is not None else _DEFAULT_FRAMING
        fid = self._framing_id(framing)
        if sock is None and address is None:
            raise ValueError("connect() needs an address or sock=")
        # Before any socket exists: a factory that raises leaks nothing.
        handler = handler_factory()
        err = 0
        if sock is None:
            assert address is not None
            sock, err = connecting_socket(address)
        else:
            sock.setblocking(False)
        if err not in (0, _errno.EINPROGRESS, _errno.EAGAIN):
            sock.close()
            c = Connection(self, -1, -1, framing)
            c._set_handler(handler)
            c._end()
            self._live[id(c)] = c
            exc = OSError(err, os.strerror(err))
            self._ready.append(Handle(self._run_on_close, (c, exc), self))
            if self._hosted and not self._in_iteration:
                self._backend.wakeup()
            return c
        fd = sock.detach()
        try:
            cid = self._backend.conn_add(fd, fid, True)
        except BaseException:
            os.close(fd)
            raise
        c = self._adopt(Connection(self, cid, fd, framing))
        c._set_handler(handler)
        mwb = int(max_write_buffer or 0)
        if mwb or idle_timeout:
            self._backend.conn_set(cid, mwb, float(idle_timeout or 0.0))
        if timeout is not None:
            c._connect_timer = self.call_later(timeout, self._connect_timed_out, c)
        return c

    def _connect_timed_out(self, c: Connection) -> None:
        c._connect_timer = None
        if c._opened or c._cid < 0:
            return
        if c._exc is None:
            c._exc = TimeoutError("connect timed out")
        c.abort()

    # -- signals ---------------------------------------------------------------

    def add_signal_handler(self, signum: int, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the loop when signal `signum` arrives.

        Main thread only (Python's rule for signal handlers).  The previous
        disposition is restored by ``remove_signal_handler``."""
        _check_signum(signum)
        check_callable(fn, "fn")
        self._check_usable()
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be added from the main thread")
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            raise RuntimeError(f"signal {signum} cannot be caught")
        if self._sig_rsock is None:
            rsock, wsock = socket.socketpair()
            rsock.setblocking(False)
            wsock.setblocking(False)
            self._sig_rsock, self._sig_wsock = rsock, wsock
            self._sig_old_wakeup = signal.set_wakeup_fd(wsock.fileno(),
                                                        warn_on_full_buffer=False)
            self._sig_wid = self._watch_add(rsock.fileno(), WATCH_READ,
                                            lambda ready: self._signal_readable())
        previous = self._signal_handlers[signum][2] if signum in self._signal_handlers \
            else signal.getsignal(signum)
        signal.signal(signum, _noop_signal_handler)
        # Restart interrupted syscalls: the wakeup fd, not EINTR, tells us.
        signal.siginterrupt(signum, False)
        self._signal_handlers[signum] = (fn, args, previous)

    def remove_signal_handler(self, signum: int) -> bool:
        """Restore `signum`'s previous disposition; False if none was set."""
        entry = self._signal_handlers.pop(signum, None)
        if entry is None:
            return False
        previous = entry[2]
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if not self._signal_handlers:
            self._teardown_signals()
        return True

    def _teardown_signals(self) -> None:
        for signum, (_, _, previous) in list(self._signal_handlers.items()):
            try:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass
        self._signal_handlers.clear()
        if self._sig_rsock is None:
            return
        if not self._forked:
            if not self._closed:
                self._watch_remove(self._sig_wid)
            try:
                signal.set_wakeup_fd(self._sig_old_wakeup)
            except ValueError:
                pass  # not the main thread
        self._sig_rsock.close()
        if self._sig_wsock is not None:
            self._sig_wsock.close()
        self._sig_rsock = self._sig_wsock = None
        self._sig_wid = -1

    def _signal_readable(self) -> None:
        if self._sig_rsock is None:
            return
        try:
            data = self._sig_rsock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            entry = self._signal_handlers.get(signum)
            if entry is not None:
                self._ready.append(Handle(entry[0], entry[1], self))

    # -- watched foreign fds (signals; the asyncio loop's add_reader) -----------

    def _watch_add(self, fd: int, events: int, callback: Callable[[int], None]) -> int:
        """Call ``callback(ready)`` from the iteration's dispatch while `fd`
        is ready for `events` (WATCH_* bits, level-triggered); the fd stays
        the caller's.  Returns the watch id."""
        wid = self._backend.watch_add(fd, events)
        self._watchers[wid] = callback
        return wid

    def _watch_set(self, wid: int, events: int) -> None:
        self._backend.watch_set(wid, events)

    def _watch_remove(self, wid: int) -> None:
        if self._watchers.pop(wid, None) is not None and not self._closed:
            self._backend.watch_remove(wid)

    # -- hosting and introspection ---------------------------------------------

    def fileno(self) -> int:
        """An fd that is readable whenever ``run_once(0)`` has work, so that
        another loop can host this one (epoll backend; the select backend
        raises NotImplementedError)."""
        self._check_usable()
        fd = int(self._backend.fileno())
        if not self._hosted:
            self._hosted = True
            self._keep_fd_honest()
            if self._backend.has_pending():
                self._backend.wakeup()
        return fd

    def stats(self) -> Dict[str, int]:
        """Counters: connections_open, accepted, rejected, bytes_in,
        bytes_out, messages_in, messages_out, and backend details."""
        s = self._backend.stats() if not self._closed else {}
        s["messages_out"] = self._messages_out + s.get("messages_out", 0)
        for key in ("connections_open", "accepted", "rejected", "bytes_in", "bytes_out",
                    "messages_in"):
            s.setdefault(key, 0)
        return s

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._running else "idle")
        return f"<fastmux.Loop backend={self.backend} {state}>"


def _noop_signal_handler(signum: int, frame: Any) -> None:
    """Python-level handler; the real work happens via the wakeup fd."""


def _check_signum(signum: Any) -> None:
    if isinstance(signum, bool) or not isinstance(signum, int):
        raise TypeError(f"signum must be an int, got {signum!r}")
    if signum not in signal.valid_signals():
        raise ValueError(f"signum {signum} is not a signal number on this platform")


__all__ = ["Loop", "Handler", "Connection", "Server", "Handle", "TimerHandle"]
