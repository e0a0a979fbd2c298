"""Cross-thread wake-ups: ``call_soon_threadsafe`` and ``stop`` from other threads.

A loop blocked in its poll must wake for every callback queued from another
thread.  The epoll core collapses wake-ups with a ``wake_pending`` flag in
front of an eventfd; clearing that flag before draining the eventfd let a
wake-up land in between and be eaten, after which the flag stayed set over
an empty eventfd and every later wake-up wrote nothing: the loop slept with
thousands of callbacks queued.

Each test arms a watchdog *timer on the loop itself*: a lost wake-up then
shows as the watchdog firing (a failure naming the lost wake-up), never as
a hang, because the timer wakes the loop by its own means.
"""

from __future__ import annotations

import threading

import pytest

WATCHDOG = 10.0  # seconds; the work itself takes well under one


def _run_with_watchdog(loop, done):
    """loop.run() until `done()` is true (checked by the callbacks, which
    stop the loop) or the watchdog fires; returns True if the watchdog fired."""
    fired = []

    def watchdog():
        fired.append(True)
        loop.stop()

    guard = loop.call_later(WATCHDOG, watchdog)
    if not done():
        loop.run()
    guard.cancel()
    return bool(fired)


@pytest.mark.parametrize("threads,per_thread", [(8, 1000), (2, 5000)])
def test_call_soon_threadsafe_from_many_threads_loses_nothing(loop, threads, per_thread):
    total = threads * per_thread
    seen = [[] for _ in range(threads)]
    count = [0]
    barrier = threading.Barrier(threads)
    # The workers pause now and then, so the loop goes back to sleep
    # between bursts: that is when a lost wake-up shows.
    pauses = [threading.Event() for _ in range(threads)]

    def callback(t, i):
        seen[t].append(i)
        count[0] += 1
        if count[0] == total:
            loop.stop()

    def worker(t):
        barrier.wait()
        for i in range(per_thread):
            loop.call_soon_threadsafe(callback, t, i)
            if i % 100 == 99:
                pauses[t].wait(0.002)  # never set: a bounded pause

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    try:
        fired = _run_with_watchdog(loop, lambda: count[0] == total)
    finally:
        for w in workers:
            w.join(WATCHDOG)
    assert not fired, (
        f"lost wake-up: the loop slept with callbacks queued ({count[0]} of {total} ran "
        f"before the {WATCHDOG}s watchdog)")
    assert count[0] == total
    for t in range(threads):
        assert seen[t] == list(range(per_thread)), f"thread {t}'s callbacks ran out of order"


def test_threadsafe_wakeups_after_each_idle_sleep(loop):
    """One callback at a time, each sent only after the loop ran the
    previous one and went back to sleep: every single wake-up must work."""
    n = 300
    ran = []
    ack = threading.Event()

    def callback(i):
        ran.append(i)
        ack.set()
        if i == n - 1:
            loop.stop()

    def worker():
        for i in range(n):
            ack.clear()
            loop.call_soon_threadsafe(callback, i)
            if not ack.wait(WATCHDOG):
                return

    w = threading.Thread(target=worker)
    w.start()
    try:
        fired = _run_with_watchdog(loop, lambda: len(ran) == n)
    finally:
        w.join(WATCHDOG)
    assert not fired, f"lost wake-up after {len(ran)} of {n} callbacks"
    assert ran == list(range(n))


def test_stop_from_another_thread_wakes_a_blocked_loop(loop):
    """stop() from another thread while run() is blocked in its poll (no
    timers but the watchdog, nothing ready) makes run() return."""
    started = threading.Event()
    loop.call_soon(started.set)  # runs in run()'s first iteration

    def stopper():
        if started.wait(WATCHDOG):
            loop.stop()

    t = threading.Thread(target=stopper)
    t.start()
    try:
        fired = _run_with_watchdog(loop, lambda: False)
    finally:
        t.join(WATCHDOG)
    assert started.is_set()
    assert not fired, "stop() from another thread did not wake the loop"


def test_call_soon_threadsafe_after_close_raises(loop):
    loop.close()
    with pytest.raises(RuntimeError):
        loop.call_soon_threadsafe(lambda: None)


def test_wakeup_racing_close_is_safe(backend):
    """Threads hammering call_soon_threadsafe while the loop is closed:
    they get RuntimeError or nothing, never a crash (the epoll backend frees
    its C loop in close())."""
    import fastmux

    for _ in range(20):
        lp = fastmux.Loop(backend=backend)
        go = threading.Event()
        errors = []

        def hammer():
            go.wait(WATCHDOG)
            for _ in range(2000):
                try:
                    lp.call_soon_threadsafe(lambda: None)
                except RuntimeError:
                    return
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return

        ts = [threading.Thread(target=hammer) for _ in range(3)]
        for t in ts:
            t.start()
        go.set()
        lp.close()
        for t in ts:
            t.join(WATCHDOG)
        assert errors == []
