"""Test helpers: bounded waits, plain-socket peers, recording handlers.

Nothing here sleeps and hopes: every wait drives the loop with
``run_once`` and gives up with an AssertionError at a deadline.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import Any, Callable, Iterable

import fastmux

#: Upper bound of any single wait in the suite, in seconds.
DEADLINE = 10.0

NOT_CLOSED = object()  # Recorder.close_exc before on_close ran


def run_until(loop: fastmux.Loop, predicate: Callable[[], Any], timeout: float = DEADLINE,
              *, peers: Iterable["Peer"] = (), what: str | None = None,
              step: float = 0.05) -> None:
    """Run ``loop.run_once(step)`` until ``predicate()`` is true.

    Plain-socket `peers` are stepped (flush output, read input) every
    iteration, so a test drives clients and the loop in one thread.  Raises
    AssertionError after `timeout` seconds."""
    peers = list(peers)
    if peers:
        step = min(step, 0.01)  # a peer may have more to send at any moment
    deadline = time.monotonic() + timeout
    while True:
        for p in peers:
            p.step()
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        loop.run_once(step)


def spin(loop: fastmux.Loop, iterations: int = 5, step: float = 0.01,
         peers: Iterable["Peer"] = ()) -> None:
    """Run a few bounded iterations -- used to show that something does NOT happen."""
    peers = list(peers)
    for _ in range(iterations):
        for p in peers:
            p.step()
        loop.run_once(step)


def pattern(n: int, seed: int = 0) -> bytes:
    """n deterministic pseudo-random bytes (distinct per seed)."""
    return random.Random(seed).randbytes(n)


def family_of(address: Any) -> int:
    if isinstance(address, str):
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


class Peer:
    """A plain non-blocking socket on the other end of a fastmux connection.

    ``send`` queues and flushes what the kernel takes; ``step`` flushes and
    reads; ``received``/``eof``/``error`` tell what the peer has seen."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.received = bytearray()
        self.eof = False
        self.error: OSError | None = None
        self._out = bytearray()

    @classmethod
    def connect(cls, address: Any, *, rcvbuf: int | None = None,
                sndbuf: int | None = None) -> "Peer":
        s = socket.socket(family_of(address), socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if sndbuf is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            # Loopback connects complete in the kernel (the listener's accept
            # queue), without the loop running.
            s.settimeout(5)
            s.connect(address)
        except BaseException:
            s.close()
            raise
        return cls(s)

    @property
    def pending(self) -> int:
        """Bytes queued by send() that the kernel has not taken yet."""
        return len(self._out)

    @property
    def done(self) -> bool:
        """The peer has seen EOF or an error."""
        return self.eof or self.error is not None

    def send(self, data: bytes) -> None:
        self._out += data
        self.flush()

    def flush(self) -> None:
        while self._out and self.error is None:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.error = e
                return
            del self._out[:n]

    def pump(self) -> None:
        while not self.eof and self.error is None:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.error = e
                return
            if not data:
                self.eof = True
                return
            self.received += data

    def step(self) -> None:
        self.flush()
        self.pump()

    def shutdown_write(self) -> None:
        assert not self._out, "shutdown_write with unsent output"
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


class Recorder(fastmux.Handler):
    """A handler that records every callback, in order.

    Subclasses add behaviour and call ``super()``.  ``events`` holds tuples:
    ("open",), ("message", data), ("eof",), ("drain",), ("close", exc)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []
        self.messages: list[bytes] = []
        self.conn: Any = None
        self.close_conn: Any = None
        self.close_exc: Any = NOT_CLOSED
        self.close_count = 0
        self.eof_count = 0
        self.drain_count = 0
        self.open_count = 0

    @property
    def opened(self) -> bool:
        return self.open_count > 0

    @property
    def closed(self) -> bool:
        return self.close_count > 0

    @property
    def data(self) -> bytes:
        return b"".join(self.messages)

    def on_open(self, conn: Any) -> None:
        self.open_count += 1
        self.conn = conn
        self.events.append(("open",))

    def on_message(self, conn: Any, data: bytes) -> None:
        assert type(data) is bytes, type(data)
        self.messages.append(data)
        self.events.append(("message", data))

    def on_eof(self, conn: Any) -> Any:
        self.eof_count += 1
        self.events.append(("eof",))
        return None

    def on_drain(self, conn: Any) -> None:
        self.drain_count += 1
        self.events.append(("drain",))

    def on_close(self, conn: Any, exc: Any) -> None:
        self.close_count += 1
        self.close_conn = conn
        self.close_exc = exc
        self.events.append(("close", exc))

    def assert_closed_once(self, exc_type: type | None = None) -> None:
        """on_close ran exactly once, last, with `exc_type` (None: exc is None)."""
        assert self.close_count == 1, self.events
        assert self.events[-1][0] == "close", self.events
        if self.conn is not None:
            assert self.close_conn is self.conn
        if exc_type is None:
            assert self.close_exc is None, repr(self.close_exc)
        else:
            assert isinstance(self.close_exc, exc_type), repr(self.close_exc)


class Echo(Recorder):
    """Writes every message back (with the framing's terminator if given)."""

    suffix = b""

    def on_message(self, conn: Any, data: bytes) -> None:
        super().on_message(conn, data)
        conn.write(data + self.suffix)


class Factory:
    """A handler_factory that remembers the handlers it made, in order."""

    def __init__(self, cls: type = Recorder, *args: Any, **kwargs: Any) -> None:
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.made: list[Any] = []

    def __call__(self) -> Any:
        h = self.cls(*self.args, **self.kwargs)
        self.made.append(h)
        return h

    @property
    def opened(self) -> list[Any]:
        return [h for h in self.made if h.opened]

    def __getitem__(self, i: int) -> Any:
        return self.made[i]

    def __len__(self) -> int:
        return len(self.made)


def dup_socket(fd: int) -> socket.socket:
    """A socket object on a dup of `fd`: setsockopt/getsockopt on it act on
    the same kernel socket; closing it closes only the dup."""
    import os
    return socket.socket(fileno=os.dup(fd))


class ThreadRunner:
    """Runs functions in threads and joins them (bounded) at the end."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        def body() -> None:
            try:
                fn(*args)
            except BaseException as e:  # reported by join_all
                self.errors.append(e)

        t = threading.Thread(target=body, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def join_all(self, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in self.threads if t.is_alive()]
        assert not alive, f"threads still running: {alive}"
        if self.errors:
            raise self.errors[0]


def close_if_open(sock: socket.socket) -> None:
    """Close a socket handed to fastmux with sock=, unless fastmux already
    closed its fd (which is not specified); never closes an fd reused since."""
    import os
    fd = sock.fileno()
    if fd == -1:
        return
    try:
        os.fstat(fd)
    except OSError:
        sock.detach()
    else:
        sock.close()


def set_sockopt_on_fd(fd: int, level: int, opt: int, value: int) -> None:
    """setsockopt on the socket behind `fd` (through a dup; fd stays open)."""
    s = dup_socket(fd)
    try:
        s.setsockopt(level, opt, value)
    finally:
        s.close()


def get_sockopt_on_fd(fd: int, level: int, opt: int) -> int:
    s = dup_socket(fd)
    try:
        return s.getsockopt(level, opt)
    finally:
        s.close()
