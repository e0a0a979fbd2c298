"""Argument checks shared by the public entry points.

Every public call checks its arguments before it creates anything (a socket,
a socket file, a timer, a handler), so a bad argument raises at the call and
not later in a callback, a log line or a worker process: ``TypeError`` for
the wrong kind of value, ``ValueError`` for a value out of range, with a
message that names the argument.  The checks run above the backend seam, so
the epoll and select backends raise the same error for the same call.

The rules, the same for every entry point:

* An int argument is an ``int`` (or another ``numbers.Integral``); a bool is
  refused: ``Fixed(True)`` is a mistake, not a size of 1.
* A duration in seconds is an int or a float, finite.  "No limit" is spelled
  None, never 0 or a negative number.
* An address is ``(host, port)`` with an int port from 0 to 65535, or a Unix
  socket path: a ``bytes`` or ``os.PathLike`` value, or a ``str`` that
  contains a "/" (``"./app.sock"``, ``"/run/app.sock"``) or starts with NUL
  (Linux's abstract namespace).  Any other str -- ``"localhost:8080"``,
  ``"app.sock"`` -- is refused, so that a mistyped TCP address never becomes
  a socket file in the current directory.
"""

from __future__ import annotations

import math
import numbers
import os
import socket
from typing import Any, Dict

from ._backend import resolve_backend
from ._sockets import is_unix_path

#: Bounds a count or a byte size the core keeps in 64 bits, with room for
#: the loop's own arithmetic on it (the default high watermark is 4 * low).
MAX_COUNT = 2 ** 62

#: Bounds a timeout in seconds (about 31 years): its milliseconds must fit
#: the core's int64.
MAX_SECONDS = 1e9

#: Bounds listen(2)'s backlog, a C int.
MAX_BACKLOG = 0x7FFFFFFF

_LISTEN_OPTIONS = ("backlog", "max_connections", "idle_timeout", "max_write_buffer")


def check_int(value: Any, name: str, lo: int, hi: int, hint: str = "") -> int:
    """`value` as an int from `lo` to `hi`; TypeError for a non-int (or a
    bool), ValueError out of range.  `hint` ends the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}{hint}")
    v = int(value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be from {lo} to {hi}, got {v}{hint}")
    return v


def check_number(value: Any, name: str) -> float:
    """`value` as a finite float (a delay, a deadline, a poll timeout)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return v


def check_seconds(value: Any, name: str, *, zero_ok: bool = False) -> float:
    """`value` as a positive (or, with `zero_ok`, non-negative) timeout of at
    most MAX_SECONDS.  Callers let None through themselves: it means none."""
    v = check_number(value, name)
    if v < 0 or (v == 0 and not zero_ok) or v > MAX_SECONDS:
        what = ">= 0" if zero_ok else "> 0"
        extra = "" if zero_ok else "; None means no timeout"
        raise ValueError(f"{name} must be {what} seconds (at most {MAX_SECONDS:.0e}), "
                         f"got {value!r}{extra}")
    return v


def check_callable(value: Any, name: str) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")


def check_bytes(value: Any, name: str) -> bytes:
    """`value` (any bytes-like object) as bytes.  A str or an int is refused:
    ``bytes(5)`` would be five NUL bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        return bytes(memoryview(value))
    except TypeError:
        raise TypeError(f"{name} must be bytes-like (bytes, bytearray, memoryview), "
                        f"got {type(value).__name__} {value!r:.40}") from None


def check_address(address: Any) -> None:
    """Refuse what is neither ``(host, port)`` nor a Unix socket path."""
    if is_unix_path(address):
        if not os.fsdecode(address):
            raise ValueError("address: the Unix socket path is empty")
        return
    if isinstance(address, str):
        host, colon, port = address.rpartition(":")
        tcp = f"({host!r}, {port})" if colon and port.isdigit() else "(host, port)"
        raise ValueError(
            f"address {address!r} is not a Unix socket path: a str path must contain "
            f"a '/' (e.g. './{address}', or pass a pathlib.Path); for TCP pass {tcp}")
    if not isinstance(address, tuple):
        raise TypeError(f"address must be a (host, port) tuple or a Unix socket path, "
                        f"got {address!r}")
    if len(address) < 2:
        raise ValueError(f"address must be (host, port), got {address!r}")
    host = address[0]
    if host is not None and not isinstance(host, (str, bytes)):
        raise TypeError(f"address: host must be a str, got {host!r}")
    check_int(address[1], "port", 0, 65535)


def check_listen_args(address: Any, handler_factory: Any, framing: Any, *,
                      sock: Any = None, backlog: Any = 1024,
                      max_connections: Any = None, idle_timeout: Any = None,
                      max_write_buffer: Any = None, what: str = "listen()") -> None:
    """Everything ``Loop.listen`` and ``WorkerPool`` take, checked before a
    socket is made."""
    if sock is None:
        if address is None:
            raise ValueError(f"{what} needs an address or sock=")
        check_address(address)
    elif not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, got {sock!r}")
    check_callable(handler_factory, "handler_factory")
    check_framing(framing)
    check_int(backlog, "backlog", 0, MAX_BACKLOG)
    if max_connections is not None:
        check_int(max_connections, "max_connections", 0, MAX_COUNT, "; None means unlimited")
    check_conn_options(idle_timeout, max_write_buffer)


def check_connect_args(address: Any, handler_factory: Any, framing: Any, *,
                       sock: Any = None, timeout: Any = None, idle_timeout: Any = None,
                       max_write_buffer: Any = None) -> None:
    """Everything ``Loop.connect`` takes, checked before a socket is made."""
    if sock is None:
        if address is None:
            raise ValueError("connect() needs an address or sock=")
        check_address(address)
    elif not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, got {sock!r}")
    check_callable(handler_factory, "handler_factory")
    check_framing(framing)
    if timeout is not None:
        check_seconds(timeout, "timeout")
    check_conn_options(idle_timeout, max_write_buffer)


def check_conn_options(idle_timeout: Any, max_write_buffer: Any) -> None:
    if idle_timeout is not None:
        check_seconds(idle_timeout, "idle_timeout")
    if max_write_buffer is not None:
        check_int(max_write_buffer, "max_write_buffer", 1, MAX_COUNT, "; None means unlimited")


def check_framing(framing: Any) -> None:
    from ._framing import Framing  # _framing imports this module

    if framing is not None and not isinstance(framing, Framing):
        raise TypeError(f"framing must be a framing spec, got {framing!r}")


def check_pool_args(address: Any, handler_factory: Any, framing: Any, backend: Any,
                    listen_options: Dict[str, Any]) -> None:
    """Everything ``WorkerPool`` (and so ``serve``) takes, checked in the
    calling process before anything is bound or forked.  An "auto" backend
    is resolved here too, so a missing C core is reported once, by the
    supervisor, and not by every worker."""
    for name in listen_options:
        if name not in _LISTEN_OPTIONS:
            raise TypeError(f"WorkerPool got an unexpected listen option {name!r}")
    if address is None:
        raise ValueError("WorkerPool needs an address")
    check_listen_args(address, handler_factory, framing, what="WorkerPool", **listen_options)
    resolve_backend(backend, stacklevel=3)
