"""Shared fixtures: one suite, both backends, and a leak check around every test.

Every behavioural test takes the ``backend`` (or ``loop``) fixture, so it runs
once on the C epoll core and once on the pure-Python select backend; the
select backend is the behavioural oracle (see fastmux/_backend.py).

Markers (registered in ``pytest_configure`` so no ini file is needed):

* ``stress`` -- heavier tests (hundreds of connections, megabytes of data).
* ``epoll_only`` -- the test needs the epoll backend; it is skipped on select.
* ``no_leak_check`` -- opt out of the fd/thread leak check (say why).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

import pytest

# The helpers module sits beside this file; make it importable whatever
# pytest's import mode is (prepend inserts this directory, importlib does not).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import support  # noqa: E402

import fastmux  # noqa: E402
from fastmux import _backend  # noqa: E402

BACKENDS = ["epoll", "select"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stress: heavier tests (many connections, megabytes of data)")
    config.addinivalue_line("markers", "epoll_only: needs the epoll backend; skipped on select")
    config.addinivalue_line("markers", "no_leak_check: opt out of the autouse fd/thread leak check")


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name under test.

    A missing C core skips the epoll half -- unless FASTMUX_EXPECT_BACKEND=epoll
    (CI sets it), where it fails, so a broken build cannot pass green."""
    name = request.param
    if name == "epoll" and not _backend.epoll_available():
        if os.environ.get("FASTMUX_EXPECT_BACKEND") == "epoll":
            pytest.fail(
                "FASTMUX_EXPECT_BACKEND=epoll but the C core (fastmux._core) "
                "does not import: the build is broken"
            )
        pytest.skip("epoll backend unavailable (C core not built)")
    if name != "epoll" and request.node.get_closest_marker("epoll_only"):
        pytest.skip(f"needs the epoll backend, not {name}")
    return name


@pytest.fixture
def loop(backend: str):
    """A fresh loop on the backend under test, closed at teardown."""
    lp = fastmux.Loop(backend=backend)
    try:
        yield lp
    finally:
        lp.close()


# --- leak check -------------------------------------------------------------

# Kinds of fd that fastmux creates (sockets, epoll/eventfd/timerfd, pipes).
# Any other new fd (a regular file such as /dev/urandom, opened lazily and
# kept by the interpreter or a library) is tolerated: it is not ours.
_OURS = ("socket:", "anon_inode:", "pipe:")


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listdir itself used, already gone
            continue
    return fds


def _leaked(before: dict[int, str]) -> dict[int, str]:
    now = _open_fds()
    return {
        fd: target
        for fd, target in now.items()
        if before.get(fd) != target and target.startswith(_OURS)
    }


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest):
    """Fail a test that leaves fds (sockets, epoll/event/timer fds, pipes) or
    threads behind.  Autouse fixtures are set up first and torn down last, so
    this runs after the ``loop`` fixture has closed its loop."""
    if request.node.get_closest_marker("no_leak_check") or sys.platform != "linux":
        yield
        return
    # No gc.collect() here: the previous test's teardown already proved its
    # fds closed, and a full collection costs ~0.1 s per call in this suite.
    before = _open_fds()
    threads_before = set(threading.enumerate())
    yield
    # Bounded grace period, used only when something looks leaked: a socket
    # object a test dropped is closed by gc; a joined peer thread may be
    # finishing.
    deadline = time.monotonic() + 2.0
    collected = False
    while True:
        leaked = _leaked(before)
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if (not leaked and not threads) or time.monotonic() > deadline:
            break
        if collected:
            time.sleep(0.02)
        gc.collect()
        collected = True
    assert not leaked, f"fds left open by the test: {leaked}"
    assert not threads, f"threads left running by the test: {threads}"


# --- peers and threads, cleaned up even when a test fails ---------------------

class PeerSet:
    """Creates plain-socket peers (support.Peer) and closes them at teardown."""

    def __init__(self) -> None:
        self.all: list[support.Peer] = []

    def connect(self, address, **kwargs) -> support.Peer:
        p = support.Peer.connect(address, **kwargs)
        self.all.append(p)
        return p

    def adopt(self, sock) -> support.Peer:
        p = support.Peer(sock)
        self.all.append(p)
        return p


@pytest.fixture
def peers():
    ps = PeerSet()
    try:
        yield ps
    finally:
        for p in ps.all:
            p.close()


@pytest.fixture
def threads():
    """A support.ThreadRunner whose threads are joined (bounded) at teardown;
    every thread body in the suite uses socket timeouts."""
    tr = support.ThreadRunner()
    try:
        yield tr
    finally:
        for t in tr.threads:
            t.join(support.DEADLINE)
