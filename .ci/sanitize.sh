#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer in a
# scratch copy of the tree and run the test suite (minus stress tests) on it.
#
# The interpreter is not instrumented, so the ASan/UBSan runtimes are
# preloaded.  Leak detection is off here: LeakSanitizer cannot tell CPython's
# own deliberate leaks from ours (a suppression matches any frame of a stack,
# and every one of our allocations has interpreter frames below it).  Leaks
# are valgrind's job: .ci/valgrind.sh counts only leaks whose stack is in our
# module.
#
#   bash .ci/sanitize.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r csrc fastmux setup.py pyproject.toml MANIFEST.in "$work"/
[ -f README.md ] && cp README.md "$work"/
rm -f "$work"/fastmux/_core*.so "$work"/fastmux/bench/_loadgen*.so
(cd "$work" && FASTMUX_SANITIZE=1 FASTMUX_REQUIRE_C=1 "$PY" setup.py -q build_ext --inplace >/dev/null)

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# Run from the scratch tree so its fastmux/ comes first on sys.path.
cd "$work"
export PYTHONPATH="$work"
core=$("$PY" -c 'import fastmux._core as c; print(c.__file__)')
case "$core" in
  "$work"/*) echo "sanitized core: $core" ;;
  *) echo "sanitize.sh: imported $core, not the sanitized build" >&2; exit 1 ;;
esac

export FASTMUX_EXPECT_BACKEND=epoll
# -k: not the stdlib loop's half of tests/compat (the oracle runs no fastmux C).
run_pytest() {
  set +e
  "$PY" -m pytest -q -p no:cacheprovider -m "not stress" -k "not _stdlib" "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "sanitize.sh: pytest collected no tests ($*)" >&2
    return 1
  fi
  return "$rc"
}
if [ "$#" -gt 0 ]; then
  rc=0
  run_pytest "$@" || rc=$?
  exit "$rc"
fi
# The process pool's tests fork from the test process: they get a fresh
# interpreter of their own rather than one that has run 1,400 tests under
# ASan (a supervisor forked late in the long run once hung at start-up on
# 2026-11-29; test_workers.py alone passed 6 runs of 6 under ASan).
rc=0
run_pytest "$repo/tests" --ignore="$repo/tests/test_workers.py" || rc=$?
run_pytest "$repo/tests/test_workers.py" || rc=$?
exit "$rc"
