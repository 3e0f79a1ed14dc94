#!/bin/sh
# The README's test command: install what is needed, build with warnings as
# errors, run every suite, check what `meson install` installs, then the
# unit suites and the engines' end-to-end tests under valgrind, the whole
# suite under ASan+UBSan, and a short libFuzzer run of each fuzz target
# (FLEECE_FUZZ_SECONDS, default 20).
# Run as root on Debian 12.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)

./scripts/install-deps.sh

setup () {
    dir=$1; shift
    if [ -f "$dir/build.ninja" ]; then
        meson setup --reconfigure "$dir" "$@" >/dev/null
    else
        meson setup "$dir" "$@" >/dev/null
    fi
}

echo "== build (warnings are errors)"
setup build-test -Dwerror=true -Dbuildtype=debugoptimized
ninja -C build-test

echo "== all suites"
meson test -C build-test --print-errorlogs --num-processes 2

echo "== meson install, used from the install"
tests/check-install.sh build-test

echo "== unit suites and the engines' end-to-end tests under valgrind"
meson test -C build-test --setup valgrind --suite unit --print-errorlogs --num-processes 2
# The fault matrix and the demo would take several minutes more under
# valgrind; ASan+UBSan covers them below.
meson test -C build-test --setup valgrind --print-errorlogs --num-processes 1 \
    test-lifecycle test-pve

echo "== all suites under ASan+UBSan"
setup build-asan -Dwerror=true -Dbuildtype=debug -Db_sanitize=address,undefined -Db_lundef=false
ninja -C build-asan
# FLEECE_FAULTS_SAMPLE: a third of the fault matrix (all of it ran above).
ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
LSAN_OPTIONS=suppressions=$top/tests/lsan.supp \
FLEECE_FAULTS_SAMPLE=3 \
    meson test -C build-asan --print-errorlogs --num-processes 2 --no-suite perl

echo "== fuzz targets under libFuzzer (clang, ASan+UBSan)"
(export CC=clang; setup build-fuzz -Dbuildtype=debugoptimized \
    -Db_sanitize=address,undefined -Db_lundef=false)
ninja -C build-fuzz tests/fuzz-qmp tests/fuzz-record
meson test -C build-fuzz --no-rebuild --suite fuzz --print-errorlogs --num-processes 2

echo "== all tests passed"
