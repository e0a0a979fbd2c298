"""WorkerPool and serve(): several processes serving one port.

Clients here are plain blocking sockets with timeouts, so every wait is
bounded; the pool is stopped in a ``finally`` so no worker outlives a test.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from support import DEADLINE

import fastmux

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="WorkerPool needs fork")


class PidReply(fastmux.Handler):
    """Answers every line with the pid of the process serving it."""

    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        conn.write(b"%d\n" % os.getpid())


class BigReply(fastmux.Handler):
    """Answers a line with `n` bytes (an ASCII count, then filler)."""

    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        n = int(data)
        conn.write(b"x" * n)
        conn.close()


class Stuck(fastmux.Handler):
    """Blocks its worker's loop: only SIGKILL ends that worker."""

    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        conn.write(b"stuck\n")
        conn._flush_now()  # make sure the client learns we got here
        time.sleep(60)


def family_of(address) -> int:
    return socket.AF_UNIX if isinstance(address, str) else socket.AF_INET


def client(address, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(family_of(address), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(address)
    except BaseException:
        s.close()
        raise
    return s


def ask(s: socket.socket, line: bytes = b"pid\n") -> bytes:
    """Send a line, read one line back (b"" on EOF)."""
    s.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            return b""
        buf += chunk
    return buf


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc; zombies included)."""
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            kids.append(int(name))
    return kids


def wait_for(predicate, timeout: float = DEADLINE, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


@pytest.fixture
def pools():
    """Makes WorkerPools and stops them at teardown, even if a test fails."""
    made: list[fastmux.WorkerPool] = []

    def make(*args, **kwargs) -> fastmux.WorkerPool:
        kwargs.setdefault("shutdown_timeout", 2.0)
        pool = fastmux.WorkerPool(*args, **kwargs)
        made.append(pool)
        return pool.start()

    try:
        yield make
    finally:
        for pool in made:
            pool.stop()


def test_connections_spread_over_workers(backend, pools):
    pool = pools(("127.0.0.1", 0), PidReply, framing=fastmux.Lines(), workers=2,
                 backend=backend)
    host, port = pool.address
    assert host == "127.0.0.1" and port > 0
    workers = set(pool.pids)
    assert len(workers) == 2 and os.getpid() not in workers
    socks = [client(pool.address) for _ in range(40)]
    try:
        served = [int(ask(s)) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert set(served) <= workers
    assert len(set(served)) > 1, "every connection landed on one worker"


def test_killed_worker_loses_only_its_connections(backend, pools):
    pool = pools(("127.0.0.1", 0), PidReply, framing=fastmux.Lines(), workers=2,
                 backend=backend)
    socks = [client(pool.address) for _ in range(40)]
    try:
        served = [int(ask(s)) for s in socks]
        assert len(set(served)) == 2
        victim = served[0]
        os.kill(victim, signal.SIGKILL)
        for s, pid in zip(socks, served, strict=True):
            if pid == victim:
                # Its connections are gone: EOF or a reset, never an answer.
                try:
                    reply = ask(s)
                except (ConnectionResetError, BrokenPipeError):
                    reply = b""
                assert reply == b""
            else:
                assert int(ask(s)) == pid  # the survivor's connections carry on
        wait_for(lambda: len(pool.pids) == 2 and victim not in pool.pids,
                 what="a replacement worker")
        assert pool.restarts == 1
        replacement = (set(pool.pids) - set(served)).pop()
        # The replacement serves: new connections reach it.
        seen: set[int] = set()
        deadline = time.monotonic() + DEADLINE
        while replacement not in seen and time.monotonic() < deadline:
            s = client(pool.address)
            socks.append(s)
            seen.add(int(ask(s)))
        assert replacement in seen
    finally:
        for s in socks:
            s.close()


def test_stop_leaves_no_process_behind(backend):
    pool = fastmux.WorkerPool(("127.0.0.1", 0), PidReply, framing=fastmux.Lines(),
                              workers=2, backend=backend, shutdown_timeout=2.0)
    pool.start()
    try:
        pids = pool.pids
        assert sorted(children_of(os.getpid())) == sorted(pids)
        s = client(pool.address)
        assert int(ask(s)) in pids
    finally:
        pool.stop()
    try:
        assert s.recv(100) == b""  # the connection was closed, not dropped
    finally:
        s.close()
    assert pool.wait(0)
    assert pool.pids == []
    assert children_of(os.getpid()) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # The port is free again (SO_REUSEADDR: the closed connection may be
    # in TIME_WAIT, but nothing may be bound or listening there).
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(pool.address)
    finally:
        probe.close()
    pool.stop()  # idempotent


def test_stop_drains_queued_output(backend):
    size = 8 * 1024 * 1024
    pool = fastmux.WorkerPool(("127.0.0.1", 0), BigReply, framing=fastmux.Lines(),
                              workers=2, backend=backend, shutdown_timeout=DEADLINE)
    pool.start()
    stopper = threading.Thread(target=pool.stop)
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect(pool.address)
        s.sendall(b"%d\n" % size)
        got = len(s.recv(4096))
        stopper.start()  # stops while most of the reply is still queued
        time.sleep(0.2)
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
        s.close()
        assert got == size
    finally:
        if stopper.ident is not None:
            stopper.join(DEADLINE + 5)
        pool.stop()
    assert children_of(os.getpid()) == []


def test_stop_kills_a_worker_that_does_not_drain(backend):
    pool = fastmux.WorkerPool(("127.0.0.1", 0), Stuck, framing=fastmux.Lines(), workers=2,
                              backend=backend, shutdown_timeout=0.5)
    pool.start()
    s = client(pool.address)
    try:
        assert ask(s, b"hang\n") == b"stuck\n"
        t0 = time.monotonic()
        pool.stop()
        elapsed = time.monotonic() - t0
    finally:
        pool.stop()
        s.close()
    assert elapsed < 0.5 + 5.0
    assert children_of(os.getpid()) == []


def test_unix_path_shared_listener(backend, pools, tmp_path):
    path = str(tmp_path / "pool.sock")
    pool = pools(path, PidReply, framing=fastmux.Lines(), workers=2, backend=backend)
    assert pool.address == path
    socks = [client(path) for _ in range(8)]
    try:
        served = [int(ask(s)) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert set(served) <= set(pool.pids)
    pool.stop()
    assert not os.path.exists(path)


def test_single_worker_runs_in_process(backend, pools):
    pool = pools(("127.0.0.1", 0), PidReply, framing=fastmux.Lines(), workers=1,
                 backend=backend)
    assert pool.pids == [os.getpid()]
    assert children_of(os.getpid()) == []
    socks = [client(pool.address) for _ in range(4)]
    try:
        assert {int(ask(s)) for s in socks} == {os.getpid()}
    finally:
        for s in socks:
            s.close()
    pool.stop()
    assert pool.wait(0) and pool.pids == []


def test_single_worker_drains_on_stop(backend):
    size = 4 * 1024 * 1024
    pool = fastmux.WorkerPool(("127.0.0.1", 0), BigReply, framing=fastmux.Lines(),
                              workers=1, backend=backend, shutdown_timeout=DEADLINE)
    pool.start()
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect(pool.address)
        s.sendall(b"%d\n" % size)
        got = len(s.recv(4096))
        stopper = threading.Thread(target=pool.stop)
        stopper.start()
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
        s.close()
        stopper.join(DEADLINE)
        assert got == size
    finally:
        pool.stop()


def test_worker_failing_to_start_is_reported(monkeypatch):
    # The pool checks its arguments (an unknown backend included) before it
    # forks, so make the workers fail where only a worker looks: its Loop.
    def no_loop(backend: str) -> fastmux.Loop:
        raise OSError("no loop for this worker")

    monkeypatch.setattr(fastmux._workers, "Loop", no_loop)
    pool = fastmux.WorkerPool(("127.0.0.1", 0), PidReply, workers=2)
    with pytest.raises(RuntimeError, match="failed to start"):
        pool.start()
    assert children_of(os.getpid()) == []
    pool.stop()
    for workers in (1, 2):
        with pytest.raises(ValueError, match="backend"):
            fastmux.WorkerPool(("127.0.0.1", 0), PidReply, workers=workers, backend="nonesuch")


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        fastmux.WorkerPool(("127.0.0.1", 0), PidReply, workers=0)
    with pytest.raises(TypeError):
        fastmux.WorkerPool(("127.0.0.1", 0), PidReply, reuse_port=True)
    pool = fastmux.WorkerPool(("127.0.0.1", 0), PidReply, workers=2)
    with pytest.raises(RuntimeError):
        _ = pool.address
    pool.stop()  # before start: harmless
