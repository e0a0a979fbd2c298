"""Echo servers end to end: data integrity, many connections, address kinds."""

from __future__ import annotations

import socket

import pytest
from support import Echo, Factory, Recorder, close_if_open, pattern, run_until, spin

import fastmux


class LineEcho(Echo):
    suffix = b"\n"


@pytest.mark.stress
def test_200_concurrent_connections_every_byte(loop, peers):
    """200 clients each stream 24 KiB of distinct data through a Raw echo
    server at once; every byte must come back in order."""
    n_clients, size = 200, 24 * 1024
    fac = Factory(Echo)
    server = loop.listen(("127.0.0.1", 0), fac)
    ps = [peers.connect(server.address) for _ in range(n_clients)]
    payloads = [pattern(size, seed=i) for i in range(n_clients)]
    # Queue everything now; Peer.step() feeds the kernel as it drains.
    for p, data in zip(ps, payloads):
        p.send(data)
    run_until(loop, lambda: all(len(p.received) >= size for p in ps), timeout=60, peers=ps,
              what="all echoes back")
    for i, (p, data) in enumerate(zip(ps, payloads)):
        assert p.error is None and not p.eof
        assert bytes(p.received) == data, f"client {i} got corrupted data"
    assert len(fac) == n_clients
    st = loop.stats()
    assert st["accepted"] == n_clients
    assert st["connections_open"] == n_clients
    assert st["bytes_in"] == n_clients * size
    assert st["bytes_out"] == n_clients * size
    # Closing every client closes every server connection cleanly.
    for p in ps:
        p.close()
    run_until(loop, lambda: all(h.closed for h in fac.made))
    for h in fac.made:
        h.assert_closed_once(None)
    assert loop.stats()["connections_open"] == 0


def test_pipelined_lines(loop, peers):
    fac = Factory(LineEcho)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    p = peers.connect(server.address)
    lines = [b"line %d " % i + pattern(i % 50, i).replace(b"\n", b"") for i in range(500)]
    p.send(b"".join(line + b"\n" for line in lines))
    expected = b"".join(line + b"\n" for line in lines)
    run_until(loop, lambda: len(p.received) >= len(expected), peers=[p])
    assert bytes(p.received) == expected
    assert fac[0].messages == lines


def test_fastmux_client_and_server(loop):
    """Both ends are fastmux connections on the same loop."""
    sfac = Factory(LineEcho)
    server = loop.listen(("127.0.0.1", 0), sfac, framing=fastmux.Lines())
    cfac = Factory(Recorder)
    conn = loop.connect(server.address, cfac, framing=fastmux.Lines())
    assert len(cfac) == 1, "handler_factory runs inside connect()"
    assert not cfac[0].opened, "on_open must not run synchronously inside connect()"
    run_until(loop, lambda: cfac[0].opened)
    for i in range(100):
        conn.write(b"msg %d\n" % i)
    run_until(loop, lambda: len(cfac[0].messages) == 100)
    assert cfac[0].messages == [b"msg %d" % i for i in range(100)]
    assert cfac[0].conn is conn
    conn.close()
    run_until(loop, lambda: cfac[0].closed and sfac[0].closed)
    cfac[0].assert_closed_once(None)
    sfac[0].assert_closed_once(None)


def test_writes_before_connected_are_queued(loop):
    sfac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), sfac, framing=fastmux.Lines())
    cfac = Factory(Recorder)
    conn = loop.connect(server.address, cfac)
    conn.write(b"early 1\n")
    conn.writelines([b"early ", b"2\n"])
    run_until(loop, lambda: sfac.made and len(sfac[0].messages) == 2)
    assert sfac[0].messages == [b"early 1", b"early 2"]
    assert cfac[0].opened


def test_close_right_after_connect_flushes_queued_writes(loop):
    sfac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), sfac, framing=fastmux.Lines())
    cfac = Factory(Recorder)
    conn = loop.connect(server.address, cfac)
    conn.write(b"hello\n")
    conn.close()
    assert conn.closed
    run_until(loop, lambda: sfac.made and sfac[0].closed and cfac[0].closed)
    assert sfac[0].messages == [b"hello"]
    sfac[0].assert_closed_once(None)
    cfac[0].assert_closed_once(None)


def test_port_zero(loop, peers):
    server = loop.listen(("127.0.0.1", 0), Factory(Echo))
    host, port = server.address[:2]
    assert host == "127.0.0.1"
    assert isinstance(port, int) and port != 0
    p = peers.connect(("127.0.0.1", port))
    p.send(b"ping")
    run_until(loop, lambda: p.received == b"ping", peers=[p])


def test_ipv6(loop, peers):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    fac = Factory(Echo)
    server = loop.listen(("::1", 0), fac)
    assert server.address[0] == "::1" and server.address[1] != 0
    p = peers.connect(server.address[:2])
    p.send(b"six")
    run_until(loop, lambda: p.received == b"six", peers=[p])
    # And a fastmux client over IPv6.
    cfac = Factory(Recorder)
    conn = loop.connect(("::1", server.address[1]), cfac)
    conn.write(b"v6")
    run_until(loop, lambda: cfac[0].data == b"v6")


def test_unix_socket(loop, peers, tmp_path):
    path = str(tmp_path / "echo.sock")
    fac = Factory(Echo)
    server = loop.listen(path, fac)
    assert server.address == path
    p = peers.connect(path)
    p.send(b"over unix")
    run_until(loop, lambda: p.received == b"over unix", peers=[p])
    # A fastmux client on the same path, with framing.
    sfac = Factory(LineEcho)
    path2 = str(tmp_path / "lines.sock")
    loop.listen(path2, sfac, framing=fastmux.Lines())
    cfac = Factory(Recorder)
    conn = loop.connect(path2, cfac, framing=fastmux.Lines())
    conn.write(b"a\nb\n")
    run_until(loop, lambda: cfac[0].messages == [b"a", b"b"])
    assert isinstance(conn.fileno(), int)
    conn.close()
    run_until(loop, lambda: cfac[0].closed)
    cfac[0].assert_closed_once(None)


def test_listen_on_existing_socket(loop, peers):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    addr = sock.getsockname()
    try:
        server = loop.listen(None, Factory(Echo), sock=sock)
        assert server.address[:2] == addr
        p = peers.connect(addr)
        p.send(b"via sock=")
        run_until(loop, lambda: p.received == b"via sock=", peers=[p])
    finally:
        loop.close()
        close_if_open(sock)


def test_handler_factory_once_per_connection(loop, peers):
    fac = Factory(Echo)
    server = loop.listen(("127.0.0.1", 0), fac)
    ps = [peers.connect(server.address) for _ in range(3)]
    run_until(loop, lambda: len(fac.opened) == 3)
    spin(loop)
    assert len(fac) == 3
    assert len({id(h) for h in fac.made}) == 3
    assert all(h.open_count == 1 for h in fac.made)
    assert len({id(h.conn) for h in fac.made}) == 3
    for i, p in enumerate(ps):
        p.send(b"%d" % i)
    run_until(loop, lambda: all(p.received for p in ps), peers=ps)
    assert [bytes(p.received) for p in ps] == [b"0", b"1", b"2"]


def test_plain_handler_base_class_works(loop, peers):
    """All callbacks are optional: the bare Handler accepts and discards."""
    server = loop.listen(("127.0.0.1", 0), fastmux.Handler, framing=fastmux.Lines())
    p = peers.connect(server.address)
    p.send(b"ignored\n")
    run_until(loop, lambda: loop.stats()["messages_in"] >= 1, peers=[p])
    p.shutdown_write()
    run_until(loop, lambda: p.eof, peers=[p])  # closed after EOF, queue empty
    run_until(loop, lambda: loop.stats()["connections_open"] == 0)

