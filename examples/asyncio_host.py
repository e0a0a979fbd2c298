"""Host a fastmux loop inside asyncio: one fd, watched by asyncio.

`loop.fileno()` (epoll backend) is readable whenever `run_once(0)` has
work -- I/O, due timers, ready callbacks, queued writes -- so asyncio only
has to watch it.  Here an asyncio task and a fastmux line-echo server share
one thread; the task talks to the server with asyncio streams.

    python examples/asyncio_host.py
"""

import asyncio

import fastmux


class Echo(fastmux.Handler):
    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        conn.write(data.upper() + b"\n")


def attach(aloop: asyncio.AbstractEventLoop, floop: fastmux.Loop) -> None:
    """Drive `floop` from `aloop`: run one non-blocking iteration each time
    its fd becomes readable."""
    aloop.add_reader(floop.fileno(), floop.run_once, 0)


async def main() -> None:
    with fastmux.Loop(backend="epoll") as floop:
        server = floop.listen(("127.0.0.1", 0), Echo, framing=fastmux.Lines())
        ticks: list[float] = []
        floop.call_later(0.05, ticks.append, floop.time())  # a fastmux timer
        aloop = asyncio.get_running_loop()
        attach(aloop, floop)
        try:
            host, port = server.address[:2]
            reader, writer = await asyncio.open_connection(host, port)
            for word in (b"hello", b"from", b"asyncio"):
                writer.write(word + b"\n")
                print((await asyncio.wait_for(reader.readline(), 5)).decode().strip())
            await asyncio.sleep(0.1)
            print("fastmux timer fired:", bool(ticks))
            writer.close()
            await writer.wait_closed()
        finally:
            aloop.remove_reader(floop.fileno())


if __name__ == "__main__":
    asyncio.run(main())
