#!/usr/bin/env bash
# aiohttp's own functional suites for its server and client
# (tests/test_web_functional.py, tests/test_client_functional.py) with
# fastmux's asyncio loop swapped in (issue 11, proof 2), and again on stock
# asyncio as the reference.
#
#   bash .ci/aiohttp.sh [PASS...]    PASS: fastmux-epoll fastmux-select asyncio (default: all)
#
# 1. a fresh venv: this tree installed into it (`pip install .`, with the C
#    core required), then the pinned aiohttp and every package its tests
#    import (tests/compat/aiohttp/requirements.txt);
# 2. the same aiohttp release's sdist, fetched with `pip download` (the only
#    network used is the package registry, through pip), from which only
#    tests/ and pytest.ini (aiohttp's pytest settings) are unpacked -- the
#    tests import the installed aiohttp, with its C extensions;
# 3. tests/compat/aiohttp/run_suite.py runs the two files once per pass, with
#    the fastmux_loop plugin: fastmux.install(), so that aiohttp's "pyloop"
#    loop fixture (asyncio.new_event_loop) makes fastmux loops, on each
#    native backend; then on stock asyncio.  It fails unless every pass ran
#    tests and none failed (a failure is retried once, alone; one that then
#    passes is listed as flaky), every test that passed on asyncio passed on
#    fastmux (bar a listed, explained expected difference), and the fastmux
#    passes ran fastmux loops only.
# The steps are .ci/compat-lib.sh's, shared with .ci/uvicorn.sh; the runner
# is tests/compat/harness.py.
#
# About 2 minutes on 2 CPUs (100-160 s measured: the venv, then three passes
# of 25-45 s with 4 xdist workers; the tests mostly wait on sockets and timers).
# FASTMUX_AIOHTTP_KEEP=1 keeps the work directory; FASTMUX_AIOHTTP_WORKERS
# sets the xdist workers; FASTMUX_AIOHTTP_PYTEST_ARGS adds pytest arguments,
# split as shell words (e.g. "-k 'ssl or keepalive'").
set -euo pipefail
source "$(dirname "$0")/compat-lib.sh"
compat_init aiohttp 'aiohttp' "$@"

compat_venv <<'PYEOF'
import importlib.metadata as md, os, sys
venv, version = sys.argv[1], sys.argv[2]
import fastmux, fastmux._core, aiohttp, aiohttp._http_parser
for mod in (fastmux, aiohttp):
    assert os.path.abspath(mod.__file__).startswith(venv), f"{mod.__name__} from {mod.__file__}"
assert md.version("aiohttp") == version, md.version("aiohttp")
with fastmux.Loop() as loop:
    assert loop.backend == "epoll", loop.backend
print(f"  fastmux {fastmux.__version__} (C core), aiohttp {md.version('aiohttp')} "
      f"(C extensions), Python {sys.version.split()[0]}")
PYEOF

REQUIRED=(conftest.py test_web_functional.py test_client_functional.py)
compat_sdist pytest.ini
compat_run "aiohttp's functional suites"
