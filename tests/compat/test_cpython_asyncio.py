"""CPython's own asyncio conformance tests, run on fastmux's event loop.

The ``test.test_asyncio`` package that ships with every interpreter writes
its event-loop tests once, as mixins, and binds them to each stdlib loop by a
small subclass that only says how to make the loop (``create_event_loop``,
``new_loop``, or ``policy.new_event_loop`` for the subprocess tests).  This
module makes the same subclasses for three loops:

* ``epoll``  -- ``fastmux.EventLoop(backend="epoll")`` (the C core),
* ``select`` -- ``fastmux.EventLoop(backend="select")`` (pure Python),
* ``stdlib`` -- ``asyncio.SelectorEventLoop()``, the oracle: a test that fails
  or skips there fails or skips because of this machine, not fastmux.

The goal is that every test the stdlib loop passes here passes on fastmux.
``EXPECTED_FAILURES`` lists the exceptions, each with its reason (target:
empty; the same list is in docs/asyncio.md).  An entry is a unittest
expected failure, so a test that starts passing fails the run until its
entry is removed.

The test classes differ between Python versions and some modules are absent
on some of them: everything is looked up defensively, and a suite that cannot
be bound becomes one test that skips with the reason.  pytest collects the
classes made here as unittest test cases.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import os
import unittest
from typing import Any, Callable, Dict, List, Optional, Tuple
from unittest import mock

import fastmux
from fastmux import _backend

#: The loops under test.  "stdlib" is the oracle (see the module docstring).
LOOP_KINDS = ("epoll", "select", "stdlib")

#: (suite, test method) -> why it fails on fastmux's loop by design.
#: Applied to the fastmux loops only; keep in step with docs/asyncio.md.
EXPECTED_FAILURES: Dict[Tuple[str, str], str] = {}


def _require(kind: str) -> None:
    """The rule of tests/conftest.py's ``backend`` fixture: a missing C core
    skips the epoll half -- unless FASTMUX_EXPECT_BACKEND=epoll, where it fails."""
    if kind == "epoll" and not _backend.epoll_available():
        if os.environ.get("FASTMUX_EXPECT_BACKEND") == "epoll":
            raise AssertionError(
                "FASTMUX_EXPECT_BACKEND=epoll but the C core (fastmux._core) "
                "does not import: the build is broken")
        raise unittest.SkipTest("epoll backend unavailable (C core not built)")


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    _require(kind)
    if kind == "stdlib":
        return asyncio.SelectorEventLoop()
    loop = fastmux.EventLoop(backend=kind)
    assert loop.backend == kind, (loop.backend, kind)
    return loop


def _import(name: str) -> Tuple[Optional[Any], str]:
    """test.test_asyncio.<name>, or (None, why not)."""
    try:
        return importlib.import_module(f"test.test_asyncio.{name}"), ""
    except unittest.SkipTest as exc:
        return None, f"test.test_asyncio.{name} skips itself here: {exc}"
    except ImportError as exc:
        return None, f"test.test_asyncio.{name} is not available: {exc}"


# -- how each kind of CPython test class is told which loop to use ------------

def _hook_create_event_loop(kind: str) -> Dict[str, Any]:
    """EventLoopTestsMixin, BaseSockTestsMixin, SendfileBase: create_event_loop()."""
    def create_event_loop(self: Any) -> asyncio.AbstractEventLoop:
        return _new_loop(kind)
    return {"create_event_loop": create_event_loop}


def _hook_new_loop(kind: str) -> Dict[str, Any]:
    """FunctionalTestCaseMixin (test_server, test_buffered_proto): new_loop()."""
    def new_loop(self: Any) -> asyncio.AbstractEventLoop:
        return _new_loop(kind)
    return {"new_loop": new_loop}


def _hook_policy_loop(kind: str) -> Dict[str, Any]:
    """test_subprocess's SubprocessWatcherMixin: its setUp takes the loop from
    ``policy.new_event_loop()``; answer that call with ours during setUp."""
    def setUp(self: Any) -> None:
        _require(kind)
        policy = asyncio.get_event_loop_policy()
        with mock.patch.object(policy, "new_event_loop", lambda: _new_loop(kind)):
            super(cls_holder[0], self).setUp()
    cls_holder: List[type] = []
    return {"setUp": setUp, "__cls_holder": cls_holder}


def _hook_policy_and_new_loop(kind: str) -> Dict[str, Any]:
    """test_ssl.TestSSL: asyncio.new_event_loop() in setUp (the policy's),
    and new_loop() for the loops some tests run in threads."""
    ns = _hook_policy_loop(kind)
    ns.update(_hook_new_loop(kind))
    return ns


def _hook_isolated(kind: str) -> Dict[str, Any]:
    """unittest.IsolatedAsyncioTestCase: loop_factory (3.13), or the Runner
    it makes in _setupAsyncioRunner (3.11, 3.12)."""
    if hasattr(unittest.IsolatedAsyncioTestCase, "loop_factory"):
        return {"loop_factory": staticmethod(lambda: _new_loop(kind))}

    def _setupAsyncioRunner(self: Any) -> None:
        assert self._asyncioRunner is None, "asyncio runner is already initialized"
        self._asyncioRunner = asyncio.Runner(debug=True, loop_factory=lambda: _new_loop(kind))
    return {"_setupAsyncioRunner": _setupAsyncioRunner}


#: suite name -> (module, class in it, how it takes a loop).  Each class is
#: CPython's own binding of the mixins to the stdlib selector loop on Unix,
#: so its platform-specific overrides and skips come along.
SUITES: List[Tuple[str, str, str, Callable[[str], Dict[str, Any]]]] = [
    # EventLoopTestsMixin through UnixEventLoopTestsMixin, with the
    # subprocess tests of SubprocessTestsMixin; TLS tests are in the mixin.
    ("Events", "test_events", "SelectEventLoopTests", _hook_create_event_loop),
    # BaseSockTestsMixin: sock_* and, on 3.11+, datagram sock_* calls.
    ("SockLowlevel", "test_sock_lowlevel", "SelectEventLoopTests", _hook_create_event_loop),
    # BaseStartServer plus the Unix start_server test.
    ("StartServer", "test_server", "SelectorStartServerTests", _hook_new_loop),
    ("Server2", "test_server", "TestServer2", _hook_isolated),
    ("UnixServerCleanup", "test_server", "UnixServerCleanupTests", _hook_isolated),
    ("BufferedProto", "test_buffered_proto", "BufferedProtocolSelectorTests", _hook_new_loop),
    # TLS: BaseStartTLS (start_tls over fastmux's transports, and asyncio's
    # TLS transports for ssl=), and 3.11+'s TestSSL (uvloop's TLS tests).
    ("StartTLS", "test_sslproto", "SelectorStartTLSTests", _hook_new_loop),
    ("SSL", "test_ssl", "TestSSL", _hook_policy_and_new_loop),
    # SendfileMixin + SockSendfileMixin.
    ("Sendfile", "test_sendfile", "SelectEventLoopTests", _hook_create_event_loop),
    # SubprocessMixin with the default watchers of 3.10-3.13.
    ("SubprocessThreaded", "test_subprocess", "SubprocessThreadedWatcherTests", _hook_policy_loop),
    ("SubprocessPidfd", "test_subprocess", "SubprocessPidfdWatcherTests", _hook_policy_loop),
]


def _expected_failure(meth: Callable[..., Any], reason: str) -> Callable[..., Any]:
    # A new function: marking CPython's own would mark the stdlib binding too.
    @functools.wraps(meth)
    def test(self: Any) -> Any:
        return meth(self)
    test.__doc__ = f"Expected to fail on fastmux: {reason}"
    return unittest.expectedFailure(test)


def _missing(name: str, reason: str) -> type:
    @unittest.skip(reason)
    class Missing(unittest.TestCase):
        def test_suite_available(self) -> None:
            pass  # pragma: no cover
    Missing.__name__ = Missing.__qualname__ = name
    Missing.__module__ = __name__
    return Missing


def _bind(suite: str, base: type, kind: str,
          hook: Callable[[str], Dict[str, Any]]) -> type:
    ns = hook(kind)
    holder = ns.pop("__cls_holder", None)
    if kind != "stdlib":
        for (s, test_name), reason in EXPECTED_FAILURES.items():
            meth = getattr(base, test_name, None) if s == suite else None
            if meth is not None:
                ns[test_name] = _expected_failure(meth, reason)
    name = f"{suite}_{kind}"
    ns["__module__"] = __name__
    ns["__qualname__"] = name
    cls = type(name, (base,), ns)
    if holder is not None:
        holder.append(cls)
    return cls


def _build() -> None:
    for suite, module_name, class_name, hook in SUITES:
        module, why = _import(module_name)
        base = getattr(module, class_name, None) if module is not None else None
        if base is None and module is not None:
            why = f"test.test_asyncio.{module_name} has no {class_name} on this Python"
        for kind in LOOP_KINDS:
            name = f"{suite}_{kind}"
            if base is None:
                globals()[name] = _missing(name, why)
            else:
                globals()[name] = _bind(suite, base, kind, hook)


_build()
