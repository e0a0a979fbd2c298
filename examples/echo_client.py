"""Echo client: sends N lines, checks each comes back, prints the rate.

    python examples/echo_client.py [--port 8899] [--count 100000] [--depth 16]
"""

import argparse
import time

import fastmux


class Client(fastmux.Handler):
    def __init__(self, count: int, depth: int, done: list) -> None:
        self.count, self.depth, self.done = count, depth, done
        self.sent = self.received = 0

    def on_open(self, conn: fastmux.Connection) -> None:
        self.t0 = time.perf_counter()
        self._send_more(conn)

    def _send_more(self, conn: fastmux.Connection) -> None:
        # Keep `depth` requests in flight: pipelining is what batching rewards.
        while self.sent < self.count and self.sent - self.received < self.depth:
            conn.write(b"message %d\n" % self.sent)
            self.sent += 1

    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        expected = b"message %d" % self.received
        if data != expected:
            raise ValueError(f"got {data!r}, expected {expected!r}")
        self.received += 1
        if self.received == self.count:
            dt = time.perf_counter() - self.t0
            print(f"{self.count} round trips in {dt:.2f} s: {self.count / dt:,.0f} msgs/s")
            conn.close()
        else:
            self._send_more(conn)

    def on_close(self, conn: fastmux.Connection, exc: BaseException | None) -> None:
        if exc is not None:
            print(f"connection closed: {exc!r}")
        self.done.append(exc)
        conn.loop.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8899)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    done: list = []
    with fastmux.Loop(backend=args.backend) as loop:
        loop.connect((args.host, args.port),
                     lambda: Client(args.count, args.depth, done),
                     framing=fastmux.Lines(), timeout=5)
        loop.run()
    raise SystemExit(1 if done and done[0] is not None else 0)


if __name__ == "__main__":
    main()
