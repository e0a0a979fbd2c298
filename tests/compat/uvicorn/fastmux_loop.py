"""pytest plugin: run uvicorn's own test suite on fastmux's asyncio loop.

Loaded by .ci/uvicorn.sh as ``-p fastmux_loop`` (this directory on
PYTHONPATH).  ``FASTMUX_UVICORN_LOOP`` chooses the loop:

* ``fastmux`` (default): ``fastmux.install()``, so every loop that asyncio
  makes through its policy -- ``asyncio.new_event_loop()``, ``asyncio.run()``,
  and anyio's pytest runner, which uvicorn's async tests use
  (``anyio_backend`` is "asyncio" and anyio's ``Runner`` then calls
  ``asyncio.new_event_loop()``) -- is a ``fastmux.EventLoop``;
  uvicorn's ``--loop auto`` (the default of ``Config`` and ``uvicorn.run``,
  which would pick uvloop) is pointed at ``fastmux.new_event_loop`` too, so
  the tests that run a whole server through ``Server.run()`` use the same
  path as ``uvicorn --loop fastmux:new_event_loop``; tests that name a loop
  (``loop="asyncio"``, a custom loop class) keep it;
* ``asyncio``: the stock policy and uvicorn's own "auto" (uvloop), for the
  reference run.

It also proves which loop ran: every asyncio loop created, and every loop
*run* during each test, is recorded (``BaseEventLoop.__init__`` and
``run_forever`` are wrapped; uvloop loops are counted where
``uvloop.new_event_loop`` makes them).  In fastmux mode an anyio test (the ones whose
loop is chosen by the harness, not by the test) fails unless every loop it
ran was fastmux's; tests that build a loop class of their own choosing
(uvicorn's loop-selection tests: ``Config(loop="asyncio")`` and
friends) are listed, not failed.  With ``FASTMUX_UVICORN_REPORT_DIR`` set,
each pytest process (xdist workers included) writes its tallies there as
JSON for the script to add up.
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

MODE = os.environ.get("FASTMUX_UVICORN_LOOP", "fastmux")
if MODE not in ("fastmux", "asyncio"):
    raise RuntimeError(f"FASTMUX_UVICORN_LOOP must be 'fastmux' or 'asyncio', not {MODE!r}")

_created: Counter[str] = Counter()  # loop class -> loops created
_ran: Dict[str, Set[str]] = {}  # test nodeid -> loop classes run during it
_current: Optional[str] = None  # nodeid of the test in progress
_backends: Counter[str] = Counter()  # fastmux native backend of each loop created
_outcomes: Dict[str, str] = {}  # test nodeid -> passed/failed/error/skipped/xfailed/xpassed


def _kind(loop: Any) -> str:
    if isinstance(loop, fastmux.EventLoop):
        return "fastmux.EventLoop"
    cls = type(loop)
    return f"{cls.__module__}.{cls.__qualname__}"


def _install_probes() -> None:
    init = base_events.BaseEventLoop.__init__
    run_forever = base_events.BaseEventLoop.run_forever

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _created[_kind(self)] += 1
        if isinstance(self, fastmux.EventLoop):
            _backends[self.backend] += 1

    def recording_run_forever(self: Any) -> None:
        if _current is not None:
            _ran.setdefault(_current, set()).add(_kind(self))
        run_forever(self)

    base_events.BaseEventLoop.__init__ = counting_init  # type: ignore[method-assign]
    base_events.BaseEventLoop.run_forever = recording_run_forever  # type: ignore[method-assign]


def _count_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    new = uvloop.new_event_loop

    def counting_new_event_loop() -> Any:
        loop = new()
        _created["uvloop.Loop"] += 1
        if _current is not None:
            _ran.setdefault(_current, set()).add("uvloop.Loop")
        return loop

    uvloop.new_event_loop = counting_new_event_loop


def auto_loop_factory(use_subprocess: bool = False) -> Any:
    """uvicorn's "auto" loop setting, in fastmux mode."""
    return fastmux.new_event_loop


def pytest_configure(config: pytest.Config) -> None:
    _install_probes()
    _count_uvloop()
    if MODE == "fastmux":
        fastmux.install()
        from uvicorn import config as uvicorn_config

        factories = uvicorn_config.LOOP_FACTORIES
        if "auto" not in factories:
            raise RuntimeError("uvicorn.config.LOOP_FACTORIES has no 'auto': not uvicorn >= 0.36?")
        factories["auto"] = f"{__name__}:auto_loop_factory"


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    result = yield
    # Reached only when the test body passed: check the loop it ran on.
    ran = _ran.get(item.nodeid, set())
    if _runs_on_anyio(item):
        if MODE == "fastmux" and ran != {"fastmux.EventLoop"}:
            raise AssertionError(
                f"fastmux_loop: this anyio test ran on {sorted(ran) or 'no asyncio loop'}, "
                "not on fastmux.EventLoop only")
        if MODE == "asyncio" and "fastmux.EventLoop" in ran:
            raise AssertionError("fastmux_loop: the reference run ran a fastmux loop")
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


def _runs_on_anyio(item: pytest.Item) -> bool:
    """An async test that anyio's plugin runs (sync tests ignore the mark)."""
    func = getattr(item, "obj", None)
    return (item.get_closest_marker("anyio") is not None
            and inspect.iscoroutinefunction(func))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    tests_on = Counter(kind for kinds in _ran.values() for kind in kinds)
    others = {nodeid: sorted(k for k in kinds if k != "fastmux.EventLoop")
              for nodeid, kinds in sorted(_ran.items())}
    summary = {
        "mode": MODE,
        "loops_created": dict(_created),
        "fastmux_backends": dict(_backends),
        "tests_that_ran_a_loop": len(_ran),
        "tests_by_loop": dict(tests_on),
        "tests_on_other_loops": {n: k for n, k in others.items() if k},
        "outcomes": _outcomes,
    }
    out = os.environ.get("FASTMUX_UVICORN_REPORT_DIR")
    if out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.path.join(out, f"loops-{worker}.json"), "w") as f:
            json.dump(summary, f, indent=1)


def pytest_unconfigure(config: pytest.Config) -> None:
    if MODE == "fastmux":
        asyncio.set_event_loop_policy(None)
