"""fastmux: a Python event loop for TCP and Unix-socket servers and clients.

The hot path is a C core (edge-triggered epoll, framing, batched delivery,
coalesced writes) built through cffi; elsewhere the same API runs on a
pure-Python ``selectors`` backend.  ``fastmux.EventLoop`` is the same core
as an asyncio event loop (``fastmux.run(main())``, ``fastmux.install()``).
See README.md.
"""

from __future__ import annotations

from ._aio import EventLoop, EventLoopPolicy, install, new_event_loop, run
from ._backend import epoll_available
from ._constants import DEFAULT_MAX_SIZE, DEFAULT_MAX_WRITE_BUFFER
from ._errors import (
    BackendUnavailable,
    ConnectionClosed,
    FastmuxError,
    IdleTimeout,
    MessageTooLarge,
    WriteBufferFull,
)
from ._framing import Delimiter, Fixed, Framing, LengthPrefixed, Lines, Raw
from ._loop import (
    Connection,
    Handle,
    Handler,
    Loop,
    Server,
    TimerHandle,
)
from ._workers import WorkerPool, serve

try:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    __version__ = _version("fastmux")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "Loop",
    "Handler",
    "Connection",
    "Server",
    "Handle",
    "TimerHandle",
    "Framing",
    "Raw",
    "Lines",
    "Delimiter",
    "LengthPrefixed",
    "Fixed",
    "FastmuxError",
    "MessageTooLarge",
    "ConnectionClosed",
    "BackendUnavailable",
    "WriteBufferFull",
    "IdleTimeout",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MAX_WRITE_BUFFER",
    "epoll_available",
    "WorkerPool",
    "serve",
    "EventLoop",
    "EventLoopPolicy",
    "new_event_loop",
    "install",
    "run",
    "__version__",
]
