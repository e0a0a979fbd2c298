"""pytest plugin: run aiohttp's own functional tests on fastmux's asyncio loop.

Loaded by .ci/aiohttp.sh as ``-p fastmux_loop`` (this directory and
tests/compat, for the shared ``loopcheck``, on PYTHONPATH).
``FASTMUX_AIOHTTP_LOOP`` chooses the loop:

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

It also proves which loop ran: ``loopcheck`` records every asyncio loop
created, and every loop *run*, during each test (setup, call and teardown),
and counts every transport made by class: in the fastmux passes, plain TCP
connections are fastmux's native ``_StreamTransport``; TLS connections, made
by ``_make_ssl_transport``, are asyncio's ``_SelectorSocketTransport`` (under
its sslproto) over the core's watches.  In fastmux mode a test fails if it
made or ran any loop other than fastmux's, and an async test (a coroutine
function, run by aiohttp's plugin) fails unless it ran a fastmux loop; in
the reference run a test fails if it made or ran a fastmux loop.  With
``FASTMUX_AIOHTTP_REPORT_DIR`` set, each pytest process (xdist workers
included) writes its tallies and every test's outcome there as JSON for
run_suite.py to add up.
"""

from __future__ import annotations

import inspect
from typing import Any, Generator, Optional

import loopcheck
import pytest
from loopcheck import (  # noqa: F401 -- the shared hooks, registered from this module
    FASTMUX,
    pytest_report_header,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
    pytest_unconfigure,
)

MODE = loopcheck.init("FASTMUX_AIOHTTP")


def pytest_configure(config: pytest.Config) -> None:
    loopcheck.configure()


def _check_loops(item: pytest.Item, called: bool) -> None:
    """``called``: the test body ran and passed (not so for a test skipped
    in setup, whose teardown is checked all the same)."""
    used = loopcheck.used(item.nodeid)
    if MODE == "fastmux":
        others = sorted(used - {FASTMUX})
        if others:
            raise AssertionError(f"fastmux_loop: this test used {others}, not fastmux's loop only")
        if called and inspect.iscoroutinefunction(getattr(item, "obj", None)) \
                and FASTMUX not in loopcheck.ran(item.nodeid):
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
