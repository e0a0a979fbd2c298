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

# The handler is shared with `python -m fastmux http`; it is just:
#
#     class Hello(fastmux.Handler):
#         def on_message(self, conn, request):
#             if b"\r\nconnection: close" in request.lower():
#                 conn.write(HELLO_CLOSE_RESPONSE)
#                 conn.close()
#             else:
#                 conn.write(HELLO_RESPONSE)
from fastmux._cli import HTTP_FRAMING, Hello


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    with fastmux.Loop(backend=args.backend) as loop:
        server = loop.listen((args.host, args.port), Hello, framing=HTTP_FRAMING)
        loop.add_signal_handler(signal.SIGINT, loop.stop)
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        print(f"http on http://{server.address[0]}:{server.address[1]}/ "
              f"({loop.backend} backend)", flush=True)
        loop.run()


if __name__ == "__main__":
    main()
