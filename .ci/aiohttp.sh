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
#    tests and none failed (a failure is retried once, alone), every test
#    that passed on asyncio passed on fastmux (bar a listed, explained
#    expected difference), and the fastmux passes ran fastmux loops only.
#
# About 2 minutes on 2 CPUs (100-160 s measured: the venv, then three passes
# of 25-45 s with 4 xdist workers; the tests mostly wait on sockets and timers).
# FASTMUX_AIOHTTP_KEEP=1 keeps the work directory; FASTMUX_AIOHTTP_WORKERS
# sets the xdist workers; FASTMUX_AIOHTTP_PYTEST_ARGS adds pytest arguments
# (e.g. "-k keepalive").
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
export FASTMUX_REQUIRE_C=1   # the epoll pass must run on the C core
compat="$repo/tests/compat/aiohttp"
passes=("$@")
[ ${#passes[@]} -gt 0 ] || passes=(fastmux-epoll fastmux-select asyncio)

step() { printf '\n=== %s ===\n' "$*"; }
fail() { echo "aiohttp.sh: $*" >&2; exit 1; }
t0=$SECONDS

version=$(sed -n 's/^aiohttp==\([0-9.]*\)$/\1/p' "$compat/requirements.txt")
[ -n "$version" ] || fail "no 'aiohttp==X' line in $compat/requirements.txt"

work=$(mktemp -d)
if [ "${FASTMUX_AIOHTTP_KEEP:-}" = 1 ]; then
  echo "work directory (kept): $work"
else
  trap 'rm -rf "$work"' EXIT
fi

step "fresh venv: fastmux from this tree, aiohttp $version and its test dependencies"
"$PY" -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q "$repo"
"$vpy" -m pip install -q -r "$compat/requirements.txt"
(cd "$work" && "$vpy" - "$work/venv" "$version" <<'PYEOF')
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

step "aiohttp $version sdist: its tests"
# --no-binary aiohttp (not :all:): the sdist of aiohttp itself, while its
# build backend (needed by pip to read the sdist's metadata) comes as wheels.
"$vpy" -m pip download -q --no-deps --no-binary aiohttp "aiohttp==$version" -d "$work/sdist"
sdist="$work/sdist/aiohttp-$version.tar.gz"
[ -f "$sdist" ] || fail "pip download did not produce $sdist"
mkdir "$work/src"
tar -xzf "$sdist" -C "$work/src" --strip-components=1 \
  "aiohttp-$version/tests" "aiohttp-$version/pytest.ini"
for f in conftest.py test_web_functional.py test_client_functional.py; do
  [ -f "$work/src/tests/$f" ] || fail "the sdist has no tests/$f"
done

step "aiohttp's functional suites: ${passes[*]}"
rc=0
(cd "$work/src" && "$vpy" "$compat/run_suite.py" "$work" "${passes[@]}") || rc=$?
echo "aiohttp.sh: $((SECONDS - t0)) s in all"
exit "$rc"
