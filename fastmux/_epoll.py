"""EpollBackend: the C core behind the Backend protocol.

This is the only module that imports the cffi module ``fastmux._core``.
Each method is one cffi call.  ``poll`` makes one call per loop iteration
and turns the flat C batch into a list with one ``ffi.unpack`` plus one copy
of the message arena.  When the accelerator is built (``fastmux._speedups``,
csrc/speedups.c, loaded by fastmux/_loop.py), ``fast_path`` returns its
``Core`` over this loop: the loop then iterates through it, messages go to
handlers straight from the arena and connections write into the core's
queue, all without cffi.
"""

from __future__ import annotations

import errno as _errno
import os
import threading
from typing import Any

from ._backend import Batch
from ._constants import SHARED
from ._core import ffi, lib  # type: ignore[import-not-found]
from ._speedups_load import speedups

_unpack = ffi.unpack
_buffer = ffi.buffer


def _check(rc: int) -> int:
    if rc < 0 and rc != -_errno.EBADF:
        raise OSError(-rc, os.strerror(-rc))
    return rc


class EpollBackend:
    """The edge-triggered epoll core (csrc/)."""

    name = "epoll"

    def __init__(self) -> None:
        loop = lib.fm_loop_new()
        if loop == ffi.NULL:
            e = ffi.errno
            raise OSError(e, f"fastmux: cannot create the epoll loop: {os.strerror(e)}")
        self._loop = loop
        self._batch = lib.fm_loop_batch(loop)
        self._ev = self._batch.ev  # fixed for the loop's life
        self._core: Any = None  # the accelerator's Core, once fast_path made it
        self._stats = lib.fm_loop_stats(loop)
        self._poll = lib.fm_poll
        self._send = lib.fm_send
        self._closed = False
        self._wake_lock = threading.Lock()

    def poll(self, timeout: float | None) -> Batch:
        n = self._poll(self._loop, _timeout_ms(timeout))
        if n <= 0:
            if n < 0:
                raise OSError(-n, os.strerror(-n))
            return 0, (), b""
        b = self._batch
        used = b.used
        return n, _unpack(self._ev, 4 * n), _unpack(b.arena, used) if used else b""

    def fast_path(self, conns: list[Any]) -> Any:
        """The accelerator's Core over this loop (see _backend.FastPath), or
        None when it is not built or FASTMUX_NO_SPEEDUPS=1."""
        if speedups is None:
            return None
        api = int(ffi.cast("uintptr_t", lib.fm_api_table()))
        loop = int(ffi.cast("uintptr_t", self._loop))
        self._core = speedups.Core(api, loop, conns)
        return self._core

    def has_pending(self) -> bool:
        return bool(lib.fm_has_pending(self._loop))

    def wakeup(self) -> None:
        # Any thread: the lock keeps a wake-up from racing close_all()
        # into freed memory.
        with self._wake_lock:
            if not self._closed:
                lib.fm_wakeup(self._loop)

    def set_timer(self, deadline: float | None) -> None:
        # int64 nanoseconds: a deadline past ~292 years is "never".
        ns = -1 if deadline is None or deadline >= 9e9 else int(deadline * 1e9)
        lib.fm_set_timer(self._loop, ns)

    def fileno(self) -> int:
        return int(lib.fm_loop_fd(self._loop))

    def framing_new(self, kind: int, max_size: int, n: int, sep: bytes,
                    little_endian: bool) -> int:
        return _check(lib.fm_framing_new(self._loop, kind, max_size, n, sep, len(sep),
                                         int(little_endian)))

    def listener_add(self, fd: int, framing: int, max_connections: int) -> int:
        return _check(lib.fm_listener_add(self._loop, fd, framing, max_connections))

    def listener_set(self, lid: int, max_write_buffer: int, idle_timeout: float) -> None:
        lib.fm_listener_set(self._loop, lid, max_write_buffer, _ms(idle_timeout))

    def listener_remove(self, lid: int) -> None:
        lib.fm_listener_remove(self._loop, lid)

    def conn_add(self, fd: int, framing: int, connecting: bool) -> int:
        return _check(lib.fm_conn_add(self._loop, fd, framing, int(connecting)))

    def conn_set(self, cid: int, max_write_buffer: int, idle_timeout: float) -> None:
        lib.fm_conn_set(self._loop, cid, max_write_buffer, _ms(idle_timeout))

    def send(self, cid: int, data: bytes) -> int:
        return int(self._send(self._loop, cid, data, len(data)))

    def send_many(self, items: list[tuple[int, bytes]]) -> list[int]:
        send, loop = self._send, self._loop
        return [send(loop, cid, data, len(data)) for cid, data in items]

    def close(self, cid: int) -> None:
        lib.fm_close(self._loop, cid)

    def abort(self, cid: int) -> None:
        lib.fm_abort(self._loop, cid)

    def shutdown(self, cid: int) -> None:
        lib.fm_shutdown(self._loop, cid)

    def pause(self, cid: int) -> None:
        lib.fm_pause(self._loop, cid)

    def resume(self, cid: int) -> None:
        lib.fm_resume(self._loop, cid)

    def set_framing(self, cid: int, framing: int) -> None:
        lib.fm_set_framing(self._loop, cid, framing)

    def pushback(self, cid: int, data: bytes, reemit_eof: bool) -> None:
        lib.fm_pushback(self._loop, cid, data, len(data), int(reemit_eof))

    def set_write_limits(self, cid: int, high: int, low: int) -> None:
        lib.fm_set_write_limits(self._loop, cid, high, low)

    def write_buffer_size(self, cid: int) -> int:
        return int(lib.fm_write_buffer_size(self._loop, cid))

    def watch_add(self, fd: int, events: int) -> int:
        return _check(lib.fm_watch_add(self._loop, fd, events))

    def watch_set(self, wid: int, events: int) -> None:
        _check(lib.fm_watch_set(self._loop, wid, events))

    def watch_remove(self, wid: int) -> None:
        lib.fm_watch_remove(self._loop, wid)

    def stats(self) -> dict[str, int]:
        s = self._stats
        return {
            "accepted": s.accepted,
            "rejected": s.rejected,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "reads": s.reads,
            "writes": s.writes,
            "polls": s.polls,
            "emfile": s.emfile,
            "messages_in": s.messages_in,
            "connections_open": s.connections_open,
            "messages_out": s.messages_out,
        }

    def after_fork(self) -> None:
        lib.fm_loop_after_fork(self._loop)

    def close_all(self) -> None:
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
        if self._core is not None:
            self._core.detach()
        lib.fm_loop_free(self._loop)
        self._loop = ffi.NULL


def _timeout_ms(timeout: float | None) -> int:
    """epoll_wait's timeout: -1 forever, else milliseconds rounded up, so
    that the poll never returns before a timer is due."""
    if timeout is None:
        return -1
    if timeout <= 0:
        return 0
    return min(int(timeout * 1000.0) + 1, 0x7FFFFFFF)


def _ms(seconds: float) -> int:
    if seconds is None or seconds <= 0:
        return 0
    return max(1, int(seconds * 1000.0 + 0.5))


def core_constants() -> dict[str, int]:
    """The shared numbers as the compiled core has them, by the names of
    fastmux/_constants.py: limits through fm_const, the rest from the
    header's defines (tests compare them with _constants)."""
    out = {}
    for name in SHARED:
        selector = getattr(lib, "FM_CONST_" + name, None)
        out[name] = int(lib.fm_const(selector) if selector is not None
                        else getattr(lib, "FM_" + name))
    return out


def c_split(kind: int, max_size: int, n: int, sep: bytes, little: bool,
            buf: bytes, maxout: int = 1 << 20) -> tuple[list[bytes], int, bool]:
    """Run the C framer over `buf` (tests and the fuzzer): (messages,
    consumed, toolarge)."""
    cap = max(1, min(maxout, len(buf) + 1))
    starts = ffi.new("uint32_t[]", cap)
    ends = ffi.new("uint32_t[]", cap)
    consumed = ffi.new("size_t *")
    toolarge = ffi.new("int *")
    k = lib.fm_split(kind, max_size, n, sep, len(sep), int(little), buf, len(buf),
                     starts, ends, cap, consumed, toolarge)
    if k < 0:
        raise ValueError("bad framing parameters")
    return [buf[starts[i]:ends[i]] for i in range(k)], int(consumed[0]), bool(toolarge[0])
