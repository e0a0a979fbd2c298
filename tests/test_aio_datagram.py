"""Datagrams on fastmux's asyncio loop, both backends, every supported
Python: sock_sendto / sock_recvfrom / sock_recvfrom_into (asyncio has them
from 3.11; fastmux's loop has them on 3.10 too) and create_datagram_endpoint."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Iterator, List, Tuple

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


def udp_pair() -> Tuple[socket.socket, socket.socket]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    return a, b


def test_sock_sendto_recvfrom(aloop: fastmux.EventLoop) -> None:
    a, b = udp_pair()

    async def main() -> List[Any]:
        # The receive is started first, so it has to wait for readability.
        recv = asyncio.ensure_future(aloop.sock_recvfrom(b, 100))
        await asyncio.sleep(0)
        sent = await aloop.sock_sendto(a, b"one", b.getsockname())
        got = await asyncio.wait_for(recv, TIMEOUT)
        buf = bytearray(10)
        recv_into = asyncio.ensure_future(aloop.sock_recvfrom_into(b, buf))
        await asyncio.sleep(0)
        await aloop.sock_sendto(a, b"two", b.getsockname())
        n, addr = await asyncio.wait_for(recv_into, TIMEOUT)
        return [sent, got, bytes(buf[:n]), addr]

    try:
        sent, got, two, addr = aloop.run_until_complete(main())
    finally:
        a.close()
        b.close()
    assert sent == 3
    assert got[0] == b"one" and got[1][1] == addr[1]
    assert two == b"two"


def test_sock_recvfrom_cancelled_leaves_no_watch(aloop: fastmux.EventLoop) -> None:
    a, b = udp_pair()

    async def main() -> None:
        recv = asyncio.ensure_future(aloop.sock_recvfrom(b, 100))
        await asyncio.sleep(0)
        recv.cancel()
        with pytest.raises(asyncio.CancelledError):
            await recv
        # The fd is free again: a new wait on it works.
        recv2 = asyncio.ensure_future(aloop.sock_recvfrom(b, 100))
        await asyncio.sleep(0)
        await aloop.sock_sendto(a, b"x", b.getsockname())
        assert (await asyncio.wait_for(recv2, TIMEOUT))[0] == b"x"

    try:
        aloop.run_until_complete(main())
    finally:
        a.close()
        b.close()


def test_datagram_endpoint_echo(aloop: fastmux.EventLoop) -> None:
    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(data.upper(), addr)

    class Client(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.got: "asyncio.Future[bytes]" = aloop.create_future()

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.got.set_result(data)

    async def main() -> bytes:
        server, _ = await aloop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        client, proto = await aloop.create_datagram_endpoint(
            Client, remote_addr=server.get_extra_info("sockname"))
        try:
            client.sendto(b"hello")
            return await asyncio.wait_for(proto.got, TIMEOUT)
        finally:
            client.close()
            server.close()
            await asyncio.sleep(0)

    assert aloop.run_until_complete(main()) == b"HELLO"
