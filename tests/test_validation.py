"""Bad input gets a clear error at the call, the same on both backends (issue 8, item 7).

One table: each row is a call with one bad argument, the exception it must
raise at once, and a substring that names the argument.  Every row runs on
both backends, and must leave nothing behind: no server, connection,
callback, timer, socket (the autouse leak check) or socket file.
"""

from __future__ import annotations

import math
import os
import pathlib
import signal
import socket
import sys
import warnings

import pytest
from support import Factory, Recorder, run_until

import fastmux
from fastmux import Delimiter, Fixed, Handler, LengthPrefixed, Lines, _backend

LOCAL = "127.0.0.1"


def noop() -> None:
    pass


class Ctx:
    """What a row may use: the loop, and a live connection made on demand."""

    def __init__(self, loop: fastmux.Loop, backend: str) -> None:
        self.loop = loop
        self.backend = backend
        self._conn: fastmux.Connection | None = None
        self._peer: socket.socket | None = None

    def conn(self) -> fastmux.Connection:
        if self._conn is None:
            mine, self._peer = socket.socketpair()
            self._conn = self.loop.connect(None, Handler, sock=mine)
        return self._conn

    def close(self) -> None:
        if self._peer is not None:
            self._peer.close()


def listen(c: Ctx, address=(LOCAL, 0), factory=Handler, **kw):
    return c.loop.listen(address, factory, **kw)


def connect(c: Ctx, address=(LOCAL, 9), factory=Handler, **kw):
    return c.loop.connect(address, factory, **kw)


def pool(c: Ctx, address=(LOCAL, 0), factory=Handler, **kw):
    kw.setdefault("workers", 2)
    return fastmux.WorkerPool(address, factory, backend=c.backend, **kw)


# (id, call, exception type, substring of the message naming the argument)
ROWS = [
    # -- addresses ----------------------------------------------------------
    ("listen-port-70000", lambda c: listen(c, (LOCAL, 70000)), ValueError, "port"),
    ("listen-port-negative", lambda c: listen(c, (LOCAL, -1)), ValueError, "port"),
    ("listen-port-str", lambda c: listen(c, (LOCAL, "8080")), TypeError, "port"),
    ("listen-port-bool", lambda c: listen(c, (LOCAL, True)), TypeError, "port"),
    ("listen-port-float", lambda c: listen(c, (LOCAL, 80.0)), TypeError, "port"),
    ("listen-host-port-str", lambda c: listen(c, "localhost:8080"), ValueError,
     "('localhost', 8080)"),
    ("listen-bare-name-str", lambda c: listen(c, "app.sock"), ValueError, "./app.sock"),
    ("listen-address-int", lambda c: listen(c, 8080), TypeError, "address"),
    ("listen-address-short", lambda c: listen(c, (LOCAL,)), ValueError, "address"),
    ("listen-host-int", lambda c: listen(c, (127, 80)), TypeError, "host"),
    ("listen-no-address", lambda c: listen(c, None), ValueError, "address"),
    ("connect-port-70000", lambda c: connect(c, (LOCAL, 70000)), ValueError, "port"),
    ("connect-port-negative", lambda c: connect(c, (LOCAL, -1)), ValueError, "port"),
    ("connect-host-port-str", lambda c: connect(c, "localhost:8080"), ValueError,
     "('localhost', 8080)"),
    ("pool-port-70000", lambda c: pool(c, (LOCAL, 70000)), ValueError, "port"),
    ("pool-host-port-str", lambda c: pool(c, "localhost:8080"), ValueError, "address"),
    ("serve-port-99999", lambda c: fastmux.serve((LOCAL, 99999), Handler, backend=c.backend),
     ValueError, "port"),
    # -- handler factories ------------------------------------------------------
    ("listen-factory-int", lambda c: listen(c, factory=42), TypeError, "handler_factory"),
    ("listen-factory-instance", lambda c: listen(c, factory=Handler()), TypeError,
     "handler_factory"),
    ("connect-factory-int", lambda c: connect(c, factory=42), TypeError, "handler_factory"),
    ("pool-factory-int", lambda c: pool(c, factory=42), TypeError, "handler_factory"),
    # -- listen/connect options ---------------------------------------------------
    ("listen-framing-str", lambda c: listen(c, framing="lines"), TypeError, "framing"),
    ("listen-sock-str", lambda c: listen(c, None, sock="fd"), TypeError, "sock"),
    ("listen-backlog-negative", lambda c: listen(c, backlog=-1), ValueError, "backlog"),
    ("listen-backlog-str", lambda c: listen(c, backlog="9"), TypeError, "backlog"),
    ("listen-max-connections-negative", lambda c: listen(c, max_connections=-1), ValueError,
     "max_connections"),
    ("listen-max-connections-float", lambda c: listen(c, max_connections=2.5), TypeError,
     "max_connections"),
    ("listen-idle-zero", lambda c: listen(c, idle_timeout=0), ValueError, "idle_timeout"),
    ("listen-idle-negative", lambda c: listen(c, idle_timeout=-1), ValueError, "idle_timeout"),
    ("listen-idle-nan", lambda c: listen(c, idle_timeout=math.nan), ValueError, "idle_timeout"),
    ("listen-idle-inf", lambda c: listen(c, idle_timeout=math.inf), ValueError, "idle_timeout"),
    ("listen-idle-str", lambda c: listen(c, idle_timeout="5"), TypeError, "idle_timeout"),
    ("listen-max-write-buffer-negative", lambda c: listen(c, max_write_buffer=-5), ValueError,
     "max_write_buffer"),
    ("listen-max-write-buffer-zero", lambda c: listen(c, max_write_buffer=0), ValueError,
     "max_write_buffer"),
    ("listen-max-write-buffer-huge", lambda c: listen(c, max_write_buffer=2 ** 64), ValueError,
     "max_write_buffer"),
    ("listen-max-write-buffer-float", lambda c: listen(c, max_write_buffer=1e6), TypeError,
     "max_write_buffer"),
    ("connect-timeout-zero", lambda c: connect(c, timeout=0), ValueError, "timeout"),
    ("connect-timeout-negative", lambda c: connect(c, timeout=-1), ValueError, "timeout"),
    ("connect-timeout-str", lambda c: connect(c, timeout="5"), TypeError, "timeout"),
    ("connect-idle-zero", lambda c: connect(c, idle_timeout=0), ValueError, "idle_timeout"),
    ("connect-max-write-buffer-negative", lambda c: connect(c, max_write_buffer=-5),
     ValueError, "max_write_buffer"),
    ("connect-framing-bytes", lambda c: connect(c, framing=b"\n"), TypeError, "framing"),
    ("connect-sock-int", lambda c: connect(c, None, sock=3), TypeError, "sock"),
    ("pool-idle-zero", lambda c: pool(c, idle_timeout=0), ValueError, "idle_timeout"),
    ("pool-max-write-buffer-negative", lambda c: pool(c, max_write_buffer=-5), ValueError,
     "max_write_buffer"),
    ("pool-unknown-option", lambda c: pool(c, max_conections=3), TypeError, "max_conections"),
    ("pool-backend-unknown", lambda c: fastmux.WorkerPool((LOCAL, 0), Handler, backend="kqueue"),
     ValueError, "backend"),
    # -- callbacks and timers -----------------------------------------------------
    ("call_soon-int", lambda c: c.loop.call_soon(42), TypeError, "fn"),
    ("call_soon_threadsafe-int", lambda c: c.loop.call_soon_threadsafe(42), TypeError, "fn"),
    ("call_later-int", lambda c: c.loop.call_later(1, 42), TypeError, "fn"),
    ("call_at-int", lambda c: c.loop.call_at(0, 42), TypeError, "fn"),
    ("call_later-delay-str", lambda c: c.loop.call_later("1", noop), TypeError, "delay"),
    ("call_later-delay-nan", lambda c: c.loop.call_later(math.nan, noop), ValueError, "delay"),
    ("call_at-when-str", lambda c: c.loop.call_at("now", noop), TypeError, "when"),
    ("add_signal_handler-fn", lambda c: c.loop.add_signal_handler(signal.SIGUSR1, 42),
     TypeError, "fn"),
    ("add_signal_handler-signum", lambda c: c.loop.add_signal_handler(99999, noop),
     ValueError, "signum"),
    ("run_once-timeout-str", lambda c: c.loop.run_once("0"), TypeError, "timeout"),
    ("run_once-timeout-nan", lambda c: c.loop.run_once(math.nan), ValueError, "timeout"),
    ("shutdown-timeout-negative", lambda c: c.loop.shutdown(-1), ValueError, "timeout"),
    # -- connections ------------------------------------------------------------
    ("write-str", lambda c: c.conn().write("hello"), TypeError, "data"),
    ("write-int", lambda c: c.conn().write(5), TypeError, "data"),
    ("writelines-bytes", lambda c: c.conn().writelines(b"ab"), TypeError, "data"),
    ("set_write_limits-negative", lambda c: c.conn().set_write_limits(high=-1), ValueError,
     "high"),
    ("set_write_limits-str", lambda c: c.conn().set_write_limits(low="1"), TypeError, "low"),
    ("set_framing-str", lambda c: c.conn().set_framing("lines"), TypeError, "framing"),
    # -- framing specs ----------------------------------------------------------
    ("Delimiter-str", lambda c: Delimiter("\r\n"), TypeError, "sep"),
    ("Delimiter-int", lambda c: Delimiter(5), TypeError, "sep"),
    ("Delimiter-max_size-zero", lambda c: Delimiter(b"\n", max_size=0), ValueError,
     "max_size"),
    ("Delimiter-max_size-float", lambda c: Delimiter(b"\n", max_size=1e3), TypeError,
     "max_size"),
    ("Lines-max_size-bool", lambda c: Lines(max_size=True), TypeError, "max_size"),
    ("Lines-max_size-huge", lambda c: Lines(max_size=2 ** 31), ValueError, "max_size"),
    ("Fixed-bool", lambda c: Fixed(True), TypeError, "size"),
    ("Fixed-float", lambda c: Fixed(4.0), TypeError, "size"),
    ("Fixed-zero", lambda c: Fixed(0), ValueError, "size"),
    ("LengthPrefixed-bool", lambda c: LengthPrefixed(True), TypeError, "header_size"),
    ("LengthPrefixed-float", lambda c: LengthPrefixed(4.0), TypeError, "header_size"),
    ("LengthPrefixed-3", lambda c: LengthPrefixed(3), ValueError, "header_size"),
    ("LengthPrefixed-byteorder-int", lambda c: LengthPrefixed(4, 1), TypeError, "byteorder"),
    ("LengthPrefixed-byteorder-middle", lambda c: LengthPrefixed(4, "middle"), ValueError,
     "byteorder"),
    ("LengthPrefixed-max_size-str", lambda c: LengthPrefixed(4, max_size="9"), TypeError,
     "max_size"),
]


def _state(loop: fastmux.Loop) -> tuple:
    return (len(loop._servers), len(loop._live), len(loop._ready), len(loop._timers),
            loop.stats()["connections_open"])


@pytest.mark.parametrize("call, exc_type, names", [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_bad_argument_raises_at_the_call(loop, backend, tmp_path, monkeypatch, call,
                                         exc_type, names):
    monkeypatch.chdir(tmp_path)  # a str taken for a Unix path would land here
    ctx = Ctx(loop, backend)
    try:
        if "conn" in call.__code__.co_names:
            ctx.conn()  # made before the snapshot: the row uses it
        before = _state(loop)
        with pytest.raises(exc_type) as info:
            call(ctx)
        assert names in str(info.value), str(info.value)
        assert _state(loop) == before, "the rejected call left something behind"
        assert os.listdir(tmp_path) == []
        # The loop is still usable.
        ran = []
        loop.call_soon(ran.append, 1)
        loop.run_once(0)
        assert ran == [1]
    finally:
        ctx.close()


def test_table_covers_the_issue_cases():
    """The cases issue 8 names are all in the table."""
    ids = {r[0] for r in ROWS}
    for case in ("listen-port-70000", "connect-port-70000", "pool-port-70000",
                 "serve-port-99999", "listen-host-port-str", "listen-factory-int",
                 "call_soon-int", "listen-idle-zero", "listen-idle-negative",
                 "connect-timeout-zero", "connect-timeout-negative",
                 "listen-max-write-buffer-negative", "connect-timeout-str", "Delimiter-str",
                 "Fixed-bool"):
        assert case in ids


# --- what is still accepted --------------------------------------------------------

def test_unix_path_forms(loop, backend, tmp_path, monkeypatch):
    """A str with a "/", a pathlib.Path (even a bare name) and bytes are Unix paths."""
    monkeypatch.chdir(tmp_path)
    for address, name in (("./a.sock", "a.sock"), (pathlib.Path("b.sock"), "b.sock"),
                          (b"./c.sock", "c.sock"), (str(tmp_path / "d.sock"), "d.sock")):
        fac = Factory(Recorder)
        server = loop.listen(address, fac, framing=Lines())
        assert os.path.exists(tmp_path / name)
        cfac = Factory(Recorder)
        loop.connect(address, cfac)
        run_until(loop, lambda: len(fac) == 1 and cfac[0].opened, what=f"connect to {address!r}")
        cfac[0].conn.write(b"hi\n")
        run_until(loop, lambda: fac[0].messages == [b"hi"])
        cfac[0].conn.close()
        server.close()
        assert not os.path.exists(tmp_path / name)


def test_edge_values_accepted(loop, backend):
    """The limits of each rule are accepted: port 0, max_connections=0, the
    None spellings of "no limit", a negative delay, the largest sizes."""
    s = loop.listen((LOCAL, 0), Handler, max_connections=0, idle_timeout=None,
                    max_write_buffer=None, backlog=0)
    s.close()
    s = loop.listen((LOCAL, 0), Handler, idle_timeout=0.001, max_write_buffer=1)
    s.close()
    ran = []
    loop.call_later(-1, ran.append, "later")
    loop.call_at(0, ran.append, "at")
    run_until(loop, lambda: len(ran) == 2)
    assert Fixed(2 ** 31 - 1).size == 2 ** 31 - 1
    assert Delimiter(bytearray(b"\r\n")).sep == b"\r\n"
    assert Delimiter(memoryview(b"--")).sep == b"--"
    assert LengthPrefixed(8, "little", max_size=2 ** 31 - 1).max_size == 2 ** 31 - 1


def test_write_accepts_bytes_like(loop, backend, peers):
    fac = Factory(Recorder)
    server = loop.listen((LOCAL, 0), fac)
    p = peers.connect(server.address)
    run_until(loop, lambda: len(fac) == 1)
    conn = fac[0].conn
    conn.write(bytearray(b"a"))
    conn.write(memoryview(b"b"))
    conn.writelines([b"c", bytearray(b"d")])
    run_until(loop, lambda: bytes(p.received) == b"abcd", peers=[p])


# --- the fallback warning ------------------------------------------------------------

@pytest.fixture
def no_core(monkeypatch):
    """As if the C core did not import, and nobody asked for pure Python."""
    monkeypatch.setattr(_backend, "epoll_available", lambda: False)
    monkeypatch.setattr(_backend, "_fallback_warned", False)
    if not sys.platform.startswith("linux"):
        pytest.skip("the fallback warning is about Linux, where epoll is expected")
    monkeypatch.delenv("FASTMUX_PURE", raising=False)
    monkeypatch.delenv("FASTMUX_BACKEND", raising=False)
    if _backend._fallback_cause(os.path.dirname(_backend.__file__)) is None:
        pytest.skip("an installed pure-Python fastmux: select was chosen at install")


def test_fallback_cause(tmp_path):
    """Source tree: warn; installed with a core that does not load: warn;
    installed without a core (FASTMUX_PURE=1): chosen, no warning."""
    src = tmp_path / "src"
    (src / "csrc").mkdir(parents=True)
    (src / "csrc" / "fastmux.h").write_text("")
    (src / "fastmux").mkdir()
    assert "source tree" in _backend._fallback_cause(str(src / "fastmux"))
    broken = tmp_path / "site" / "fastmux"
    broken.mkdir(parents=True)
    (broken / "_core.abi3.so").write_bytes(b"")
    assert "does not load" in _backend._fallback_cause(str(broken))
    pure = tmp_path / "site2" / "fastmux"
    pure.mkdir(parents=True)
    assert _backend._fallback_cause(str(pure)) is None


def test_missing_core_warns_once(no_core):
    with pytest.warns(RuntimeWarning, match=r"C core.*select backend") as caught:
        with fastmux.Loop() as lp:
            assert lp.backend == "select"
    assert len(caught) == 1
    assert caught[0].filename == __file__  # points at the Loop() call
    assert "FASTMUX_BACKEND=select" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fastmux.Loop() as lp:  # once per process
            assert lp.backend == "select"


@pytest.mark.parametrize("env", [{"FASTMUX_PURE": "1"}, {"FASTMUX_BACKEND": "select"}])
def test_missing_core_asked_for_does_not_warn(no_core, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fastmux.Loop() as lp:
            assert lp.backend == "select"


def test_missing_core_warns_in_the_pool_supervisor(no_core):
    """A pool says it once, before it forks; its workers inherit that."""
    with pytest.warns(RuntimeWarning, match="C core") as caught:
        fastmux.WorkerPool((LOCAL, 0), Handler, workers=2)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert _backend._fallback_warned


def test_explicit_select_never_warns(no_core):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fastmux.Loop("select"):
            pass
