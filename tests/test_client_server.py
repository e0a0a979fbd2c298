"""Outgoing connects (refused, timed out) and servers (close, accept)."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
from support import Echo, Factory, Recorder, run_until, spin

import fastmux


@contextlib.contextmanager
def refusing_port():
    """A port on 127.0.0.1 that refuses connections: bound, never listening
    (so no one else can take it while the test runs)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()
    finally:
        s.close()


@contextlib.contextmanager
def hanging_listener(n_fillers):
    """A loopback listener whose accept queue is full (listen(0) and
    `n_fillers` connects that are never accepted): Linux then drops further
    SYNs, so a new connect hangs in SYN_SENT.  Only loopback is used."""
    lst = socket.socket()
    fillers = []
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        for _ in range(n_fillers):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(lst.getsockname())
            fillers.append(f)
        time.sleep(0.05)  # let the handshakes that can complete, complete
        yield lst.getsockname()
    finally:
        for f in fillers:
            f.close()
        lst.close()


def test_connect_refused(loop):
    fac = Factory(Recorder)
    with refusing_port() as addr:
        conn = loop.connect(addr, fac)
        assert len(fac) == 1
        assert not fac[0].closed, "on_close must not run inside connect()"
        run_until(loop, lambda: fac[0].closed)
    h = fac[0]
    assert not h.opened
    assert h.events == [("close", h.close_exc)]
    assert isinstance(h.close_exc, ConnectionRefusedError)
    assert h.close_conn is conn
    assert conn.closed
    with pytest.raises(fastmux.ConnectionClosed):
        conn.write(b"x")


def test_connect_refused_with_queued_writes(loop):
    fac = Factory(Recorder)
    with refusing_port() as addr:
        conn = loop.connect(addr, fac)
        conn.write(b"never sent")
        run_until(loop, lambda: fac[0].closed)
    assert isinstance(fac[0].close_exc, ConnectionRefusedError)
    assert not fac[0].opened


def test_connect_unix_missing_path(loop, tmp_path):
    fac = Factory(Recorder)
    loop.connect(str(tmp_path / "nobody-here.sock"), fac)
    run_until(loop, lambda: fac[0].closed)
    assert isinstance(fac[0].close_exc, OSError)
    assert not fac[0].opened


def test_connect_timeout(loop):
    timeout = 0.2
    for n_fillers in (2, 4, 8):  # bounded retries if a connect slips through
        fac = Factory(Recorder)
        with hanging_listener(n_fillers) as addr:
            t0 = time.monotonic()
            conn = loop.connect(addr, fac, timeout=timeout)
            run_until(loop, lambda: fac[0].closed, timeout=5)
            elapsed = time.monotonic() - t0
        if fac[0].opened:  # the kernel accepted it after all: try harder
            continue
        break
    else:
        pytest.fail("could not make a loopback connect hang")
    h = fac[0]
    assert isinstance(h.close_exc, TimeoutError), repr(h.close_exc)
    assert h.events == [("close", h.close_exc)]
    assert elapsed >= timeout
    assert elapsed < timeout + 3
    assert conn.closed


def test_connect_timeout_does_not_fire_once_connected(loop):
    sfac = Factory(Echo)
    server = loop.listen(("127.0.0.1", 0), sfac)
    cfac = Factory(Recorder)
    conn = loop.connect(server.address, cfac, timeout=0.1)
    run_until(loop, lambda: cfac[0].opened)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        loop.run_once(0.05)
    assert not cfac[0].closed and not conn.closed
    conn.write(b"alive")
    run_until(loop, lambda: cfac[0].data == b"alive")


def test_server_close_keeps_existing_connections(loop, peers):
    fac = Factory(Echo)
    server = loop.listen(("127.0.0.1", 0), fac)
    addr = server.address
    p1 = peers.connect(addr)
    p1.send(b"one")
    run_until(loop, lambda: p1.received == b"one", peers=[p1])
    server.close()
    spin(loop, 3, peers=[p1])
    # No new connection is accepted.
    try:
        p2 = peers.connect(addr)
    except ConnectionRefusedError:
        pass
    else:  # the kernel completed the handshake on a socket fastmux left open
        spin(loop, 10, peers=[p2])
        assert len(fac) == 1
    assert loop.stats()["accepted"] == 1
    # The existing connection keeps working.
    p1.send(b"two")
    run_until(loop, lambda: p1.received == b"onetwo", peers=[p1])
    assert not fac[0].closed


def test_server_close_unix_socket(loop, peers, tmp_path):
    path = str(tmp_path / "srv.sock")
    fac = Factory(Echo)
    server = loop.listen(path, fac)
    p1 = peers.connect(path)
    run_until(loop, lambda: fac.opened)
    server.close()
    spin(loop, 3)
    with pytest.raises(OSError):
        peers.connect(path)
    p1.send(b"x")
    run_until(loop, lambda: p1.received == b"x", peers=[p1])


def test_listen_resolves_names(loop, peers):
    server = loop.listen(("localhost", 0), Factory(Echo))
    host, port = server.address[:2]
    assert host in ("127.0.0.1", "::1") and port != 0
    p = peers.connect((host, port))
    p.send(b"named")
    run_until(loop, lambda: p.received == b"named", peers=[p])


def test_listen_on_busy_port_raises(loop):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(OSError):
            loop.listen(s.getsockname(), Factory(Recorder))
    finally:
        s.close()


def test_connect_factory_error_propagates_and_leaks_nothing(loop):
    """A handler factory that raises inside connect() raises to the caller;
    no socket is left open (the autouse leak check would see it)."""
    server = loop.listen(("127.0.0.1", 0), fastmux.Handler)

    def broken() -> fastmux.Handler:
        raise RuntimeError("factory failed")

    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(RuntimeError, match="factory failed"):
            loop.connect(server.address, broken)
        gc.collect()
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, f"connect() leaked a socket: {unclosed[0].message}"
    assert loop.stats()["connections_open"] == 0
