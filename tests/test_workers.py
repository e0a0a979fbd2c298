"""WorkerPool and serve(): several processes serving one port.

Clients here are plain blocking sockets with timeouts, so every wait is
bounded; the pool is stopped in a ``finally`` so no worker outlives a test.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
import warnings

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


class HoldAtGate(fastmux.Handler):
    """On b"hold": answers its pid, then blocks its worker until the test
    lets go (it connects to the Unix socket `GATE` and waits for a byte)."""

    gate = ""

    def on_message(self, conn: fastmux.Connection, data: bytes) -> None:
        if data == b"hold":
            g = socket.socket(socket.AF_UNIX)
            g.settimeout(DEADLINE)
            try:
                g.connect(self.gate)
                g.recv(1)  # the test lets go (or closes), or DEADLINE passes
            except OSError:
                pass
            finally:
                g.close()
        conn.write(b"%d\n" % os.getpid())


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


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no Threads: line for {pid}")


def kill_and_await_replacement(pool: fastmux.WorkerPool) -> tuple[int, int]:
    """SIGKILL one worker, wait until the pool has replaced it; returns
    (victim, replacement)."""
    before = pool.pids
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    found: list[int] = []

    def replaced() -> bool:
        # One read of pool.pids per check: the supervisor's reports arrive
        # on their own schedule, and two reads may see two of them.
        now = pool.pids
        new = set(now) - set(before)
        if len(now) == len(before) and victim not in now and len(new) == 1:
            found.append(new.pop())
            return True
        return False

    wait_for(replaced, what="a replacement worker")
    return victim, found[0]


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
        # One supervisor process, the workers its children.
        supervisors = children_of(os.getpid())
        assert len(supervisors) == 1 and supervisors[0] not in pids
        assert sorted(children_of(supervisors[0])) == sorted(pids)
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
    for pid in pids + supervisors:
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


def test_workers_are_forked_from_a_single_threaded_process(backend, pools, capfd):
    """Forking from a multi-threaded process can deadlock the child (and
    Python 3.12+ warns).  The workers -- the first ones and a replacement
    for one that was killed -- are forked by a supervisor process with one
    thread, and no process of the pool warns about fork()."""

    def show(message, category, filename, lineno, file=None, line=None):
        # To fd 2 itself, so capfd sees what the forked processes print too.
        os.write(2, warnings.formatwarning(message, category, filename, lineno).encode())

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # inherited by every process forked here
        warnings.showwarning = show
        pool = pools(("127.0.0.1", 0), PidReply, framing=fastmux.Lines(), workers=2,
                     backend=backend)
        parents = {parent_of(pid) for pid in pool.pids}
        victim, replacement = kill_and_await_replacement(pool)
        parents.add(parent_of(replacement))
        assert len(parents) == 1
        (supervisor,) = parents
        assert supervisor != os.getpid()
        assert threads_of(supervisor) == 1
        assert pool.restarts == 1
        # The replacement serves.
        seen: set[int] = set()
        socks = []
        try:
            deadline = time.monotonic() + DEADLINE
            while replacement not in seen and time.monotonic() < deadline:
                socks.append(client(pool.address))
                seen.add(int(ask(socks[-1])))
        finally:
            for s in socks:
                s.close()
        assert replacement in seen
        pool.stop()
    err = capfd.readouterr().err
    assert "fork" not in err and "Warning" not in err, err


def test_worker_exits_and_restarts_are_logged(backend, pools, tmp_path):
    """The supervisor logs, on the "fastmux" logger, a worker's exit with
    its exit status, its replacement, and each worker's exit at stop.  The
    supervisor is a process of its own: the handler here writes to a file
    (caplog's records would stay in the supervisor's memory)."""
    log = logging.getLogger("fastmux")
    handler = logging.FileHandler(tmp_path / "pool.log")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        pool = pools(("127.0.0.1", 0), PidReply, framing=fastmux.Lines(), workers=2,
                     backend=backend)
        first = pool.pids
        victim, replacement = kill_and_await_replacement(pool)
        pool.stop()  # returns once the supervisor has exited: the log is complete
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()
    lines = (tmp_path / "pool.log").read_text().splitlines()
    for pid in first:
        assert any(line.startswith("INFO fastmux fastmux worker %d " % pid) and "started" in line
                   for line in lines), lines
    exited = [line for line in lines if line.startswith("WARNING fastmux fastmux worker %d " % victim)]
    assert len(exited) == 1, lines
    assert "exited (killed by signal %d (SIGKILL))" % signal.SIGKILL in exited[0]
    assert "restarting it" in exited[0]
    assert any("worker %d " % replacement in line and "replacing %d" % victim in line
               for line in lines), lines
    for pid in set(first) - {victim} | {replacement}:
        assert any("worker %d " % pid in line and "stopped (exit code 0)" in line
                   for line in lines), lines


def test_unix_busy_worker_leaves_connections_to_the_others(backend, pools, tmp_path):
    """A worker stuck in a handler keeps no connection: whatever the
    supervisor handed it before it could tell is taken back (after
    _workers._STALL) and served by the other worker, which then gets every
    new one.  Once the stuck worker reads again, it gets its turn again."""
    gate = socket.socket(socket.AF_UNIX)
    gate.settimeout(DEADLINE)
    gate.bind(str(tmp_path / "gate.sock"))
    gate.listen(1)
    HoldAtGate.gate = str(tmp_path / "gate.sock")
    path = str(tmp_path / "pool.sock")
    pool = pools(path, HoldAtGate, framing=fastmux.Lines(), workers=2, backend=backend)
    held = client(path, timeout=DEADLINE)
    socks = []
    try:
        held.sendall(b"hold\n")
        holder, _ = gate.accept()  # one worker now sits in its handler
        try:
            # Fresh connections are answered while it sits there (the held
            # connection's answer comes only after the gate opens).
            served = set()
            for _ in range(10):
                socks.append(client(path))
                served.add(int(ask(socks[-1])))
            assert len(served) == 1
            holder.sendall(b"x")
        finally:
            holder.close()
        (busy,) = set(pool.pids) - served
        assert int(ask(held, b"")) == busy
        deadline = time.monotonic() + DEADLINE
        while busy not in served and time.monotonic() < deadline:
            socks.append(client(path))
            served.add(int(ask(socks[-1])))
        assert busy in served
    finally:
        held.close()
        gate.close()
        for s in socks:
            s.close()


def shares(served: list[int], pids: list[int]) -> dict[int, int]:
    """How many of `served` each of `pids` took (0 for a worker that took none)."""
    assert set(served) <= set(pids), (served, pids)
    return {pid: served.count(pid) for pid in pids}


def sockets_of(pid: int) -> dict[str, str]:
    """fd -> socket inode, for the sockets process `pid` has open."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:"):
            out[fd] = target
    return out


@pytest.mark.parametrize("burst", [False, True], ids=["one-at-a-time", "burst"])
def test_unix_connections_spread_over_workers(backend, pools, tmp_path, burst):
    """Connections to a Unix path are spread over every worker, whether they
    arrive one at a time or as a burst queued before any is served: the
    supervisor accepts them and hands them to the workers in turn."""
    path = str(tmp_path / "pool.sock")
    pool = pools(path, PidReply, framing=fastmux.Lines(), workers=4, backend=backend)
    n = 40
    socks: list[socket.socket] = []
    try:
        if burst:
            socks = [client(path) for _ in range(n)]
            served = [int(ask(s)) for s in socks]
        else:
            served = []
            for _ in range(n):
                socks.append(client(path))
                served.append(int(ask(socks[-1])))
    finally:
        for s in socks:
            s.close()
    share = shares(served, pool.pids)
    assert min(share.values()) >= n // 4 // 2, share


def test_unix_spread_goes_on_after_a_worker_is_replaced(backend, pools, tmp_path):
    path = str(tmp_path / "pool.sock")
    pool = pools(path, PidReply, framing=fastmux.Lines(), workers=4, backend=backend)
    victim, replacement = kill_and_await_replacement(pool)
    socks: list[socket.socket] = []
    try:
        # The replacement is handed connections once it is ready.
        seen: set[int] = set()
        deadline = time.monotonic() + DEADLINE
        while replacement not in seen and time.monotonic() < deadline:
            socks.append(client(path))
            seen.add(int(ask(socks[-1])))
        assert replacement in seen and victim not in seen
        n = 40
        served = []
        for _ in range(n):
            socks.append(client(path))
            served.append(int(ask(socks[-1])))
    finally:
        for s in socks:
            s.close()
    share = shares(served, pool.pids)
    assert min(share.values()) >= n // 4 // 2, share


def test_unix_pool_leaks_no_fds(backend, pools, tmp_path):
    """The sockets the supervisor accepts and the workers adopt are closed
    when their connections end: after a few hundred connections every
    process of the pool is back at the sockets it started with.  (Sockets
    only: the supervisor makes its select loop's epoll fd just after
    start() returns.)"""
    path = str(tmp_path / "pool.sock")
    pool = pools(path, PidReply, framing=fastmux.Lines(), workers=2, backend=backend)
    pids = pool.pids
    (supervisor,) = {parent_of(pid) for pid in pids}

    def one_round(count: int) -> None:
        socks = [client(path) for _ in range(count)]
        try:
            for s in socks:
                int(ask(s))
        finally:
            for s in socks:
                s.close()

    baseline = {p: sockets_of(p) for p in [supervisor, *pids]}
    for _ in range(5):
        one_round(40)
    # The workers close their ends once they see each client's EOF.
    try:
        wait_for(lambda: all(sockets_of(p) == fds for p, fds in baseline.items()),
                 what="the pool's sockets back to where they started")
    except AssertionError:
        extra = {p: set(sockets_of(p).items()) ^ set(fds.items()) for p, fds in baseline.items()}
        raise AssertionError(f"sockets that differ (supervisor {supervisor}): {extra}") from None


def test_unix_pool_applies_listen_options(backend, pools, tmp_path):
    """max_connections and idle_timeout hold for the connections a worker
    adopts from the supervisor as for those a listener accepts: beyond the
    limit a connection is closed at once, and a silent one is closed."""
    path = str(tmp_path / "pool.sock")
    pool = pools(path, PidReply, framing=fastmux.Lines(), workers=2, backend=backend,
                 max_connections=1, idle_timeout=0.5)
    socks = [client(path, timeout=DEADLINE) for _ in range(2)]
    try:
        # In turn: one connection each, so each worker is at its limit.
        assert {int(ask(s)) for s in socks} == set(pool.pids)
        refused = client(path, timeout=DEADLINE)
        socks.append(refused)
        try:
            assert ask(refused) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
        for s in socks[:2]:  # idle_timeout closes the two that were served
            assert s.recv(100) == b""
    finally:
        for s in socks:
            s.close()


def test_unix_connections_waiting_for_a_killed_worker_go_to_another(
        backend, pools, tmp_path, monkeypatch):
    """Connections handed to a worker that dies before it reads them are
    taken back by the supervisor and served by another worker; only the
    ones the dead worker had adopted die with it."""
    # Inherited by the forked supervisor: no stuck-worker check interferes,
    # only the death can free what waits for the stuck worker.
    monkeypatch.setattr(fastmux._workers, "_STALL", 3600.0)
    gate = socket.socket(socket.AF_UNIX)
    gate.settimeout(DEADLINE)
    gate.bind(str(tmp_path / "gate.sock"))
    gate.listen(1)
    HoldAtGate.gate = str(tmp_path / "gate.sock")
    path = str(tmp_path / "pool.sock")
    pool = pools(path, HoldAtGate, framing=fastmux.Lines(), workers=2, backend=backend)
    (supervisor,) = {parent_of(pid) for pid in pool.pids}
    held = client(path, timeout=DEADLINE)
    socks = []
    holder = None
    try:
        held.sendall(b"hold\n")
        holder, _ = gate.accept()  # one worker sits in its handler, the held one adopted
        baseline = sockets_of(supervisor)
        socks = [client(path, timeout=DEADLINE) for _ in range(10)]
        for s in socks:
            s.sendall(b"pid\n")
        # Every one handed off (the supervisor holds none), some of them in
        # turn to the stuck worker, which cannot read them.
        wait_for(lambda: sockets_of(supervisor) == baseline, what="every connection handed off")
        ready, _, _ = select.select(socks, [], [], DEADLINE)
        assert ready, "no connection answered"
        first = int(ask(ready[0], b""))
        (stuck,) = set(pool.pids) - {first}
        os.kill(stuck, signal.SIGKILL)
        others = [s for s in socks if s is not ready[0]]
        assert {int(ask(s, b"")) for s in others} == {first}
        try:
            assert ask(held, b"") == b""  # adopted by the dead worker: gone
        except (ConnectionResetError, BrokenPipeError):
            pass
    finally:
        if holder is not None:
            holder.close()
        held.close()
        gate.close()
        for s in socks:
            s.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not hasattr(__import__("resource"), "prlimit"), reason="needs prlimit")
def test_unix_supervisor_out_of_fds_backs_off(backend, pools, tmp_path):
    """A supervisor that cannot accept (EMFILE) pauses accepting instead of
    spinning on a listener that stays readable, and serves the waiting
    client once it has fds again."""
    import resource
    path = str(tmp_path / "pool.sock")
    pool = pools(path, PidReply, framing=fastmux.Lines(), workers=2, backend=backend)
    (supervisor,) = {parent_of(pid) for pid in pool.pids}
    sockets = sockets_of(supervisor)
    first = client(path)
    try:
        int(ask(first))  # the supervisor is in its loop (its epoll fd made)
    finally:
        first.close()
    # ... and has closed its copy of that connection: no hole below the limit.
    wait_for(lambda: sockets_of(supervisor) == sockets, what="the supervisor's sockets")
    old = resource.prlimit(supervisor, resource.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{supervisor}/fd")}
    lowest_free = min(set(range(len(used) + 1)) - used)
    s = None
    try:
        try:
            resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (lowest_free, old[1]))
            s = client(path, timeout=DEADLINE)
            s.sendall(b"pid\n")
            t0, cpu0 = time.monotonic(), cpu_seconds(supervisor)
            # Nothing to wait for but time: the supervisor must stay (nearly) idle.
            ready, _, _ = select.select([s], [], [], 1.0)
            assert not ready, f"answered {s.recv(100)!r} with no fd to accept with"
            busy = (cpu_seconds(supervisor) - cpu0) / (time.monotonic() - t0)
            assert busy < 0.2, f"the supervisor spins: {busy:.0%} of a CPU"
        finally:
            resource.prlimit(supervisor, resource.RLIMIT_NOFILE, old)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(100)
            assert chunk, "the waiting client was dropped"
            buf += chunk
        assert int(buf) in pool.pids
    finally:
        if s is not None:
            s.close()


def test_unix_hand_off_skips_full_workers_and_keeps_what_none_can_take(tmp_path):
    """The supervisor's dispatcher, in-process (no worker processes): a
    worker whose hand-off socket would block is skipped; when every one
    would, the accepted connections are kept, not dropped, and handed on
    once a socket has room (its selector waits for that)."""
    import selectors

    from fastmux._workers import _Channel, _Dispatcher, _Worker

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "d.sock"))
    listener.listen(16)
    disp = _Dispatcher(listener, 2)
    lifelines = [socket.socketpair() for _ in range(2)]
    workers = {slot: _Worker(1_000_000 + slot, slot, lifelines[slot][0], _Channel())
               for slot in range(2)}
    for w in workers.values():
        w.ready = True
    sel = selectors.DefaultSelector()
    clients: list[socket.socket] = []
    received: list[socket.socket] = []

    def fill(w: _Worker) -> int:
        """Fill w's hand-off socket with fd-less probes until it would block."""
        n = 0
        try:
            while True:
                w.chan.send.send(b"p")
                n += 1
        except BlockingIOError:
            return n

    def connect(n: int) -> None:
        for _ in range(n):
            clients.append(client(str(tmp_path / "d.sock")))
        disp.readable = True
        disp.run(workers, time.monotonic())

    def take(w: _Worker) -> tuple[int, int]:
        """Read what waits for w, as the worker would: (probes, connections)."""
        probes = 0
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(w.chan.peer, 1, 64)
            except BlockingIOError:
                break
            probes += not fds
            received.extend(socket.socket(fileno=fd) for fd in fds)
        return probes, len(received)

    try:
        full = workers[0]
        probes = fill(full)
        connect(3)  # worker 0's turn, but its socket is full: all go to worker 1
        assert full.chan.full and not disp.held
        assert take(workers[1]) == (0, 3)
        fill(workers[1])
        connect(2)  # every socket full: kept
        assert len(disp.held) == 2
        for c in clients:
            c.setblocking(False)
            with pytest.raises(BlockingIOError):
                c.recv(1)  # open, not dropped
        # The supervisor now waits for room on the full sockets.
        disp.interest(sel, workers, time.monotonic(), 0.2)
        assert {key.fileobj for key in sel.get_map().values()
                if key.events == selectors.EVENT_WRITE} == {w.chan.send for w in workers.values()}
        assert take(full) == (probes, 3)  # worker 0 reads: its socket has room
        events = sel.select(DEADLINE)
        assert full.chan.send in {key.fileobj for key, _ in events}
        full.chan.full = False  # what WorkerPool._supervise does on that event
        disp.run(workers, time.monotonic())
        assert not disp.held
        assert take(full) == (0, 5)
        # The five connections the workers got are the clients' own.
        assert len(received) == len(clients)
        for i, r in enumerate(received):
            r.sendall(b"%d" % i)
        for i, c in enumerate(clients):
            c.setblocking(True)
            c.settimeout(DEADLINE)
            assert c.recv(10) == b"%d" % i
    finally:
        sel.close()
        disp.close()
        for w in workers.values():
            w.chan.close()
        for a, b in lifelines:
            a.close()
            b.close()
        for c in clients + received:
            c.close()


SERVE_SCRIPT = """
import os, sys
import fastmux

class PidReply(fastmux.Handler):
    def on_message(self, conn, data):
        conn.write(b"%d\\n" % os.getpid())

fastmux.serve(("127.0.0.1", 0), PidReply, framing=fastmux.Lines(), workers=2,
              backend=sys.argv[1], shutdown_timeout=2.0,
              ready=lambda pool: print(pool.address[1], flush=True))
"""


def test_serve_replaces_a_killed_worker_without_fork_warnings(backend):
    """A real serve() in its own process, every warning shown: a worker is
    killed, replaced, serves; SIGTERM stops everything cleanly, and nothing
    warned about fork() (Python 3.12+ does when a multi-threaded process
    forks)."""
    import subprocess
    import sys
    proc = subprocess.Popen(
        [sys.executable, "-W", "always", "-c", SERVE_SCRIPT, backend],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())  # the address, or "" if serve() failed
        address = ("127.0.0.1", port)
        (supervisor,) = children_of(proc.pid)
        wait_for(lambda: len(children_of(supervisor)) == 2, what="two workers")
        first = set(children_of(supervisor))
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(set(children_of(supervisor)) - first) == 1
                 and victim not in children_of(supervisor), what="a replacement worker")
        (replacement,) = set(children_of(supervisor)) - first
        seen: set[int] = set()
        socks = []
        try:
            deadline = time.monotonic() + DEADLINE
            while replacement not in seen and time.monotonic() < deadline:
                socks.append(client(address))
                seen.add(int(ask(socks[-1])))
        finally:
            for s in socks:
                s.close()
        assert replacement in seen
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Warning" not in err, err
    for pid in first | {replacement, supervisor}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
