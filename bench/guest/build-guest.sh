#!/bin/sh
# bench/guest/build-guest.sh: build the benchmark guest from Debian packages
# only (no network beyond the package archive, no distro image): Debian's
# kernel, its virtio/SCSI modules, busybox-static and bench/guest/probe.c in
# a small initramfs.  Idempotent: downloads and the image are cached in
# $FLEECE_BENCH_CACHE (default /var/cache/fleece-bench-guest) and rebuilt
# only when an input changes.  Prints the directory holding
#   vmlinuz  initramfs.gz  kernel-version  modules.order
#
# Needs: apt-get, dpkg-deb, cc with a static libc (libc6-dev), cpio, gzip,
# modinfo (kmod), xz/zstd (only if the kernel's modules are compressed).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
cache=${FLEECE_BENCH_CACHE:-/var/cache/fleece-bench-guest}
debs=$cache/debs
log() { echo "build-guest: $*" >&2; }

# A missing tool inside $(...) or a pipeline would not stop `set -e`: the
# image would come out without modules or empty.  Check them first.
missing=
for tool in apt-get dpkg-deb cc strip cpio gzip modinfo:kmod; do
  cmd=${tool%%:*}
  command -v "$cmd" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
if [ -n "$missing" ]; then
  log "missing:$missing (apt-get install$missing)"
  exit 1
fi

mkdir -p "$debs"

# ---- the packages ------------------------------------------------------------
# apt-get download writes into the current directory; as root it warns that
# the download ran unsandboxed (the _apt user cannot write the cache): harmless.
download() {
  ( cd "$debs" && apt-get download "$@" >/dev/null 2>"$debs/apt.log" ) || {
    cat "$debs/apt.log" >&2
    return 1
  }
}

# linux-image-amd64 is a meta package: the kernel is in the package it
# depends on (linux-image-6.1.0-NN-amd64 on Debian 12).
kpkg=
if download linux-image-amd64; then
  meta=$(ls -t "$debs"/linux-image-amd64_*.deb | head -1)
  kpkg=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' |
         sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -1)
  [ -n "$kpkg" ] || { log "no kernel dependency in $meta"; exit 1; }
  ls "$debs/${kpkg}"_*.deb >/dev/null 2>&1 || download "$kpkg"
  ls "$debs"/busybox-static_*.deb >/dev/null 2>&1 || download busybox-static
else
  # Offline: whatever was fetched before.
  log "apt-get download failed; using the cached packages"
fi
if [ -n "$kpkg" ]; then
  kdeb=$(ls -t "$debs/${kpkg}"_*.deb 2>/dev/null | head -1)
else
  kdeb=$(ls -t "$debs"/linux-image-[0-9]*.deb 2>/dev/null | head -1)
fi
bdeb=$(ls -t "$debs"/busybox-static_*.deb 2>/dev/null | head -1)
[ -n "$kdeb" ] && [ -n "$bdeb" ] || { log "kernel or busybox-static package missing"; exit 1; }

# ---- is the image up to date? ------------------------------------------------
stamp=$( (basename "$kdeb"; basename "$bdeb"; cat "$here/init" "$here/probe.c" "$0";
          cc --version | head -1) | sha256sum | cut -c1-16)
out=$cache/guest-$stamp
if [ -f "$out/initramfs.gz" ] && [ -f "$out/vmlinuz" ]; then
  echo "$out"
  exit 0
fi

log "building $out from $(basename "$kdeb"), $(basename "$bdeb")"
work=$(mktemp -d "$cache/work-XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/k"
dpkg-deb -x "$bdeb" "$work/b"
kver=$(ls "$work/k/lib/modules" | head -1)
kmods=$work/k/lib/modules/$kver/kernel

# ---- modules: the wanted ones and everything they depend on -------------------
# Compressed modules (.ko.xz/.ko.zst on newer kernels) are unpacked here:
# busybox insmod may not read them.
find "$kmods" -name '*.ko.xz' -exec xz -d {} +
find "$kmods" -name '*.ko.zst' -exec zstd -q -d --rm {} +
find "$kmods" -name '*.ko.gz' -exec gzip -d {} +
# An index "name path", names with "_" for "-" (the same to the kernel).
find "$kmods" -name '*.ko' |
  awk '{ n = $0; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n); print n, $0 }' \
  > "$work/index"
modpath() {
  awk -v n="$(echo "$1" | tr '-' '_')" '$1 == n { print $2; exit }' "$work/index"
}
# virtio_console: the control port; crct10dif_generic and
# crc64_rocksoft_generic: the crypto implementations crc-t10dif and
# crc64-rocksoft look up at load time (softdeps naming crypto aliases,
# which modinfo cannot resolve to a file).
want="crct10dif_generic crc64_rocksoft_generic virtio_pci virtio_scsi virtio_blk sd_mod virtio_console"
order=$work/order
: > "$order"
visit() {     # depth-first: dependencies before the module
  grep -qx "$1" "$order" 2>/dev/null && return 0
  f=$(modpath "$1")
  if [ -z "$f" ]; then
    grep -qx "$1" "$work/k/lib/modules/$kver/modules.builtin" 2>/dev/null ||
      log "module $1 not found (built in?)"
    return 0
  fi
  for d in $(modinfo -F depends "$f" | tr ',' ' '); do
    visit "$(echo "$d" | tr '-' '_')"
  done
  echo "$1" >> "$order"
}
for m in $want; do visit "$m"; done

# ---- the probe --------------------------------------------------------------------
root=$work/root
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/etc" "$root/lib/modules"
cc -static -O2 -std=gnu11 -Wall -Wextra -o "$root/bin/probe" "$here/probe.c"
strip "$root/bin/probe"
cp "$work/b/bin/busybox" "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init" "$root/bin/busybox" "$root/bin/probe"
while read -r m; do
  cp "$(modpath "$m")" "$root/lib/modules/$m.ko"
done < "$order"
cp "$order" "$root/etc/modules.order"

mkdir -p "$out.tmp"
( cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 ) |
  gzip -9 > "$out.tmp/initramfs.gz"
cp "$work/k/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
echo "$kver" > "$out.tmp/kernel-version"
cp "$order" "$out.tmp/modules.order"
rm -rf "$out"
mv "$out.tmp" "$out"
# Older images in the cache: built from inputs that have changed since.
for old in "$cache"/guest-*; do
  [ "$old" = "$out" ] || rm -rf "$old"
done
log "guest ready: kernel $kver, modules $(tr '\n' ' ' < "$order")"
echo "$out"
