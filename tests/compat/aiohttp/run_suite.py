"""Run aiohttp's functional suites on fastmux's loop and on stock asyncio; compare.

Called by .ci/aiohttp.sh with the venv's Python, from the directory that
holds aiohttp's unpacked ``tests/`` and ``pytest.ini``:

    python run_suite.py WORKDIR PASS...      (PASS: fastmux-epoll, fastmux-select, asyncio)

Each pass runs pytest over FILES with the ``fastmux_loop`` plugin (beside
this file), which records every test's outcome and the asyncio loops made
and run, and fails any test that used a loop other than the pass's.  A test
that fails is run once more, alone and without xdist; one that then passes
counts as passed and is listed as flaky in the summary.  Exits 1 unless, after that:

* every pass ran tests (pytest's exit code 5, "no tests", is a failure) and
  none failed or errored;
* every test that passed on stock asyncio passed on each fastmux pass,
  except those in EXPECTED_DIFFERENCES (each with its reason);
* the fastmux passes really made fastmux loops, on the backend asked for
  only, and native stream transports; the stock pass made no fastmux loop.
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
from typing import Any, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.environ.get("FASTMUX_AIOHTTP_WORKERS", "4")  # the tests mostly wait
# Extra pytest arguments for every pass (shell words: e.g. "-k 'ssl or keepalive'").
EXTRA = shlex.split(os.environ.get("FASTMUX_AIOHTTP_PYTEST_ARGS", ""))
# Issue 11, proof 2: aiohttp's functional suites for its server and client.
FILES = ["tests/test_web_functional.py", "tests/test_client_functional.py"]
# aiohttp's pytest.ini is used as shipped (filterwarnings = error,
# xfail_strict, its 120 s timeout), except its addopts, which load
# coverage, doctests of every module and xdist's "auto" workers: replaced
# by its marker selection (what aiohttp's own CI runs by default).
PYTEST_ARGS = ["-o", "addopts=", "-m", "not dev_mode and not autobahn and not internal",
               "--strict-markers", "-p", "no:cacheprovider", "-q", "-rfE"]
PASSES = {  # name -> environment
    "fastmux-epoll": {"FASTMUX_AIOHTTP_LOOP": "fastmux", "FASTMUX_BACKEND": "epoll"},
    "fastmux-select": {"FASTMUX_AIOHTTP_LOOP": "fastmux", "FASTMUX_BACKEND": "select"},
    "asyncio": {"FASTMUX_AIOHTTP_LOOP": "asyncio"},
}
NATIVE = "fastmux._aio._StreamTransport"
BAD = ("failed", "error", "xpassed")
# Tests allowed to pass on stock asyncio and not on fastmux, each with the
# reason it is the environment and not fastmux.  Empty: none differ.
EXPECTED_DIFFERENCES: Dict[str, str] = {}


def pytest(name: str, report_dir: str, args: List[str]) -> int:
    os.makedirs(report_dir, exist_ok=True)
    env = dict(os.environ, **PASSES[name])
    env["FASTMUX_AIOHTTP_REPORT_DIR"] = report_dir
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONASYNCIODEBUG", None)
    if name == "asyncio":
        env.pop("FASTMUX_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "fastmux_loop", *PYTEST_ARGS, *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def load(report_dir: str) -> Tuple[Dict[str, str], Dict[str, Counter[str]]]:
    """Outcomes by test and the loop tallies, added up over the processes."""
    outcomes: Dict[str, str] = {}
    loops: Dict[str, Counter[str]] = {"created": Counter(), "backends": Counter(),
                                      "tests_by_loop": Counter(), "transports": Counter()}
    for path in sorted(glob.glob(os.path.join(report_dir, "loops-*.json"))):
        with open(path) as f:
            d = json.load(f)
        outcomes.update(d["outcomes"])  # xdist: controller and workers agree
        loops["created"].update(d["loops_created"])
        loops["backends"].update(d["fastmux_backends"])
        loops["tests_by_loop"].update(d["tests_by_loop"])
        loops["transports"].update(d["transports"])
    return outcomes, loops


def run_pass(name: str, work: str) -> Dict[str, Any]:
    t0 = time.monotonic()
    report_dir = os.path.join(work, f"report-{name}")
    rc = pytest(name, report_dir, ["-n", WORKERS, *EXTRA, *FILES])
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
        pytest(name, retry_dir, ["-n", "0", *bad])
        again, _ = load(retry_dir)
        for nodeid in bad:
            if again.get(nodeid) == "passed":
                result["flaky"].append(nodeid)
                outcomes[nodeid] = "passed"
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
        if not loops["transports"].get(NATIVE):
            problems.append(f"{name}: no fastmux native stream transport was made")
        others = {k: n for k, n in loops["created"].items() if k != "fastmux.EventLoop"}
        if others:  # the plugin failed the tests that made them
            problems.append(f"{name}: loops other than fastmux's were made: {others}")
    elif fastmux_loops:
        problems.append(f"{name}: the reference run created {fastmux_loops} fastmux loops")


def main() -> int:
    work, names = sys.argv[1], sys.argv[2:]
    for name in names:
        if name not in PASSES:
            raise SystemExit(f"unknown pass {name!r}; choose from {sorted(PASSES)}")
    results = []
    for name in names:
        print(f"\n=== aiohttp's functional suites, pass {name} ===", flush=True)
        result = run_pass(name, work)
        check_loops(result)
        results.append(result)

    problems: List[str] = []
    print("\n=== aiohttp's functional suites: summary ===")
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
        for nodeid in r["flaky"]:
            print(f"{'':>17}flaky: {nodeid}")
        for nodeid, outcome in sorted(r["outcomes"].items()):
            if outcome in BAD and nodeid not in EXPECTED_DIFFERENCES:
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
                if n in EXPECTED_DIFFERENCES:
                    print(f"{'':>17}expected: {n}: {EXPECTED_DIFFERENCES[n]}")
                else:
                    problems.append(f"{r['name']}: passed on stock asyncio, not here "
                                    f"({r['outcomes'].get(n, 'not run')}): {n}")

    if problems:
        print("\naiohttp suites: FAILED")
        for p in problems:
            print("  " + p)
        return 1
    print("\naiohttp suites: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
