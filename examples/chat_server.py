"""Broadcast chat: every line from one client goes to every client.

The seed tutorial's select server with per-client message queues, without
the queues: `write` queues for you and flushes once per loop iteration.

    python examples/chat_server.py [--port 8898]
    nc 127.0.0.1 8898   (in two terminals)
"""

import argparse
import signal

import fastmux


class Room:
    def __init__(self) -> None:
        self.members: set[fastmux.Connection] = set()

    def broadcast(self, line: bytes) -> None:
        for conn in self.members:
            if not conn.closed:
                conn.write(line)


class Chat(fastmux.Handler):
    def __init__(self, room: Room) -> None:
        self.room = room

    def on_open(self, conn: fastmux.Connection) -> None:
        self.name = "%s:%s" % conn.peername[:2] if isinstance(conn.peername, tuple) else "anon"
        self.room.members.add(conn)
        self.room.broadcast(f"* {self.name} joined\n".encode())

    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        self.room.broadcast(f"[{self.name}] ".encode() + data + b"\n")

    def on_close(self, conn: fastmux.Connection, exc: BaseException | None) -> None:
        self.room.members.discard(conn)
        self.room.broadcast(f"* {self.name} left\n".encode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8898, help="0 picks a free port")
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    room = Room()
    with fastmux.Loop(backend=args.backend) as loop:
        # A slow reader must not hold unbounded output: cap each queue.
        server = loop.listen((args.host, args.port), lambda: Chat(room),
                             framing=fastmux.Lines(max_size=4096),
                             max_write_buffer=1024 * 1024)
        loop.add_signal_handler(signal.SIGINT, loop.stop)
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        host, port = server.address[:2]
        print(f"chat on {host}:{port} ({loop.backend} backend)", flush=True)
        loop.run()


if __name__ == "__main__":
    main()
