#!/usr/bin/env bash
# Install passes: test what users install, not the source tree.
#
#   bash .ci/install_tests.sh [extra pytest args]
#
# (a) wheel: build the sdist and the abi3 manylinux wheel (.ci/build_wheel.sh),
#     install the wheel into a fresh venv, run the suite from a copy of tests/
#     outside the source tree with FASTMUX_EXPECT_BACKEND=epoll and
#     DeprecationWarnings as errors.
# (b) pure: install the sdist with FASTMUX_PURE=1 into another fresh venv;
#     no compiled module may be installed, Loop() must pick "select", and the
#     suite must pass (epoll tests skip; FASTMUX_EXPECT_BACKEND is unset).
# (c) every other supported Python: the same wheel (abi3: one wheel for all
#     CPython >= 3.10) in a fresh venv of each of CPython 3.10, 3.12 and 3.13
#     (found through pyenv by .ci/pythons.sh; missing ones fail when CI=true),
#     the suite run as in (a) (FASTMUX_PYTHONS="3.10 ..." to choose).
#     About 50 s per version on 2 CPUs.
# All passes skip the stress tests (they run once, in the main pass).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
PYTEST_ARGS=(-p no:cacheprovider -m "not stress" --timeout=120 -q "$@")

step() { printf '\n=== %s ===\n' "$*"; }
fail() { echo "install_tests: $*" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A copy of the tests, away from ./fastmux so it cannot shadow the install.
# No ini file comes along: conftest.py registers the markers itself.
cp -r tests "$work/tests"
rm -rf "$work/tests/fuzz" "$work/tests/__pycache__"

run_suite() {  # venv-python, label, [interpreter options]
  local vpy=$1 label=$2 rc=0
  shift 2
  (cd "$work/tests" && "$vpy" "$@" -m pytest --rootdir "$work/tests" "${PYTEST_ARGS[@]}") || rc=$?
  if [ "$rc" -eq 5 ]; then fail "$label: pytest collected no tests"; fi
  [ "$rc" -eq 0 ] || fail "$label: tests failed (pytest exit $rc)"
}

# Checks on an installed fastmux: where it comes from, its version, backend.
check_install() {  # venv-python, expected backend
  (cd "$work" && "$1" - "$2" "$work/venv-" <<'EOF')
import glob, importlib.metadata as md, os, sys
expected, venv_prefix = sys.argv[1], sys.argv[2]
import fastmux
pkg = os.path.dirname(os.path.abspath(fastmux.__file__))
assert pkg.startswith(venv_prefix), f"fastmux imported from {pkg}, not the venv"
assert fastmux.__version__ == md.version("fastmux"), fastmux.__version__
assert "unknown" not in fastmux.__version__, fastmux.__version__
compiled = sorted(os.path.relpath(p, pkg)
                  for p in glob.glob(os.path.join(pkg, "**", "*.so"), recursive=True))
with fastmux.Loop() as loop:
    backend = loop.backend
assert backend == expected, f"Loop().backend is {backend!r}, expected {expected!r}"
if expected == "select":
    assert not compiled, f"pure install holds compiled modules: {compiled}"
    assert not fastmux.epoll_available()
else:
    assert any(c.startswith("_core.") and c.endswith(".abi3.so") for c in compiled), compiled
    import fastmux._core  # noqa: F401
assert os.path.exists(os.path.join(pkg, "py.typed"))
reqs = md.requires("fastmux") or []
runtime = [r for r in reqs if "extra ==" not in r]
assert all(r.startswith("cffi") for r in runtime), f"runtime deps: {runtime}"
print(f"  fastmux {fastmux.__version__} from {pkg}; backend {backend}; compiled: {compiled}")
EOF
}

step "build the sdist and the abi3 manylinux wheel"
# (Not `tee /dev/stderr`: reopening stderr truncates a log file it points to.)
bash .ci/build_wheel.sh "$work/dist" > "$work/build_wheel.out"
cat "$work/build_wheel.out"
wheel=$(tail -n 1 "$work/build_wheel.out")
sdist=$(ls "$work"/dist/fastmux-*.tar.gz)
[ -f "$wheel" ] || fail "no wheel from build_wheel.sh"

step "(a) wheel in a fresh venv, tests from outside the source tree (epoll expected)"
"$PY" -m venv "$work/venv-wheel"
vpy="$work/venv-wheel/bin/python"
"$vpy" -m pip install -q "${wheel}[test]"
(
  unset FASTMUX_BACKEND
  export FASTMUX_EXPECT_BACKEND=epoll
  check_install "$vpy" epoll
  run_suite "$vpy" "wheel" -W error::DeprecationWarning
)

step "(b) pure-Python install (FASTMUX_PURE=1) from the sdist in a fresh venv"
"$PY" -m venv "$work/venv-pure"
vpy="$work/venv-pure/bin/python"
# --no-cache-dir: a wheel cached from an earlier (C) build must not be reused.
env -u FASTMUX_REQUIRE_C FASTMUX_PURE=1 "$vpy" -m pip install -q --no-cache-dir "${sdist}[test]"
(
  # The epoll tests must skip here, not fail: no FASTMUX_EXPECT_BACKEND.
  unset FASTMUX_EXPECT_BACKEND FASTMUX_BACKEND
  check_install "$vpy" select
  # Not the stdlib oracle of tests/compat: the other passes run it.
  PYTEST_ARGS+=(-k "not _stdlib")
  run_suite "$vpy" "pure"
)

step "(c) the wheel on every other supported Python, DeprecationWarnings as errors"
pythons=$(bash .ci/pythons.sh)  # fails here, under CI=true, if one is missing
while read -r minor pyexe; do
  [ -n "$minor" ] || continue
  step "(c) CPython $minor ($pyexe): wheel in a fresh venv (epoll expected)"
  t0=$SECONDS
  "$pyexe" -m venv "$work/venv-$minor"
  vpy="$work/venv-$minor/bin/python"
  "$vpy" -m pip install -q "${wheel}[test]"
  (
    unset FASTMUX_BACKEND
    export FASTMUX_EXPECT_BACKEND=epoll
    check_install "$vpy" epoll
    run_suite "$vpy" "CPython $minor" -W error::DeprecationWarning
  )
  echo "  CPython $minor: $((SECONDS - t0))s"
done <<<"$pythons"

step "install passes: all passed"
