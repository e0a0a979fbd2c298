"""Soak: a bounded run of mixed traffic on one loop, then nothing may be left over.

One server loop runs in this process (so its fds, RSS and live handles are
the ones sampled), with three listeners on loopback TCP:

* ``lines`` -- ``Lines`` echo: echo clients (some half-close), crowds of
  concurrent clients, clients that vanish (FIN or RST via SO_LINGER 0,
  with or without unread echoes), and lines over ``max_size``.
* ``frames`` -- ``LengthPrefixed`` echo: pipelined frames (empty ones too),
  and headers announcing a frame over ``max_size``.
* ``slow`` -- a producer that streams a known byte pattern while the
  write buffer is under its high watermark and resumes in ``on_drain``;
  its clients read slowly through a small receive buffer (and some vanish
  mid-stream).

The client load is a subprocess (threads, one connection kind each), so
its sockets and memory do not blur the server's figures.  At the same time,
timers run in ``call_later`` chains (each tick also makes and cancels a
decoy timer) and worker threads of this process post ``call_soon_threadsafe``
callbacks.

Every connection starts with a hello (``H kind id nbytes crc nmsgs``) that
the server acknowledges, so the server knows each connection's kind and
checks, in ``on_close``, what it received against what the client said it
would send (byte count, CRC-32, message count) and the close reason
against the kind.  The client compares every echoed byte with what it sent.

A warm-up round of the same traffic runs first; then the fd count, RSS and
live-connection figures are sampled, the soak runs, and they are sampled
again: fds and live connections must be back to their values, RSS within
``RSS_SLACK``.  FASTMUX_SOAK_SECONDS sets the soak's length (default 20 s per
backend); every client thread and worker thread is also bounded in count.

The soak found that a timer callback cancelling many timers made other due
timers run twice; ``test_due_timers_run_once_when_a_timer_cancels_many``
(not a stress test) pins that down on its own.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from typing import Any

import pytest
from support import run_until, set_sockopt_on_fd, spin

import fastmux

#: Length of the soak per backend, in seconds.
SOAK_SECONDS = float(os.environ.get("FASTMUX_SOAK_SECONDS", "20"))
#: Length of the warm-up round, in seconds (its growth does not count).
WARMUP_SECONDS = min(3.0, max(1.0, SOAK_SECONDS / 8))
#: Count bound: rounds per client thread (each round is one to 32 connections).
MAX_ROUNDS = 20_000
#: Count bound: callbacks per call_soon_threadsafe worker thread.
MAX_CALLBACKS = 200_000
#: Worker threads posting call_soon_threadsafe callbacks.
N_WORKERS = 4
#: Timer chains running during the soak.
N_CHAINS = 4
#: RSS growth tolerated over the soak (allocator noise: pymalloc arenas and
#: malloc's heap are not handed back page for page; measured growth after the
#: warm-up is under 100 KiB).  A leak of a few hundred bytes per connection
#: (the default soak makes 35,000-50,000) or of anything per message exceeds it.
RSS_SLACK = 4 * 1024 * 1024

LINES_MAX = 64 * 1024  # max_size of the lines listener
FRAMES_MAX = 64 * 1024  # max_size of the frames listener
SLOW_HIGH, SLOW_LOW, SLOW_CHUNK = 32 * 1024, 8 * 1024, 8 * 1024

# The slow producer's byte stream: BLOCK repeated, entered at an offset the
# client chooses.  The client script builds the same BLOCK.
BLOCK = random.Random(12345).randbytes(65536)
BLOCK2 = BLOCK + BLOCK

PAGE = os.sysconf("SC_PAGE_SIZE")


# --- found by the soak -------------------------------------------------------------------

def test_due_timers_run_once_when_a_timer_cancels_many(loop):
    """A timer callback that cancels enough timers to make the loop compact
    its heap must not make the other timers due in that iteration run twice
    (the soak's timer chains, which cancel a decoy per tick, forked)."""
    ran = []

    def canceller():
        for _ in range(100):
            loop.call_later(30, ran.append, "decoy").cancel()

    loop.call_later(0, canceller)
    loop.call_later(0, ran.append, "due")
    run_until(loop, lambda: ran, what="the second timer")
    spin(loop, 3)
    assert ran == ["due"]


# --- the client load (a subprocess) -------------------------------------------------------

CLIENT = r"""
import json, random, socket, struct, sys, threading, time, zlib

host = "127.0.0.1"
p_lines, p_frames, p_slow = (int(a) for a in sys.argv[1:4])
seconds, max_rounds, seed = float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
TIMEOUT = 10.0
LINES_MAX, FRAMES_MAX = int(sys.argv[7]), int(sys.argv[8])
BLOCK = random.Random(12345).randbytes(65536)
BLOCK2 = BLOCK + BLOCK
RST = struct.pack("ii", 1, 0)

lock = threading.Lock()
conns = {}      # kind -> connections made
payload = {}    # kind -> payload bytes the server must have received
echoed = {}     # kind -> bytes received back and verified
messages = {}   # kind -> messages sent (after the hello)
errors = []
nerrors = [0]
ids = iter(range(1 << 62))
t0 = time.monotonic()
deadline = t0 + seconds


def add(table, kind, n):
    with lock:
        table[kind] = table.get(kind, 0) + n


def fail(msg):
    with lock:
        nerrors[0] += 1
        if len(errors) < 20:
            errors.append(msg)


def connect(port, kind, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(TIMEOUT)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    add(conns, kind, 1)
    return s


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(min(n - len(buf), 262144))
        if not d:
            raise EOFError("EOF after %d of %d bytes" % (len(buf), n))
        buf += d
    return bytes(buf)


def recv_to_eof(s, step=262144):
    buf = bytearray()
    while True:
        d = s.recv(step)
        if not d:
            return bytes(buf)
        buf += d


def frame(b):
    return len(b).to_bytes(4, "big") + b


def hello_line(s, kind, nbytes=0, crc=0, nmsgs=0):
    cid = next(ids)
    s.sendall(b"H %s %d %d %d %d\n" % (kind.encode(), cid, nbytes, crc, nmsgs))
    got = recv_exact(s, 3)
    if got != b"OK\n":
        raise AssertionError("bad ack %r" % got)


def hello_frame(s, kind, nbytes=0, crc=0, nmsgs=0):
    cid = next(ids)
    s.sendall(frame(b"H %s %d %d %d %d" % (kind.encode(), cid, nbytes, crc, nmsgs)))
    got = recv_exact(s, 6)
    if got != frame(b"OK"):
        raise AssertionError("bad ack %r" % got)


def lines_of(rng, n, size):
    return [rng.randbytes(rng.randrange(size)).replace(b"\n", b"\0") for _ in range(n)]


def announce(parts):
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return sum(map(len, parts)), crc, len(parts)


def echo(rng, r):
    parts = lines_of(rng, rng.randrange(1, 200), 1500)
    data = b"".join(p + b"\n" for p in parts)
    s = connect(p_lines, "echo")
    try:
        hello_line(s, "echo", *announce(parts))
        s.sendall(data)
        if r % 2:  # half-close: the server closes after the last echo
            s.shutdown(socket.SHUT_WR)
            got = recv_to_eof(s)
        else:
            got = recv_exact(s, len(data))
    finally:
        s.close()
    if got != data:
        raise AssertionError("echo: %d bytes back, %d sent, differ" % (len(got), len(data)))
    add(payload, "echo", announce(parts)[0])
    add(echoed, "echo", len(got))
    add(messages, "echo", len(parts))


def frames(rng, r):
    parts = [rng.randbytes(rng.randrange(1025) if rng.random() > 0.05 else 0)
             for _ in range(rng.randrange(1, 300))]
    data = b"".join(frame(p) for p in parts)
    s = connect(p_frames, "frames")
    try:
        hello_frame(s, "frames", *announce(parts))
        s.sendall(data)  # pipelined: every frame in one go
        got = recv_exact(s, len(data))
    finally:
        s.close()
    if got != data:
        raise AssertionError("frames: %d bytes back differ" % len(got))
    add(payload, "frames", announce(parts)[0])
    add(echoed, "frames", len(got))
    add(messages, "frames", len(parts))


def expected_stream(start, n):
    out = bytearray()
    pos = start
    while len(out) < n:
        k = min(n - len(out), 65536)
        o = pos % 65536
        out += BLOCK2[o:o + k]
        pos += k
    return bytes(out)


def slow(rng, r):
    total, start = rng.randrange(128 * 1024, 768 * 1024), rng.randrange(65536)
    s = connect(p_slow, "slow", rcvbuf=8192)
    try:
        hello_line(s, "slow", total, start, 0)
        buf = bytearray()
        n = 0
        while True:
            d = s.recv(4096)
            if not d:
                break
            buf += d
            n += 1
            if n % 4 == 0:
                time.sleep(0.001)  # a slow reader: the server's queue fills
    finally:
        s.close()
    if bytes(buf) != expected_stream(start, total):
        raise AssertionError("slow: %d of %d bytes, content differs" % (len(buf), total))
    add(echoed, "slow", total)


def wait_disconnected(s, what):
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        raise AssertionError(what + ": the server did not disconnect")


def oversize(rng, r):
    if r % 2:
        s = connect(p_lines, "oversize")
        try:
            hello_line(s, "oversize")
            try:
                s.sendall(b"x" * (LINES_MAX + 4096))  # no newline
            except (ConnectionResetError, BrokenPipeError):
                pass
            wait_disconnected(s, "oversize line")
        finally:
            s.close()
    else:
        s = connect(p_frames, "oversize")
        try:
            hello_frame(s, "oversize")
            try:
                s.sendall((FRAMES_MAX + 1).to_bytes(4, "big") + b"abc")
            except (ConnectionResetError, BrokenPipeError):
                pass
            wait_disconnected(s, "oversize frame")
        finally:
            s.close()


def vanish(rng, r):
    v = r % 5
    if v < 2:  # connect, then close (FIN) or reset (RST) at once
        s = connect(p_lines, "anon")
        if v == 1:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        s.close()
    elif v < 4:  # send lines, vanish without reading the echoes
        s = connect(p_lines, "vanish")
        try:
            hello_line(s, "vanish")
            s.sendall(b"".join(p + b"\n" for p in lines_of(rng, rng.randrange(1, 50), 200)))
            if v == 3:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        finally:
            s.close()
    else:  # a slow reader that vanishes mid-stream
        s = connect(p_slow, "vanish_slow", rcvbuf=8192)
        try:
            hello_line(s, "vanish_slow", 1 << 20, rng.randrange(65536), 0)
            recv_exact(s, rng.randrange(1, 32768))
            if rng.random() < 0.5:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        finally:
            s.close()


def crowd(rng, r):
    socks = []
    try:
        parts = lines_of(rng, rng.randrange(8, 33), 300)
        for p in parts:
            s = connect(p_lines, "crowd")
            socks.append(s)
            hello_line(s, "crowd", *announce([p]))
        for s, p in zip(socks, parts):
            s.sendall(p + b"\n")
        for s, p in zip(socks, parts):
            got = recv_exact(s, len(p) + 1)
            if got != p + b"\n":
                raise AssertionError("crowd: echo differs")
        add(payload, "crowd", announce(parts)[0])
        add(echoed, "crowd", sum(len(p) + 1 for p in parts))
        add(messages, "crowd", len(parts))
    finally:
        for s in socks:
            s.close()


rounds = {}


def worker(name, fn, tseed):
    rng = random.Random(tseed)
    r = 0
    while r < max_rounds and time.monotonic() < deadline:
        try:
            fn(rng, r)
        except Exception as e:
            fail("%s round %d: %r" % (name, r, e))
        r += 1
    rounds[name] = r


kinds = [("echo", echo), ("echo2", echo), ("frames", frames), ("frames2", frames),
         ("slow", slow), ("oversize", oversize), ("vanish", vanish), ("crowd", crowd)]
threads = [threading.Thread(target=worker, args=(name, fn, seed * 100 + i))
           for i, (name, fn) in enumerate(kinds)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"conns": conns, "payload": payload, "echoed": echoed,
                  "messages": messages, "rounds": rounds, "errors": errors,
                  "nerrors": nerrors[0], "elapsed": time.monotonic() - t0}), flush=True)
"""


# --- the server side ----------------------------------------------------------------------

# Kinds whose connections must end cleanly with every announced byte received.
VERIFIED = ("echo", "frames", "crowd")
# Kinds that vanish: on_close sees a clean EOF or a reset.
VANISHING = ("anon", "vanish", "vanish_slow")


class Tally:
    """What the server saw, in fixed-size counters (they must not grow with
    the traffic: they live in the process whose RSS is measured)."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.closes: collections.Counter[str] = collections.Counter()  # kind -> on_close
        self.reasons: collections.Counter[tuple[str, str]] = collections.Counter()
        self.payload: collections.Counter[str] = collections.Counter()  # kind -> bytes
        self.drains = 0
        self.errors: list[str] = []
        self.nerrors = 0

    def fail(self, msg: str) -> None:
        self.nerrors += 1
        if len(self.errors) < 20:
            self.errors.append(msg)


class SoakHandler(fastmux.Handler):
    """Echo (``lines`` and ``frames`` modes) or slow producer (``slow``)."""

    def __init__(self, loop: fastmux.Loop, tally: Tally, mode: str) -> None:
        self.loop = loop
        self.t = tally
        self.mode = mode
        self.kind: str | None = None
        self.cid = -1
        self.expect = (0, 0, 0)
        self.n = self.crc = self.msgs = 0
        self.pos = self.drains = self.closes = 0

    def on_open(self, conn: Any) -> None:
        self.t.opened += 1
        if self.mode == "slow":
            set_sockopt_on_fd(conn.fileno(), socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            conn.set_write_limits(SLOW_HIGH, SLOW_LOW)

    def reply(self, conn: Any, data: bytes) -> None:
        if self.mode == "frames":
            conn.write(len(data).to_bytes(4, "big") + data)
        else:
            conn.write(data + b"\n")

    def on_message(self, conn: Any, data: bytes) -> None:
        if self.kind is None:
            self.hello(conn, data)
            return
        self.msgs += 1
        self.n += len(data)
        self.crc = zlib.crc32(data, self.crc)
        self.reply(conn, data)

    def hello(self, conn: Any, data: bytes) -> None:
        parts = data.split()
        if len(parts) != 6 or parts[0] != b"H":
            self.t.fail(f"bad hello {data[:40]!r}")
            conn.abort()
            return
        self.kind = parts[1].decode()
        self.cid = int(parts[2])
        self.expect = (int(parts[3]), int(parts[4]), int(parts[5]))
        self.reply(conn, b"OK")
        if self.mode == "slow":
            self.fill(conn)

    def fill(self, conn: Any) -> None:
        """Write the pattern while under the high watermark; on_drain (or,
        if the kernel took it all, the next iteration) goes on."""
        if conn.closed:
            return
        total, start = self.expect[0], self.expect[1]
        for _ in range(SLOW_HIGH // SLOW_CHUNK + 2):
            if self.pos >= total or conn.write_buffer_size > SLOW_HIGH:
                break
            k = min(SLOW_CHUNK, total - self.pos)
            o = (start + self.pos) % 65536
            conn.write(BLOCK2[o:o + k])
            self.pos += k
        if self.pos >= total:
            conn.close()
        elif conn.write_buffer_size <= SLOW_HIGH:
            self.loop.call_soon(self.fill, conn)

    def on_drain(self, conn: Any) -> None:
        self.drains += 1
        self.t.drains += 1
        if self.mode == "slow":
            self.fill(conn)

    def on_close(self, conn: Any, exc: BaseException | None) -> None:
        t = self.t
        self.closes += 1
        if self.closes > 1:
            t.fail(f"on_close ran {self.closes} times ({self.kind} {self.cid})")
            return
        t.closed += 1
        kind = self.kind or "anon"
        t.closes[kind] += 1
        t.reasons[(kind, type(exc).__name__ if exc is not None else "None")] += 1
        who = f"{kind} #{self.cid}"
        if kind in VERIFIED:
            got = (self.n, self.crc, self.msgs)
            if exc is not None or got != self.expect:
                t.fail(f"{who}: closed with {exc!r}, received (bytes, crc, msgs) "
                       f"{got}, announced {self.expect}")
            t.payload[kind] += self.n
        elif kind == "slow":
            if exc is not None or self.pos != self.expect[0] or not self.drains:
                t.fail(f"{who}: closed with {exc!r} after {self.pos} of "
                       f"{self.expect[0]} bytes, {self.drains} drains")
        elif kind == "oversize":
            if not isinstance(exc, fastmux.MessageTooLarge):
                t.fail(f"{who}: closed with {exc!r}, not MessageTooLarge")
        elif kind in VANISHING:
            if exc is not None and not isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                t.fail(f"{who}: closed with {exc!r}")
        else:
            t.fail(f"unknown kind {kind!r}")


class Callbacks:
    """call_soon_threadsafe from worker threads: every callback counted,
    each thread's in the order posted."""

    def __init__(self, loop: fastmux.Loop) -> None:
        self.loop = loop
        self.next = [0] * N_WORKERS
        self.sent = [0] * N_WORKERS
        self.ran = 0
        self.out_of_order = 0
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def run(self, tid: int, seq: int) -> None:
        if seq != self.next[tid]:
            self.out_of_order += 1
        self.next[tid] = seq + 1
        self.ran += 1

    def worker(self, tid: int) -> None:
        seq = 0
        try:
            while seq < MAX_CALLBACKS and not self.stop.is_set():
                self.loop.call_soon_threadsafe(self.run, tid, seq)
                seq += 1
                if seq % 10 == 0:
                    time.sleep(0.001)  # bursts, so the loop also sleeps and is woken
        except BaseException as e:  # reported by join
            self.errors.append(e)
        finally:
            self.sent[tid] = seq

    def start(self) -> None:
        for tid in range(N_WORKERS):
            t = threading.Thread(target=self.worker, args=(tid,), daemon=True)
            t.start()
            self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        alive = [t for t in self.threads if t.is_alive()]
        self.threads = []
        assert not alive, f"call_soon_threadsafe workers still running: {alive}"
        assert not self.errors, self.errors


class Chains:
    """Timer chains: each tick schedules the next (delays cycling through
    DELAYS) and makes and cancels a decoy that must never run."""

    DELAYS = (0.0, 0.0005, 0.002, 0.005, 0.001)

    def __init__(self, loop: fastmux.Loop) -> None:
        self.loop = loop
        self.scheduled = self.fired = self.pending = 0
        self.early = self.decoys_ran = self.repeats = 0
        self.next = [0] * N_CHAINS  # the tick each chain expects next
        self.stopping = False

    def start(self) -> None:
        self.stopping = False
        for chain in range(N_CHAINS):
            self.schedule(chain, 0)

    def schedule(self, chain: int, k: int) -> None:
        delay = self.DELAYS[(chain + k) % len(self.DELAYS)]
        due = self.loop.time() + delay
        self.scheduled += 1
        self.pending += 1
        self.loop.call_later(delay, self.tick, chain, k, due)

    def tick(self, chain: int, k: int, due: float) -> None:
        if k != self.next[chain]:  # a timer that ran twice: do not fork the chain
            self.repeats += 1
            return
        self.next[chain] = k + 1
        self.pending -= 1
        self.fired += 1
        if self.loop.time() < due:
            self.early += 1
        self.loop.call_later(30.0, self.decoy).cancel()
        if not self.stopping:
            self.schedule(chain, k + 1)

    def decoy(self) -> None:
        self.decoys_ran += 1


def active_timers(loop: fastmux.Loop) -> int:
    return sum(1 for h in loop._timers if not h.cancelled())


def sample(loop: fastmux.Loop) -> dict[str, int]:
    gc.collect()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * PAGE
    return {"fds": len(os.listdir("/proc/self/fd")), "rss": rss,
            "open": loop.stats()["connections_open"], "live": len(loop._live),
            "timers": active_timers(loop)}


def settle(loop: fastmux.Loop, predicate: Any, state: Any, timeout: float = 10.0) -> None:
    """run_until, failing with `state()` as it is at the deadline."""
    try:
        run_until(loop, predicate, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"not settled after {timeout} s: {state()}") from None


def soak_round(loop: fastmux.Loop, ports: list[int], tally: Tally, seconds: float,
               seed: int, tmp_path: Any) -> dict[str, Any]:
    """Run the client load for `seconds` with timers and threadsafe callbacks
    alongside; wait (bounded) until everything has settled; check it all."""
    cbs = Callbacks(loop)
    chains = Chains(loop)
    errlog = tmp_path / f"client-{seed}.err"
    st0 = loop.stats()
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CLIENT), *map(str, ports), str(seconds),
             str(MAX_ROUNDS), str(seed), str(LINES_MAX), str(FRAMES_MAX)],
            stdout=subprocess.PIPE, stderr=err)
    t0 = time.monotonic()
    try:
        chains.start()
        cbs.start()
        run_until(loop, lambda: proc.poll() is not None, timeout=seconds + 60,
                  what="the client load to finish (client threads stuck?)")
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        cbs.join()
        chains.stopping = True
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"client exited {proc.returncode}: {errlog.read_text()[-2000:]}"
    report = json.loads(out)

    # Bounded waits: on a loop that lost a wake-up these still end, since
    # run_until polls with a timeout; they fail with what was left over.
    sent = sum(cbs.sent)
    settle(loop, lambda: cbs.ran >= sent,
           lambda: f"call_soon_threadsafe callbacks: {cbs.ran} of {sent} ran")
    settle(loop, lambda: chains.pending == 0,
           lambda: f"timer chains: {chains.pending} ticks still pending")
    assert chains.repeats == 0, f"{chains.repeats} timer callbacks ran more than once"
    clients = sum(report["conns"].values())
    settle(loop, lambda: (tally.closed >= clients and not loop._live
                          and loop.stats()["connections_open"] == 0),
           lambda: f"connections: on_close ran {tally.closed} times for {clients} clients, "
                   f"live map {len(loop._live)}, open {loop.stats()['connections_open']}")

    # Nothing lost, nothing extra.
    assert report["nerrors"] == 0, f"client saw {report['nerrors']} errors: {report['errors']}"
    assert tally.nerrors == 0, f"server saw {tally.nerrors} errors: {tally.errors}"
    assert cbs.ran == sent and cbs.out_of_order == 0, \
        f"callbacks: {cbs.ran} ran of {sent} posted, {cbs.out_of_order} out of order"
    assert cbs.next == cbs.sent, f"per thread: ran up to {cbs.next}, posted {cbs.sent}"
    assert chains.fired == chains.scheduled and chains.early == 0 and chains.decoys_ran == 0, \
        vars(chains)
    st1 = loop.stats()
    accepted = st1["accepted"] - st0["accepted"]
    assert accepted == clients, f"accepted {accepted}, clients connected {clients}"
    assert tally.opened == tally.closed == clients, \
        f"on_open {tally.opened}, on_close {tally.closed}, clients {clients}"
    assert dict(tally.closes) == report["conns"], (dict(tally.closes), report["conns"])
    for kind in VERIFIED:
        assert tally.payload[kind] == report["payload"].get(kind, 0), kind
    assert tally.reasons[("oversize", "MessageTooLarge")] == report["conns"].get("oversize", 0)
    return {
        "elapsed": elapsed,
        "connections": clients,
        "messages_in": st1["messages_in"] - st0["messages_in"],
        "messages_out": st1["messages_out"] - st0["messages_out"],
        "bytes_in": st1["bytes_in"] - st0["bytes_in"],
        "bytes_out": st1["bytes_out"] - st0["bytes_out"],
        "callbacks": cbs.ran,
        "timers": chains.fired,
        "drains": tally.drains,
        "report": report,
        "reasons": dict(tally.reasons),
    }


@pytest.mark.stress
@pytest.mark.timeout(int(SOAK_SECONDS + WARMUP_SECONDS) + 180)
def test_soak_mixed_traffic(loop, tmp_path):
    tallies = [Tally(), Tally()]
    current = [tallies[0]]
    servers = []
    try:
        for mode, framing in (("lines", fastmux.Lines(max_size=LINES_MAX)),
                              ("frames", fastmux.LengthPrefixed(4, max_size=FRAMES_MAX)),
                              ("slow", fastmux.Lines())):
            servers.append(loop.listen(
                ("127.0.0.1", 0),
                lambda mode=mode: SoakHandler(loop, current[0], mode),
                framing=framing))
        ports = [s.address[1] for s in servers]

        soak_round(loop, ports, tallies[0], WARMUP_SECONDS, 1, tmp_path)
        before = sample(loop)
        current[0] = tallies[1]
        fig = soak_round(loop, ports, tallies[1], SOAK_SECONDS, 2, tmp_path)
        after = sample(loop)
    finally:
        for s in servers:
            s.close()

    print(f"\n[soak {loop.backend}] {fig['elapsed']:.1f} s, {fig['connections']} connections, "
          f"{fig['messages_in']} messages in / {fig['messages_out']} out, "
          f"{fig['bytes_in']} bytes in / {fig['bytes_out']} out, "
          f"{fig['callbacks']} threadsafe callbacks, {fig['timers']} timers, "
          f"{fig['drains']} drains; fds {before['fds']} -> {after['fds']}, "
          f"RSS {before['rss'] >> 10} -> {after['rss'] >> 10} KiB "
          f"(slack {RSS_SLACK >> 10} KiB), "
          f"live {before['open']}/{before['live']} -> {after['open']}/{after['live']} "
          f"(open/map), timers {before['timers']} -> {after['timers']}")
    print(f"[soak {loop.backend}] connections by kind {fig['report']['conns']}, "
          f"close reasons {fig['reasons']}")
    assert after["fds"] == before["fds"], (before, after)
    assert (after["open"], after["live"], after["timers"]) == \
        (before["open"], before["live"], before["timers"]), (before, after)
    assert after["rss"] - before["rss"] <= RSS_SLACK, \
        f"RSS grew by {(after['rss'] - before['rss']) >> 10} KiB over the soak"
