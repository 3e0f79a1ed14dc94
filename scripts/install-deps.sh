#!/bin/sh
# Installs everything libfleece needs to build, test and run its demo on Debian 12 (as root):
# the toolchain and libraries from bookworm, QEMU >= 10 from bookworm-backports.
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: run as root (apt-get needs it)" >&2
    exit 1
fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
# Third-party sources that are unreachable must not stop us; Debian's own must work.
apt-get update || true

apt-get install -y --no-install-recommends \
    build-essential meson ninja-build pkg-config \
    libglib2.0-dev libjson-c-dev uuid-dev check \
    valgrind abigail-tools clang libclang-rt-dev \
    perl libextutils-pkgconfig-perl libtest-simple-perl \
    gnuplot-nox ca-certificates

if [ "$codename" = bookworm ]; then
    apt-get install -y --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-utils qemu-block-extra
else
    apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils qemu-block-extra
fi
