#!/usr/bin/env bash
# Find the interpreters of the CPython versions we support besides the one
# CI runs on, through pyenv, at run time (no path is written down anywhere).
#
#   bash .ci/pythons.sh [minor ...]      (default: $FASTMUX_PYTHONS or 3.10 3.12 3.13)
#
# Prints "<minor> <interpreter path>" per version, newest patch release of
# each.  A missing pyenv or version fails the run when CI=true (a version
# that silently drops out of CI is a version nobody tests); elsewhere it is
# reported on stderr and left out.
set -euo pipefail
read -r -a minors <<<"${*:-${FASTMUX_PYTHONS:-3.10 3.12 3.13}}"

missing() {
  if [ "${CI:-}" = true ]; then
    echo "pythons.sh: $* (CI=true: every supported Python must be tested)" >&2
    exit 1
  fi
  echo "pythons.sh: WARNING: $*; not tested here" >&2
}

if ! command -v pyenv >/dev/null; then
  missing "pyenv not found, so CPython ${minors[*]} cannot be found"
  exit 0
fi
installed=$(pyenv versions --bare --skip-aliases)
for minor in "${minors[@]}"; do
  # 3.12 or 3.12.N exactly: not 3.12-dev, 3.12.1t (free-threaded), pypy3.12.
  ver=$(grep -E "^${minor//./\\.}(\\.[0-9]+)?\$" <<<"$installed" | sort -V | tail -n 1 || true)
  if [ -z "$ver" ]; then
    missing "CPython $minor is not installed in pyenv ($(pyenv root))"
    continue
  fi
  py=$(PYENV_VERSION=$ver pyenv which "python$minor" 2>/dev/null || true)
  if [ -z "$py" ] || ! "$py" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$minor'.split('.'))))"; then
    missing "pyenv's $ver has no working python$minor"
    continue
  fi
  echo "$minor $py"
done
