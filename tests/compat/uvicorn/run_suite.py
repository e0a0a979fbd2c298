"""uvicorn's test suite on fastmux's loop and on stock asyncio, compared.

Called by .ci/uvicorn.sh with the venv's Python, from the directory that
holds uvicorn's unpacked ``tests/`` and ``pyproject.toml`` (its pytest
settings); the runner and its checks are tests/compat/harness.py:

    python run_suite.py WORKDIR PASS...      (PASS: fastmux-epoll, fastmux-select, asyncio)

The whole suite, by pytest's own collection.  A fastmux pass may run another
loop only in OWN_LOOP_TESTS (the plugin already fails any anyio test that
ran on another loop).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from harness import Suite, main  # noqa: E402

# The only tests allowed to run a loop other than fastmux's in a fastmux pass:
# their subject is the loop uvicorn or the test itself picks.
OWN_LOOP_TESTS = {
    # uvicorn's auto_loop_factory, called directly: uvloop when installed.
    "tests/test_auto_detection.py::test_loop_auto",
    # asyncio.run(..., loop_factory=CustomLoop), a SelectorEventLoop subclass.
    "tests/test_compat.py::test_asyncio_run__custom_loop_factory",
    "tests/test_compat.py::test_asyncio_run__passing_a_non_awaitable_callback_should_throw_error",
}

SUITE = Suite(
    env_prefix="FASTMUX_UVICORN",
    plugin_dir=HERE,
    title="uvicorn's suite",
    verdict="uvicorn suite",
    pytest_args=["-p", "no:cacheprovider", "--timeout=120", "-q", "-rfE"],
    own_loop_tests=OWN_LOOP_TESTS,
)

if __name__ == "__main__":
    sys.exit(main(SUITE))
