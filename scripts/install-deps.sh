#!/bin/sh
# Installs everything libfleece needs to build, test and run its demo on Debian 12 (as root):
# the toolchain and libraries from bookworm, QEMU >= 10 from bookworm-backports.
# The backports source uses the Debian mirror this machine's apt sources already name.
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: run as root (apt-get needs it)" >&2
    exit 1
fi

# The URI of the archive that serves suite $1, from /etc/apt/sources.list*
# (one-line "deb URI SUITE ..." and deb822 "URIs:/Suites:" stanzas).
debian_mirror () {
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && cat "$f"; echo
    done | awk -v suite="$1" '
        /^deb /    { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { if ($(i+1) == suite) { print $i; exit } break } }
        /^URIs:/   { u = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && u != "") { print u; exit } }
        /^$/       { u = "" }'
}

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ] && ! grep -rqsE '^(Suites:.*bookworm-backports|deb .*bookworm-backports)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(debian_mirror bookworm)
    if [ -z "$mirror" ]; then
        echo "install-deps.sh: no bookworm source in /etc/apt/sources.list*; add one, or add bookworm-backports yourself" >&2
        exit 1
    fi
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
# Third-party sources that are unreachable must not stop us; Debian's own must work.
apt-get update || true

# The build (librbd for the RBD storage), the tests (a throwaway Ceph for
# the RBD suite, zstd for VMA through a pipe), the Debian packages
# (debhelper, lintian) and the benchmarks' plots.
apt-get install -y --no-install-recommends \
    build-essential meson ninja-build pkg-config \
    libglib2.0-dev libjson-c-dev uuid-dev librbd-dev librados-dev check \
    valgrind abigail-tools clang libclang-rt-dev \
    perl libextutils-pkgconfig-perl libtest-simple-perl \
    debhelper lintian zstd \
    ceph-mon ceph-osd ceph-common \
    gnuplot-nox ca-certificates

if [ "$codename" = bookworm ]; then
    apt-get install -y --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-utils qemu-block-extra
else
    apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils qemu-block-extra
fi
