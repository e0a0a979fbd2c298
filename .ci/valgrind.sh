#!/usr/bin/env bash
# valgrind memcheck over a representative subset of the suite (epoll
# backend).  PYTHONMALLOC=malloc routes every Python allocation through
# malloc so valgrind sees it.  CPython has errors and leaks of its own that
# are not ours, so the verdict counts only error records with a frame in
# fastmux's compiled module: any memory error there, or a definite leak whose
# allocation stack passes through it, fails the run.
#
#   bash .ci/valgrind.sh [pytest args]     (default: the subset below)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
command -v valgrind >/dev/null || { echo "valgrind.sh: valgrind is not installed" >&2; exit 1; }
xml=$(mktemp --suffix=.xml)
trap 'rm -f "$xml"' EXIT
subset=(tests/test_echo.py tests/test_connection.py tests/test_framing_io.py -k epoll)
set +e
PYTHONMALLOC=malloc FASTMUX_EXPECT_BACKEND=epoll valgrind --tool=memcheck \
  --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
  --num-callers=40 --xml=yes --xml-file="$xml" \
  "$PY" -m pytest -q -p no:cacheprovider -p no:randomly -o timeout=600 "${@:-${subset[@]}}"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "valgrind.sh: the tests failed under valgrind (pytest exit $rc)" >&2
  exit 1
fi
"$PY" - "$xml" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
ours = []
for err in root.iter("error"):
    frames = err.findall("./stack/frame")
    objs = [f.findtext("obj") or "" for f in frames]
    fns = [f.findtext("fn") or "" for f in frames]
    if any("fastmux/_core" in o for o in objs) or any(fn.startswith("fm_") or fn.startswith("fm__") for fn in fns):
        kind = err.findtext("kind")
        what = err.findtext("what") or err.findtext("./xwhat/text") or ""
        ours.append((kind, what, [fn for fn in fns if fn][:8]))
total = len(list(root.iter("error")))
print(f"valgrind: {total} error records in all, {len(ours)} in fastmux code")
for kind, what, fns in ours:
    print(f"  {kind}: {what}\n    " + " <- ".join(fns))
sys.exit(1 if ours else 0)
PYEOF
