#!/bin/sh
# The README's test command: install what is needed, build with warnings as
# errors, run every suite, check what `meson install` installs and the
# Debian packages, then the unit suites and the engines' end-to-end tests
# under valgrind, the whole suite under ASan+UBSan, and a short libFuzzer
# run of each fuzz target (FLEECE_FUZZ_SECONDS, default 20).
#
# Upstream material, where the machine has it (each suite that needs one
# says so and is skipped without it):
#   FLEECE_PVE_QEMU         Proxmox's patched qemu-system-x86_64 (a
#                           Proxmox host's /usr/bin/kvm works), for the
#                           pve-real suite; or
#   FLEECE_PVE_QEMU_KIT     a kit that builds it (build-pve-qemu.sh, cached
#                           in /var/cache/pve-qemu-build: ~10 min once);
#   FLEECE_PVE_QEMU_RBD     the same with the rbd block driver (Proxmox
#                           builds it so), for the Proxmox engine on RBD;
#                           built from the kit with --enable-rbd;
#   FLEECE_QEMU_SERVER_SRC  qemu-server's source tree (its cfg2cmd
#                           command-line expectations, its Perl modules);
#   FLEECE_CEPH_UP          ceph-up.sh, a throwaway single-node Ceph.
# Run as root on Debian 12.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)

./scripts/install-deps.sh

if [ -z "${FLEECE_PVE_QEMU:-}" ] && [ -n "${FLEECE_PVE_QEMU_KIT:-}" ]; then
    echo "== Proxmox's patched QEMU (built once, then cached)"
    "$FLEECE_PVE_QEMU_KIT/build-pve-qemu.sh" > /tmp/fleece-pve-qemu-build.log 2>&1 || {
        tail -40 /tmp/fleece-pve-qemu-build.log >&2; exit 1; }
    tail -3 /tmp/fleece-pve-qemu-build.log
    export FLEECE_PVE_QEMU=/var/cache/pve-qemu-build/build/qemu-system-x86_64
fi
# The kit configures QEMU without rbd; Proxmox ships it with rbd.  The RBD
# suite runs the Proxmox engine on a second build with the driver (the
# kit's script, run from a scratch copy with --enable-rbd instead; its own
# work dir, the downloaded source shared), and the refusal on the first.
if [ -z "${FLEECE_PVE_QEMU_RBD:-}" ] && [ -n "${FLEECE_PVE_QEMU_KIT:-}" ] \
   && [ -n "${FLEECE_CEPH_UP:-}" ]; then
    echo "== Proxmox's patched QEMU with rbd (built once, then cached)"
    kit_copy=$(mktemp -d)
    sed 's/--disable-rbd/--enable-rbd/; s/\(--with-pkgversion=[^ ]*\)/\1-rbd/' \
        "$FLEECE_PVE_QEMU_KIT/build-pve-qemu.sh" > "$kit_copy/build-pve-qemu.sh"
    grep -q -- --enable-rbd "$kit_copy/build-pve-qemu.sh" || {
        echo "the kit's build script has no --disable-rbd to turn around" >&2; exit 1; }
    orig=/var/cache/pve-qemu-build/dl/qemu_10.0.2+ds.orig.tar.xz
    [ -f "$orig" ] || orig=
    QEMU_ORIG=$orig PBS_STUB_DIR="$FLEECE_PVE_QEMU_KIT/pbs-stub" \
        bash "$kit_copy/build-pve-qemu.sh" -p "$FLEECE_PVE_QEMU_KIT/patches" \
        -w /var/cache/pve-qemu-build-rbd > /tmp/fleece-pve-qemu-rbd-build.log 2>&1 || {
        tail -40 /tmp/fleece-pve-qemu-rbd-build.log >&2; exit 1; }
    rm -rf "$kit_copy"
    tail -3 /tmp/fleece-pve-qemu-rbd-build.log
    export FLEECE_PVE_QEMU_RBD=/var/cache/pve-qemu-build-rbd/build/qemu-system-x86_64
fi
for v in FLEECE_PVE_QEMU FLEECE_PVE_QEMU_RBD FLEECE_QEMU_SERVER_SRC FLEECE_CEPH_UP; do
    eval "val=\${$v:-}"
    echo "   $v=${val:-(not set: its tests are skipped)}"
done

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

echo "== Debian packages: built, lintian, installed, used and removed"
tests/check-deb.sh

echo "== unit suites and the engines' end-to-end tests under valgrind"
meson test -C build-test --setup valgrind --suite unit --print-errorlogs --num-processes 2
# The fault matrix, the fixtures and the demo would take several minutes
# more under valgrind; ASan+UBSan covers them below.
meson test -C build-test --setup valgrind --print-errorlogs --num-processes 1 \
    test-lifecycle test-pve test-pve-real test-safety

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
