"""Run uvicorn's test suite on fastmux's loop and on stock asyncio; compare.

Called by .ci/uvicorn.sh with the venv's Python, from the directory that
holds uvicorn's unpacked ``tests/`` and ``pyproject.toml``:

    python run_suite.py WORKDIR PASS...      (PASS: fastmux-epoll, fastmux-select, asyncio)

Each pass runs pytest with the ``fastmux_loop`` plugin (beside this file),
which records every test's outcome and the asyncio loops created and run.
A test that fails is run once more, alone and without xdist; one that then
passes is reported as flaky.  Exits 1 unless, after that:

* every pass ran tests (pytest's exit code 5, "no tests", is a failure) and
  none failed or errored;
* every test that passed on stock asyncio passed on each fastmux pass;
* the fastmux passes really ran fastmux loops on the backend asked for, and
  no other loop except in OWN_LOOP_TESTS (the plugin already failed any
  async test that ran on another loop); the stock pass ran none.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.environ.get("FASTMUX_UVICORN_WORKERS", "4")  # the tests mostly wait
# Extra pytest arguments for every pass (e.g. "-k contextvars" while working on one test).
EXTRA = os.environ.get("FASTMUX_UVICORN_PYTEST_ARGS", "").split()
PASSES = {  # name -> environment
    "fastmux-epoll": {"FASTMUX_UVICORN_LOOP": "fastmux", "FASTMUX_BACKEND": "epoll"},
    "fastmux-select": {"FASTMUX_UVICORN_LOOP": "fastmux", "FASTMUX_BACKEND": "select"},
    "asyncio": {"FASTMUX_UVICORN_LOOP": "asyncio"},
}
BAD = ("failed", "error", "xpassed")
# The only tests allowed to run a loop other than fastmux's in a fastmux pass:
# their subject is the loop uvicorn or the test itself picks.
OWN_LOOP_TESTS = {
    # uvicorn's auto_loop_factory, called directly: uvloop when installed.
    "tests/test_auto_detection.py::test_loop_auto",
    # asyncio.run(..., loop_factory=CustomLoop), a SelectorEventLoop subclass.
    "tests/test_compat.py::test_asyncio_run__custom_loop_factory",
    "tests/test_compat.py::test_asyncio_run__passing_a_non_awaitable_callback_should_throw_error",
}


def pytest(name: str, report_dir: str, args: List[str]) -> int:
    os.makedirs(report_dir, exist_ok=True)
    env = dict(os.environ, **PASSES[name])
    env["FASTMUX_UVICORN_REPORT_DIR"] = report_dir
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONASYNCIODEBUG", None)
    if name == "asyncio":
        env.pop("FASTMUX_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "fastmux_loop", "-p", "no:cacheprovider",
           "--timeout=120", "-q", "-rfE", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def load(report_dir: str) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """Outcomes by test and the loop tallies, added up over the processes."""
    outcomes: Dict[str, str] = {}
    loops: Dict[str, Any] = {"created": Counter(), "backends": Counter(),
                             "tests_by_loop": Counter(), "others": {}}
    for path in sorted(glob.glob(os.path.join(report_dir, "loops-*.json"))):
        with open(path) as f:
            d = json.load(f)
        outcomes.update(d["outcomes"])  # xdist: controller and workers agree
        loops["created"].update(d["loops_created"])
        loops["backends"].update(d["fastmux_backends"])
        loops["tests_by_loop"].update(d["tests_by_loop"])
        loops["others"].update(d["tests_on_other_loops"])
    return outcomes, loops


def run_pass(name: str, work: str) -> Dict[str, Any]:
    t0 = time.monotonic()
    rc = pytest(name, os.path.join(work, f"report-{name}"), ["-n", WORKERS, *EXTRA])
    outcomes, loops = load(os.path.join(work, f"report-{name}"))
    result: Dict[str, Any] = {"name": name, "rc": rc, "outcomes": outcomes, "loops": loops,
                              "flaky": [], "problems": []}
    if rc == 5 or not outcomes:
        result["problems"].append(f"{name}: pytest collected or ran no tests (exit {rc})")
    elif rc not in (0, 1):
        result["problems"].append(f"{name}: pytest was interrupted or failed to run (exit {rc})")
    bad = sorted(n for n, o in outcomes.items() if o in BAD)
    if bad and rc in (0, 1):
        print(f"\n{name}: {len(bad)} test(s) failed; running them once more, alone", flush=True)
        retry_dir = os.path.join(work, f"report-{name}-retry")
        pytest(name, retry_dir, ["-n", "0", *bad])
        again, _ = load(retry_dir)
        for nodeid in bad:
            if again.get(nodeid) == "passed":
                result["flaky"].append(nodeid)
            else:
                outcomes[nodeid] = again.get(nodeid, outcomes[nodeid])
    result["seconds"] = time.monotonic() - t0
    return result


def check_loops(result: Dict[str, Any]) -> None:
    name, loops, problems = result["name"], result["loops"], result["problems"]
    fastmux_loops = loops["created"].get("fastmux.EventLoop", 0)
    if name.startswith("fastmux-"):
        backend = name.split("-", 1)[1]
        if fastmux_loops == 0:
            problems.append(f"{name}: no fastmux.EventLoop was created: the loop was not swapped")
        if set(loops["backends"]) != {backend}:
            problems.append(f"{name}: fastmux loops ran on backends {dict(loops['backends'])}, "
                            f"expected {backend} only")
        for nodeid, kinds in sorted(loops["others"].items()):
            if nodeid not in OWN_LOOP_TESTS:
                problems.append(f"{name}: ran on {', '.join(kinds)}, not fastmux's loop: {nodeid}")
    elif fastmux_loops:
        problems.append(f"{name}: the reference run created {fastmux_loops} fastmux loops")


def counts(outcomes: Dict[str, str]) -> Counter[str]:
    return Counter(outcomes.values())


def main() -> int:
    work, names = sys.argv[1], sys.argv[2:]
    for name in names:
        if name not in PASSES:
            raise SystemExit(f"unknown pass {name!r}; choose from {sorted(PASSES)}")
    results = []
    for name in names:
        print(f"\n=== uvicorn's suite, pass {name} ===", flush=True)
        result = run_pass(name, work)
        check_loops(result)
        results.append(result)

    problems: List[str] = []
    print("\n=== uvicorn's suite: summary ===")
    for r in results:
        c = counts(r["outcomes"])
        loops = r["loops"]
        print(f"{r['name']:>15}: {c['passed']} passed, {c['failed']} failed, "
              f"{c['error']} errors, {c['skipped']} skipped, {c['xfailed']} xfailed"
              f"{', %d flaky (passed on retry)' % len(r['flaky']) if r['flaky'] else ''}"
              f"  ({r['seconds']:.0f} s)")
        print(f"{'':>17}loops created: {dict(loops['created'])}; "
              f"tests that ran each loop: {dict(loops['tests_by_loop'])}")
        for nodeid, kinds in sorted(loops["others"].items() if r["name"] != "asyncio" else ()):
            print(f"{'':>17}ran its own loop: {nodeid}: {', '.join(kinds)}")
        for nodeid in r["flaky"]:
            print(f"{'':>17}flaky: {nodeid}")
        for nodeid, outcome in sorted(r["outcomes"].items()):
            if outcome in BAD:
                problems.append(f"{r['name']}: {outcome}: {nodeid}")
        problems += r["problems"]

    stock = next((r for r in results if r["name"] == "asyncio"), None)
    if stock is not None:
        passed_on_stock = {n for n, o in stock["outcomes"].items() if o == "passed"}
        for r in results:
            if r is stock:
                continue
            lost = sorted(n for n in passed_on_stock if r["outcomes"].get(n) != "passed")
            gained = sorted(n for n, o in r["outcomes"].items()
                            if o == "passed" and n not in passed_on_stock)
            print(f"{r['name']:>15} vs asyncio: {len(lost)} passed on asyncio only, "
                  f"{len(gained)} passed on {r['name']} only")
            for n in lost:
                problems.append(f"{r['name']}: passed on stock asyncio, not here "
                                f"({r['outcomes'].get(n, 'not run')}): {n}")

    if problems:
        print("\nuvicorn suite: FAILED")
        for p in problems:
            print("  " + p)
        return 1
    print("\nuvicorn suite: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
