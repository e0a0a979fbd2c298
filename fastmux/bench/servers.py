"""The servers under test of ``python -m fastmux bench``, one per process.

    python -m fastmux.bench.servers NAME MODE CPU

NAME is one of SERVERS, MODE one of "raw", "lines", "http" (or, for the
asyncio Protocol servers that speak TLS, "tls-raw" and "tls-http": the same
under ``ssl=``, with the certificate and key named by the environment
variables FASTMUX_BENCH_CERT and FASTMUX_BENCH_KEY), CPU the CPU to pin to
(-1: leave the affinity alone).  The server listens on 127.0.0.1 on a
free port, prints ``READY <port>`` on stdout and serves until it is killed
(the bench sends SIGTERM) or an hour passes.

The rule every Python server follows: a Python-level function runs per
message -- per read in "raw" mode, per line in "lines" mode, per request in
"http" mode -- and produces that message's answer.  What differs is only the
I/O machinery around it, which is what the bench compares.  No server echoes
in C on behalf of Python; only "c-et", the floor reference, is C throughout.

The asyncio Protocol servers ("asyncio", "uvloop", "rloop",
"asyncio-fastmux") are one Protocol class on four event loops (in the TLS
modes the same class under ``ssl=``, on the three loops with TLS).  The uvicorn
servers (HTTP only) are uvicorn with httptools serving a hello ASGI app, on
three loops; their per-request function is the app.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    import asyncio
    import ssl

#: The answer of every "http" server (the load generator checks the status
#: line, Content-Length and the body).
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\n"
            b"Hello, world!")

#: Bound on how long a server runs if nobody stops it.
MAX_SECONDS = 3600.0

#: What every server serves, and the TLS modes (the Protocol servers only).
PLAIN_MODES = ("raw", "lines", "http")
TLS_MODES = ("tls-raw", "tls-http")
MODES = PLAIN_MODES + TLS_MODES

#: The separator that ends a message in each framed mode.
_SEP = {"lines": b"\n", "http": b"\r\n\r\n", "tls-http": b"\r\n\r\n"}


def _listen() -> socket.socket:
    # Loopback only: the bench never serves another host.  proto=IPPROTO_TCP
    # as getaddrinfo gives it to create_server(host, port): asyncio sets
    # TCP_NODELAY only on sockets whose proto says TCP, and without it a
    # server that answers in two writes (uvicorn: head, then body) waits
    # for the client's delayed ACK, 40 ms per response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def _answer(mode: str) -> Callable[[bytes], bytes]:
    """The per-message handler of the peers: message in, answer out.  For
    "lines" the message includes its newline (peers slice it that way)."""
    if mode in ("http", "tls-http"):
        def http(request: bytes) -> bytes:
            return RESPONSE
        return http

    def echo(data: bytes) -> bytes:
        return data
    return echo


# -- fastmux ------------------------------------------------------------------

def serve_fastmux(sock: socket.socket, mode: str, backend: str) -> None:
    import fastmux

    class RawEcho(fastmux.Handler):
        def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
            conn.write(data)

    class LineEcho(fastmux.Handler):
        # Lines() strips the newline; the answer puts it back.
        def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
            conn.write(data + b"\n")

    class Hello(fastmux.Handler):
        def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
            conn.write(RESPONSE)

    handlers = {"raw": (RawEcho, fastmux.Raw()), "lines": (LineEcho, fastmux.Lines()),
                "http": (Hello, fastmux.Delimiter(b"\r\n\r\n"))}
    handler, framing = handlers[mode]
    with fastmux.Loop(backend=backend) as loop:
        loop.listen(None, handler, framing=framing, sock=sock)
        _ready(sock)
        loop.call_later(MAX_SECONDS, loop.stop)
        loop.run()


# -- asyncio / uvloop Protocol ------------------------------------------------

def _protocol_class(mode: str) -> type:
    import asyncio

    answer = _answer(mode)
    sep = _SEP.get(mode)

    class Proto(asyncio.Protocol):
        """The idiomatic Protocol: one transport.write per message."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.write = transport.write  # type: ignore[attr-defined]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            if sep is None:
                self.write(answer(data))
                return
            buf = self.buf + data if self.buf else data
            pos = 0
            while True:
                i = buf.find(sep, pos)
                if i < 0:
                    break
                end = i + len(sep)
                self.write(answer(buf[pos:end]))
                pos = end
            self.buf = buf[pos:]

    return Proto


#: The asyncio event loops the Protocol server runs on: name -> (module,
#: function) of the loop factory.  The same Protocol class on each, so the
#: loop is the only difference.
LOOPS: Dict[str, Tuple[str, str]] = {
    "asyncio": ("asyncio", "new_event_loop"),
    "uvloop": ("uvloop", "new_event_loop"),
    "rloop": ("rloop", "new_event_loop"),
    "fastmux": ("fastmux", "new_event_loop"),
}


def _new_loop(loop_name: str) -> "asyncio.AbstractEventLoop":
    import importlib

    module, func = LOOPS[loop_name]
    loop: asyncio.AbstractEventLoop = getattr(importlib.import_module(module), func)()
    return loop


def _tls_context() -> "ssl.SSLContext":
    """The TLS servers' context: the stdlib's defaults for a server, with the
    bench's throwaway certificate (tlsclient.make_cert)."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.environ["FASTMUX_BENCH_CERT"], os.environ["FASTMUX_BENCH_KEY"])
    return ctx


def serve_asyncio(sock: socket.socket, mode: str, loop_name: str) -> None:
    import asyncio

    loop = _new_loop(loop_name)
    asyncio.set_event_loop(loop)
    proto = _protocol_class(mode)
    port = sock.getsockname()[1]  # rloop's create_server takes the fd over
    sslcontext = _tls_context() if mode in TLS_MODES else None
    loop.run_until_complete(loop.create_server(proto, sock=sock, ssl=sslcontext))
    _ready(port)
    loop.call_later(MAX_SECONDS, loop.stop)
    loop.run_forever()


# -- uvicorn + httptools, hello ASGI app ------------------------------------------

#: uvicorn's --loop value for each loop (a "module:function" string is a
#: loop factory; uvicorn >= 0.36).
UVICORN_LOOPS = {"asyncio": "asyncio", "uvloop": "uvloop", "fastmux": "fastmux:new_event_loop"}


async def hello_app(scope: Dict[str, Any], receive: Callable[[], Awaitable[Any]],
                    send: Callable[[Dict[str, Any]], Awaitable[None]]) -> None:
    """The hello ASGI app: the per-request Python function of the uvicorn
    servers (uvicorn adds its date and server headers)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]})
    await send({"type": "http.response.body", "body": b"Hello, world!"})


def serve_uvicorn(sock: socket.socket, mode: str, loop_name: str) -> None:
    """uvicorn with its httptools parser serving `hello_app`, keep-alive, no
    access log, on the named loop.  HTTP only."""
    import asyncio
    import importlib

    # Typed as Any: mypy checks this module alike with and without the
    # optional package installed.
    uvicorn: Any = importlib.import_module("uvicorn")
    if mode != "http":
        raise SystemExit(f"uvicorn serves HTTP only, not {mode!r}")
    config = uvicorn.Config(hello_app, loop=UVICORN_LOOPS[loop_name], http="httptools",
                            interface="asgi3", lifespan="off", access_log=False,
                            log_level="warning", timeout_graceful_shutdown=1)

    class Server(uvicorn.Server):  # type: ignore[misc]  # (a subclass of Any)
        async def startup(self, sockets: Optional[List[socket.socket]] = None) -> None:
            await super().startup(sockets)
            asyncio.get_running_loop().call_later(MAX_SECONDS, setattr, self,
                                                  "should_exit", True)
            _ready(sock)

    Server(config).run(sockets=[sock])


# -- selectors, one send per read ---------------------------------------------

def serve_selectors(sock: socket.socket, mode: str) -> None:
    """Level-triggered selectors server: one recv per readable event, the
    handler per message, every answer of the read joined into one send."""
    import selectors
    import time

    answer = _answer(mode)
    sep = _SEP.get(mode)
    sel = selectors.DefaultSelector()
    sock.setblocking(False)
    sel.register(sock, selectors.EVENT_READ, None)

    class State:
        __slots__ = ("sock", "inbuf", "out")

        def __init__(self, s: socket.socket) -> None:
            self.sock = s
            self.inbuf = b""
            self.out = b""

    def close(st: State) -> None:
        sel.unregister(st.sock)
        st.sock.close()

    _ready(sock)
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline:
        for key, mask in sel.select(1.0):
            st: Optional[State] = key.data
            if st is None:
                for _ in range(128):
                    try:
                        c, _addr = sock.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(c, selectors.EVENT_READ, State(c))
                continue
            s = st.sock
            if mask & selectors.EVENT_WRITE:
                try:
                    n = s.send(st.out)
                except BlockingIOError:
                    n = 0
                except OSError:
                    close(st)
                    continue
                st.out = st.out[n:]
                if not st.out:
                    sel.modify(s, selectors.EVENT_READ, st)
            if not mask & selectors.EVENT_READ:
                continue
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                close(st)
                continue
            if not data:
                close(st)
                continue
            if sep is None:
                out = answer(data)
            else:
                buf = st.inbuf + data if st.inbuf else data
                answers: List[bytes] = []
                pos = 0
                while True:
                    i = buf.find(sep, pos)
                    if i < 0:
                        break
                    end = i + len(sep)
                    answers.append(answer(buf[pos:end]))
                    pos = end
                st.inbuf = buf[pos:]
                out = b"".join(answers)
            if not out:
                continue
            if st.out:
                st.out += out
                continue
            try:
                n = s.send(out)
            except BlockingIOError:
                n = 0
            except OSError:
                close(st)
                continue
            if n < len(out):
                st.out = out[n:]
                sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE, st)


# -- the tutorial edge-triggered select.epoll server --------------------------

def serve_python_et(sock: socket.socket, mode: str) -> None:
    """select.epoll the way tutorials teach it: EPOLLET, recv until
    BlockingIOError, one send per message."""
    import select
    import time

    answer = _answer(mode)
    sep = _SEP.get(mode)
    sock.setblocking(False)
    ep = select.epoll()
    lfd = sock.fileno()
    ep.register(lfd, select.EPOLLIN | select.EPOLLET)
    socks: Dict[int, socket.socket] = {}
    inbufs: Dict[int, bytes] = {}
    pending: Dict[int, bytes] = {}

    def close(fd: int) -> None:
        ep.unregister(fd)
        socks.pop(fd).close()
        inbufs.pop(fd, None)
        pending.pop(fd, None)

    def send(fd: int, data: bytes) -> None:
        if fd in pending:
            pending[fd] += data
            return
        try:
            n = socks[fd].send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            pending[fd] = data[n:]  # flushed on EPOLLOUT

    _ready(sock)
    deadline = time.monotonic() + MAX_SECONDS
    while time.monotonic() < deadline:
        for fd, ev in ep.poll(1.0):
            if fd == lfd:
                while True:
                    try:
                        c, _addr = sock.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    socks[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
                continue
            s = socks.get(fd)
            if s is None:
                continue
            try:
                if ev & select.EPOLLOUT and fd in pending:
                    data = pending.pop(fd)
                    send(fd, data)
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    while True:
                        try:
                            data = s.recv(65536)
                        except BlockingIOError:
                            break
                        if not data:
                            close(fd)
                            break
                        if sep is None:
                            send(fd, answer(data))
                            continue
                        buf = inbufs.get(fd, b"") + data
                        pos = 0
                        while True:
                            i = buf.find(sep, pos)
                            if i < 0:
                                break
                            end = i + len(sep)
                            send(fd, answer(buf[pos:end]))
                            pos = end
                        inbufs[fd] = buf[pos:]
            except OSError:
                if fd in socks:
                    close(fd)


# -- the C floor --------------------------------------------------------------

def serve_c(sock: socket.socket, mode: str) -> None:
    from ._loadgen import lib  # type: ignore[import-not-found]

    modes = {"raw": lib.LG_RAW, "lines": lib.LG_LINES, "http": lib.LG_HTTP}
    sock.setblocking(False)
    _ready(sock)
    rc = lib.lg_c_server(sock.fileno(), modes[mode], MAX_SECONDS)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))


# -- entry point ----------------------------------------------------------------

def _ready(sock: "socket.socket | int") -> None:
    port = sock if isinstance(sock, int) else sock.getsockname()[1]
    print(f"READY {port}", flush=True)


SERVERS: Dict[str, Callable[[socket.socket, str], None]] = {
    "fastmux-epoll": lambda s, m: serve_fastmux(s, m, "epoll"),
    "fastmux-select": lambda s, m: serve_fastmux(s, m, "select"),
    "asyncio": lambda s, m: serve_asyncio(s, m, "asyncio"),
    "uvloop": lambda s, m: serve_asyncio(s, m, "uvloop"),
    "rloop": lambda s, m: serve_asyncio(s, m, "rloop"),
    "asyncio-fastmux": lambda s, m: serve_asyncio(s, m, "fastmux"),
    "uvicorn-fastmux": lambda s, m: serve_uvicorn(s, m, "fastmux"),
    "uvicorn-uvloop": lambda s, m: serve_uvicorn(s, m, "uvloop"),
    "uvicorn-asyncio": lambda s, m: serve_uvicorn(s, m, "asyncio"),
    "selectors-batch": serve_selectors,
    "python-et": serve_python_et,
    "c-et": serve_c,
}

#: The modes a server can serve (default: PLAIN_MODES).  TLS: the Protocol
#: class under ssl= on the loops that have TLS (rloop 0.5 raises
#: NotImplementedError for ssl=).
SERVER_MODES: Dict[str, Tuple[str, ...]] = {
    "asyncio": MODES,
    "uvloop": MODES,
    "asyncio-fastmux": MODES,
    "uvicorn-fastmux": ("http",),
    "uvicorn-uvloop": ("http",),
    "uvicorn-asyncio": ("http",),
}

#: The optional packages a server needs (the `bench` extra installs them).
REQUIRES: Dict[str, Tuple[str, ...]] = {
    "uvloop": ("uvloop",),
    "rloop": ("rloop",),
    "uvicorn-fastmux": ("uvicorn", "httptools"),
    "uvicorn-uvloop": ("uvicorn", "httptools", "uvloop"),
    "uvicorn-asyncio": ("uvicorn", "httptools"),
}


def serves(name: str, mode: str) -> bool:
    """Whether server `name` runs in `mode`."""
    return mode in SERVER_MODES.get(name, PLAIN_MODES)


def missing(name: str) -> List[str]:
    """The optional packages server `name` needs that are not installed."""
    import importlib.util

    return [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]


def _settle_malloc() -> None:
    """Start every server with glibc malloc's dynamic mmap threshold raised.

    glibc serves a block above the threshold (128 KiB at start-up) with
    mmap, and raises the threshold to a block's size the first time such a
    block is free()d -- but not when realloc() shrinks it.  A loop that
    allocates a 256 KiB read buffer per read and shrinks it to what arrived
    (the stdlib's sock.recv(262144), rloop) then pays mmap, munmap and page
    faults on every read, or not, depending on whether anything earlier in
    the process happened to free a large block: measured here, stdlib
    asyncio's echo took 24 or 8 us of CPU per message depending only on
    whether PYTHONPATH was set.  One large free() at start-up puts every
    server in the state a long-running process reaches anyway."""
    block = bytearray(1 << 20)  # malloc(1 MiB): above the threshold, mmap'd
    del block  # free(): the threshold becomes 1 MiB


def main(argv: List[str]) -> int:
    if len(argv) != 3 or argv[0] not in SERVERS or argv[1] not in MODES \
            or not serves(argv[0], argv[1]):
        print(f"usage: python -m fastmux.bench.servers {{{','.join(SERVERS)}}} "
              f"{{{','.join(MODES)}}} CPU", file=sys.stderr)
        return 2
    name, mode, cpu = argv[0], argv[1], int(argv[2])
    if cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    _settle_malloc()
    sock = _listen()
    SERVERS[name](sock, mode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
