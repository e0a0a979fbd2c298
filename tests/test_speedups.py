"""The C accelerator (csrc/speedups.c) against misuse of its internals:
the ways Python code run from inside one of its calls can pull memory from
under it.  Each of these was a use-after-free or an out-of-bounds read;
.ci/sanitize.sh runs them under ASan.  The public API cannot reach most of
them (Loop.close() refuses to run inside an iteration), so they poke at
private attributes -- as a handler that misbehaves badly enough could."""

from __future__ import annotations

import pytest
from support import Factory, Recorder, run_until, spin

import fastmux
from fastmux import _speedups_load

speedups = _speedups_load.speedups

pytestmark = [
    pytest.mark.epoll_only,
    pytest.mark.skipif(speedups is None, reason="fastmux._speedups is not built or disabled"),
]


def test_dispatch_refuses_a_negative_index(loop):
    core = loop._fast
    with pytest.raises(IndexError):
        core.dispatch(-1)  # used to read the 16 bytes before the event array
    with pytest.raises(IndexError):
        core.event(-1)


def test_handler_that_frees_the_loop_mid_batch(loop, peers):
    """The batch lives in the C loop: once a handler has freed it, the
    dispatch must stop instead of reading the freed batch for the next
    message."""

    class Freeing(Recorder):
        def on_message(self, conn, data):
            super().on_message(conn, data)
            loop._backend.close_all()  # the C loop and its batch are freed

    fac = Factory(Freeing)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    p = peers.connect(server.address)
    run_until(loop, lambda: len(fac.made) == 1)
    server.close()  # Server.close() would call into the freed loop below
    p.send(b"a\nb\nc\n")
    with pytest.raises(RuntimeError, match="closed"):
        for _ in range(200):
            p.step()
            loop.run_once(0.01)
    assert fac[0].messages == [b"a"]


class _Stream(speedups.Stream if speedups is not None else object):  # type: ignore[misc]
    __slots__ = ("marks", "on_mark")

    def _mark_dirty(self):
        self.marks += 1
        if self.on_mark is not None:
            self.on_mark(self)


def _stream(core):
    s = _Stream()
    s._wbuf = []
    s._cid = 0
    s.marks = 0
    s.on_mark = None
    s._bind(core)
    return s


def test_bind_sets_the_new_core_before_releasing_the_old(loop):
    """Releasing a Stream's last reference to a Core frees the Core and its
    connection table, whose items' finalizers may write to that Stream: the
    write must find the new binding, not the freed Core."""
    from fastmux._core import ffi, lib  # type: ignore[import-not-found]

    api = int(ffi.cast("uintptr_t", lib.fm_api_table()))
    cloop = int(ffi.cast("uintptr_t", loop._backend._loop))
    writes = []

    class WritesWhenFreed:
        def __del__(self):
            s.write(b"x")
            writes.append(s._core)

    core = speedups.Core(api, cloop, [WritesWhenFreed()])
    s = _stream(core)
    del core  # s holds the only reference
    s._bind(None)
    assert writes == [None]
    assert s._wbuf == [b"x"] and s.marks == 1  # the Python path


def test_write_when_mark_dirty_deletes_the_buffer():
    s = _stream(None)

    def drop(st):
        del st._wbuf

    s.on_mark = drop
    s.write(b"x")  # used to append to NULL
    assert s.marks == 1
    with pytest.raises(AttributeError):
        s.write(b"y")


def test_write_when_check_bytes_returns_no_bytes():
    from fastmux._checks import check_bytes
    from fastmux._errors import ConnectionClosed

    s = _stream(None)
    speedups.setup(ConnectionClosed, lambda value, name: bytearray(value))
    try:
        with pytest.raises(TypeError):
            s.write(bytearray(b"x"))  # used to return with an exception set
    finally:
        speedups.setup(ConnectionClosed, check_bytes)
    s.write(bytearray(b"y"))
    assert s._wbuf == [b"y"]


def test_connections_outlive_their_closed_loop(backend, peers):
    """Loop.close() frees the C loop (Core.detach first); Connection objects
    the program kept still refuse writes, close and abort safely."""
    lp = fastmux.Loop(backend=backend)
    try:
        fac = Factory(Recorder)
        server = lp.listen(("127.0.0.1", 0), fac)
        for _ in range(3):
            peers.connect(server.address)
        run_until(lp, lambda: len(fac.made) == 3)
        kept = [h.conn for h in fac.made]
        kept[0].write(b"queued" * 10000)  # held for the end of the iteration
        kept[1].write(b"sent" * 10000)
        spin(lp, 1)
        kept[1].write(b"queued")
    finally:
        lp.close()
    for c in kept:
        with pytest.raises(fastmux.ConnectionClosed):
            c.write(b"after")
        c.close()
        c.abort()
        c.shutdown_write()
        assert c.write_buffer_size == 0
