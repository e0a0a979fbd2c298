"""Echo server: every line a client sends comes back.

    python examples/echo_server.py [--port 8899] [--backend auto|epoll|select]
    printf 'hello\nworld\n' | nc 127.0.0.1 8899
"""

import argparse
import signal

import fastmux


class Echo(fastmux.Handler):
    """Lines() framing hands over each line without its newline; put it back."""

    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        conn.write(data + b"\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8899, help="0 picks a free port")
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    with fastmux.Loop(backend=args.backend) as loop:
        server = loop.listen((args.host, args.port), Echo, framing=fastmux.Lines())
        loop.add_signal_handler(signal.SIGINT, loop.stop)
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        host, port = server.address[:2]
        print(f"echo on {host}:{port} ({loop.backend} backend); Ctrl+C stops", flush=True)
        loop.run()


if __name__ == "__main__":
    main()
