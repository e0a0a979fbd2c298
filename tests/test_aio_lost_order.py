"""connection_lost comes after the callbacks already queued, as on asyncio's loop.

asyncio's transports never call connection_lost from the I/O event itself:
close() and abort() with nothing left to send, a fatal error, a reset seen
by a read, all schedule it with call_soon, and an event's own callback
runs after the callbacks queued before the poll; so what was already
queued -- a task created by data_received, the first step of a task that
the protocol's connection_lost will cancel -- runs first.  fastmux's core
reports a connection's end in its poll, ahead of the callbacks queued
before it; without deferral connection_lost ran first.  Found by aiohttp's
tests/test_web_functional.py::test_upgrade_tail_is_byte_limited (its
server logged the 400 for the garbage behind a declined upgrade on asyncio,
not on fastmux): the request task that handles that 400 was created before
the EOF's close, and connection_lost cancelled it before its first step.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, List, Optional

import pytest

import fastmux


class Server(asyncio.Protocol):
    """Starts a task per request, as an HTTP server does, and cancels the
    running task in connection_lost (as aiohttp's handler_cancellation)."""

    def __init__(self, events: List[str], how: str, done: "asyncio.Future[None]") -> None:
        self.events = events
        self.how = how
        self.done = done
        self.task: Optional["asyncio.Task[None]"] = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.events.append("data")
        # From a callback, as a request handler's task would: the loop's
        # next poll is the one that reports the connection's end.
        asyncio.get_running_loop().call_soon(self.later)

    def later(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.handle())
        if self.how == "close":
            self.transport.close()
        elif self.how == "abort":
            self.transport.abort()
        # "reset": the peer reset the connection already; a poll sees it.
        asyncio.get_running_loop().call_soon(self.events.append, "queued after")

    async def handle(self) -> None:
        self.events.append("task started")

    def connection_lost(self, exc: Any) -> None:
        self.events.append("lost")
        if self.task is not None:
            self.task.cancel()
        self.done.set_result(None)


async def _scenario(how: str) -> List[str]:
    loop = asyncio.get_running_loop()
    events: List[str] = []
    done = loop.create_future()
    server = await loop.create_server(lambda: Server(events, how, done), "127.0.0.1", 0)
    client = socket.create_connection(server.sockets[0].getsockname()[:2], timeout=5.0)
    try:
        if how == "reset":
            # Request and RST reach the accepted socket together: data, then
            # a reset that the same poll (fastmux) or the next read (asyncio) finds.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.sendall(b"GET")
            client.close()
        else:
            client.sendall(b"GET")
        await asyncio.wait_for(done, 5.0)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    return events


# close() and abort() schedule connection_lost when called: before what is
# queued after them.  A reset is read after what data_received queued, and
# connection_lost scheduled then: after what that queued.
EXPECTED = {"close": ["data", "task started", "lost", "queued after"],
            "abort": ["data", "task started", "lost", "queued after"],
            "reset": ["data", "task started", "queued after", "lost"]}
HOWS = ["close", "abort", "reset"]


@pytest.mark.parametrize("how", HOWS)
def test_lost_after_queued_work_stock_asyncio(how: str) -> None:
    """The oracle: asyncio's own loop."""
    loop = asyncio.SelectorEventLoop()
    try:
        assert loop.run_until_complete(_scenario(how)) == EXPECTED[how]
    finally:
        loop.close()


@pytest.mark.parametrize("how", HOWS)
def test_lost_after_queued_work(backend: str, how: str) -> None:
    loop = fastmux.EventLoop(backend)
    try:
        assert loop.run_until_complete(_scenario(how)) == EXPECTED[how]
    finally:
        loop.close()
