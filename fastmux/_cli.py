"""The example servers as commands: ``python -m fastmux echo`` and ``... http``.

The handlers are the ones of ``examples/echo_server.py`` and
``examples/http_hello.py`` (the examples keep their own copy, so each is a
program a reader can copy whole); each command serves with ``fastmux.serve``
(so ``--workers N`` forks N processes on one port, and SIGINT/SIGTERM stop it
gracefully).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from ._backend import epoll_available
from ._framing import Delimiter, Framing, Lines
from ._loop import Connection, Handler, HandlerFactory
from ._workers import WorkerPool, serve


class Echo(Handler):
    """Line echo: every line a client sends comes back (``Lines()`` framing)."""

    def on_message(self, conn: Connection, data: bytes) -> None:
        conn.write(data + b"\n")


ECHO_FRAMING = Lines()

HELLO_BODY = b"Hello, world!"
HELLO_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                  b"Connection: keep-alive\r\n\r\n%s" % (len(HELLO_BODY), HELLO_BODY))
HELLO_CLOSE_RESPONSE = HELLO_RESPONSE.replace(b"keep-alive", b"close")

#: A request is everything up to the blank line; headers over 64 KiB are refused.
HTTP_FRAMING = Delimiter(b"\r\n\r\n", max_size=64 * 1024)


class Hello(Handler):
    """The classic HTTP "Hello, world!" keep-alive server (``HTTP_FRAMING``).

    Requests have no body; pipelined requests arriving in one read are
    answered with one send, however many ``write`` calls that takes."""

    def on_message(self, conn: Connection, request: bytes) -> None:
        # Only the Connection header matters to this server.
        if b"\r\nconnection: close" in request.lower():
            conn.write(HELLO_CLOSE_RESPONSE)
            conn.close()
        else:
            conn.write(HELLO_RESPONSE)


def add_server_arguments(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=_port, default=port,
                   help="port (default %(default)s; 0 picks a free one and prints it)")
    p.add_argument("--backend", default="auto", choices=["auto", "epoll", "select"],
                   help="event loop backend (default %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port (default %(default)s: in-process)")


def _port(text: str) -> int:
    """argparse type of --port: an int from 0 to 65535 (argparse reports the
    error in one line and exits 2)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, got {port}")
    return port


def run_server(name: str, opts: argparse.Namespace, factory: HandlerFactory,
               framing: Framing, url: Optional[str] = None) -> int:
    if opts.workers < 1:
        print(f"{name}: --workers must be >= 1", file=sys.stderr)
        return 2

    def ready(pool: WorkerPool) -> None:
        host, port = pool.address[0], pool.address[1]
        shown = f"[{host}]" if ":" in host else host
        where = (url or "{host}:{port}").format(host=shown, port=port)
        print(f"{name} on {where} ({_backend_name(opts.backend)} backend, {pool.workers} "
              f"worker{'s' if pool.workers != 1 else ''}); Ctrl+C stops", flush=True)

    try:
        serve((opts.host, opts.port), factory, framing=framing, workers=opts.workers,
              backend=opts.backend, ready=ready)
    except (OSError, ValueError, RuntimeError) as e:
        # A port in use, a host that does not resolve or is not ours, a
        # backend this host lacks: the user's input, so one line, no
        # traceback.  (RuntimeError covers BackendUnavailable and a worker
        # that failed to start; its own traceback went to stderr already.)
        detail = " ".join(str(e).split()) or type(e).__name__
        print(f"{name}: cannot serve on {opts.host}:{opts.port}: {detail}", file=sys.stderr)
        return 1
    return 0


def _backend_name(requested: str) -> str:
    if requested != "auto":
        return requested
    forced = os.environ.get("FASTMUX_BACKEND")
    return forced or ("epoll" if epoll_available() else "select")


class _Command:
    def __init__(self, name: str, port: int, factory: HandlerFactory, framing: Framing,
                 url: Optional[str] = None) -> None:
        self.name, self.port, self.factory, self.framing, self.url = (
            name, port, factory, framing, url)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_server_arguments(p, self.port)

    def run(self, opts: Any) -> int:
        return run_server(self.name, opts, self.factory, self.framing, self.url)


#: ``python -m fastmux echo``: a line echo server.
echo = _Command("echo", 8899, Echo, ECHO_FRAMING)
#: ``python -m fastmux http``: HTTP "Hello, world!" with keep-alive.
http = _Command("http", 8080, Hello, HTTP_FRAMING, "http://{host}:{port}/")
