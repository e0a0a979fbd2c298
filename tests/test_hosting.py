"""Hosting a fastmux loop inside asyncio through ``loop.fileno()``.

On the epoll backend ``fileno()`` is the epoll fd, readable whenever
``run_once(0)`` has work: I/O, due timers, pending callbacks, connections on
the core's ready list.  asyncio watches it with ``add_reader`` and calls
``run_once(0)``; nothing else drives the fastmux loop.  On the select
backend ``fileno()`` raises NotImplementedError.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from support import Echo, Factory, Recorder, set_sockopt_on_fd

import fastmux
from fastmux._constants import READ_BUDGET

HOST_DEADLINE = 10.0


class LineEcho(Echo):
    suffix = b"\n"


def test_fileno(loop, backend):
    if backend == "select":
        with pytest.raises(NotImplementedError):
            loop.fileno()
        return
    fd = loop.fileno()
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]"
    assert os.get_inheritable(fd) is False
    assert loop.fileno() == fd


def hosted(loop, coro_fn):
    """Run `coro_fn(aloop, calls)` on a fresh asyncio loop that drives `loop`
    only through add_reader(loop.fileno()).  `calls` counts run_once calls."""

    async def main():
        aloop = asyncio.get_running_loop()
        calls = [0]

        def drive():
            calls[0] += 1
            loop.run_once(0)

        aloop.add_reader(loop.fileno(), drive)
        try:
            return await asyncio.wait_for(coro_fn(aloop, calls), HOST_DEADLINE)
        finally:
            aloop.remove_reader(loop.fileno())

    return asyncio.run(main())


@pytest.mark.epoll_only
def test_asyncio_hosts_a_timer(loop):
    async def body(aloop, calls):
        fut = aloop.create_future()
        t0 = loop.time()
        loop.call_later(0.05, lambda: fut.set_result(loop.time() - t0))
        return await fut

    assert hosted(loop, body) >= 0.05


@pytest.mark.epoll_only
def test_asyncio_hosts_call_soon_and_threadsafe(loop):
    async def body(aloop, calls):
        fut = aloop.create_future()
        got = []

        def from_asyncio():
            loop.call_soon(got.append, "soon")
            loop.call_soon(lambda: fut.set_result(list(got)))

        aloop.call_soon(from_asyncio)
        first = await fut
        fut2 = aloop.create_future()
        aloop.run_in_executor(None, loop.call_soon_threadsafe, lambda: fut2.set_result("ts"))
        return first, await fut2

    assert hosted(loop, body) == (["soon"], "ts")


@pytest.mark.epoll_only
def test_asyncio_hosts_echo_server(loop):
    fac = Factory(LineEcho)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())

    async def body(aloop, calls):
        reader, writer = await asyncio.open_connection(*server.address[:2])
        try:
            for i in range(50):
                writer.write(b"line %d\n" % i)
            await writer.drain()
            lines = [await reader.readline() for _ in range(50)]
        finally:
            writer.close()
            await writer.wait_closed()
        return lines

    assert hosted(loop, body) == [b"line %d\n" % i for i in range(50)]


@pytest.mark.epoll_only
def test_asyncio_hosting_does_not_spin_when_idle(loop):
    async def body(aloop, calls):
        fut = aloop.create_future()
        loop.call_later(0.02, lambda: fut.set_result(None))  # arm and fire the timer once
        await fut
        before = calls[0]
        await asyncio.sleep(0.3)
        return calls[0] - before

    assert hosted(loop, body) < 20, "loop.fileno() stays readable with no work"


@pytest.mark.epoll_only
def test_asyncio_hosts_ready_list(loop):
    """A peer's bytes exceed the per-poll read budget and are all in the
    kernel before the connection is first read: after one run_once the rest
    is on the core's ready list with no new edge to come.  fileno() must stay
    readable until everything is read, with only asyncio driving."""

    class Big(Recorder):
        def on_open(self, conn):
            super().on_open(conn)
            set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    fac = Factory(Big)
    server = loop.listen(("127.0.0.1", 0), fac)
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        client.settimeout(5)
        client.connect(server.address)
        client.setblocking(False)

        async def body(aloop, calls):
            while not fac.opened:
                await asyncio.sleep(0.005)
            # Everything is sent before the connection's first read, in
            # one go that the kernel buffers.
            total = 0
            chunk = b"R" * 65536
            while total < 3 * READ_BUDGET:
                try:
                    total += client.send(chunk)
                except BlockingIOError:
                    break
            assert total > READ_BUDGET, f"kernel buffered only {total} bytes"
            while len(fac[0].data) < total:
                await asyncio.sleep(0.005)
            return total

        total = hosted(loop, body)
    finally:
        client.close()
    assert fac[0].data == b"R" * total


@pytest.mark.epoll_only
def test_asyncio_hosts_callbacks_scheduled_inside_an_iteration(loop):
    """A callback that schedules the next one from inside run_once: each must
    make fileno() readable for the iteration after."""

    async def body(aloop, calls):
        fut = aloop.create_future()
        got = []

        def step(i):
            got.append(i)
            if i < 5:
                loop.call_soon(step, i + 1)
            else:
                fut.set_result(list(got))

        loop.call_later(0.01, step, 0)  # starts inside an iteration
        return await fut

    assert hosted(loop, body) == [0, 1, 2, 3, 4, 5]


@pytest.mark.epoll_only
def test_asyncio_hosts_writes_made_outside_the_loop(loop):
    """conn.write() called from asyncio code (outside any fastmux iteration)
    is queued output: fileno() must become readable so it gets sent."""
    sfac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), sfac, framing=fastmux.Lines())

    async def body(aloop, calls):
        cfac = Factory(Recorder)
        conn = loop.connect(server.address, cfac)
        while not (cfac.opened and sfac.opened):
            await asyncio.sleep(0.005)
        for i in range(3):
            conn.write(b"from asyncio %d\n" % i)
            while len(sfac[0].messages) < i + 1:
                await asyncio.sleep(0.005)
        sfac[0].conn.write(b"reply\n")  # the server side too
        while not cfac[0].messages:
            await asyncio.sleep(0.005)
        conn.close()
        return sfac[0].messages, cfac[0].messages

    server_got, client_got = hosted(loop, body)
    assert server_got == [b"from asyncio %d" % i for i in range(3)]
    assert client_got == [b"reply\n"]


@pytest.mark.epoll_only
def test_asyncio_hosts_writes_made_before_hosting(loop):
    """A write made between iterations before the loop is first hosted
    (before the first fileno()) is queued output too: hosting must make
    fileno() readable so that it gets sent.  With the accelerator the write
    sits in the C core's dirty list, which fm_has_pending() must count."""
    sfac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), sfac)
    peer = socket.create_connection(server.address, timeout=HOST_DEADLINE)
    try:
        deadline = loop.time() + HOST_DEADLINE
        while not sfac.opened and loop.time() < deadline:
            loop.run_once(0.01)
        assert sfac.opened
        sfac[0].conn.write(b"written before hosting\n")
        peer.setblocking(False)

        async def body(aloop, calls):
            got = b""
            while not got.endswith(b"\n"):
                try:
                    got += peer.recv(4096)
                except BlockingIOError:
                    await asyncio.sleep(0.005)
            return got

        assert hosted(loop, body) == b"written before hosting\n"
    finally:
        peer.close()
