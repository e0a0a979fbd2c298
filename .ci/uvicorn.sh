#!/usr/bin/env bash
# uvicorn's own test suite with fastmux's asyncio loop swapped in (issue 10,
# proof 2), and again on stock asyncio as the reference.
#
#   bash .ci/uvicorn.sh [PASS...]    PASS: fastmux-epoll fastmux-select asyncio (default: all)
#
# 1. a fresh venv: this tree installed into it (`pip install .`, with the C
#    core required), then the pinned uvicorn and every package its tests
#    import (tests/compat/uvicorn/requirements.txt);
# 2. the same uvicorn release's sdist, fetched with `pip download` (the only
#    network used is the package registry, through pip), from which only
#    tests/ and pyproject.toml (uvicorn's pytest settings) are unpacked --
#    the tests import the installed uvicorn;
# 3. tests/compat/uvicorn/run_suite.py runs the suite once per pass, with the
#    fastmux_loop plugin: fastmux.install() plus uvicorn's "auto" loop pointed
#    at fastmux.new_event_loop, on each native backend; then on stock
#    asyncio.  It fails unless every pass ran tests and none failed (a
#    failure is retried once, alone; one that then passes is listed as
#    flaky), every test that passed on asyncio passed on fastmux, and the
#    fastmux passes really ran fastmux loops.
# The steps are .ci/compat-lib.sh's, shared with .ci/aiohttp.sh; the runner
# is tests/compat/harness.py.
#
# About 4 minutes on 2 CPUs (three passes of ~55 s with 4 xdist workers; the
# suite mostly waits on sockets and timers).  FASTMUX_UVICORN_KEEP=1 keeps
# the work directory; FASTMUX_UVICORN_WORKERS sets the xdist workers;
# FASTMUX_UVICORN_PYTEST_ARGS adds pytest arguments, split as shell words
# (e.g. "-k contextvars").
set -euo pipefail
source "$(dirname "$0")/compat-lib.sh"
compat_init uvicorn 'uvicorn\[standard\]' "$@"

compat_venv <<'PYEOF'
import importlib.metadata as md, os, sys
venv, version = sys.argv[1], sys.argv[2]
import fastmux, fastmux._core, uvicorn
for mod in (fastmux, uvicorn):
    assert os.path.abspath(mod.__file__).startswith(venv), f"{mod.__name__} from {mod.__file__}"
assert md.version("uvicorn") == version, md.version("uvicorn")
with fastmux.Loop() as loop:
    assert loop.backend == "epoll", loop.backend
print(f"  fastmux {fastmux.__version__} (C core), uvicorn {md.version('uvicorn')}, "
      f"httptools {md.version('httptools')}, Python {sys.version.split()[0]}")
PYEOF

REQUIRED=(conftest.py)
compat_sdist pyproject.toml
compat_run "uvicorn's suite"
