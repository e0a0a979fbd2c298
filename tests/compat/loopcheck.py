"""The common part of the ``fastmux_loop`` pytest plugins of the
third-party suites (tests/compat/*/fastmux_loop.py, run by
tests/compat/harness.py).

A suite's plugin calls ``init(PREFIX)`` at import, which reads
``PREFIX_LOOP`` -- ``fastmux`` (the default: the plugin installs fastmux's
loop) or ``asyncio`` (stock loops, the reference run) -- and re-exports the
hooks below; its own ``pytest_configure`` calls ``configure()`` and then
swaps the loop in its own way, and its own ``pytest_runtest_call`` (and
friends) decide which loops each test may use, from the tallies here:

* every asyncio loop made (``BaseEventLoop.__init__``) and *run*
  (``run_forever``) during each test (setup, call and teardown), by class
  (``_used``: made or run; ``_ran``: run);
* every transport made, by class (``BaseTransport.__init__``);
* one outcome per test (``pytest_runtest_logreport``).

With ``PREFIX_REPORT_DIR`` set, each pytest process (xdist workers included)
writes its tallies and every test's outcome there as JSON for the harness to
add up.
"""

from __future__ import annotations

import asyncio
import json
import os
from asyncio import base_events
from collections import Counter
from typing import Any, Dict, Generator, Optional, Set

import pytest

import fastmux

FASTMUX = "fastmux.EventLoop"
MODE = "fastmux"  # set by init()
_prefix = ""

_created: Counter[str] = Counter()  # loop class -> loops created
_used: Dict[str, Set[str]] = {}  # test nodeid -> loop classes made or run during it
_ran: Dict[str, Set[str]] = {}  # test nodeid -> loop classes run during it
_current: Optional[str] = None  # nodeid of the test in progress
_backends: Counter[str] = Counter()  # fastmux native backend of each loop created
_transports: Counter[str] = Counter()  # transport class -> transports made
_outcomes: Dict[str, str] = {}  # test nodeid -> passed/failed/error/skipped/xfailed/xpassed


def init(prefix: str) -> str:
    """Read ``{prefix}_LOOP``; returns the mode, fastmux or asyncio."""
    global MODE, _prefix
    _prefix = prefix
    MODE = os.environ.get(f"{prefix}_LOOP", "fastmux")
    if MODE not in ("fastmux", "asyncio"):
        raise RuntimeError(f"{prefix}_LOOP must be 'fastmux' or 'asyncio', not {MODE!r}")
    return MODE


def kind(obj: Any) -> str:
    if isinstance(obj, fastmux.EventLoop):
        return FASTMUX
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def record(loop_kind: str, ran: bool) -> None:
    """A loop of ``loop_kind`` made (or, ``ran``, run) by the current test."""
    if _current is not None:
        _used.setdefault(_current, set()).add(loop_kind)
        if ran:
            _ran.setdefault(_current, set()).add(loop_kind)


def count_created(loop_kind: str) -> None:
    _created[loop_kind] += 1


def used(nodeid: str) -> Set[str]:
    return _used.get(nodeid, set())


def ran(nodeid: str) -> Set[str]:
    return _ran.get(nodeid, set())


def _install_probes() -> None:
    init_ = base_events.BaseEventLoop.__init__
    run_forever = base_events.BaseEventLoop.run_forever
    transport_init = asyncio.BaseTransport.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init_(self, *args, **kwargs)
        k = kind(self)
        _created[k] += 1
        if isinstance(self, fastmux.EventLoop):
            _backends[self.backend] += 1
        record(k, ran=False)

    def recording_run_forever(self: Any) -> None:
        record(kind(self), ran=True)
        run_forever(self)

    def counting_transport_init(self: Any, *args: Any, **kwargs: Any) -> None:
        transport_init(self, *args, **kwargs)
        _transports[kind(self)] += 1

    base_events.BaseEventLoop.__init__ = counting_init  # type: ignore[method-assign]
    base_events.BaseEventLoop.run_forever = recording_run_forever  # type: ignore[method-assign]
    asyncio.BaseTransport.__init__ = counting_transport_init  # type: ignore[method-assign]


def configure() -> None:
    """The probes, then (fastmux mode) fastmux's policy: the suite's own
    ``pytest_configure`` calls this first."""
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
    others = {nodeid: sorted(k for k in kinds if k != FASTMUX)
              for nodeid, kinds in sorted(_ran.items())}
    summary = {
        "mode": MODE,
        "loops_created": dict(_created),
        "fastmux_backends": dict(_backends),
        "transports": dict(_transports),
        "tests_that_ran_a_loop": len(_ran),
        "tests_by_loop": dict(Counter(k for kinds in _ran.values() for k in kinds)),
        "tests_on_other_loops": {n: k for n, k in others.items() if k},
        "outcomes": _outcomes,
    }
    out = os.environ.get(f"{_prefix}_REPORT_DIR")
    if out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.path.join(out, f"loops-{worker}.json"), "w") as f:
            json.dump(summary, f, indent=1)


def pytest_unconfigure(config: pytest.Config) -> None:
    if MODE == "fastmux":
        asyncio.set_event_loop_policy(None)
