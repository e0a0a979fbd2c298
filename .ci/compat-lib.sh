# Shared steps of the third-party-suite scripts (.ci/uvicorn.sh,
# .ci/aiohttp.sh), sourced by them after `set -euo pipefail`:
#
#   compat_init NAME VERSION_RE "$@"   the repo root as cwd; $repo, $PY,
#       $compat (tests/compat/NAME), $passes (the arguments, or all three),
#       $version (from the requirements.txt line VERSION_RE==X, a sed
#       pattern), $work (a temporary directory, kept with FASTMUX_NAME_KEEP=1)
#   compat_venv <<'PYEOF' ... PYEOF    a fresh venv ($vpy): this tree
#       (`pip install .`, with the C core required), then
#       $compat/requirements.txt; then the Python on stdin, run from $work with
#       the venv's directory and $version as arguments, checks what it got
#   compat_sdist FILE...               the release's sdist from the package
#       registry (`pip download`, the only network used), of which only tests/
#       and FILE... are unpacked into $work/src (the tests import the
#       installed package); fails unless each tests/$REQUIRED exists
#   compat_run TITLE                   $compat/run_suite.py (over
#       tests/compat/harness.py) in $work/src for $passes; exits with its code
#
# step/fail print a heading or an error (prefixed NAME.sh:).

compat_init() {
  name=$1
  local version_re=$2
  shift 2
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  repo=$(pwd)
  PY=${PYTHON:-python3}
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
  export FASTMUX_REQUIRE_C=1   # the epoll pass must run on the C core
  compat="$repo/tests/compat/$name"
  passes=("$@")
  [ ${#passes[@]} -gt 0 ] || passes=(fastmux-epoll fastmux-select asyncio)
  t0=$SECONDS

  version=$(sed -n "s/^$version_re==\([0-9.]*\)\$/\1/p" "$compat/requirements.txt")
  [ -n "$version" ] || fail "no '${version_re//\\/}==X' line in $compat/requirements.txt"

  work=$(mktemp -d)
  local keep="FASTMUX_${name^^}_KEEP"
  if [ "${!keep:-}" = 1 ]; then
    echo "work directory (kept): $work"
  else
    trap 'rm -rf "$work"' EXIT
  fi
}

step() { printf '\n=== %s ===\n' "$*"; }
fail() { echo "$name.sh: $*" >&2; exit 1; }

compat_venv() {
  step "fresh venv: fastmux from this tree, $name $version and its test dependencies"
  "$PY" -m venv "$work/venv"
  vpy="$work/venv/bin/python"
  "$vpy" -m pip install -q "$repo"
  "$vpy" -m pip install -q -r "$compat/requirements.txt"
  (cd "$work" && "$vpy" - "$work/venv" "$version")   # the check, on stdin
}

compat_sdist() {
  step "$name $version sdist: its tests"
  # --no-binary NAME (not :all:): the sdist of NAME itself, while its build
  # backend (needed by pip to read the sdist's metadata) comes as wheels.
  "$vpy" -m pip download -q --no-deps --no-binary "$name" "$name==$version" -d "$work/sdist"
  local sdist="$work/sdist/$name-$version.tar.gz" f
  [ -f "$sdist" ] || fail "pip download did not produce $sdist"
  mkdir "$work/src"
  local members=("$name-$version/tests")
  for f in "$@"; do members+=("$name-$version/$f"); done
  tar -xzf "$sdist" -C "$work/src" --strip-components=1 "${members[@]}"
  for f in "${REQUIRED[@]}"; do
    [ -f "$work/src/tests/$f" ] || fail "the sdist has no tests/$f"
  done
}

compat_run() {
  step "$1: ${passes[*]}"
  local rc=0
  (cd "$work/src" && "$vpy" "$compat/run_suite.py" "$work" "${passes[@]}") || rc=$?
  echo "$name.sh: $((SECONDS - t0)) s in all"
  exit "$rc"
}
