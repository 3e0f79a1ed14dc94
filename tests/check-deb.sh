#!/bin/sh
# The Debian packages (debian/, issue 17), checked the way they are used:
#  1. exports the tree as it would be committed -- the working tree's
#     tracked and untracked-but-not-ignored files, uncommitted changes
#     included, no build directories, no .git -- into a scratch directory;
#  2. builds the packages there with `dpkg-buildpackage -us -uc -b` (the
#     unit and ABI suites run inside; DEB_BUILD_OPTIONS=nocheck skips them);
#  3. runs lintian on them and on the source package: no errors and no
#     warnings (overrides, each with its reason, would be in
#     debian/source/lintian-overrides and debian/PACKAGE.lintian-overrides);
#  4. checks what each package holds and depends on;
#  5. deletes the export, installs the packages into this machine, runs
#     debian/tests/* (the autopkgtests: a C program built with
#     `pkg-config fleece`, `perl -MFleece`, `fleece --version` and
#     `fleece demo`) with an empty environment from a scratch directory
#     under /tmp, and removes the packages again, also on failure.
# Run as root on Debian 12, with the build dependencies of debian/control
# installed (`apt-get build-dep ./`).
#
#   tests/check-deb.sh [--keep]     --keep: leave the scratch directory
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
keep=no
[ "${1:-}" = --keep ] && keep=yes

fail () { echo "check-deb: $*" >&2; exit 1; }
say () { echo "check-deb: $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs the packages with apt-get)"
for tool in dpkg-buildpackage dpkg-checkbuilddeps dpkg-parsechangelog lintian apt-get; do
    command -v "$tool" >/dev/null 2>&1 ||
        fail "$tool is missing: apt-get install dpkg-dev debhelper lintian"
done

# What is built, from debian/ alone: the library package is the one named
# after the soname.
cd "$src"
version=$(dpkg-parsechangelog -S Version)
# Without epoch (file names), and without the Debian revision (if the
# package is ever made non-native): the project's version.
fileversion=${version#*:}
upstream=$(echo "$fileversion" | sed 's/-[^-]*$//')
libpkg=$(sed -n 's/^Package: \(libfleece[0-9][0-9]*\)$/\1/p' debian/control)
[ -n "$libpkg" ] || fail "debian/control has no libfleeceN package"
packages="$libpkg libfleece-dev libfleece-perl fleece"
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)

# The packaging and the build agree on the version and the soname.
meson_version=$(sed -n "s/^  version : '\(.*\)',$/\1/p" meson.build)
soversion=$(sed -n 's/^soversion = \([0-9][0-9]*\)$/\1/p' meson.build)
[ "$upstream" = "$meson_version" ] ||
    fail "debian/changelog is at $version, meson.build at $meson_version: add a debian/changelog entry for $meson_version"
[ "$libpkg" = "libfleece$soversion" ] ||
    fail "the library package is $libpkg but meson.build's soversion is $soversion (rename it and debian/$libpkg.*)"
head -1 "debian/$libpkg.symbols" | grep -q "^libfleece\.so\.$soversion $libpkg " ||
    fail "debian/$libpkg.symbols is not for libfleece.so.$soversion"

for p in $packages; do
    if dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null | grep -qv '^not-installed$'; then
        fail "$p is already installed; remove it first (apt-get purge $packages)," \
             "this check installs and removes its own build"
    fi
done

work=$(mktemp -d /tmp/fleece-deb-XXXXXX)
installed=no
remove_packages () {
    [ "$installed" = yes ] || return 0
    installed=no
    say "removing $packages"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        purge -y -q $packages >"$work/purge.log" 2>&1 ||
        { cat "$work/purge.log" >&2; echo "check-deb: removing $packages failed" >&2; return 1; }
}
cleanup () {
    status=$?
    trap - EXIT INT TERM
    remove_packages || status=1
    if [ "$keep" = yes ]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. The export: what `git add -A && git commit` would commit now, so that
# uncommitted work (and new files not yet added) is what gets packaged;
# ignored files (build*/) stay out, and so does what a package build in
# the tree itself leaves (obj-*/, debian/.debhelper/, debian/PACKAGE/,
# ...).  Outside git: the tree minus those.
tree=$work/libfleece-$upstream
mkdir "$tree"
leftovers='^(obj-[^/]*/|debian/(\.debhelper|tmp|libfleece[0-9]+|libfleece-dev|libfleece-perl|fleece)/|debian/(files|debhelper-build-stamp|[^/]*\.substvars|[^/]*\.debhelper\.log)$)'
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$src" ls-files -z --cached --others --exclude-standard
else
    find . -path ./.git -prune -o -path './build*' -prune -o \( -type f -o -type l \) -print0 |
        sed -z 's|^\./||'
fi | LEFTOVERS=$leftovers perl -0 -ne 'chomp; print "$_\0" if (-e $_ || -l $_) && !m{$ENV{LEFTOVERS}}' |
    tar -C "$src" --null -T - -cf - | tar -C "$tree" -xf -
[ -x "$tree/debian/rules" ] || fail "the export has no executable debian/rules"

# 2. The build: the source package (for lintian; a native package needs
# no upstream tarball), then the binary packages.
cd "$work"
dsc=
if [ "$(cat "$tree/debian/source/format")" = "3.0 (native)" ]; then
    dpkg-source -b "$(basename "$tree")" >"$work/source.log" 2>&1 ||
        { cat "$work/source.log" >&2; fail "dpkg-source -b failed"; }
    dsc=$work/libfleece_$fileversion.dsc
fi
cd "$tree"
dpkg-checkbuilddeps || fail "build dependencies missing; install them with: apt-get build-dep ./"
say "building $packages $version (dpkg-buildpackage -us -uc -b; log: $work/build.log)"
if ! dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1; then
    { grep -E 'FAILED|error|Error [0-9]|^ *[0-9]+/[0-9]+ .* (FAIL|TIMEOUT|ERROR) ' "$work/build.log" |
          cut -c1-400 | tail -n 40
      echo "..."; tail -n 15 "$work/build.log" | cut -c1-400; } >&2
    fail "dpkg-buildpackage failed (above; the whole log: rerun with --keep, $work/build.log)"
fi
grep -E '^(Ok|Fail|Skipped|Timeout): ' "$work/build.log" | sed 's/^/check-deb: meson test in the build: /' || true
changes=$work/libfleece_${fileversion}_$arch.changes
[ -f "$changes" ] || fail "no $changes"

# 3. lintian.
say "lintian"
# Every tag is shown (information and pedantic ones too, and what the
# overrides hide); errors and warnings fail.
rc=0
# shellcheck disable=SC2086
lintian --fail-on error,warning --display-info --pedantic --show-overrides $dsc "$changes" \
    >"$work/lintian.log" 2>&1 || rc=$?
grep -v '^running with root privileges is not recommended!$' "$work/lintian.log" || true
[ "$rc" = 0 ] || fail "lintian reports errors or warnings, or failed (exit $rc; above)"

# 4. What the packages hold and depend on.
deb () { echo "$work/${1}_${fileversion}_$arch.deb"; }
for p in $packages; do
    [ -f "$(deb "$p")" ] || fail "$p was not built"
done
has () {   # has PACKAGE PATH-REGEX
    dpkg-deb -c "$(deb "$1")" | awk '{ print $6 }' | sed 's|^\.||' | grep -Eq "^$2\$" ||
        fail "$1 has no $2"
}
has "$libpkg" "/usr/lib/$multiarch/libfleece\.so\.$soversion"
has libfleece-dev "/usr/include/fleece/fleece\.h"
has libfleece-dev "/usr/lib/$multiarch/libfleece\.so"
has libfleece-dev "/usr/lib/$multiarch/pkgconfig/fleece\.pc"
has libfleece-perl "/usr/lib/$multiarch/perl5/[0-9.]+/Fleece\.pm"
has libfleece-perl "/usr/lib/$multiarch/perl5/[0-9.]+/auto/Fleece/Fleece\.so"
has libfleece-perl "/usr/share/man/man3/Fleece\.3pm\.gz"
has fleece "/usr/bin/fleece"
has fleece "/usr/share/man/man1/fleece\.1\.gz"
want=$(find "$tree/docs/man" -name "*.3" | wc -l)
got=$(dpkg-deb -c "$(deb libfleece-dev)" | grep -c '/usr/share/man/man3/fleece.*\.3\.gz$' || true)
[ "$got" = "$want" ] || fail "libfleece-dev has $got section-3 man pages, docs/man has $want"
depends () { dpkg-deb -f "$(deb "$1")" Depends; }
depends libfleece-dev | grep -q "$libpkg (= $version)" || fail "libfleece-dev does not depend on $libpkg (= $version)"
depends libfleece-perl | grep -q "perlapi-" || fail "libfleece-perl has no perlapi dependency (dh_perl)"
depends libfleece-perl | grep -q "$libpkg (>= " || fail "libfleece-perl does not depend on $libpkg"
depends fleece | grep -q "$libpkg (>= " || fail "fleece does not depend on $libpkg"
# Nothing points into the build tree: no rpath, no build path in the files.
x=$work/contents
for p in $packages; do
    dpkg-deb -x "$(deb "$p")" "$x"
done
rpaths=$(find "$x" -type f -exec sh -c \
    'for f; do readelf -d "$f" 2>/dev/null | grep -Eq "RPATH|RUNPATH" && echo "$f"; done; true' sh {} +)
[ -z "$rpaths" ] || fail "files with an rpath: $(echo "$rpaths" | sed "s|^$x||" | tr '\n' ' ')"
if grep -rl --binary-files=text "$tree" "$x" >/dev/null 2>&1; then
    fail "files name the build tree $tree: $(grep -rl --binary-files=text "$tree" "$x" | sed "s|^$x||" | tr '\n' ' ')"
fi
say "contents and dependencies: ok"

# 5. Installed, used from the installed files alone.  The export goes
# first, so nothing can come from a build tree.
cp -a "$tree/debian/tests" "$work/autopkgtests"
cd /tmp
rm -rf "$tree" "$x"
say "installing $packages"
installed=yes
debs=""
for p in $packages; do debs="$debs $(deb "$p")"; done
# apt-get rather than dpkg -i: it installs local .debs together with any
# dependencies that are missing, in one step, and waits for the dpkg lock.
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
    install -y -q --no-install-recommends $debs >"$work/install.log" 2>&1 ||
    { cat "$work/install.log" >&2; fail "installing the packages failed"; }

# Each autopkgtest with an empty environment (no LD_LIBRARY_PATH,
# PKG_CONFIG_PATH, PERL5LIB, FLEECE_*), in its own directory under /tmp.
tests=$(sed -n 's/^Tests: *//p' "$work/autopkgtests/control" | tr ',' ' ')
for t in $tests; do
    tmp=$(mktemp -d "$work/test-XXXXXX")
    say "autopkgtest $t"
    (cd "$tmp" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$tmp" LC_ALL=C.UTF-8 \
        AUTOPKGTEST_TMP="$tmp" "$work/autopkgtests/$t") ||
        fail "autopkgtest $t failed"
done

remove_packages
say "ok: $packages $version: built, lintian-clean, installed, used from" \
    "the installed files (C program via pkg-config, perl -MFleece, fleece demo), removed"
