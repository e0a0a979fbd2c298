"""The backend seam: what the loop asks of an I/O core, and how one is chosen.

A backend owns all I/O on the fds handed to it.  ``_loop.Loop`` is written once
on top of this protocol; ``_epoll.EpollBackend`` forwards each method to the C
core (csrc/fastmux.h, one cffi call each) and ``_select.SelectBackend``
implements the very same semantics in pure Python on ``selectors``.  The
select backend is the behavioural oracle: whatever it does, the C core does.

Ids
    Connections, listeners and watches are named by small non-negative ints
    ("slots").  A connection id stays valid, and is not reused, until the
    loop has been handed the EV_CLOSED event for it *and* the next ``poll``
    has started.  Calls on a connection that has closed are harmless: they
    return a negative errno (EBADF/EPIPE) and do nothing.

The batch
    ``poll(timeout)`` returns ``(n, ev, blob)``: n events laid out flat in the
    sequence ``ev`` -- ``ev[4*i:4*i+4]`` is ``(kind, id, start, end)`` -- plus
    one ``bytes`` object.  For EV_MSG the payload is ``blob[start:end]``.
    Events of one connection are in stream order; ACCEPT/CONNECTED come
    before any MSG of that connection; CLOSED is its last event.  Event
    kinds and the meaning of start/end are the ``EV_*`` constants below
    (fastmux/_constants.py, the same numbers as FM_EV_* in fastmux.h).

Reading (edge-triggered rules, identical on both backends)
    * A readable connection is read until EAGAIN, a short read, EOF, or its
      per-poll budget (READ_BUDGET bytes); a connection stopped early is
      remembered on the core's ready list and the next poll does not block.
    * Bytes are split by the connection's framing (see ``framing_new``);
      complete messages become EV_MSG, an incomplete tail is kept.  A message
      over ``max_size`` (or a length header announcing more) closes the
      connection: messages before it are delivered, then
      EV_CLOSED(start=0, end=R_TOOLARGE).  When messages of that connection
      precede it in the same batch, the verdict waits one poll, because
      their handler may change the framing (a header, then ``Fixed(n)``
      for its body); the next poll splits the rest with whatever framing is
      then in force.
    * Peer FIN: after every complete message, one EV_EOF (the incomplete
      tail is discarded).  The connection stays writable.  EV_EOF is not
      delivered while the connection is paused.
    * A read/write error (reset, broken pipe): messages already read are
      delivered, then EV_CLOSED(start=errno, end=R_ERROR); the fd is closed.
    * A paused connection is neither read nor framed; ``resume`` puts it on
      the ready list so buffered bytes are framed and delivered even if no
      new byte arrives.

Writing
    * ``send(cid, data)`` appends to the connection's output queue and, if
      the queue was empty and the connection is connected, sends at once
      (MSG_NOSIGNAL); only the unsent tail stays queued and goes out when the
      socket is writable.  Returns the bytes still queued, or -errno when the
      connection cannot send any more (closed, closing, shut down, reset).
      The caller (the loop) coalesces: it calls send once per connection per
      iteration with everything written during that iteration.
    * Before a connecting connection is up, sent data is queued.
    * Write limits (default high 64 KiB, low 16 KiB): once the queue has
      exceeded ``high``, EV_DRAIN is emitted once when it falls to ``low``
      or below.  ``max_write_buffer`` (0: unlimited): a queue above it
      closes the connection with EV_CLOSED(end=R_WBUFFULL).

Closing
    * ``close(cid)``: stop reading, flush the queue, then close the fd and
      emit EV_CLOSED(0, R_NONE) (or (errno, R_ERROR) if flushing fails).
    * ``abort(cid)``: close the fd now, drop the queue; EV_CLOSED(0, R_NONE)
      is emitted by the next poll.
    * ``shutdown(cid)``: shutdown(SHUT_WR) once the queue is empty.
    * Every connection gets exactly one EV_CLOSED.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Protocol, Sequence, Tuple

from ._errors import BackendUnavailable

Batch = Tuple[int, Sequence[int], bytes]


class FastPath(Protocol):
    """The optional fast path (csrc/speedups.c's Core): a backend whose
    batch stays in native memory, whose message loop runs natively and whose
    connections write into its own output queue.  The loop then calls
    ``iterate`` instead of ``poll``, reads the events it leaves (every kind
    but EV_MSG) with ``event`` and ends each iteration with ``finish``;
    ``Connection`` objects bound to it (``_bind``) write through it."""

    def iterate(self, timeout: float | None) -> tuple[int, int, Exception | None]:
        """Send what was queued, poll like ``poll`` (keeping the batch),
        then deliver the EV_MSG events from the start as ``dispatch(0)``.
        Returns (events in the batch, ``dispatch``'s index, exception)."""

    def dispatch(self, i: int) -> tuple[int, Exception | None]:
        """Deliver the EV_MSG events from index i on, as ``Loop._dispatch``
        does, to the loop's connections; stop at the first other event.
        Returns the index of the first event not handled and the Exception
        a handler raised (then the event before that index was the one that
        raised)."""

    def finish(self) -> None:
        """Send what the iteration wrote (one send per connection)."""

    def flush_conn(self, cid: int) -> int:
        """Send one connection's queued writes now: the bytes it still holds,
        or -errno once it cannot send."""

    def detach(self) -> None:
        """The backend is being closed: the fast path must not touch it."""

    def event(self, i: int) -> tuple[int, int, int, int]:
        """Event i of the batch: (kind, id, start, end)."""


class Backend(Protocol):
    """The methods a backend provides.  See the module docstring.

    A new backend (io_uring, kqueue) implements these and passes the suite
    and tests/test_conformance.py; ``fast_path`` may return None."""

    name: str

    def poll(self, timeout: float | None) -> Batch:
        """Wait up to `timeout` seconds (None: forever) and do all ready I/O."""

    def fast_path(self, conns: list[Any]) -> FastPath | None:
        """The backend's native message loop over the loop's connection
        table `conns` (by id, kept up to date in place), or None (see
        FastPath)."""

    def has_pending(self) -> bool:
        """True if the next poll has work without waiting (ready list, events)."""

    def wakeup(self) -> None:
        """Make a blocked or the next poll return; safe from any thread."""

    def set_timer(self, deadline: float | None) -> None:
        """Make fileno() readable at monotonic time `deadline` (None: never)."""

    def fileno(self) -> int:
        """An fd readable whenever poll(0) has work; NotImplementedError if none."""

    def framing_new(self, kind: int, max_size: int, n: int, sep: bytes,
                    little_endian: bool) -> int:
        """Register a framing; n is the header size (LENGTH) or size (FIXED)."""

    def listener_add(self, fd: int, framing: int, max_connections: int) -> int:
        """Accept on fd (borrowed, never closed); max_connections < 0: none."""

    def listener_set(self, lid: int, max_write_buffer: int, idle_timeout: float) -> None:
        """Options applied to connections accepted from now on."""

    def listener_remove(self, lid: int) -> None: ...

    def conn_add(self, fd: int, framing: int, connecting: bool) -> int:
        """Take ownership of a connected (or connecting) non-blocking fd."""

    def conn_set(self, cid: int, max_write_buffer: int, idle_timeout: float) -> None: ...

    def send(self, cid: int, data: bytes) -> int: ...

    def send_many(self, items: list[tuple[int, bytes]]) -> list[int]:
        """``send`` for each ``(cid, data)``; the results, in order (a
        connection that cannot send also reports EV_CLOSED)."""

    def close(self, cid: int) -> None: ...

    def abort(self, cid: int) -> None: ...

    def shutdown(self, cid: int) -> None: ...

    def pause(self, cid: int) -> None: ...

    def resume(self, cid: int) -> None: ...

    def set_framing(self, cid: int, framing: int) -> None: ...

    def pushback(self, cid: int, data: bytes, reemit_eof: bool) -> None: ...

    def set_write_limits(self, cid: int, high: int, low: int) -> None: ...

    def write_buffer_size(self, cid: int) -> int: ...

    def watch_add(self, fd: int, events: int) -> int:
        """Watch a foreign fd (never read, written or closed by the backend)
        for WATCH_READ/WATCH_WRITE, level-triggered: EV_WATCH(id, start=the
        ready bits) in every poll while it is ready.  OSError if the fd
        cannot be watched (EEXIST: it is already registered)."""

    def watch_set(self, wid: int, events: int) -> None:
        """Change what a watch waits for (0: nothing, for now)."""

    def watch_remove(self, wid: int) -> None: ...

    def stats(self) -> dict[str, int]:
        """Counters: accepted, rejected, bytes_in, bytes_out, reads, writes,
        polls, emfile, messages_in, connections_open."""

    def after_fork(self) -> None: ...

    def close_all(self) -> None:
        """Close every connection fd and the backend's own fds."""


def epoll_available() -> bool:
    """True if the compiled C core imports on this host."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        from . import _core  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, stacklevel: int = 1) -> str:
    """The backend `name` stands for here: "epoll" or "select".

    "auto" is FASTMUX_BACKEND if set, else "epoll" when the C core imports,
    else "select" -- with a RuntimeWarning (once per process, pointing
    `stacklevel` frames above the caller, as ``warnings.warn`` counts) when
    that fallback happens on Linux and nobody asked for pure Python.
    Raises ValueError for an unknown name and BackendUnavailable for
    "epoll" where the core is missing."""
    if name == "auto":
        forced = os.environ.get("FASTMUX_BACKEND")
        if forced:
            name = forced
        elif epoll_available():
            return "epoll"
        else:
            _warn_pure_fallback(stacklevel + 2)
            return "select"
    if name == "epoll":
        if not epoll_available():
            raise BackendUnavailable(
                "the epoll backend needs Linux and the compiled C core "
                "(fastmux._core); reinstall without FASTMUX_PURE=1 on Linux "
                "with a C compiler"
            )
        return name
    if name == "select":
        return name
    raise ValueError(f"unknown backend {name!r}: expected 'auto', 'epoll' or 'select'")


def make_backend(name: str) -> Backend:
    """Build the backend called `name` ("auto", "epoll" or "select")."""
    name = resolve_backend(name, stacklevel=3)  # make_backend <- Loop() <- user
    if name == "epoll":
        from ._epoll import EpollBackend

        return EpollBackend()
    from ._select import SelectBackend

    return SelectBackend()


# Set once the fallback warning has been given (a forked worker inherits it).
_fallback_warned = False


def _warn_pure_fallback(stacklevel: int) -> None:
    """Say once per process that "auto" fell back to select on Linux.

    Nobody asked for it (FASTMUX_PURE=1 and FASTMUX_BACKEND=select at run
    time are the two ways to ask), so the C core is missing by accident: most
    often Python runs from a source tree that was never built, whose
    ``fastmux/`` shadows an installed copy.  Benchmarking that by mistake
    measures the pure-Python fallback."""
    global _fallback_warned
    if _fallback_warned or not sys.platform.startswith("linux"):
        return
    if os.environ.get("FASTMUX_PURE") == "1":
        return
    cause = _fallback_cause(os.path.dirname(os.path.abspath(__file__)))
    if cause is None:
        return
    _fallback_warned = True
    warnings.warn(
        "fastmux: the compiled epoll core (fastmux._core) does not import, so "
        f"Loop() uses the slower pure-Python select backend: {cause}. "
        "To choose the select backend on purpose, set FASTMUX_BACKEND=select "
        "(or FASTMUX_PURE=1).", RuntimeWarning, stacklevel=stacklevel)


def _fallback_cause(pkg: str) -> str | None:
    """Why the package at `pkg` has no C core, or None if that was chosen."""
    if os.path.exists(os.path.join(os.path.dirname(pkg), "csrc", "fastmux.h")):
        return (f"fastmux is imported from the source tree {pkg}, where the C core "
                "was never built (an installed fastmux, if any, is shadowed by it); "
                "build it in place with `python setup.py build_ext --inplace`, "
                "install with `pip install -e .`, or run from another directory")
    if any(name.startswith("_core.") for name in os.listdir(pkg)):
        return (f"the fastmux installed at {pkg} has a C core that does not load; "
                "reinstall it on Linux with a C compiler")
    # Installed without the core (FASTMUX_PURE=1, or a C build that failed
    # and said so at install): pure Python was chosen there.
    return None
