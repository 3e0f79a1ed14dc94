#!/bin/sh
# The README's main job: install what is needed, build, and run a fleecing
# backup of a throwaway QEMU against a deliberately slow target, showing
# guest write latency with and without fleecing.  Run as root on Debian 12.
set -eu
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
if [ -f build/build.ninja ]; then
    meson setup --reconfigure build >/dev/null
else
    meson setup build >/dev/null
fi
ninja -C build
exec ./build/tools/fleece demo
