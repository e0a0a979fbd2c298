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
# One XML file per process (%p): a test that forks would otherwise append a
# second document to the same file.
xmldir=$(mktemp -d)
trap 'rm -rf "$xmldir"' EXIT
subset=(tests/test_echo.py tests/test_connection.py tests/test_framing_io.py tests/test_speedups.py
        tests/test_write_path.py -k epoll)
set +e
PYTHONMALLOC=malloc FASTMUX_EXPECT_BACKEND=epoll valgrind --tool=memcheck \
  --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
  --num-callers=40 --xml=yes --xml-file="$xmldir/vg.%p.xml" \
  "$PY" -m pytest -q -p no:cacheprovider -p no:randomly -o timeout=600 "${@:-${subset[@]}}"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "valgrind.sh: the tests failed under valgrind (pytest exit $rc)" >&2
  exit 1
fi
"$PY" - "$xmldir" <<'PYEOF'
import glob
import os
import sys
import xml.etree.ElementTree as ET

errors = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "vg.*.xml"))):
    try:
        errors += list(ET.parse(path).getroot().iter("error"))
    except ET.ParseError:
        # A forked child that left with os._exit may end its file early.
        print(f"valgrind: {os.path.basename(path)} is incomplete; skipped")
ours = []
for err in errors:
    frames = err.findall("./stack/frame")
    objs = [f.findtext("obj") or "" for f in frames]
    fns = [f.findtext("fn") or "" for f in frames]
    # Whose is it?  The first frame, from the allocation or error site out,
    # that is not in libc, the loader, valgrind or the interpreter itself:
    # ours if it is in one of fastmux's modules.  (A leak made by cffi or
    # by interpreter code merely running under our dispatch loop is not.)
    owner = ""
    for o, fn in zip(objs, fns):
        base = os.path.basename(o)
        if (base.startswith(("libc.", "libc-", "ld-linux", "vgpreload", "libpython"))
                or base.startswith("python3")):
            continue
        owner = o + ":" + fn
        break
    if "/fastmux/_" in owner or ":fm_" in owner:
        kind = err.findtext("kind")
        what = err.findtext("what") or err.findtext("./xwhat/text") or ""
        ours.append((kind, what, [fn for fn in fns if fn][:8]))
total = len(errors)
print(f"valgrind: {total} error records in all, {len(ours)} in fastmux code")
for kind, what, fns in ours:
    print(f"  {kind}: {what}\n    " + " <- ".join(fns))
sys.exit(1 if ours else 0)
PYEOF
