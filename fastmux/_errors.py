"""Exception types of fastmux."""

from __future__ import annotations


class FastmuxError(Exception):
    """Base class of every error fastmux raises or reports."""


class MessageTooLarge(FastmuxError, ValueError):
    """A peer sent a message larger than its framing's ``max_size``.

    Delivered to ``Handler.on_close``; the connection has been closed."""


class ConnectionClosed(FastmuxError, ConnectionError):
    """A write or other operation on a connection that is closed, closing,
    shut down for writing, or was reset by the peer."""


class BackendUnavailable(FastmuxError, RuntimeError):
    """The requested backend cannot run on this host or install."""


class WriteBufferFull(FastmuxError):
    """Queued output exceeded ``max_write_buffer``: the peer does not read.

    Delivered to ``Handler.on_close``; the connection has been closed."""


class IdleTimeout(FastmuxError, TimeoutError):
    """No bytes arrived within ``idle_timeout``; delivered to ``on_close``."""
