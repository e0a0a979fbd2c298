"""pytest plugin: run uvicorn's own test suite on fastmux's asyncio loop.

Loaded by .ci/uvicorn.sh as ``-p fastmux_loop`` (this directory and
tests/compat, for the shared ``loopcheck``, on PYTHONPATH).
``FASTMUX_UVICORN_LOOP`` chooses the loop:

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

It also proves which loop ran (``loopcheck`` records every asyncio loop
created and run during each test; uvloop loops are counted here, where
``uvloop.new_event_loop`` makes them).  In fastmux mode an anyio test (the
ones whose loop is chosen by the harness, not by the test) fails unless
every loop it ran was fastmux's; tests that build a loop class of their own
choosing (uvicorn's loop-selection tests: ``Config(loop="asyncio")`` and
friends) are listed, not failed.  With ``FASTMUX_UVICORN_REPORT_DIR`` set,
each pytest process (xdist workers included) writes its tallies there as
JSON for the script to add up.
"""

from __future__ import annotations

import inspect
from typing import Any, Generator

import loopcheck
import pytest
from loopcheck import (  # noqa: F401 -- the shared hooks, registered from this module
    pytest_report_header,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
    pytest_unconfigure,
)

import fastmux

MODE = loopcheck.init("FASTMUX_UVICORN")


def _count_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    new = uvloop.new_event_loop

    def counting_new_event_loop() -> Any:
        loop = new()
        loopcheck.count_created("uvloop.Loop")
        loopcheck.record("uvloop.Loop", ran=True)
        return loop

    uvloop.new_event_loop = counting_new_event_loop


def auto_loop_factory(use_subprocess: bool = False) -> Any:
    """uvicorn's "auto" loop setting, in fastmux mode."""
    return fastmux.new_event_loop


def pytest_configure(config: pytest.Config) -> None:
    loopcheck.configure()
    _count_uvloop()
    if MODE == "fastmux":
        from uvicorn import config as uvicorn_config

        factories = uvicorn_config.LOOP_FACTORIES
        if "auto" not in factories:
            raise RuntimeError("uvicorn.config.LOOP_FACTORIES has no 'auto': not uvicorn >= 0.36?")
        factories["auto"] = f"{__name__}:auto_loop_factory"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    result = yield
    # Reached only when the test body passed: check the loop it ran on.
    ran = loopcheck.ran(item.nodeid)
    if _runs_on_anyio(item):
        if MODE == "fastmux" and ran != {loopcheck.FASTMUX}:
            raise AssertionError(
                f"fastmux_loop: this anyio test ran on {sorted(ran) or 'no asyncio loop'}, "
                "not on fastmux.EventLoop only")
        if MODE == "asyncio" and loopcheck.FASTMUX in ran:
            raise AssertionError("fastmux_loop: the reference run ran a fastmux loop")
    return result


def _runs_on_anyio(item: pytest.Item) -> bool:
    """An async test that anyio's plugin runs (sync tests ignore the mark)."""
    func = getattr(item, "obj", None)
    return (item.get_closest_marker("anyio") is not None
            and inspect.iscoroutinefunction(func))
