#!/bin/sh
# Usage: run-fuzz.sh FUZZER CORPUS_DIR [SECONDS]
# A short libFuzzer run from the seed corpus (the test suite's 'fuzz'
# suite), or a long one by hand (docs/reliability.md).  New inputs go to a
# scratch dir, never into the source tree; a crash, leak or timeout is
# kept in fuzz-artifacts/ next to the fuzzer and its path printed.
set -eu
fuzzer=$1 corpus=$2 secs=${3:-${FLEECE_FUZZ_SECONDS:-20}}
artifacts=$(dirname "$fuzzer")/fuzz-artifacts/$(basename "$fuzzer")
work=$(mktemp -d "${TMPDIR:-/tmp}/fleece-fuzz-XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$artifacts"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

status=0
"$fuzzer" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
  -max_len=131072 -print_final_stats=1 -artifact_prefix="$artifacts/" \
  "$work" "$corpus" > "$work/log" 2>&1 || status=$?
tail -n 25 "$work/log"
if [ "$status" != 0 ]; then
  echo "run-fuzz: $(basename "$fuzzer") failed (exit $status); reproduce with:"
  for f in "$artifacts"/*; do
    [ -f "$f" ] && echo "  $fuzzer $f"
  done
fi
exit "$status"
