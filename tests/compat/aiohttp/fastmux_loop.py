"""pytest plugin: run aiohttp's own functional tests on fastmux's asyncio loop.

Loaded by .ci/aiohttp.sh as ``-p fastmux_loop`` (this directory on
PYTHONPATH).  ``FASTMUX_AIOHTTP_LOOP`` chooses the loop:

* ``fastmux`` (default): ``fastmux.install()``.  aiohttp's test plugin
  (``aiohttp.pytest_plugin``, which aiohttp's conftest loads) makes each
  test's ``loop`` fixture from ``loop_factory``, parametrized by
  ``--aiohttp-loop``: "pyloop" (the default, and the only one run here) is
  ``asyncio.new_event_loop``, which asks the event loop policy -- so with
  fastmux's policy installed every ``loop`` fixture, every async test and
  every async fixture (aiohttp's plugin runs them all with
  ``loop.run_until_complete``) is on a ``fastmux.EventLoop``.  The option
  takes only the names "pyloop" and "uvloop", so the policy is the one
  seam; it keeps the test ids (``[pyloop]``) identical across passes, which
  the comparison needs;
* ``asyncio``: the stock policy, for the reference run.

It also proves which loop ran: every asyncio loop created, and every loop
*run*, during each test (setup, call and teardown) is recorded
(``BaseEventLoop.__init__`` and ``run_forever`` are wrapped), and every
transport made is counted by class (``BaseTransport.__init__``): in the
fastmux passes, plain TCP connections are fastmux's native
``_StreamTransport``; TLS connections, made by ``_make_ssl_transport``, are
asyncio's ``_SelectorSocketTransport`` (under its sslproto) over the core's
watches.  In fastmux
mode a test fails if it made or ran any loop other than fastmux's, and an
async test (a coroutine function, run by aiohttp's plugin) fails unless it
ran a fastmux loop; in the reference run a test fails if it made or ran a
fastmux loop.  With ``FASTMUX_AIOHTTP_REPORT_DIR`` set, each pytest process
(xdist workers included) writes its tallies and every test's outcome there
as JSON for run_suite.py to add up.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from asyncio import base_events
from collections import Counter
from typing import Any, Dict, Generator, Optional, Set

import pytest

import fastmux

MODE = os.environ.get("FASTMUX_AIOHTTP_LOOP", "fastmux")
if MODE not in ("fastmux", "asyncio"):
    raise RuntimeError(f"FASTMUX_AIOHTTP_LOOP must be 'fastmux' or 'asyncio', not {MODE!r}")

FASTMUX = "fastmux.EventLoop"
_created: Counter[str] = Counter()  # loop class -> loops created
_used: Dict[str, Set[str]] = {}  # test nodeid -> loop classes made or run during it
_ran: Dict[str, Set[str]] = {}  # test nodeid -> loop classes run during it
_current: Optional[str] = None  # nodeid of the test in progress
_backends: Counter[str] = Counter()  # fastmux native backend of each loop created
_transports: Counter[str] = Counter()  # transport class -> transports made
_outcomes: Dict[str, str] = {}  # test nodeid -> passed/failed/error/skipped/xfailed/xpassed


def _kind(loop: Any) -> str:
    if isinstance(loop, fastmux.EventLoop):
        return FASTMUX
    cls = type(loop)
    return f"{cls.__module__}.{cls.__qualname__}"


def _install_probes() -> None:
    init = base_events.BaseEventLoop.__init__
    transport_init = asyncio.BaseTransport.__init__
    run_forever = base_events.BaseEventLoop.run_forever

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        kind = _kind(self)
        _created[kind] += 1
        if isinstance(self, fastmux.EventLoop):
            _backends[self.backend] += 1
        if _current is not None:
            _used.setdefault(_current, set()).add(kind)

    def recording_run_forever(self: Any) -> None:
        if _current is not None:
            kind = _kind(self)
            _used.setdefault(_current, set()).add(kind)
            _ran.setdefault(_current, set()).add(kind)
        run_forever(self)

    def counting_transport_init(self: Any, *args: Any, **kwargs: Any) -> None:
        transport_init(self, *args, **kwargs)
        cls = type(self)
        _transports[f"{cls.__module__}.{cls.__qualname__}"] += 1

    base_events.BaseEventLoop.__init__ = counting_init  # type: ignore[method-assign]
    base_events.BaseEventLoop.run_forever = recording_run_forever  # type: ignore[method-assign]
    asyncio.BaseTransport.__init__ = counting_transport_init  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    _install_probes()
    if MODE == "fastmux":
        fastmux.install()


def pytest_report_header(config: pytest.Config) -> str:
    if MODE == "fastmux":
        with fastmux.Loop() as core:
            backend = core.backend
        return (f"fastmux_loop: asyncio loops are fastmux.EventLoop "
                f"(fastmux {fastmux.__version__} from {os.path.dirname(fastmux.__file__)}, "
                f"backend {backend})")
    return "fastmux_loop: stock asyncio loops (reference run)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Generator[
        None, Any, Any]:
    global _current
    _current = item.nodeid
    try:
        return (yield)
    finally:
        _current = None


def _check_loops(item: pytest.Item, called: bool) -> None:
    """``called``: the test body ran and passed (not so for a test skipped
    in setup, whose teardown is checked all the same)."""
    used = _used.get(item.nodeid, set())
    if MODE == "fastmux":
        others = sorted(used - {FASTMUX})
        if others:
            raise AssertionError(f"fastmux_loop: this test used {others}, not fastmux's loop only")
        if called and inspect.iscoroutinefunction(getattr(item, "obj", None)) \
                and FASTMUX not in _ran.get(item.nodeid, set()):
            raise AssertionError("fastmux_loop: this async test ran no fastmux.EventLoop")
    elif FASTMUX in used:
        raise AssertionError("fastmux_loop: the reference run made or ran a fastmux loop")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    result = yield
    _check_loops(item, True)  # reached only when the test body passed
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Generator[
        None, Any, Any]:
    result = yield
    _check_loops(item, False)  # fixtures' teardown (the loop fixture's run_forever) included
    return result


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One outcome per test: a failed setup or teardown is an error, a
    failed call a failure (xdist workers report here too)."""
    nodeid, when = report.nodeid, report.when
    if hasattr(report, "wasxfail"):
        if report.skipped:
            _outcomes[nodeid] = "xfailed"
        elif report.passed and when == "call":
            _outcomes[nodeid] = "xpassed"
        return
    if report.failed:
        _outcomes[nodeid] = "failed" if when == "call" else "error"
    elif report.skipped:
        _outcomes[nodeid] = "skipped"
    elif when == "call" and report.passed and nodeid not in _outcomes:
        _outcomes[nodeid] = "passed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    summary = {
        "mode": MODE,
        "loops_created": dict(_created),
        "fastmux_backends": dict(_backends),
        "transports": dict(_transports),
        "tests_by_loop": dict(Counter(kind for kinds in _ran.values() for kind in kinds)),
        "outcomes": _outcomes,
    }
    out = os.environ.get("FASTMUX_AIOHTTP_REPORT_DIR")
    if out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.path.join(out, f"loops-{worker}.json"), "w") as f:
            json.dump(summary, f, indent=1)


def pytest_unconfigure(config: pytest.Config) -> None:
    if MODE == "fastmux":
        asyncio.set_event_loop_policy(None)
