"""fastmux as an asyncio event loop.

``EventLoop`` is asyncio's own selector event loop with two parts replaced:

* its selector is ``_CoreSelector``, a face of a native ``fastmux.Loop``:
  ``select(timeout)`` runs one iteration of the native loop, which sends the
  output written since the last iteration, polls (epoll in C, or the select
  backend), delivers stream data straight to the protocols, and reports the
  foreign fds that ``add_reader``/``add_writer`` watch (the core's watches)
  back to asyncio as selector events;
* its stream transports are ``_StreamTransport``: a native ``Connection``
  (Raw framing) seen through asyncio's ``Transport`` interface.  Reads are
  drained in C and handed over once per read; writes made during one
  iteration leave in one ``send`` per transport at the end of the iteration.
  Listening sockets are accepted from in C; ``loop.sendfile`` on these
  transports is ``os.sendfile`` (see docs/asyncio.md for what differs).

Everything else -- futures, tasks, timers, ``call_soon_threadsafe``,
executors, DNS, happy eyeballs, signals, ``sock_*``, subprocesses, pipes,
datagram and TLS transports -- is asyncio's own code running over that
selector, so it behaves as asyncio does on every supported Python.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import inspect
import io
import logging
import os
import selectors
import socket
import sys
import warnings
from asyncio import base_events, constants, protocols, transports, trsock
from collections.abc import Mapping
from typing import Any, Callable, Coroutine, Dict, Iterator, List, Optional, Tuple, TypeVar

from ._framing import Raw
from ._loop import Connection, Handler, Loop

__all__ = ["EventLoop", "EventLoopPolicy", "new_event_loop", "install", "run"]

_T = TypeVar("_T")
_RAW = Raw()
# A native sendfile whose socket buffer is full hands the core this much of
# the file (copied) and waits for the core to drain it: the connection's fd
# is the core's, so the core is what learns when it is writable again.
_SENDFILE_CHUNK = 64 * 1024
_logger = logging.getLogger("asyncio")

# asyncio's internals that this module builds on are not in the type stubs:
# typed as Any here, in one place.
_SelectorEventLoop: Any = asyncio.SelectorEventLoop
_FlowControlMixin: Any = transports._FlowControlMixin
_Server = Any  # asyncio.base_events.Server (its _attach/_detach)

# asyncio.Server._attach/_detach take the transport from 3.13 on.
_ServerClass: Any = base_events.Server
_SERVER_TRACKS_TRANSPORTS = len(inspect.signature(_ServerClass._attach).parameters) > 1


class _CoreSelector(selectors.BaseSelector):
    """The selector asyncio's loop drives: one native iteration per select.

    Foreign fds (add_reader/add_writer, the self-pipe, sock_* waits) are the
    core's watches, level-triggered like any selector; ``select`` returns
    the ones that became ready during the iteration."""

    def __init__(self, core: Loop) -> None:
        self._core = core
        self._keys: Dict[int, selectors.SelectorKey] = {}
        self._wids: Dict[int, int] = {}
        self._ready: List[Tuple[selectors.SelectorKey, int]] = []
        self._map = _KeyMapping(self._keys)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        fd = _fileobj_to_fd(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._wids[fd] = self._core._watch_add(fd, events, lambda ready: self._on_ready(fd, ready))
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = self._fd_of(fileobj)
        key = self._keys.pop(fd, None)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        self._core._watch_remove(self._wids.pop(fd))
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = self._fd_of(fileobj)
        key = self._keys.get(fd)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if events != key.events:
            if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
                raise ValueError(f"Invalid events: {events!r}")
            try:
                self._core._watch_set(self._wids[fd], events)
            except OSError:
                self.unregister(fileobj)
                raise
        key = key._replace(events=events, data=data)
        self._keys[fd] = key
        return key

    def select(self, timeout: Optional[float] = None) -> List[Tuple[selectors.SelectorKey, int]]:
        self._ready = []
        core = self._core
        if (core._fast is not None and not core._ready and not core._timers
                and not core._hosted):
            # Only I/O for the core: no Python body of its own (asyncio runs
            # the callbacks; EventLoop._run_once sends what they wrote).
            core._run_io(timeout)
        else:
            core.run_once(None if timeout is None else max(timeout, 0.0))
        ready, self._ready = self._ready, []
        return ready

    def _on_ready(self, fd: int, ready: int) -> None:
        key = self._keys.get(fd)
        if key is not None:
            ready &= key.events
            if ready:
                self._ready.append((key, ready))

    def _fd_of(self, fileobj: Any) -> int:
        try:
            return _fileobj_to_fd(fileobj)
        except ValueError:
            # A closed file object: find it by identity, as selectors does.
            for key in self._keys.values():
                if key.fileobj is fileobj:
                    return key.fd
            raise

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        key = self._keys.get(self._fd_of(fileobj))
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        return key

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        for fd in list(self._keys):
            self._keys.pop(fd)
            self._core._watch_remove(self._wids.pop(fd))


class _KeyMapping(Mapping[Any, selectors.SelectorKey]):
    """A read-only view of the registered keys by fd (selectors' get_map)."""

    def __init__(self, keys: Dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        fd = _fileobj_to_fd(fileobj)
        try:
            return self._keys[fd]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)


def _fileobj_to_fd(fileobj: Any) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


class _Listener:
    """A listening socket of an asyncio Server, accepted from by the core.
    The socket stays the Server's (asyncio closes it in _stop_serving)."""

    framing = _RAW

    def __init__(self, loop: "EventLoop", sock: socket.socket, lid: int,
                 protocol_factory: Callable[[], asyncio.BaseProtocol],
                 server: Optional[_Server]) -> None:
        self._loop = loop
        self._sock = sock
        self._lid = lid
        self._protocol_factory = protocol_factory
        self._server = server
        # As asyncio's accept path does: connections are made in (a copy of)
        # the context that started serving, so their protocols see it.
        self._context = contextvars.copy_context()

    def _factory(self) -> "_StreamTransport":
        return self._context.run(self._make_transport)

    def _make_transport(self) -> "_StreamTransport":
        return _StreamTransport(self._loop, self._protocol_factory(), None, self._server, None)

    def close(self) -> None:
        core = self._loop._core
        if core._servers.pop(self._lid, None) is not None and not core.is_closed():
            core._backend.listener_remove(self._lid)


class _StreamTransport(Handler, _FlowControlMixin, asyncio.Transport):  # type: ignore[misc]
    """asyncio's Transport over a native Connection.

    The native loop calls the Handler methods (on_open, on_message, on_eof,
    on_drain, on_close) from its dispatch; they call the protocol.  Writes go
    to the connection's per-iteration buffer and leave in one send at the end
    of the iteration; ``get_write_buffer_size`` counts them until then.

    The native loop calls the handler from its dispatch, outside any task;
    the protocol's callbacks run in a copy of the context the transport was
    made in (``_call``), as asyncio's Handles run them, so that context
    variables set around create_server/create_connection reach them."""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    def __init__(self, loop: "EventLoop", protocol: asyncio.BaseProtocol,
                 extra: Optional[Dict[str, Any]], server: Optional[_Server],
                 waiter: Optional["asyncio.Future[None]"]) -> None:
        _FlowControlMixin.__init__(self, extra, loop)
        self._aloop: Optional[EventLoop] = loop
        self._conn: Optional[Connection] = None
        self._sock: Optional[socket.socket] = None  # made on demand for get_extra_info
        self._server = server
        self._waiter = waiter
        self._closing = False
        self._lost_scheduled = False  # connection_lost is queued (see _lose_soon)
        self._eof = False
        self._eof_pending = False  # the core saw EOF; eof_received not called yet
        self._paused = False
        self._conn_lost = 0
        self._unsent = 0  # bytes written this iteration, not yet handed to the core
        self._protocol_connected = False
        self._context = contextvars.copy_context()
        self._in_context = False
        self._sending_file = False  # loop.sendfile() in progress: write() refuses
        self._drain_waiter: Optional["asyncio.Future[None]"] = None
        self.set_protocol(protocol)
        if server is not None:
            if _SERVER_TRACKS_TRANSPORTS:
                server._attach(self)
            else:
                server._attach()

    # -- the native connection's handler ---------------------------------------

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in the transport's context; directly when already in
        it (Context.run refuses to enter a context twice)."""
        if self._in_context:
            return fn(*args)
        self._in_context = True
        try:
            return self._context.run(fn, *args)
        finally:
            self._in_context = False

    def on_open(self, conn: Connection) -> None:
        self._conn = conn
        self._route_data()
        if conn._core is not None:
            # The accelerator's write (csrc/speedups.c, Stream._twrite): while
            # the gate is open, transport.write is C through and through;
            # otherwise it calls _write_py.  An instance attribute, so
            # ``transport.write`` resolves to it before the class's method.
            conn._tw_slow = self._write_py
            conn._tw_pause = self._maybe_pause_protocol
            self.write = conn._twrite  # type: ignore[method-assign]
            self._gate()
        loop = self._aloop
        assert loop is not None
        loop._transports[conn._fd] = self
        conn.set_write_limits(self._high_water, self._low_water)
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            # create_connection() and friends: as asyncio does, data goes to
            # the protocol only once the coroutine waiting on `waiter` has
            # the transport in hand.
            conn.pause_reading()
            loop.call_soon(self._start_reading)
        elif self._paused:
            conn.pause_reading()
        self._call(self._protocol.connection_made, self)
        if waiter is not None and not waiter.cancelled():
            waiter.set_result(None)

    def _start_reading(self) -> None:
        conn = self._conn
        if conn is not None and not self._paused and not self._closing:
            conn.resume_reading()

    def on_message(self, conn: Connection, data: bytes) -> None:
        # The hot path: _call written out (one Python frame fewer per read).
        try:
            if self._in_context:
                self._data_received(data)
            else:
                self._in_context = True
                try:
                    self._context.run(self._data_received, data)
                finally:
                    self._in_context = False
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _route_data(self) -> None:
        """Let the C dispatch call ``context.run(data_received, data)``
        itself, with on_message's error handling in _data_failed: no Python
        frame of the transport's per read.  (The Python dispatch ignores
        this and calls on_message.)"""
        conn = self._conn
        if conn is not None:
            conn._msg_call = self._context.run
            conn._msg_fn = self._data_received
            conn._msg_err = self._data_failed

    def _data_failed(self, exc: BaseException) -> None:
        self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _get_buffer_and_copy(self, data: bytes) -> None:
        """BufferedProtocol: hand `data` over through get_buffer/buffer_updated,
        one buffer at a time, as asyncio's reads do: an error is reported
        under the name of the method that raised it, and what buffer_updated
        does to the transport (close, pause_reading, set_protocol) holds
        for the rest of `data`, as it would for the next read."""
        proto: Any = self._protocol
        view = memoryview(data)
        while view:
            try:
                buf = memoryview(proto.get_buffer(len(view))).cast("B")
                if not len(buf):
                    raise RuntimeError("get_buffer() returned an empty buffer")
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
                return
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            try:
                proto.buffer_updated(n)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
                return
            view = view[n:]
            if not view or self._closing:
                return  # closed from buffer_updated: the rest is not wanted
            conn = self._conn
            if self._paused and conn is not None:
                # pause_reading() from buffer_updated: the rest waits in the
                # core (deferred, as the batch's later messages are) until
                # resume_reading().
                conn._defer(bytes(view))
                return
            if self._protocol is not proto:
                # set_protocol() from buffer_updated: the rest is the new
                # protocol's.
                self._data_received(bytes(view))
                return

    def on_eof(self, conn: Connection) -> Optional[bool]:
        # asyncio's loop reads the EOF with a recv of its own, an iteration
        # after the data before it at the earliest, so what data_received
        # scheduled runs first -- an HTTP server's request task writes its
        # response before eof_received closes on a client's half-close.  The
        # core drains data and EOF in one go: hand the EOF over in a callback
        # of its own, queued behind those.
        self._eof_pending = True
        loop = self._aloop
        if loop is not None:
            loop.call_soon(self._deliver_eof)
        return True  # closing is ours to do

    def _deliver_eof(self) -> None:
        if not self._eof_pending or self._closing or self._paused:
            return  # closed since; or paused since: resume_reading hands it over
        self._eof_pending = False
        try:
            keep_open = self._call(self._protocol.eof_received)  # type: ignore[attr-defined]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def _gate(self) -> None:
        """Open or shut the C write path (Stream._twrite) after any change
        of the state _write_py looks at, and tell it the high-water mark."""
        conn = self._conn
        if conn is not None and conn._core is not None:
            conn._tw_high = self._high_water
            conn._tw_ok = not (self._closing or self._eof or self._sending_file
                               or self._conn_lost or self._protocol_paused)

    def _maybe_pause_protocol(self) -> None:
        super()._maybe_pause_protocol()
        self._gate()

    def _maybe_resume_protocol(self) -> None:
        super()._maybe_resume_protocol()
        self._gate()

    def on_drain(self, conn: Connection) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._call(self._maybe_resume_protocol)

    def on_close(self, conn: Connection, exc: Optional[BaseException]) -> None:
        loop = self._aloop
        fd = conn._fd
        if loop is not None and loop._transports.get(fd) is self:
            del loop._transports[fd]
        closed_by_us = self._closing
        self._closing = True
        if not self._conn_lost:
            self._conn_lost = 1  # (close(), abort() or an error may have counted it)
        self._gate()
        drain_waiter = self._drain_waiter
        if drain_waiter is not None and not drain_waiter.done():
            drain_waiter.set_exception(exc if exc is not None else ConnectionError(
                "connection closed while sendfile was in progress"))
        if self._sock is not None:
            self._sock.detach()  # the core closed the fd
            self._sock = None
        self._aloop = None
        if self._waiter is not None:
            # Closed before it was ever connected (connect failed).
            waiter, self._waiter = self._waiter, None
            if not waiter.cancelled():
                waiter.set_exception(exc if exc is not None else ConnectionError(
                    "connection closed before it was established"))
        elif self._lost_scheduled:
            return  # close() or abort() queued connection_lost already
        elif self._protocol_connected and loop is not None and not loop.is_closed():
            # asyncio's transports never call connection_lost from the I/O
            # event, and the core reports the end in its poll, ahead of the
            # callbacks queued before it.  A close() that left output to
            # send: asyncio calls connection_lost once that is sent, from a
            # write callback run after those -- one hop.  A reset or error:
            # asyncio learns of it with a read of its own, an iteration
            # after the data before it (as for EOF, see on_eof), and then
            # schedules connection_lost -- two hops.
            if closed_by_us:
                loop.call_soon(self._connection_lost, exc)
            else:
                loop.call_soon(loop.call_soon, self._connection_lost, exc)
            return
        self._detach_server()

    def _lose_soon(self, exc: Optional[BaseException]) -> None:
        """Queue connection_lost now, as asyncio's close() (with nothing
        left to send), abort() and fatal errors do: after what was queued
        before the call, before what is queued after it.  The core's
        on_close, at a later poll, then only cleans up.

        As asyncio's close() and _force_close(), this counts the loss
        (``_conn_lost``): the writes that follow are dropped, and logged from
        LOG_THRESHOLD_FOR_CONNLOST_WRITES on, counting from here."""
        if not self._conn_lost:
            self._conn_lost = 1
        loop = self._aloop
        if (self._lost_scheduled or loop is None or loop.is_closed()
                or self._waiter is not None or not self._protocol_connected):
            return
        self._lost_scheduled = True
        loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Optional[BaseException]) -> None:
        try:
            self._call(self._protocol.connection_lost, exc)
        finally:
            self._detach_server()

    def _detach_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            if _SERVER_TRACKS_TRANSPORTS:
                server._detach(self)
            else:
                server._detach()

    # -- asyncio.Transport -------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._protocol_connected = True
        if isinstance(protocol, protocols.BufferedProtocol):
            self._data_received = self._get_buffer_and_copy
        else:
            self._data_received = protocol.data_received  # type: ignore[attr-defined]
        if getattr(self, "_conn", None) is not None:
            self._route_data()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return not self._closing and not self._paused

    def pause_reading(self) -> None:
        if not self.is_reading():
            return
        self._paused = True
        if self._conn is not None:
            self._conn.pause_reading()

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._conn is not None:
            self._conn.resume_reading()
        if self._eof_pending and self._aloop is not None:
            self._aloop.call_soon(self._deliver_eof)

    def _write_py(self, data: Any) -> None:
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"data argument must be a bytes-like object, "
                                f"not {type(data).__name__!r}")
            data = bytes(data)  # (a bytes subclass too: the core takes exact bytes)
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._sending_file:
            raise RuntimeError("unable to write; sendfile is in progress")
        if not data:
            return
        conn = self._conn
        if self._conn_lost or self._closing or conn is None or conn._wclosed:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                _logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        if conn._core is not None:
            # The accelerator's write: into the C core's queue, and
            # conn._queued is everything the core holds, this write included.
            conn.write(data)
            queued = conn._queued
        else:
            wb = conn._wbuf
            if not wb:
                self._unsent = 0  # the last iteration's writes went to the core
                conn._loop._dirty.append(conn)
            wb.append(data)
            self._unsent += len(data)
            # conn._queued is what the core held after the last send: never
            # less than it holds now, so this test never misses a pause.
            queued = self._unsent + conn._queued
        if queued > self._high_water and not self._protocol_paused:
            # Past the high-water mark: send now and pause the protocol only
            # for what the kernel did not take, as asyncio's transports do
            # (a big write the socket accepts whole must not pause it).
            conn._flush_now()  # sets conn._queued
            self._unsent = 0
            if conn._queued > self._high_water:
                self._maybe_pause_protocol()

    write = _write_py  # an instance's own ``write`` may be the C one (on_open)

    def writelines(self, list_of_data: Any) -> None:
        if self._eof:
            raise RuntimeError("Cannot call writelines() after write_eof()")
        # All or nothing, as asyncio's (which joins them first): an item
        # that is not bytes-like raises before anything is written.
        items = list_of_data if type(list_of_data) is list else list(list_of_data)
        for data in items:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"data argument must be a bytes-like object, "
                                f"not {type(data).__name__!r}")
        write = self.write
        for data in items:
            write(data)

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        self._eof = True
        self._gate()
        if self._conn is not None:
            self._conn.shutdown_write()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        conn = self._conn
        return conn.write_buffer_size if conn is not None else 0

    def _set_write_buffer_limits(self, high: Optional[int] = None,
                                 low: Optional[int] = None) -> None:
        super()._set_write_buffer_limits(high, low)
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.set_write_limits(self._high_water, self._low_water)
            self._gate()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._gate()
        conn = self._conn
        if conn is not None:
            conn._flush_now()
            drained = conn._cid >= 0 and conn.write_buffer_size == 0
            conn.close()
            if drained:
                self._lose_soon(None)

    def abort(self) -> None:
        self._closing = True
        self._gate()
        if self._conn is not None:
            self._conn.abort()
            self._lose_soon(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        loop = self._aloop
        if not isinstance(exc, OSError) and loop is not None:
            loop.call_exception_handler({
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })
        conn = self._conn
        if conn is not None:
            if conn._exc is None:
                conn._exc = exc
            self._closing = True
            self._gate()
            conn.abort()
            self._lose_soon(exc)

    # -- loop.sendfile() -----------------------------------------------------

    async def _sendfile(self, file: Any, offset: int, count: Optional[int]) -> int:
        """The native path of ``loop.sendfile``: once the core's queue is
        empty, ``os.sendfile`` on the connection's fd; write() raises
        meanwhile, as asyncio's does.  Raises SendfileNotAvailableError
        (loop.sendfile then falls back) when nothing could be sent."""
        if not hasattr(os, "sendfile"):
            raise asyncio.SendfileNotAvailableError("os.sendfile() is not available")
        try:
            fileno = file.fileno()
            fsize = os.fstat(fileno).st_size
        except (AttributeError, io.UnsupportedOperation, OSError):
            raise asyncio.SendfileNotAvailableError("not a regular file") from None
        blocksize = count if count else fsize
        if not blocksize:
            return 0  # an empty file
        total = 0
        self._sending_file = True
        self._gate()
        try:
            await self._flushed()
            while not count or total < count:
                if count:
                    blocksize = count - total
                conn = self._live_conn()
                try:
                    sent = os.sendfile(conn._fd, fileno, offset, blocksize)
                except BlockingIOError:
                    chunk = os.pread(fileno, min(blocksize, _SENDFILE_CHUNK), offset)
                    if not chunk:
                        break
                    conn.write(chunk)
                    conn._flush_now()
                    offset += len(chunk)
                    total += len(chunk)
                    await self._flushed()
                    continue
                except OSError as exc:
                    if total == 0:
                        raise asyncio.SendfileNotAvailableError(
                            "os.sendfile call failed") from exc
                    if exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                        exc = ConnectionError(errno.ENOTCONN, "socket is not connected")
                    # Part of the file went: the stream cannot be resumed.
                    self._fatal_error(exc, "Fatal error in sendfile")
                    raise exc from None
                if sent == 0:
                    break  # end of file
                offset += sent
                total += sent
                await asyncio.sleep(0)  # let the loop run between sends
            return total
        finally:
            self._sending_file = False
            self._gate()
            last = self._conn
            if last is not None and last._cid >= 0:
                last.set_write_limits(self._high_water, self._low_water)
            if total > 0:
                os.lseek(fileno, offset, os.SEEK_SET)

    def _live_conn(self) -> Connection:
        conn = self._conn
        if conn is None or conn._cid < 0 or conn._closed:
            raise ConnectionError("connection closed while sendfile was in progress")
        return conn

    async def _flushed(self) -> None:
        """Wait until everything written so far has been sent."""
        conn = self._live_conn()
        conn._flush_now()
        if conn.write_buffer_size == 0:
            return
        loop = self._aloop
        assert loop is not None
        waiter = self._drain_waiter = loop.create_future()
        conn.set_write_limits(0, 0)  # the core reports DRAIN once its queue is empty
        try:
            await waiter
        finally:
            self._drain_waiter = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        conn = self._conn
        if conn is None or conn._cid < 0:
            return default
        if name == "peername":
            return conn.peername
        if name == "sockname":
            return conn.sockname
        if name == "socket":
            if self._sock is None:
                self._sock = socket.socket(fileno=conn._fd)
            return trsock.TransportSocket(self._sock)
        return default

    def __repr__(self) -> str:
        state = " closing" if self._closing else ""
        fd = self._conn._fd if self._conn is not None else -1
        return f"<fastmux._StreamTransport fd={fd}{state}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if not getattr(self, "_closing", True) and getattr(self, "_conn", None) is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)


class EventLoop(_SelectorEventLoop):  # type: ignore[misc]
    """An asyncio event loop whose stream I/O runs on fastmux's core.

    ``backend`` is as for ``fastmux.Loop``: "auto" (epoll with the C core,
    else the pure-Python select backend), "epoll" or "select"."""

    def __init__(self, backend: str = "auto") -> None:
        self._core = Loop(backend)
        self._core.set_exception_handler(
            lambda _core, context: self.call_exception_handler(context))
        super().__init__(_CoreSelector(self._core))

    @property
    def backend(self) -> str:
        """The native backend's name ("epoll" or "select")."""
        return self._core.backend

    def _run_once(self) -> None:
        super()._run_once()
        # Writes made by this iteration's callbacks leave now, one send per
        # transport, so that nothing waits for the next iteration's poll.
        core = self._core
        if core._dirty:
            core._flush()
        if core._fast is not None:
            core._fast.finish()

    def _write_to_self(self) -> None:
        # call_soon_threadsafe and friends: the core's eventfd (one syscall,
        # collapsed while a wake-up is pending) instead of the self-pipe.
        core = self._core
        if not core.is_closed():
            core._backend.wakeup()

    # sock_recvfrom / sock_recvfrom_into / sock_sendto came with Python 3.11;
    # on 3.10 fastmux's loop has them too, over the same watches.
    if not hasattr(_SelectorEventLoop, "sock_sendto"):

        async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> Tuple[bytes, Any]:
            """Receive a datagram: (data, address)."""
            result: Tuple[bytes, Any] = await self._sock_io(sock, False, sock.recvfrom, bufsize)
            return result

        async def sock_recvfrom_into(self, sock: socket.socket, buf: Any,
                                     nbytes: int = 0) -> Tuple[int, Any]:
            """Receive a datagram into `buf`: (nbytes, address)."""
            result: Tuple[int, Any] = await self._sock_io(
                sock, False, sock.recvfrom_into, buf, nbytes or len(buf))
            return result

        async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
            """Send a datagram to `address`; returns the bytes sent."""
            result: int = await self._sock_io(sock, True, sock.sendto, data, address)
            return result

    async def _sock_io(self, sock: socket.socket, write: bool,
                       op: Callable[..., Any], *args: Any) -> Any:
        """``op(*args)`` now, or once `sock` is readable (writable)."""
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        try:
            return op(*args)
        except (BlockingIOError, InterruptedError):
            pass
        fut = self.create_future()
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)

        def ready() -> None:
            if fut.done():
                return
            try:
                result = op(*args)
            except (BlockingIOError, InterruptedError):
                return  # not yet: the watch is level-triggered
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        if write:
            self._add_writer(fd, ready)
            fut.add_done_callback(lambda _: self._remove_writer(fd))
        else:
            self._add_reader(fd, ready)
            fut.add_done_callback(lambda _: self._remove_reader(fd))
        return await fut

    def _make_socket_transport(self, sock: socket.socket, protocol: asyncio.BaseProtocol,
                               waiter: Optional["asyncio.Future[None]"] = None, *,
                               extra: Optional[Dict[str, Any]] = None,
                               server: Optional[_Server] = None) -> asyncio.Transport:
        self._ensure_fd_no_transport(sock)
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A stream socket was expected, got {sock!r}")
        extra = dict(extra) if extra else {}
        # As asyncio does: the addresses are known now and stay known after
        # the connection is gone.
        try:
            extra.setdefault("sockname", sock.getsockname())
        except OSError:
            pass
        try:
            extra.setdefault("peername", sock.getpeername())
        except OSError:
            pass
        # The caller's socket object stays the transport's socket, usable
        # (setsockopt, getsockname) while the connection lives, as with
        # asyncio's transports: the core owns the fd through a stand-in
        # object (explicit family/type/proto: no syscalls to make it), and
        # on_close detaches the caller's object once the core has closed it.
        extra["socket"] = trsock.TransportSocket(sock)
        transport = _StreamTransport(self, protocol, extra, server, waiter)
        transport._sock = sock
        _set_nodelay(sock)
        stand_in = socket.socket(sock.family, sock.type, sock.proto, sock.fileno())
        try:
            # The core queues writes made before the connection is up.
            transport._conn = self._core.connect(None, lambda: transport, framing=_RAW,
                                                 sock=stand_in, max_write_buffer=None)
        except BaseException:
            if stand_in.fileno() < 0:
                sock.detach()  # the core took the fd and closed it
            else:
                stand_in.detach()
            transport._sock = None
            raise
        return transport

    async def _sendfile_native(self, transp: asyncio.Transport, file: Any, offset: int,
                               count: Optional[int]) -> int:
        if isinstance(transp, _StreamTransport):
            return await transp._sendfile(file, offset, count)
        result: int = await super()._sendfile_native(transp, file, offset, count)
        return result

    def _start_serving(self, protocol_factory: Callable[[], asyncio.BaseProtocol],
                       sock: socket.socket, sslcontext: Any = None,
                       server: Optional[_Server] = None, backlog: int = 100,
                       *args: Any) -> None:
        if sslcontext is not None:
            # TLS: asyncio's own accept path and SSL transports, over the
            # core's watches.
            super()._start_serving(protocol_factory, sock, sslcontext, server, backlog, *args)
            return
        core = self._core
        sock.setblocking(False)
        lid = core._backend.listener_add(sock.fileno(), core._framing_id(_RAW), -1)
        core._backend.listener_set(lid, 0, 0.0)
        core._servers[lid] = _Listener(self, sock, lid, protocol_factory, server)  # type: ignore[assignment]

    def _stop_serving(self, sock: socket.socket) -> None:
        core = self._core
        for listener in list(core._servers.values()):
            if isinstance(listener, _Listener) and listener._sock is sock:
                listener.close()
                break
        # asyncio's own: removes the reader of a TLS listener, closes the
        # socket and, from 3.13 on, unlinks a Unix server's path.
        super()._stop_serving(sock)

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        super().close()
        self._core.close()


def _set_nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == socket.IPPROTO_TCP:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def new_event_loop() -> EventLoop:
    """A new fastmux asyncio event loop (a zero-argument loop factory, for
    ``asyncio.run(..., loop_factory=...)`` and ``uvicorn --loop``)."""
    return EventLoop()


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """An event loop policy whose loops are fastmux's (see ``install``)."""

    def _loop_factory(self) -> EventLoop:
        return EventLoop()


def install() -> None:
    """Make asyncio create fastmux loops from now on, as ``uvloop.install()``
    does: ``asyncio.set_event_loop_policy(fastmux.EventLoopPolicy())``."""
    asyncio.set_event_loop_policy(EventLoopPolicy())


def run(main: Coroutine[Any, Any, _T], *, debug: Optional[bool] = None) -> _T:
    """``asyncio.run(main)`` on a fastmux loop, on every supported Python."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=new_event_loop, debug=debug) as runner:
            result: _T = runner.run(main)
            return result
    return _run_310(main, debug)


def _run_310(main: Coroutine[Any, Any, _T], debug: Optional[bool]) -> _T:
    """What asyncio.run does on 3.10, with a fastmux loop."""
    if asyncio.events._get_running_loop() is not None:
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    if not asyncio.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        result: _T = loop.run_until_complete(main)
        return result
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    to_cancel = asyncio.all_tasks(loop)
    if not to_cancel:
        return
    for task in to_cancel:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*to_cancel, return_exceptions=True))
    for task in to_cancel:
        if task.cancelled():
            continue
        if task.exception() is not None:
            loop.call_exception_handler({
                "message": "unhandled exception during asyncio.run() shutdown",
                "exception": task.exception(),
                "task": task,
            })

