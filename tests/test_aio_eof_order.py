"""eof_received comes after what data_received scheduled, as on asyncio's loop.

asyncio's selector loop reads the EOF with a recv of its own, one loop
iteration after the data before it at the earliest, so callbacks and task
steps that data_received scheduled run first.  fastmux's core drains a
socket to EAGAIN and sees data and EOF in one go; without deferral the
protocol's eof_received (by default: close the transport) ran before them.
Found by tests/test_uvicorn_e2e.py::test_client_half_close, flaky under
load: uvicorn closed on the client's half-close before its request task
wrote the response.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, List, Optional

import pytest

import fastmux


class RequestThenEof(asyncio.Protocol):
    """Answers each request from a task, as an ASGI server does, and keeps
    asyncio's default eof_received (the transport closes)."""

    def __init__(self, events: List[str], pause_in_task: bool,
                 made: "asyncio.Future[None]") -> None:
        self.events = events
        self.pause_in_task = pause_in_task
        self.made = made

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.events.append("data")
        asyncio.get_running_loop().create_task(self.respond(data))

    async def respond(self, data: bytes) -> None:
        self.events.append("respond")
        self.transport.write(b"re:" + data)
        if self.pause_in_task:
            # Paused before the EOF was handed over: it waits for resume.
            self.transport.pause_reading()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            self.events.append("resume")
            self.transport.resume_reading()

    def eof_received(self) -> Optional[bool]:
        self.events.append("eof")
        return None

    def connection_lost(self, exc: Any) -> None:
        self.events.append("lost")


async def _scenario(pause_in_task: bool) -> List[str]:
    loop = asyncio.get_running_loop()
    events: List[str] = []
    made = loop.create_future()
    server = await loop.create_server(lambda: RequestThenEof(events, pause_in_task, made),
                                      "127.0.0.1", 0)
    client = socket.create_connection(server.sockets[0].getsockname()[:2], timeout=5.0)
    try:
        await asyncio.wait_for(made, 5.0)
        # Request and FIN reach the accepted socket together: the loop's
        # next poll finds both (loopback delivers within sendall/shutdown).
        client.sendall(b"GET")
        client.shutdown(socket.SHUT_WR)
        client.setblocking(False)
        received = b""
        deadline = loop.time() + 5.0
        while loop.time() < deadline:
            try:
                chunk = client.recv(100)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            if not chunk:
                break
            received += chunk
        assert received == b"re:GET", (received, events)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    return events


EXPECTED = {False: ["data", "respond", "eof", "lost"],
            True: ["data", "respond", "resume", "eof", "lost"]}


@pytest.mark.parametrize("pause_in_task", [False, True], ids=["plain", "paused"])
def test_eof_after_scheduled_work_stock_asyncio(pause_in_task: bool) -> None:
    """The oracle: asyncio's own loop."""
    loop = asyncio.SelectorEventLoop()
    try:
        assert loop.run_until_complete(_scenario(pause_in_task)) == EXPECTED[pause_in_task]
    finally:
        loop.close()


@pytest.mark.parametrize("pause_in_task", [False, True], ids=["plain", "paused"])
def test_eof_after_scheduled_work(backend: str, pause_in_task: bool) -> None:
    loop = fastmux.EventLoop(backend)
    try:
        assert loop.run_until_complete(_scenario(pause_in_task)) == EXPECTED[pause_in_task]
    finally:
        loop.close()
