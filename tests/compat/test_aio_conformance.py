"""fastmux.EventLoop where CPython's asyncio tests found it differing from
asyncio's selector loop, pinned down directly (both backends).

Each test here failed on the code before its fix; the CPython test that
found it is named in the docstring (see test_cpython_asyncio.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from typing import Any, Iterator, List
from unittest import mock

import pytest

import fastmux

TIMEOUT = 10.0


@pytest.fixture
def aloop(backend: str) -> Iterator[fastmux.EventLoop]:
    loop = fastmux.EventLoop(backend=backend)
    try:
        yield loop
    finally:
        loop.close()


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: List[str] = []
        self.data = bytearray()
        self.transport: Any = None
        self.lost: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        self.eof: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof.set_result(None)

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Any) -> None:
        self.lost.set_result(None)


def test_write_past_high_water_sent_whole_does_not_pause(aloop: fastmux.EventLoop) -> None:
    """A write over the high-water mark that the socket takes whole leaves
    at once and does not pause the protocol, as on asyncio's loop.  (Found
    by test_sslproto's start_tls tests: the coalesced write paused the app
    protocol, and the resume went to the SSLProtocol installed meanwhile.)"""
    async def main() -> None:
        server_side: List[Recorder] = []
        srv = await aloop.create_server(lambda: server_side.append(Recorder()) or server_side[-1],
                                        "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        tr, pr = await aloop.create_connection(Recorder, "127.0.0.1", port)
        tr.set_write_buffer_limits(high=1000)
        tr.write(b"x" * 4000)  # far less than any loopback socket buffer
        assert pr.events == []
        assert tr.get_write_buffer_size() == 0
        tr.close()
        await asyncio.wait_for(pr.lost, TIMEOUT)
        await asyncio.wait_for(server_side[0].eof, TIMEOUT)
        assert bytes(server_side[0].data) == b"x" * 4000
        srv.close()
        await srv.wait_closed()

    aloop.run_until_complete(main())


def test_create_connection_sock_stays_the_callers(aloop: fastmux.EventLoop) -> None:
    """create_connection(sock=s): `s` stays usable while the transport lives
    (get_extra_info("socket") is it) and is detached, not closed twice, once
    the transport is gone.  (Found by test_sendfile, which sets SO_SNDBUF on
    the socket it passed in.)"""
    async def main() -> None:
        srv = await aloop.create_server(Recorder, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        fd = sock.fileno()
        tr, pr = await aloop.create_connection(Recorder, sock=sock)
        assert sock.fileno() == fd
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        assert tr.get_extra_info("socket").fileno() == fd
        tr.close()
        await asyncio.wait_for(pr.lost, TIMEOUT)
        assert sock.fileno() == -1
        srv.close()
        await srv.wait_closed()

    aloop.run_until_complete(main())


def test_sendfile_is_native(aloop: fastmux.EventLoop) -> None:
    """loop.sendfile on a fastmux transport uses os.sendfile, keeps order
    with writes before and after, refuses write() meanwhile and leaves the
    file position after what was sent.  (test_sendfile's
    test_sendfile_prevents_bare_write and ..._force_unsupported_native.)"""
    data = os.urandom(64 * 1024) * 8

    async def main() -> None:
        server_side: List[Recorder] = []
        srv = await aloop.create_server(lambda: server_side.append(Recorder()) or server_side[-1],
                                        "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        tr, pr = await aloop.create_connection(Recorder, "127.0.0.1", port)
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            tr.write(b"head")
            task = aloop.create_task(aloop.sendfile(tr, f, 10))
            await asyncio.sleep(0)
            with pytest.raises(RuntimeError, match="sendfile is in progress"):
                tr.write(b"nope")
            assert await asyncio.wait_for(task, TIMEOUT) == len(data) - 10
            assert f.tell() == len(data)
        tr.write(b"tail")
        tr.write_eof()
        await asyncio.wait_for(server_side[0].eof, TIMEOUT)
        assert bytes(server_side[0].data) == b"head" + data[10:] + b"tail"
        tr.close()
        await asyncio.wait_for(pr.lost, TIMEOUT)
        srv.close()
        await srv.wait_closed()

    fallback = mock.patch.object(type(aloop), "_sendfile_fallback",
                                 side_effect=AssertionError("took the fallback path"))
    with fallback:
        aloop.run_until_complete(main())
