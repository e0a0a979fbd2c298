"""A real client library against a real server: redis-py's asyncio client
against ``redis-server``, on stock asyncio and on fastmux's loop.

The module starts one throwaway ``redis-server`` (Debian's package) for all
its tests: loopback TCP on a free port, a Unix socket, and a TLS port with a
throwaway CA and certificates (trustme) when the server build speaks TLS;
``--save '' --appendonly no`` in a temporary directory; stopped with SIGTERM
at teardown and waited for, so no process is left behind.

One workload (``_workload``) runs on every (transport, loop) pair: pipelined
SET/GET (10k small values, then values from 0 bytes to 4 MiB), INCR from
concurrent tasks over a connection pool, a MULTI/EXEC pipeline, pub/sub
(channels and a pattern, messages published from another connection and
received in order), and blocking pops (BLPOP timing out, three clients
woken in FIFO order by one RPUSH, a BLPOP on two lists woken by an LPUSH
from another client).  The workload checks its own results and returns them
stripped of its key prefix; the tests assert that fastmux's loop (epoll and
select backends) returns exactly what stock asyncio returns.

Without redis-server or redis-py the tests skip with the reason, unless
CI=true (.ci/run installs both), where they fail: a CI that cannot run them
must not pass green.  Run them alone with
``python -m pytest tests/test_redis_client.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import itertools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional

import pytest
import support

import fastmux

#: Bound on server start-up and shutdown, and on the whole workload of a test.
TIMEOUT = 60.0
#: Bound on one wait inside the workload (a message, a blocked client).
STEP_TIMEOUT = 10.0

_CI = os.environ.get("CI") == "true"
_run_ids = itertools.count()


def _missing(reason: str) -> None:
    """Skip for `reason`, or fail under CI=true where everything is installed."""
    if _CI:
        pytest.fail(f"{reason} (CI=true: .ci/run installs it, so this is a failure)")
    pytest.skip(reason)


# --- the server ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process on loopback, a Unix socket and (maybe) TLS."""

    def __init__(self, workdir: Path, certs: Optional[Dict[str, str]]) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.unix_path = str(workdir / "redis.sock")
        self.tls_port = _free_port() if certs else None
        self.certs = certs
        self.log = workdir / "redis.log"
        args = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1", "--port", str(self.port),
            "--unixsocket", self.unix_path, "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(workdir),
            "--daemonize", "no", "--logfile", str(self.log),
        ]
        if certs:
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", certs["server_cert"], "--tls-key-file", certs["server_key"],
                "--tls-ca-cert-file", certs["ca"], "--tls-auth-clients", "yes",
            ]
        # Not the sanitizer runtimes that .ci/sanitize.sh preloads into the
        # interpreter: the server is not what is tested.
        env = {k: v for k, v in os.environ.items()
               if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
        self.proc = subprocess.Popen(args, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return "(no log)"

    def wait_ready(self) -> None:
        """PING answered on TCP and the Unix socket (and TLS), or an error."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                self._ping(socket.AF_INET, ("127.0.0.1", self.port))
                self._ping(socket.AF_UNIX, self.unix_path)
                if self.tls_port is not None:
                    self._ping(socket.AF_INET, ("127.0.0.1", self.tls_port), tls=True)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _ping(self, family: int, address: Any, tls: bool = False) -> None:
        with socket.socket(family, socket.SOCK_STREAM) as raw:
            raw.settimeout(5.0)
            raw.connect(address)
            sock: socket.socket = raw
            if tls:
                sock = self.client_ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    raise ConnectionError("redis-server closed during PING")
                reply += chunk
            if reply != b"+PONG\r\n":
                raise ConnectionError(f"PING answered {reply!r}")
            if tls:
                sock.close()

    def client_ssl_context(self) -> ssl.SSLContext:
        assert self.certs is not None
        ctx = ssl.create_default_context(cafile=self.certs["ca"])
        ctx.load_cert_chain(self.certs["client_cert"], self.certs["client_key"])
        return ctx

    def stop(self) -> None:
        """SIGTERM, wait (bounded), SIGKILL if needed: no process left behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        assert self.proc.returncode is not None


def _make_certs(workdir: Path) -> Optional[Dict[str, str]]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a
    client certificate (the server asks for one), as PEM files."""
    if importlib.util.find_spec("trustme") is None:
        return None
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("fastmux-test-client@example.org")
    files = {
        "ca": workdir / "ca.pem",
        "server_cert": workdir / "server.pem", "server_key": workdir / "server.key",
        "client_cert": workdir / "client.pem", "client_key": workdir / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    for blob, path in ((server, files["server_cert"]), (client, files["client_cert"])):
        with open(path, "wb") as f:
            for pem in blob.cert_chain_pems:
                f.write(pem.bytes())
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        _missing("redis-server is not installed (Debian: apt-get install redis-server)")
    if importlib.util.find_spec("redis") is None:
        _missing("redis-py is not installed (it is in the test extra: pip install -e '.[test]')")
    workdir = tmp_path_factory.mktemp("redis")
    certs = _make_certs(workdir)
    tls_error = None if certs else "trustme is not installed (it is in the test extra)"
    server = RedisServer(workdir, certs)
    try:
        server.wait_ready()
    except (OSError, RuntimeError) as e:
        server.stop()
        if not certs:
            pytest.fail(f"redis-server did not start: {e}")
        # Perhaps a build without TLS: the same server without it.
        tls_error = f"redis-server did not start with TLS: {e}"
        server = RedisServer(workdir, None)
        try:
            server.wait_ready()
        except (OSError, RuntimeError) as e2:
            server.stop()
            pytest.fail(f"redis-server did not start: {e2}")
    server.tls_error = tls_error  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


# --- the workload -------------------------------------------------------------

#: How many keys the pipelined SET/GET writes, and per pipeline.
N_KEYS = 10_000
PIPELINE = 1_000
#: Sizes of the big values: around the 16 KiB TLS record and the 64 KiB
#: read/write chunks, and large enough to fill socket buffers (flow control).
BIG_SIZES = [0, 1, 16383, 16384, 16385, 65536, 65537, 1 << 20, 4 << 20]
#: Concurrent INCR tasks, INCRs per task, counters they share.
INCR_TASKS, INCRS, COUNTERS = 8, 200, 4
#: Messages published per channel kind (channel a, channel b, pattern only).
PUBLISHES = 300


async def _until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an awaitable predicate (a server query) until true, bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_TIMEOUT
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _workload(connect: Callable[[], Any], ns: str) -> Dict[str, Any]:
    """Run the workload with clients from `connect()` under key prefix `ns`;
    returns its results (prefix stripped) and asserts what is known of them."""
    out: Dict[str, Any] = {}
    clients: List[Any] = []

    def client() -> Any:
        c = connect()
        clients.append(c)
        return c

    def strip(name: bytes) -> str:
        text = name.decode()
        assert text.startswith(ns + ":"), text
        return text[len(ns) + 1:]

    r = client()
    try:
        out["ping"] = await r.ping()

        # Pipelined SET/GET of small values, PIPELINE commands per round trip.
        values = [(f"v{i}:" * (1 + i % 9)).encode() for i in range(N_KEYS)]
        sets: List[Any] = []
        gets: List[Any] = []
        for start in range(0, N_KEYS, PIPELINE):
            pipe = r.pipeline(transaction=False)
            for i in range(start, start + PIPELINE):
                pipe.set(f"{ns}:k{i}", values[i])
            sets += await pipe.execute()
        for start in range(0, N_KEYS, PIPELINE):
            pipe = r.pipeline(transaction=False)
            for i in range(start, start + PIPELINE):
                pipe.get(f"{ns}:k{i}")
            gets += await pipe.execute()
        assert sets == [True] * N_KEYS
        assert gets == values
        out["small"] = (len(gets), hashlib.sha256(b"|".join(gets)).hexdigest())
        out["dbsize_small"] = await r.dbsize() >= N_KEYS

        # Big values (random bytes with CRLFs in them) in one pipeline.
        big = [support.pattern(n, seed=n) for n in BIG_SIZES]
        pipe = r.pipeline(transaction=False)
        for n, blob in zip(BIG_SIZES, big):
            pipe.set(f"{ns}:big{n}", blob)
        for n in BIG_SIZES:
            pipe.get(f"{ns}:big{n}")
            pipe.strlen(f"{ns}:big{n}")
        res = await pipe.execute()
        assert res[:len(BIG_SIZES)] == [True] * len(BIG_SIZES)
        got = res[len(BIG_SIZES)::2]
        assert [len(b) for b in got] == BIG_SIZES
        assert got == big
        out["big"] = [(len(b), hashlib.sha256(b).hexdigest()[:16]) for b in got]
        out["strlen"] = res[len(BIG_SIZES) + 1::2]

        # INCR from concurrent tasks over the pool: each counter hands out
        # 1..n exactly once, whatever the interleaving.
        returned: Dict[int, List[int]] = {c: [] for c in range(COUNTERS)}

        async def incr_task(t: int) -> None:
            for i in range(INCRS):
                c = (t + i) % COUNTERS
                returned[c].append(await r.incr(f"{ns}:ctr{c}"))

        await asyncio.gather(*(incr_task(t) for t in range(INCR_TASKS)))
        per_counter = INCR_TASKS * INCRS // COUNTERS
        for c in range(COUNTERS):
            assert sorted(returned[c]) == list(range(1, per_counter + 1)), c
        out["counters"] = [int(await r.get(f"{ns}:ctr{c}")) for c in range(COUNTERS)]

        # MULTI/EXEC.
        pipe = r.pipeline(transaction=True)
        pipe.incrby(f"{ns}:ctr0", 10).incr(f"{ns}:ctr0").get(f"{ns}:ctr0")
        pipe.rpush(f"{ns}:list", *[str(i) for i in range(5)]).lrange(f"{ns}:list", 0, -1)
        out["multi"] = await pipe.execute()

        # Pub/sub: a subscriber on channels a and b and on pattern ns:*;
        # another connection publishes; messages arrive in publish order.
        sub = client().pubsub()
        pub = client()
        await sub.subscribe(f"{ns}:a", f"{ns}:b")
        await sub.psubscribe(f"{ns}:*")
        confirmations = []
        for _ in range(3):
            m = await sub.get_message(timeout=STEP_TIMEOUT)
            assert m is not None, "no subscribe confirmation"
            confirmations.append((m["type"], strip(m["channel"]), m["data"]))
        out["subscribed"] = confirmations
        counts = []
        for i in range(PUBLISHES):
            channel = ("a", "b", "p.x")[i % 3]
            counts.append(await pub.publish(f"{ns}:{channel}", f"m{i}"))
        pipe = pub.pipeline(transaction=False)  # and a burst of pipelined ones
        for i in range(PUBLISHES, 2 * PUBLISHES):
            pipe.publish(f"{ns}:{('a', 'b', 'p.x')[i % 3]}", f"m{i}")
        counts += await pipe.execute()
        out["publish_counts"] = counts
        messages = []
        for _ in range(sum(counts)):
            m = await sub.get_message(timeout=STEP_TIMEOUT)
            assert m is not None, f"message {len(messages)} of {sum(counts)} not received"
            pattern = m["pattern"]
            messages.append((m["type"], strip(m["channel"]),
                             strip(pattern) if pattern else None, m["data"].decode()))
        # In publish order; a channel subscriber before the pattern's.
        order = [int(data[1:]) for _, _, _, data in messages]
        assert order == sorted(order), "messages out of publish order"
        out["messages"] = messages
        await sub.unsubscribe()
        await sub.punsubscribe()
        out["unsubscribed"] = sorted(
            (m["type"], strip(m["channel"])) for m in
            [await sub.get_message(timeout=STEP_TIMEOUT) for _ in range(3)])
        await sub.aclose()

        # Blocking pops.
        async def blocked() -> int:
            return int((await r.info("clients"))["blocked_clients"])

        assert await blocked() == 0
        out["blpop_timeout"] = await r.blpop([f"{ns}:empty"], timeout=0.1)
        # Three clients block on one list in turn; one RPUSH wakes them in
        # the order they blocked.
        blockers = [client() for _ in range(3)]
        tasks = []
        for i, b in enumerate(blockers):
            tasks.append(asyncio.ensure_future(b.blpop([f"{ns}:q"], timeout=STEP_TIMEOUT)))
            await _until(lambda: _equals(blocked(), i + 1), f"{i + 1} blocked clients")
        out["rpush"] = await pub.rpush(f"{ns}:q", "x0", "x1", "x2")
        woken = await asyncio.wait_for(asyncio.gather(*tasks), STEP_TIMEOUT)
        out["fifo"] = [(strip(k), v) for k, v in woken]
        # A BLPOP on two lists, woken by an LPUSH on the second from another
        # client.
        task = asyncio.ensure_future(blockers[0].blpop([f"{ns}:l1", f"{ns}:l2"],
                                                      timeout=STEP_TIMEOUT))
        await _until(lambda: _equals(blocked(), 1), "the BLPOP to block")
        out["lpush"] = await pub.lpush(f"{ns}:l2", "hello")
        key, value = await asyncio.wait_for(task, STEP_TIMEOUT)
        out["blpop"] = (strip(key), value)
        out["left"] = [await r.llen(f"{ns}:q"), await r.llen(f"{ns}:l2")]
        assert await blocked() == 0
    finally:
        for c in clients:
            await c.aclose()
    return out


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


# --- running it on a loop ------------------------------------------------------

LOOPS = ["asyncio", "fastmux-epoll", "fastmux-select"]


def _new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "asyncio":
        return asyncio.SelectorEventLoop()
    return fastmux.EventLoop(backend=name.split("-", 1)[1])


def _connector(server: RedisServer, transport: str) -> Callable[[], Any]:
    import redis.asyncio as aioredis

    common: Dict[str, Any] = {"socket_timeout": STEP_TIMEOUT,
                              "socket_connect_timeout": STEP_TIMEOUT}
    if transport == "tcp":
        return lambda: aioredis.Redis(host="127.0.0.1", port=server.port, **common)
    if transport == "unix":
        return lambda: aioredis.Redis(unix_socket_path=server.unix_path, **common)
    assert transport == "tls"
    certs = server.certs
    assert certs is not None and server.tls_port is not None
    return lambda: aioredis.Redis(
        host="127.0.0.1", port=server.tls_port, ssl=True, ssl_ca_certs=certs["ca"],
        ssl_certfile=certs["client_cert"], ssl_keyfile=certs["client_key"],
        ssl_check_hostname=True, **common)


def run_workload(server: RedisServer, transport: str, loop_name: str) -> Dict[str, Any]:
    """The workload on a new loop of kind `loop_name`, closed afterwards."""
    connect = _connector(server, transport)
    ns = f"{transport}.{loop_name}.{next(_run_ids)}"
    loop = _new_loop(loop_name)

    async def main() -> Dict[str, Any]:
        running = asyncio.get_running_loop()
        assert running is loop
        # The first connection shows which transport carries the bytes.
        probe = connect()
        try:
            await probe.ping()
            conn = probe.connection or probe.connection_pool._available_connections[0]
            transport_obj = conn._writer.transport
            ssl_obj = transport_obj.get_extra_info("ssl_object")
            inner = getattr(getattr(transport_obj, "_ssl_protocol", None), "_transport", None)
            carried_by = type(inner if inner is not None else transport_obj).__module__ + "." + \
                type(inner if inner is not None else transport_obj).__qualname__
        finally:
            await probe.aclose()
        result = await asyncio.wait_for(_workload(connect, ns), TIMEOUT)
        result["_carried_by"] = carried_by
        result["_tls"] = ssl_obj is not None
        return result

    try:
        return loop.run_until_complete(main())
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


_reference: Dict[str, Dict[str, Any]] = {}


def reference(server: RedisServer, transport: str) -> Dict[str, Any]:
    """The workload's results on stock asyncio (computed once per transport)."""
    if transport not in _reference:
        _reference[transport] = run_workload(server, transport, "asyncio")
    return _reference[transport]


def _compare(got: Dict[str, Any], ref: Dict[str, Any]) -> None:
    public = {k: v for k, v in got.items() if not k.startswith("_")}
    ref_public = {k: v for k, v in ref.items() if not k.startswith("_")}
    for key in ref_public:
        assert public.get(key) == ref_public[key], f"{key!r} differs from stock asyncio's"
    assert public == ref_public


def _transport_or_skip(server: RedisServer, transport: str) -> None:
    if transport == "tls" and server.tls_error:  # type: ignore[attr-defined]
        _missing(server.tls_error)  # type: ignore[attr-defined]


TRANSPORTS = ["tcp", "unix", "tls"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_workload_on_stock_asyncio(redis_server: RedisServer, transport: str) -> None:
    """The reference run, and what is known of its results."""
    _transport_or_skip(redis_server, transport)
    ref = reference(redis_server, transport)
    assert ref["_tls"] is (transport == "tls")
    assert ref["ping"] is True
    assert ref["small"][0] == N_KEYS
    assert ref["strlen"] == BIG_SIZES
    per_counter = INCR_TASKS * INCRS // COUNTERS
    assert ref["counters"] == [per_counter] * COUNTERS
    assert ref["multi"] == [per_counter + 10, per_counter + 11, str(per_counter + 11).encode(),
                            5, [str(i).encode() for i in range(5)]]
    assert ref["subscribed"] == [("subscribe", "a", 1), ("subscribe", "b", 2),
                                 ("psubscribe", "*", 3)]
    assert ref["publish_counts"] == [2, 2, 1] * (2 * PUBLISHES // 3)
    first = ref["messages"][:5]
    assert first == [("message", "a", None, "m0"), ("pmessage", "a", "*", "m0"),
                     ("message", "b", None, "m1"), ("pmessage", "b", "*", "m1"),
                     ("pmessage", "p.x", "*", "m2")]
    assert ref["blpop_timeout"] is None
    assert ref["rpush"] == 3
    assert ref["fifo"] == [("q", b"x0"), ("q", b"x1"), ("q", b"x2")]
    assert ref["lpush"] == 1 and ref["blpop"] == ("l2", b"hello")
    assert ref["left"] == [0, 0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_workload_on_fastmux_matches_asyncio(redis_server: RedisServer, backend: str,
                                             transport: str) -> None:
    """The same workload on fastmux's loop gives stock asyncio's results; the
    plain streams are fastmux's native transports, TLS runs over asyncio's
    SSL protocol on a socket transport watched by the core."""
    _transport_or_skip(redis_server, transport)
    ref = reference(redis_server, transport)
    got = run_workload(redis_server, transport, f"fastmux-{backend}")
    if transport == "tls":
        assert got["_tls"] is True
        assert got["_carried_by"] == "asyncio.selector_events._SelectorSocketTransport"
    else:
        assert got["_tls"] is False
        assert got["_carried_by"] == "fastmux._aio._StreamTransport"
    assert ref["_carried_by"] == "asyncio.selector_events._SelectorSocketTransport"
    _compare(got, ref)
