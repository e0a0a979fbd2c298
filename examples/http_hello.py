"""The classic edge-triggered HTTP "Hello, world!", keep-alive, on fastmux.

A request is everything up to the blank line, so Delimiter(b"\\r\\n\\r\\n")
frames it; pipelined requests arriving in one read are answered with one
send, however many `write` calls the handler makes.

    python examples/http_hello.py [--port 8080]
    wrk -c100 -t1 -d5s http://127.0.0.1:8080/
"""

import argparse
import signal

import fastmux

BODY = b"Hello, world!"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: keep-alive\r\n\r\n%s" % (len(BODY), BODY))
CLOSE_RESPONSE = RESPONSE.replace(b"keep-alive", b"close")

#: A request is everything up to the blank line; headers over 64 KiB are refused.
HTTP_FRAMING = fastmux.Delimiter(b"\r\n\r\n", max_size=64 * 1024)


class Hello(fastmux.Handler):
    """Answers every request; requests have no body."""

    def on_message(self, conn: fastmux.Connection, request: bytes) -> None:
        # Only the Connection header matters to this server.
        if b"\r\nconnection: close" in request.lower():
            conn.write(CLOSE_RESPONSE)
            conn.close()  # after the queued response has gone out
        else:
            conn.write(RESPONSE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    with fastmux.Loop(backend=args.backend) as loop:
        server = loop.listen((args.host, args.port), Hello, framing=HTTP_FRAMING)
        loop.add_signal_handler(signal.SIGINT, loop.stop)
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        host, port = server.address[:2]
        print(f"http on http://{host}:{port}/ ({loop.backend} backend)", flush=True)
        loop.run()


if __name__ == "__main__":
    main()
