"""Instructions per message on the Python side, counted by callgrind.

Timed benchmarks drift on a shared machine; instruction counts do not.  Run
the same round trip (16 x 64 B messages per read, each answered by one
write) N times, under callgrind, for fastmux and for a hand-written floor
(one epoll_wait, one recv, 16 slices and handler calls, one send), and
compare (total(N) - total(0)) / (16 * N).  Syscalls are kernel time and are
not counted, so the difference is pure user-space overhead.

    PY=$(python3 -c 'import sys; print(sys.executable)')
    for m in floor epoll; do for n in 0 2000; do
      valgrind --tool=callgrind --callgrind-out-file=/dev/null $PY \\
        benchmarks/callgrind_dispatch.py $m $n 2>&1 | grep refs
    done; done
    # FASTMUX_NO_SPEEDUPS=1 for the Python dispatch loop on epoll
"""

from __future__ import annotations

import select
import socket
import sys
from typing import Any, List

N = 16
MSG = bytes(range(64)) * N


def main(mode: str, rounds: int) -> None:
    a, b = socket.socketpair()
    if mode in ("epoll", "select"):
        import fastmux

        class Echo(fastmux.Handler):
            def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
                conn.write(data)

        loop = fastmux.Loop(backend=mode)
        loop.connect(None, Echo, sock=b, framing=fastmux.Fixed(64))
        for _ in range(3):
            loop.run_once(0)
        run_once = loop.run_once
        for _ in range(rounds):
            a.sendall(MSG)
            run_once(0)
            got = 0
            while got < len(MSG):
                got += len(a.recv(65536))
        loop.close()
    elif mode == "floor":
        class Conn:
            __slots__ = ("out",)

            def __init__(self) -> None:
                self.out: List[bytes] = []

            def write(self, d: bytes) -> None:
                self.out.append(d)

        class H:
            def on_message(self, conn: Any, data: bytes) -> None:
                conn.write(data)

        ep = select.epoll()
        ep.register(b.fileno(), select.EPOLLIN | select.EPOLLET)
        conn = Conn()
        om = H().on_message
        for _ in range(rounds):
            a.sendall(MSG)
            ep.poll(0)
            data = b.recv(65536)
            for s in range(0, len(data), 64):
                om(conn, data[s:s + 64])
            b.send(b"".join(conn.out))
            conn.out.clear()
            got = 0
            while got < len(MSG):
                got += len(a.recv(65536))
        ep.close()
        b.close()
    else:
        raise SystemExit(f"unknown mode {mode!r}: floor, epoll or select")
    a.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
