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
#    failure is retried once, alone), every test that passed on asyncio
#    passed on fastmux, and the fastmux passes really ran fastmux loops.
#
# About 4 minutes on 2 CPUs (three passes of ~55 s with 4 xdist workers; the
# suite mostly waits on sockets and timers).  FASTMUX_UVICORN_KEEP=1 keeps
# the work directory; FASTMUX_UVICORN_WORKERS sets the xdist workers;
# FASTMUX_UVICORN_PYTEST_ARGS adds pytest arguments (e.g. "-k contextvars").
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
export FASTMUX_REQUIRE_C=1   # the epoll pass must run on the C core
compat="$repo/tests/compat/uvicorn"
passes=("$@")
[ ${#passes[@]} -gt 0 ] || passes=(fastmux-epoll fastmux-select asyncio)

step() { printf '\n=== %s ===\n' "$*"; }
fail() { echo "uvicorn.sh: $*" >&2; exit 1; }
t0=$SECONDS

version=$(sed -n 's/^uvicorn\[standard\]==\([0-9.]*\)$/\1/p' "$compat/requirements.txt")
[ -n "$version" ] || fail "no 'uvicorn[standard]==X' line in $compat/requirements.txt"

work=$(mktemp -d)
if [ "${FASTMUX_UVICORN_KEEP:-}" = 1 ]; then
  echo "work directory (kept): $work"
else
  trap 'rm -rf "$work"' EXIT
fi

step "fresh venv: fastmux from this tree, uvicorn $version and its test dependencies"
"$PY" -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q "$repo"
"$vpy" -m pip install -q -r "$compat/requirements.txt"
(cd "$work" && "$vpy" - "$work/venv" "$version" <<'EOF')
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
EOF

step "uvicorn $version sdist: its tests"
# --no-binary uvicorn (not :all:): the sdist of uvicorn itself, while its
# build backend (needed by pip to read the sdist's metadata) comes as wheels.
"$vpy" -m pip download -q --no-deps --no-binary uvicorn "uvicorn==$version" -d "$work/sdist"
sdist="$work/sdist/uvicorn-$version.tar.gz"
[ -f "$sdist" ] || fail "pip download did not produce $sdist"
mkdir "$work/src"
tar -xzf "$sdist" -C "$work/src" --strip-components=1 \
  "uvicorn-$version/tests" "uvicorn-$version/pyproject.toml"
[ -f "$work/src/tests/conftest.py" ] || fail "the sdist has no tests/conftest.py"

step "uvicorn's suite: ${passes[*]}"
rc=0
(cd "$work/src" && "$vpy" "$compat/run_suite.py" "$work" "${passes[@]}") || rc=$?
echo "uvicorn.sh: $((SECONDS - t0)) s in all"
exit "$rc"
