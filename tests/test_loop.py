"""The loop itself: construction, callbacks, timers, threads, signals,
exceptions, stats, run/stop/close."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
from support import DEADLINE, Echo, Factory, Recorder, run_until, spin

import fastmux
from fastmux import _backend

# --- construction and errors -------------------------------------------------------

def test_error_hierarchy():
    assert issubclass(fastmux.FastmuxError, Exception)
    assert issubclass(fastmux.MessageTooLarge, fastmux.FastmuxError)
    assert issubclass(fastmux.MessageTooLarge, ValueError)
    assert issubclass(fastmux.ConnectionClosed, fastmux.FastmuxError)
    assert issubclass(fastmux.ConnectionClosed, ConnectionError)
    assert issubclass(fastmux.BackendUnavailable, fastmux.FastmuxError)
    assert issubclass(fastmux.BackendUnavailable, RuntimeError)
    # From the limits issue; only their place in the hierarchy here.
    assert issubclass(fastmux.WriteBufferFull, fastmux.FastmuxError)
    assert issubclass(fastmux.IdleTimeout, fastmux.FastmuxError)
    assert issubclass(fastmux.IdleTimeout, TimeoutError)
    for name in ("FastmuxError", "MessageTooLarge", "ConnectionClosed", "BackendUnavailable",
                 "Loop", "Handler"):
        assert name in fastmux.__all__, name


def test_bogus_backend_raises_value_error():
    with pytest.raises(ValueError):
        fastmux.Loop(backend="bogus")


def test_forcing_unavailable_epoll_raises_backend_unavailable(monkeypatch):
    monkeypatch.setattr(_backend, "epoll_available", lambda: False)
    with pytest.raises(fastmux.BackendUnavailable):
        fastmux.Loop(backend="epoll")


def test_auto_backend(monkeypatch):
    monkeypatch.delenv("FASTMUX_BACKEND", raising=False)
    with fastmux.Loop() as lp:
        assert lp.backend == ("epoll" if _backend.epoll_available() else "select")


def test_backend_name(loop, backend):
    assert loop.backend == backend


def test_context_manager_closes(backend):
    with fastmux.Loop(backend=backend) as lp:
        assert isinstance(lp, fastmux.Loop)
        ran = []
        lp.call_soon(ran.append, 1)
        lp.run_once(0)
        assert ran == [1]
    lp.close()  # idempotent after the with block


# --- call_soon ---------------------------------------------------------------------

def test_call_soon_fifo_with_args(loop):
    got = []
    for i in range(100):
        loop.call_soon(got.append, i)
    loop.call_soon(lambda *a: got.append(a), 1, "two", None)
    assert got == [], "callbacks never run inside call_soon"
    loop.run_once(0)
    assert got == list(range(100)) + [(1, "two", None)]


def test_callbacks_scheduled_during_iteration_run_in_next(loop):
    got = []

    def first():
        got.append("first")
        loop.call_soon(got.append, "second")

    loop.call_soon(first)
    loop.run_once(0)
    assert got == ["first"]
    loop.run_once(0)
    assert got == ["first", "second"]


def test_timers_scheduled_during_iteration_run_in_next(loop):
    """call_later(0)/call_at(past) made by a callback is a callback scheduled
    during the iteration: it runs in the next one, not in the same timer phase."""
    got = []

    def first():
        got.append("first")
        loop.call_later(0, got.append, "later0")
        loop.call_at(loop.time() - 1, got.append, "past")

    loop.call_soon(first)
    loop.run_once(0)
    assert got == ["first"]
    loop.run_once(0)
    assert got == ["first", "past", "later0"]  # deadline order


def test_run_once_returns_dispatch_count(loop):
    for _ in range(3):
        loop.call_soon(lambda: None)
    assert loop.run_once(0) >= 3
    assert loop.run_once(0) == 0


def test_run_once_timeout_is_bounded(loop):
    t0 = time.monotonic()
    assert loop.run_once(0.1) == 0
    elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 2.0


# --- timers ------------------------------------------------------------------------

def test_timer_order(loop):
    got = []
    now = loop.time()
    loop.call_later(0.06, got.append, "c")
    loop.call_later(0.02, got.append, "a")
    loop.call_at(now + 0.04, got.append, "b")
    loop.call_later(0, got.append, "zero")
    run_until(loop, lambda: len(got) == 4)
    assert got == ["zero", "a", "b", "c"]


def test_timer_cancel(loop):
    got = []
    h1 = loop.call_later(0.01, got.append, 1)
    h2 = loop.call_later(0.02, got.append, 2)
    h3 = loop.call_at(loop.time() + 0.03, got.append, 3)
    h2.cancel()
    h2.cancel()  # twice is harmless
    run_until(loop, lambda: 3 in got)
    spin(loop, 5)
    assert got == [1, 3]
    h1.cancel()  # after it fired: harmless
    h3.cancel()


def test_cancel_from_another_callback(loop):
    got = []
    victim = loop.call_later(0.05, got.append, "victim")
    loop.call_later(0.01, victim.cancel)
    loop.call_later(0.1, got.append, "end")
    run_until(loop, lambda: "end" in got)
    assert got == ["end"]


def test_timers_never_fire_early(loop):
    records = []
    start_wall = time.monotonic()
    for delay in (0.0, 0.001, 0.005, 0.013, 0.02, 0.05, 0.1, 0.15):
        when = loop.time() + delay
        loop.call_at(when, lambda w=when, d=delay: records.append((w, d, loop.time(), time.monotonic())))
    run_until(loop, lambda: len(records) == 8)
    for when, delay, fired, wall in records:
        assert fired >= when, f"timer for +{delay}s fired {when - fired:.6f}s early"
        assert wall - start_wall >= delay - 1e-4


def test_call_at_in_the_past_runs_next_iteration(loop):
    got = []
    loop.call_at(loop.time() - 10, got.append, 1)
    run_until(loop, lambda: got == [1], timeout=1)


def test_time_is_monotonic(loop):
    values = [loop.time() for _ in range(1000)]
    assert values == sorted(values)
    t0 = loop.time()
    time.sleep(0.05)
    assert 0.04 <= loop.time() - t0 < 2.0


def test_timer_wakes_a_blocked_run_once(loop):
    got = []
    loop.call_later(0.05, got.append, 1)
    t0 = time.monotonic()
    while not got:
        loop.run_once(5.0)  # must return when the timer is due
        assert time.monotonic() - t0 < 2.0
    assert got == [1]


# --- threads -----------------------------------------------------------------------

def test_call_soon_threadsafe_from_8_threads_none_lost(loop):
    n_threads, per_thread = 8, 2000
    got = []
    barrier = threading.Barrier(n_threads)

    def worker(tid):
        barrier.wait(DEADLINE)
        for i in range(per_thread):
            loop.call_soon_threadsafe(got.append, (tid, i))

    ts = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(n_threads)]
    for t in ts:
        t.start()
    try:
        run_until(loop, lambda: len(got) >= n_threads * per_thread, timeout=30)
    finally:
        for t in ts:
            t.join(DEADLINE)
    spin(loop, 3)
    assert len(got) == n_threads * per_thread
    # FIFO: each thread's callbacks ran in the order it scheduled them.
    for tid in range(n_threads):
        assert [i for t, i in got if t == tid] == list(range(per_thread))


def test_call_soon_threadsafe_wakes_blocked_loop(loop, threads):
    got = []
    threads.start(lambda: (time.sleep(0.1), loop.call_soon_threadsafe(got.append, "woken")))
    t0 = time.monotonic()
    while not got:
        loop.run_once(5.0)
        assert time.monotonic() - t0 < 3.0, "call_soon_threadsafe did not wake the loop"
    threads.join_all()
    assert got == ["woken"]


def test_run_and_stop_from_another_thread(loop, threads):
    threads.start(lambda: (time.sleep(0.05), loop.call_soon_threadsafe(loop.stop)))
    t0 = time.monotonic()
    loop.run()
    assert time.monotonic() - t0 < 5.0
    threads.join_all()


# --- run / stop / close ------------------------------------------------------------

def _watchdog(loop, seconds=DEADLINE):
    """Stop a run() that did not return on its own; returns a flag list."""
    fired = []

    def fire():
        fired.append(True)
        loop.stop()

    handle = loop.call_later(seconds, fire)
    return fired, handle


def test_run_returns_after_stop(loop):
    got = []
    loop.call_later(0.05, got.append, 1)
    loop.call_later(0.1, loop.stop)
    fired, wd = _watchdog(loop)
    loop.run()
    wd.cancel()
    assert not fired
    assert got == [1]
    # run() can be called again.
    loop.call_soon(loop.stop)
    loop.run()


def test_close_while_running_raises(loop):
    errors = []

    def try_close():
        try:
            loop.close()
        except RuntimeError as e:
            errors.append(e)
        loop.stop()

    loop.call_soon(try_close)
    fired, wd = _watchdog(loop)
    loop.run()
    wd.cancel()
    assert len(errors) == 1
    loop.close()
    loop.close()


@pytest.mark.parametrize("outer", ["run_once", "run"])
def test_run_once_from_inside_an_iteration_raises(loop, peers, outer):
    """A handler or callback cannot run the loop it is called from: the
    batch being dispatched (on the epoll backend, in the C core's memory)
    would be overwritten by the inner poll -- messages later in the outer
    batch lost, the inner batch's delivered twice.  The batch goes on.
    `outer` drives the loop: run() with only I/O to do takes its own path
    (Loop._run_io) on the epoll backend."""
    errors = []

    class Nest(Recorder):
        def on_message(self, conn, data):
            super().on_message(conn, data)
            if data == b"nest":
                # Bytes for the other connection reach the kernel first, so
                # an inner poll would have a batch of its own to deliver.
                other.send(b"x1\nx2\n")
                try:
                    loop.run_once(0)
                except RuntimeError as e:
                    errors.append(e)
                loop.call_soon(loop.stop)  # bounds an inner run(), were it allowed
                try:
                    loop.run()
                except RuntimeError as e:
                    errors.append(e)
            if len(fac[0].messages) >= 3 and len(fac[1].messages) >= 2:
                loop.stop()

    fac = Factory(Nest)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    nest = peers.connect(server.address)
    run_until(loop, lambda: len(fac.made) == 1)
    other = peers.connect(server.address)
    run_until(loop, lambda: len(fac.made) == 2)
    nest.send(b"nest\na2\na3\n")
    if outer == "run":
        # No timer (a timer would make run() take run_once's path): a
        # thread stops a run() that does not end by itself.
        watchdog = threading.Timer(DEADLINE, loop.call_soon_threadsafe, (loop.stop,))
        watchdog.start()
        try:
            loop.run()
        finally:
            watchdog.cancel()
            watchdog.join()
    run_until(loop, lambda: len(fac[0].messages) >= 3 and len(fac[1].messages) >= 2,
              peers=[nest, other])
    spin(loop, 3, peers=[nest, other])
    assert len(errors) == 2, errors
    assert fac[0].messages == [b"nest", b"a2", b"a3"]
    assert fac[1].messages == [b"x1", b"x2"]
    assert not loop.is_running()

    ran = []

    def callback():
        try:
            loop.run_once(0)
        except RuntimeError:
            ran.append("refused")

    loop.call_soon(callback)
    loop.run_once(0)
    assert ran == ["refused"]
    loop.call_soon(ran.append, "next")
    loop.run_once(0)  # the loop still runs
    assert ran == ["refused", "next"]


def test_base_exception_leaves_run(loop):
    def interrupt():
        raise KeyboardInterrupt

    loop.call_soon(interrupt)
    fired, wd = _watchdog(loop)
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    wd.cancel()
    assert not fired
    loop.close()  # no longer running


def test_loop_close_closes_connections_and_releases_fds(backend, tmp_path):
    before = set(os.listdir("/proc/self/fd"))
    lp = fastmux.Loop(backend=backend)
    sfac = Factory(Recorder)
    server = lp.listen(("127.0.0.1", 0), sfac)
    lp.listen(str(tmp_path / "u.sock"), Factory(Recorder))
    cfac = Factory(Recorder)
    conns = [lp.connect(server.address, cfac) for _ in range(3)]
    run_until(lp, lambda: len(sfac.opened) == 3 and len(cfac.opened) == 3)
    conns[0].write(b"queued")
    lp.close()
    for h in sfac.made + cfac.made:
        h.assert_closed_once(None)
    assert all(c.closed for c in conns)
    lp.close()  # idempotent
    assert set(os.listdir("/proc/self/fd")) <= before


def test_loop_close_fails_pending_connect(backend):
    lp = fastmux.Loop(backend=backend)
    cfac = Factory(Recorder)
    srv = lp.listen(("127.0.0.1", 0), Factory(Recorder))
    lp.connect(srv.address, cfac)
    lp.close()  # before the connection is up
    cfac[0].assert_closed_once(None)
    assert not cfac[0].opened


# --- signals -----------------------------------------------------------------------

@pytest.fixture
def usr1_restored():
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_signal_handler(loop, usr1_restored):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, "usr1")
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: got, timeout=5)
    spin(loop, 3)
    assert got == ["usr1"]
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: len(got) == 2, timeout=5)
    loop.remove_signal_handler(signal.SIGUSR1)


def test_signal_wakes_blocked_loop(loop, usr1_restored, threads):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, 1)
    threads.start(lambda: (time.sleep(0.1), os.kill(os.getpid(), signal.SIGUSR1)))
    t0 = time.monotonic()
    while not got:
        loop.run_once(5.0)
        assert time.monotonic() - t0 < 3.0, "a signal did not wake the loop"
    threads.join_all()
    loop.remove_signal_handler(signal.SIGUSR1)


def test_remove_signal_handler_restores_previous(loop, usr1_restored):
    mine = []

    def previous(signum, frame):
        mine.append(signum)

    signal.signal(signal.SIGUSR1, previous)
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, 1)
    loop.remove_signal_handler(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is previous
    os.kill(os.getpid(), signal.SIGUSR1)
    spin(loop, 3)
    assert got == []
    assert mine == [signal.SIGUSR1]


def test_loop_close_removes_signal_handlers(backend, usr1_restored):
    previous = signal.getsignal(signal.SIGUSR1)
    lp = fastmux.Loop(backend=backend)
    lp.add_signal_handler(signal.SIGUSR1, lambda: None)
    lp.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


# --- exceptions --------------------------------------------------------------------

class Boom(Echo):
    suffix = b"\n"

    def on_message(self, conn, data):
        if data == b"boom":
            self.error = ZeroDivisionError("boom")
            raise self.error
        super().on_message(conn, data)


def test_handler_exception(loop, peers):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append((lp, ctx)))
    fac = Factory(Boom)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    bad = peers.connect(server.address)
    run_until(loop, lambda: len(fac.opened) == 1)
    good = peers.connect(server.address)
    run_until(loop, lambda: len(fac.opened) == 2)
    hbad, hgood = fac[0], fac[1]
    bad.send(b"ok\nboom\nafter\n")
    run_until(loop, lambda: hbad.closed and bad.done, peers=[bad])
    # Delivered to the exception handler, with the connection.
    assert len(contexts) == 1
    lp, ctx = contexts[0]
    assert lp is loop
    assert isinstance(ctx["message"], str) and ctx["message"]
    assert ctx["exception"] is hbad.error
    assert ctx["connection"] is hbad.conn
    # The connection was aborted; on_close got the exception; no message after.
    assert hbad.messages == [b"ok"]
    assert hbad.close_exc is hbad.error
    hbad.assert_closed_once(ZeroDivisionError)
    assert hbad.conn.closed
    # The loop keeps serving the others.
    good.send(b"still\n")
    run_until(loop, lambda: good.received == b"still\n", peers=[good])
    assert not hgood.closed


def test_exception_in_on_open_and_on_close(loop, peers):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    class BadOpen(Recorder):
        def on_open(self, conn):
            super().on_open(conn)
            raise KeyError("open")

        def on_close(self, conn, exc):
            super().on_close(conn, exc)
            raise LookupError("close")

    fac = Factory(BadOpen)
    server = loop.listen(("127.0.0.1", 0), fac)
    p = peers.connect(server.address)
    run_until(loop, lambda: fac.made and fac[0].closed and p.done, peers=[p])
    spin(loop, 5, peers=[p])
    h = fac[0]
    h.assert_closed_once(KeyError)
    excs = [type(c["exception"]) for c in contexts]
    assert excs == [KeyError, LookupError]
    # The loop still works.
    got = []
    loop.call_soon(got.append, 1)
    loop.run_once(0)
    assert got == [1]


def test_callback_exception_goes_to_handler_loop_continues(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    got = []
    err = ValueError("cb")

    def bad():
        raise err

    loop.call_soon(bad)
    loop.call_soon(got.append, "after")
    loop.call_later(0.01, bad)
    loop.call_later(0.02, got.append, "timer after")
    run_until(loop, lambda: len(got) == 2)
    assert got == ["after", "timer after"]
    assert [c["exception"] for c in contexts] == [err, err]
    assert all(isinstance(c["message"], str) for c in contexts)


def test_default_exception_handler_logs_traceback(loop, caplog):
    def bad():
        raise RuntimeError("logged please")

    loop.call_soon(bad)
    with caplog.at_level(logging.ERROR, logger="fastmux"):
        loop.run_once(0)
    records = [r for r in caplog.records if r.name.startswith("fastmux")]
    assert records, "nothing logged through logging.getLogger('fastmux')"
    assert "logged please" in caplog.text
    assert "Traceback" in caplog.text


# --- stats -------------------------------------------------------------------------

def test_stats(loop, peers):
    keys = {"connections_open", "accepted", "rejected", "bytes_in", "bytes_out",
            "messages_in", "messages_out"}
    st = loop.stats()
    assert keys <= set(st)
    assert all(st[k] == 0 for k in keys), st
    fac = Factory(Echo)
    server = loop.listen(("127.0.0.1", 0), fac, framing=fastmux.Lines())
    p = peers.connect(server.address)
    p.send(b"a\nbb\nccc\n")
    run_until(loop, lambda: len(p.received) >= 6, peers=[p])
    st = loop.stats()
    assert st["accepted"] == 1
    assert st["connections_open"] == 1
    assert st["rejected"] == 0
    assert st["bytes_in"] == 9
    assert st["bytes_out"] == 6
    assert st["messages_in"] == 3
    assert st["messages_out"] >= 1
    p.close()
    run_until(loop, lambda: loop.stats()["connections_open"] == 0)
    assert loop.stats()["accepted"] == 1


def test_run_once_refuses_to_nest(loop, peers):
    """run_once() from a handler or a callback raises RuntimeError (the
    batch being dispatched must not be replaced under the dispatcher), and
    the iteration goes on."""
    errors = []

    class Nest(Recorder):
        def on_message(self, conn, data):
            super().on_message(conn, data)
            try:
                conn.loop.run_once(0)
            except RuntimeError as e:
                errors.append(str(e))
            conn.write(data)

    fac = Factory(Nest)
    server = loop.listen(("127.0.0.1", 0), fac)
    p = peers.connect(server.address)
    p.send(b"ping")

    def nested_from_callback():
        try:
            loop.run_once(0)
        except RuntimeError as e:
            errors.append(str(e))

    loop.call_soon(nested_from_callback)
    run_until(loop, lambda: p.received == b"ping", peers=[p])
    assert len(errors) == 2 and all("inside an iteration" in e for e in errors), errors
