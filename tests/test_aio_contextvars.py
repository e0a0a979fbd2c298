"""Context variables reach protocol callbacks on fastmux's asyncio loop as on
asyncio's: a server's connections see the context that ``create_server`` /
``start_server`` ran in, a client connection the context that
``create_connection`` ran in (found by uvicorn's
test_contextvars_preserved_by_default: an ASGI app saw none of the context
the server was started in)."""

from __future__ import annotations

import asyncio
import contextvars
import socket
from typing import Any, Dict, List

import pytest

import fastmux

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR")


def _seen() -> str:
    return VAR.get("MISSING")


class Recorder(asyncio.Protocol):
    """Records VAR in each callback; closes on EOF; echoes if `echo`."""

    def __init__(self, log: Dict[str, List[str]], done: "asyncio.Future[None]",
                 echo: bool = False) -> None:
        self.log = log
        self.done = done
        self.echo = echo

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.log.setdefault("connection_made", []).append(_seen())

    def data_received(self, data: bytes) -> None:
        self.log.setdefault("data_received", []).append(_seen())
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> None:
        self.log.setdefault("eof_received", []).append(_seen())

    def connection_lost(self, exc: Any) -> None:
        self.log.setdefault("connection_lost", []).append(_seen())
        if not self.done.done():
            self.done.set_result(None)


async def _scenario() -> Dict[str, Dict[str, List[str]]]:
    loop = asyncio.get_running_loop()
    server_log: Dict[str, List[str]] = {}
    client_log: Dict[str, List[str]] = {}
    server_done = loop.create_future()
    client_done = loop.create_future()

    async def start_server() -> asyncio.AbstractServer:
        VAR.set("server")
        return await loop.create_server(lambda: Recorder(server_log, server_done, echo=True),
                                        "127.0.0.1", 0)

    async def connect(port: int) -> Any:
        VAR.set("client")
        transport, _ = await loop.create_connection(
            lambda: Recorder(client_log, client_done), "127.0.0.1", port)
        return transport

    # Each in a task of its own: each sets VAR in a context of its own.
    server = await asyncio.create_task(start_server())
    port = server.sockets[0].getsockname()[1]
    transport = await asyncio.create_task(connect(port))
    assert _seen() == "MISSING"
    transport.write(b"ping")
    transport.write_eof()
    await asyncio.wait_for(asyncio.gather(server_done, client_done), 5.0)
    server.close()
    await server.wait_closed()
    return {"server": server_log, "client": client_log}


EXPECTED = {
    "server": {"connection_made": ["server"], "data_received": ["server"],
               "eof_received": ["server"], "connection_lost": ["server"]},
    "client": {"connection_made": ["client"], "data_received": ["client"],
               "eof_received": ["client"], "connection_lost": ["client"]},
}


def test_contextvars_reach_protocol_callbacks_stock_asyncio() -> None:
    """The oracle: what asyncio's own loop does."""
    loop = asyncio.SelectorEventLoop()
    try:
        assert loop.run_until_complete(_scenario()) == EXPECTED
    finally:
        loop.close()


def test_contextvars_reach_protocol_callbacks(backend: str) -> None:
    loop = fastmux.EventLoop(backend)
    try:
        assert loop.run_until_complete(_scenario()) == EXPECTED
    finally:
        loop.close()


def test_contextvars_reach_streams_handler(backend: str) -> None:
    """asyncio.start_server: the connection handler task sees the server's
    context (the uvicorn case: a task created from data_received)."""

    async def main() -> str:
        seen: "asyncio.Future[str]" = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(_seen())
            writer.close()
            await writer.wait_closed()

        async def start() -> asyncio.AbstractServer:
            VAR.set("outer-value")
            return await asyncio.start_server(handle, "127.0.0.1", 0)

        server = await asyncio.create_task(start())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        result = await asyncio.wait_for(seen, 5.0)
        await asyncio.wait_for(reader.read(), 5.0)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return result

    loop = fastmux.EventLoop(backend)
    try:
        assert loop.run_until_complete(main()) == "outer-value"
    finally:
        loop.close()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_contextvars_accepted_socket(backend: str, family: str) -> None:
    """connect_accepted_socket: the context it was called in."""

    async def main() -> List[str]:
        loop = asyncio.get_running_loop()
        log: Dict[str, List[str]] = {}
        done = loop.create_future()
        if family == "tcp":
            a, b = socket.socket(), socket.socket()
            with socket.create_server(("127.0.0.1", 0)) as lsock:
                a.connect(lsock.getsockname())
                b, _ = lsock.accept()
        else:
            a, b = socket.socketpair()

        async def adopt() -> Any:
            VAR.set("adopted")
            transport, _ = await loop.connect_accepted_socket(lambda: Recorder(log, done), b)
            return transport

        try:
            await asyncio.create_task(adopt())
            a.sendall(b"x")
            a.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(done, 5.0)
        finally:
            a.close()
        return sorted(set(v for values in log.values() for v in values))

    loop = fastmux.EventLoop(backend)
    try:
        assert loop.run_until_complete(main()) == ["adopted"]
    finally:
        loop.close()
