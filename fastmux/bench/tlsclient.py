"""The load generator of the bench's TLS scenarios: Python, the stdlib ``ssl``
module over non-blocking sockets and ``select.epoll``.

The C load generator (``_loadgen``) does not speak TLS, and linking it to
OpenSSL would add a build dependency for one scenario pair.  This client
runs in the bench's own process, pinned to the load generator's CPU like the
C one, with the same interface (``drive``, ``quiesce``, ``close``, the same
result keys), and verifies every byte it gets back.  It is slower than the C
generator: a few µs of Python per message on top of the TLS record work, so
the server's CPU utilisation (reported per run) may stay below 1 on the
fastest servers; the figures compared are the server's CPU per message, which
the client's speed changes only through how many requests the server finds
per wake-up -- the same for every server at the same rate.

Scenarios: "tls-raw" (echo of `size`-byte requests, each carrying its
connection and sequence number) and "tls-http" (GET keep-alive, the exact
``servers.RESPONSE`` expected back), one request in flight per connection.
TLS as the servers' default context negotiates it (TLS 1.3 here); the server
certificate is the bench's throwaway self-signed one (``make_cert``).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

from .servers import RESPONSE

#: The request of the "tls-http" scenario.
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def make_cert(directory: str) -> Tuple[str, str]:
    """A throwaway self-signed ECDSA P-256 certificate for 127.0.0.1 and its
    key, written into `directory` by the ``openssl`` command; returns
    (certfile, keyfile).  Raises RuntimeError when openssl is missing or
    fails."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is not installed")
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
           "-addext", "subjectAltName=IP:127.0.0.1"]
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"openssl req failed: {out.stderr.decode(errors='replace')[-500:]}")
    return cert, key


class _Conn:
    __slots__ = ("index", "sock", "seq", "expect", "buf", "sent_ns", "inflight")

    def __init__(self, index: int, sock: ssl.SSLSocket) -> None:
        self.index = index
        self.sock = sock
        self.seq = 0
        self.expect = b""
        self.buf = b""
        self.sent_ns = 0
        self.inflight = False


class TLSLoadGen:
    """`connections` TLS connections to 127.0.0.1:`port`, handshaken in the
    constructor (blocking, bounded), then driven over epoll."""

    def __init__(self, port: int, mode: str, size: int, depth: int, connections: int,
                 cafile: str, timeout: float = 10.0) -> None:
        if mode not in ("tls-raw", "tls-http"):
            raise ValueError(f"TLSLoadGen drives tls-raw and tls-http, not {mode!r}")
        if depth != 1:
            raise ValueError("TLSLoadGen keeps one request in flight per connection")
        self._http = mode == "tls-http"
        self._size = max(size, 24)
        self._ep = select.epoll()
        self._conns: Dict[int, _Conn] = {}
        self._dead: List[_Conn] = []
        ctx = ssl.create_default_context(cafile=cafile)
        try:
            for i in range(connections):
                raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
                try:
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                except BaseException:
                    raw.close()
                    raise
                sock.setblocking(False)
                self._conns[sock.fileno()] = _Conn(i, sock)
                self._ep.register(sock.fileno(), select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def _request(self, c: _Conn) -> bytes:
        if self._http:
            c.expect = RESPONSE
            return HTTP_REQUEST
        head = b"%08d:%014d:" % (c.index, c.seq)
        c.expect = head + b"x" * (self._size - len(head))
        return c.expect

    def _send(self, c: _Conn) -> int:
        data = self._request(c)
        c.seq += 1
        c.buf = b""
        c.inflight = True
        c.sent_ns = time.perf_counter_ns()
        try:
            n = c.sock.send(data)
        except ssl.SSLWantWriteError:
            n = 0
        if n < len(data):
            # Never seen with one small request in flight; bounded if it is.
            c.sock.settimeout(10.0)
            try:
                c.sock.sendall(data[n:])
            finally:
                c.sock.setblocking(False)
        return len(data)

    def _lose(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        self._ep.unregister(fd)
        del self._conns[fd]
        c.inflight = False
        self._dead.append(c)

    def _run(self, seconds: float, max_msgs: int, stall: float, record: bool,
             send_more: bool) -> Dict[str, Any]:
        """The event loop of drive (send_more) and quiesce (not)."""
        t0 = time.perf_counter()
        end = t0 + seconds
        msgs = errors = conn_errors = bytes_in = bytes_out = writes = 0
        lat: List[int] = []
        stalled = False
        conns = self._conns
        if send_more:
            for c in list(conns.values()):
                if not c.inflight:
                    bytes_out += self._send(c)
                    writes += 1
        last = t0
        while True:
            now = time.perf_counter()
            if not send_more and not any(c.inflight for c in conns.values()):
                break
            if now >= end or (max_msgs and msgs >= max_msgs):
                break
            if now - last > stall:
                stalled = True
                break
            for fd, _ev in self._ep.poll(min(0.1, end - now)):
                ready = conns.get(fd)
                if ready is None:
                    continue
                c = ready
                while True:
                    try:
                        data = c.sock.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        break
                    except OSError:
                        data = b""
                    if not data:
                        conn_errors += 1
                        self._lose(c)
                        break
                    bytes_in += len(data)
                    c.buf += data
                    if not c.sock.pending():
                        break
                if c.sock.fileno() not in conns or len(c.buf) < len(c.expect):
                    continue
                if c.buf != c.expect:
                    errors += 1
                msgs += 1
                c.inflight = False
                last = time.perf_counter()
                if record:
                    lat.append(time.perf_counter_ns() - c.sent_ns)
                if send_more and last < end and not (max_msgs and msgs >= max_msgs):
                    bytes_out += self._send(c)
                    writes += 1
        elapsed = time.perf_counter() - t0
        lat.sort()

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] / 1e3 if lat else 0.0

        return {"msgs": msgs, "errors": errors, "conn_errors": conn_errors,
                "bytes_in": bytes_in, "bytes_out": bytes_out, "writes": writes,
                "elapsed": elapsed, "p50_us": pct(0.50), "p99_us": pct(0.99),
                "max_us": lat[-1] / 1e3 if lat else 0.0,
                "mean_us": sum(lat) / len(lat) / 1e3 if lat else 0.0,
                "stalled": int(stalled)}

    def drive(self, seconds: float, max_msgs: int = 0, record: bool = True,
              stall: float = 3.0) -> Dict[str, Any]:
        """Load for `seconds` (or `max_msgs` answers); requests in flight at
        the end stay in flight, as with the C generator."""
        return self._run(seconds, max_msgs, stall, record, send_more=True)

    def quiesce(self, seconds: float = 5.0) -> Dict[str, Any]:
        """Send nothing new; collect the answers in flight (bounded)."""
        return self._run(seconds, 0, seconds, False, send_more=False)

    def close(self) -> None:
        for c in list(self._conns.values()) + self._dead:
            c.sock.close()
        self._conns.clear()
        self._dead.clear()
        self._ep.close()


def describe(cafile: str, port: int) -> Optional[str]:
    """The TLS version and cipher a connection to `port` negotiates."""
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                cipher = s.cipher()
                return f"{s.version()} {cipher[0] if cipher else '?'}"
    except OSError:
        return None
