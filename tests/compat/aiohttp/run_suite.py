"""aiohttp's functional suites on fastmux's loop and on stock asyncio, compared.

Called by .ci/aiohttp.sh with the venv's Python, from the directory that
holds aiohttp's unpacked ``tests/`` and ``pytest.ini``; the runner and its
checks are tests/compat/harness.py:

    python run_suite.py WORKDIR PASS...      (PASS: fastmux-epoll, fastmux-select, asyncio)

Each pass runs FILES.  A fastmux pass may make no loop but fastmux's (the
plugin already fails any test that made or ran another) and must make
fastmux's native stream transport.
"""

from __future__ import annotations

import os
import sys
from typing import Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from harness import Suite, main  # noqa: E402

# Issue 11, proof 2: aiohttp's functional suites for its server and client.
FILES = ["tests/test_web_functional.py", "tests/test_client_functional.py"]
# aiohttp's pytest.ini is used as shipped (filterwarnings = error,
# xfail_strict, its 120 s timeout), except its addopts, which load
# coverage, doctests of every module and xdist's "auto" workers: replaced
# by its marker selection (what aiohttp's own CI runs by default).
PYTEST_ARGS = ["-o", "addopts=", "-m", "not dev_mode and not autobahn and not internal",
               "--strict-markers", "-p", "no:cacheprovider", "-q", "-rfE"]
# Tests allowed to pass on stock asyncio and not on fastmux, each with the
# reason it is the environment and not fastmux.  Empty: none differ.
EXPECTED_DIFFERENCES: Dict[str, str] = {}

SUITE = Suite(
    env_prefix="FASTMUX_AIOHTTP",
    plugin_dir=HERE,
    title="aiohttp's functional suites",
    verdict="aiohttp suites",
    pytest_args=PYTEST_ARGS,
    files=FILES,
    expected_differences=EXPECTED_DIFFERENCES,
    native_transport="fastmux._aio._StreamTransport",
)

if __name__ == "__main__":
    sys.exit(main(SUITE))
