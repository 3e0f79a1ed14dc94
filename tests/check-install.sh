#!/bin/sh
# What `meson install` gives users, checked the way they use it: installs
# the build into a scratch DESTDIR, then builds and runs a C program with
# pkg-config's flags (a third-party backup tool), loads the Perl module
# (qemu-server) and runs the command (admins), each against the installed
# files only.
#
#   tests/check-install.sh BUILDDIR
set -eu

build=$(cd "$1" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
dest=$(mktemp -d /tmp/fleece-install-XXXXXX)
trap 'rm -rf "$dest"' EXIT

fail () { echo "check-install: $*" >&2; exit 1; }

DESTDIR=$dest meson install -C "$build" --no-rebuild --quiet >/dev/null ||
    fail "meson install failed"
prefix=$(meson introspect "$build" --buildoptions |
         perl -MJSON::PP -0777 -ne 'print map { $_->{name} eq "prefix" ? $_->{value} : () } @{decode_json($_)}')
[ -n "$prefix" ] || fail "cannot read the prefix of $build"
root=$dest$prefix
version=$(sed -n "s/^  version : '\(.*\)',$/\1/p" "$src/meson.build")

# The library, its header, pkg-config file and man pages.
libdir=$(dirname "$(find "$root" -name libfleece.so.1 | head -1)")
[ -n "$libdir" ] && [ -e "$libdir/libfleece.so" ] || fail "libfleece.so.1 / libfleece.so not installed"
[ -f "$root/include/fleece/fleece.h" ] || fail "fleece.h not installed"
[ -f "$libdir/pkgconfig/fleece.pc" ] || fail "fleece.pc not installed"
[ -f "$root/share/man/man1/fleece.1" ] || fail "fleece.1 not installed"
want=$(ls "$src/docs/man/"*.3 | wc -l)
got=$(ls "$root/share/man/man3/"*.3 2>/dev/null | wc -l)
[ "$got" -eq "$want" ] || fail "$got of $want man pages in section 3 installed"

# A C program built only from what pkg-config says about the installed copy.
cat > "$dest/tool.c" <<'EOF'
#include <stdio.h>
#include <fleece/fleece.h>
int
main (void)
{
  struct fleece_handle *h = fleece_new ();
  if (!h)
    return 1;
  printf ("%s\n", fleece_get_version ());
  fleece_free (h);
  return 0;
}
EOF
cflags=$(PKG_CONFIG_PATH=$libdir/pkgconfig PKG_CONFIG_SYSROOT_DIR=$dest pkg-config --cflags fleece)
libs=$(PKG_CONFIG_PATH=$libdir/pkgconfig PKG_CONFIG_SYSROOT_DIR=$dest pkg-config --libs fleece)
# shellcheck disable=SC2086
cc -std=c11 -Wall -Werror $cflags "$dest/tool.c" -o "$dest/tool" $libs ||
    fail "a C program does not build with pkg-config --cflags --libs fleece"
out=$(LD_LIBRARY_PATH=$libdir "$dest/tool") || fail "the C program failed"
[ "$out" = "$version" ] || fail "the C program says version '$out', expected $version"

# The command.
out=$(LD_LIBRARY_PATH=$libdir "$root/bin/fleece" --version) || fail "fleece --version failed"
case $out in *"$version"*) ;; *) fail "fleece --version says '$out'" ;; esac

# The Perl module, when the build has it: from the installed files, not
# linked to the build tree.
if [ -d "$build/bindings/perl/build-install" ]; then
    pm=$(find "$dest" -name Fleece.pm | head -1)
    so=$(find "$dest" -path '*auto/Fleece/Fleece.so' | head -1)
    [ -n "$pm" ] && [ -n "$so" ] || fail "the Perl module is not installed"
    if readelf -d "$so" | grep -Eq 'RPATH|RUNPATH'; then
        fail "the installed Fleece.so has an rpath: $(readelf -d "$so" | grep -E 'RPATH|RUNPATH')"
    fi
    out=$(LD_LIBRARY_PATH=$libdir perl -I"$(dirname "$pm")" -MFleece \
          -e 'print $INC{"Fleece.pm"}, " ", Fleece::version(), "\n"') ||
        fail "the installed Perl module does not load"
    [ "$out" = "$pm $version" ] || fail "perl -MFleece says '$out', expected '$pm $version'"
fi
echo "check-install: libfleece $version installs under $prefix: library, header," \
     "fleece.pc, $want man pages, fleece, Perl module; all used from the install"
