"""Run a third-party test suite on fastmux's loop and on stock asyncio; compare.

The shared runner of tests/compat/*/run_suite.py, which each describe their
suite with a ``Suite`` and call ``main(suite)``; they are called by
.ci/<suite>.sh (through .ci/compat-lib.sh) with the venv's Python, from the
directory that holds the suite's unpacked ``tests/``:

    python run_suite.py WORKDIR PASS...      (PASS: fastmux-epoll, fastmux-select, asyncio)

Each pass runs pytest over the suite's files with its ``fastmux_loop``
plugin (beside its run_suite.py; the common part is ``loopcheck`` beside
this file), which records every test's outcome and the asyncio loops made
and run.  A test that fails is run once more, alone and without xdist; one
that then passes counts as passed and is listed as flaky in the summary.
Exits 1 unless, after that:

* every pass ran tests (pytest's exit code 5, "no tests", is a failure) and
  none failed or errored;
* every test that passed on stock asyncio passed on each fastmux pass,
  except the suite's ``expected_differences`` (each with its reason);
* the fastmux passes really made fastmux loops, on the backend asked for
  only (and the suite's ``native_transport``, if it names one), and no
  other loop -- or, with ``own_loop_tests``, no other loop run except in
  those tests; the stock pass made no fastmux loop.

``FASTMUX_<SUITE>_WORKERS`` sets the xdist workers (4: the tests mostly
wait); ``FASTMUX_<SUITE>_PYTEST_ARGS`` adds pytest arguments to every pass,
split as shell words (e.g. "-k 'ssl or keepalive'").
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

COMPAT = os.path.dirname(os.path.abspath(__file__))
BAD = ("failed", "error", "xpassed")
FASTMUX = "fastmux.EventLoop"


@dataclass
class Suite:
    env_prefix: str  # FASTMUX_UVICORN: its _LOOP, _REPORT_DIR, _WORKERS, _PYTEST_ARGS
    plugin_dir: str  # the directory of the suite's fastmux_loop plugin
    title: str  # "uvicorn's suite": the pass and summary headings
    verdict: str  # "uvicorn suite": the last line, "... FAILED" / "... all passed"
    pytest_args: List[str]  # before the workers, the extra arguments and the files
    files: List[str] = field(default_factory=list)  # [] : pytest's own collection
    # Tests allowed to pass on stock asyncio and not on fastmux, with the reason.
    expected_differences: Dict[str, str] = field(default_factory=dict)
    # None: a fastmux pass may make no loop but fastmux's.  A set: the tests
    # allowed to run another loop (their subject is the loop they pick).
    own_loop_tests: Optional[Set[str]] = None
    # A transport class the fastmux passes must make (fastmux's native one).
    native_transport: Optional[str] = None

    def passes(self) -> Dict[str, Dict[str, str]]:  # name -> environment
        loop = f"{self.env_prefix}_LOOP"
        return {
            "fastmux-epoll": {loop: "fastmux", "FASTMUX_BACKEND": "epoll"},
            "fastmux-select": {loop: "fastmux", "FASTMUX_BACKEND": "select"},
            "asyncio": {loop: "asyncio"},
        }


def pytest(suite: Suite, name: str, report_dir: str, args: List[str]) -> int:
    os.makedirs(report_dir, exist_ok=True)
    env = dict(os.environ, **suite.passes()[name])
    env[f"{suite.env_prefix}_REPORT_DIR"] = report_dir
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (suite.plugin_dir, COMPAT, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONASYNCIODEBUG", None)
    if name == "asyncio":
        env.pop("FASTMUX_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "fastmux_loop", *suite.pytest_args, *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def load(report_dir: str) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """Outcomes by test and the loop tallies, added up over the processes."""
    outcomes: Dict[str, str] = {}
    loops: Dict[str, Any] = {"created": Counter(), "backends": Counter(),
                             "tests_by_loop": Counter(), "transports": Counter(), "others": {}}
    for path in sorted(glob.glob(os.path.join(report_dir, "loops-*.json"))):
        with open(path) as f:
            d = json.load(f)
        outcomes.update(d["outcomes"])  # xdist: controller and workers agree
        loops["created"].update(d["loops_created"])
        loops["backends"].update(d["fastmux_backends"])
        loops["tests_by_loop"].update(d["tests_by_loop"])
        loops["transports"].update(d["transports"])
        loops["others"].update(d["tests_on_other_loops"])
    return outcomes, loops


def run_pass(suite: Suite, name: str, work: str) -> Dict[str, Any]:
    t0 = time.monotonic()
    workers = os.environ.get(f"{suite.env_prefix}_WORKERS", "4")
    extra = shlex.split(os.environ.get(f"{suite.env_prefix}_PYTEST_ARGS", ""))
    report_dir = os.path.join(work, f"report-{name}")
    rc = pytest(suite, name, report_dir, ["-n", workers, *extra, *suite.files])
    outcomes, loops = load(report_dir)
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
        pytest(suite, name, retry_dir, ["-n", "0", *bad])
        again, _ = load(retry_dir)
        for nodeid in bad:
            if again.get(nodeid) == "passed":
                result["flaky"].append(nodeid)
                outcomes[nodeid] = "passed"
            else:
                outcomes[nodeid] = again.get(nodeid, outcomes[nodeid])
    result["seconds"] = time.monotonic() - t0
    return result


def check_loops(suite: Suite, result: Dict[str, Any]) -> None:
    name, loops, problems = result["name"], result["loops"], result["problems"]
    fastmux_loops = loops["created"].get(FASTMUX, 0)
    if name.startswith("fastmux-"):
        backend = name.split("-", 1)[1]
        if fastmux_loops == 0:
            problems.append(f"{name}: no fastmux.EventLoop was created: the loop was not swapped")
        if set(loops["backends"]) != {backend}:
            problems.append(f"{name}: fastmux loops ran on backends {dict(loops['backends'])}, "
                            f"expected {backend} only")
        if suite.native_transport and not loops["transports"].get(suite.native_transport):
            problems.append(f"{name}: no fastmux native stream transport was made")
        if suite.own_loop_tests is None:
            others = {k: n for k, n in loops["created"].items() if k != FASTMUX}
            if others:  # the plugin failed the tests that made them
                problems.append(f"{name}: loops other than fastmux's were made: {others}")
        else:
            for nodeid, kinds in sorted(loops["others"].items()):
                if nodeid not in suite.own_loop_tests:
                    problems.append(
                        f"{name}: ran on {', '.join(kinds)}, not fastmux's loop: {nodeid}")
    elif fastmux_loops:
        problems.append(f"{name}: the reference run created {fastmux_loops} fastmux loops")


def main(suite: Suite) -> int:
    work, names = sys.argv[1], sys.argv[2:]
    passes = suite.passes()
    for name in names:
        if name not in passes:
            raise SystemExit(f"unknown pass {name!r}; choose from {sorted(passes)}")
    results = []
    for name in names:
        print(f"\n=== {suite.title}, pass {name} ===", flush=True)
        result = run_pass(suite, name, work)
        check_loops(suite, result)
        results.append(result)

    expected = suite.expected_differences
    problems: List[str] = []
    print(f"\n=== {suite.title}: summary ===")
    for r in results:
        c = Counter(r["outcomes"].values())
        loops = r["loops"]
        print(f"{r['name']:>15}: {c['passed']} passed, {c['failed']} failed, "
              f"{c['error']} errors, {c['skipped']} skipped, {c['xfailed']} xfailed"
              f"{', %d flaky (passed on retry)' % len(r['flaky']) if r['flaky'] else ''}"
              f"  ({r['seconds']:.0f} s)")
        print(f"{'':>17}loops created: {dict(loops['created'])}; "
              f"tests that ran each loop: {dict(loops['tests_by_loop'])}")
        print(f"{'':>17}transports made: {dict(loops['transports'].most_common())}")
        if suite.own_loop_tests is not None and r["name"] != "asyncio":
            for nodeid, kinds in sorted(loops["others"].items()):
                print(f"{'':>17}ran its own loop: {nodeid}: {', '.join(kinds)}")
        for nodeid in r["flaky"]:
            print(f"{'':>17}flaky: {nodeid}")
        for nodeid, outcome in sorted(r["outcomes"].items()):
            if outcome in BAD and nodeid not in expected:
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
                if n in expected:
                    print(f"{'':>17}expected: {n}: {expected[n]}")
                else:
                    problems.append(f"{r['name']}: passed on stock asyncio, not here "
                                    f"({r['outcomes'].get(n, 'not run')}): {n}")

    if problems:
        print(f"\n{suite.verdict}: FAILED")
        for p in problems:
            print("  " + p)
        return 1
    print(f"\n{suite.verdict}: all passed")
    return 0
