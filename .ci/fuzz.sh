#!/usr/bin/env bash
# Coverage-guided fuzzing of the C framers (csrc/framing.c) with libFuzzer.
# Builds tests/fuzz/fuzz_framing.c with clang (-fsanitize=fuzzer,address,
# undefined) and runs it for the given number of seconds (default 60),
# on a corpus kept in tests/fuzz/corpus (seeded on first run).
# Needs clang and its libFuzzer runtime (Debian: apt-get install clang,
# which pulls libclang-rt-*-dev).
#
#   bash .ci/fuzz.sh [seconds] [extra libFuzzer args]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
CC=${CLANG:-clang}
command -v "$CC" >/dev/null || { echo "fuzz.sh: $CC not found (apt-get install clang)" >&2; exit 1; }
out=${FUZZ_OUT:-$(mktemp -d)}
corpus=${FUZZ_CORPUS:-tests/fuzz/corpus}  # git-ignored; seeded below
mkdir -p "$out" "$corpus"
"$CC" -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=undefined -Icsrc tests/fuzz/fuzz_framing.c -o "$out/fuzz_framing"
# Seeds: one per framing kind.
if [ -z "$(ls -A "$corpus")" ]; then
  printf '\x00\x05\x00\x00\x01hello world' > "$corpus/raw"
  printf '\x01\x06\x00\x00\x02\nab\ncd\nlong line here\n' > "$corpus/lines"
  printf '\x01\x05\x01\x00\x03\r\nGET\r\n\r\n' > "$corpus/crlf"
  printf '\x02\x07\x01\x00\x04\x00\x03abc\x00\x00\x00\x01z' > "$corpus/len2"
  printf '\x02\x07\x02\x01\x05\x03\x00\x00\x00xyz' > "$corpus/len4le"
  printf '\x03\x00\x03\x00\x06abcdefghij' > "$corpus/fixed"
fi
set +e
"$out/fuzz_framing" -max_total_time="$secs" -max_len=4096 -print_final_stats=1 \
  -artifact_prefix="$out/" "$@" "$corpus" 2>&1 | tee "$out/fuzz.log" | grep -v '^#[0-9].*\(NEW\|REDUCE\|pulse\)'
rc=${PIPESTATUS[0]}
set -e
echo "fuzz.sh: log and any crash artifacts in $out"
grep -E 'stat::number_of_executed_units|Done [0-9]+ runs' "$out/fuzz.log" || true
exit "$rc"
