#!/bin/sh
# Usage: abi/check.sh LIBRARY INCLUDE_DIR          compare with the baseline
#        abi/check.sh --update LIBRARY INCLUDE_DIR write a new baseline
#
# The ABI gate (suite 'abi'; docs/reliability.md, "ABI").  LIBRARY is the
# built libfleece.so (with debug info: -g, as every meson buildtype but
# release and minsize gives), INCLUDE_DIR the directory holding
# fleece/fleece.h.  Compared with the committed baseline next to this
# script:
#   libfleece.abi     abidw's description of the exported functions and
#                     the types they use, restricted to the public header
#                     (the opaque handles' insides are not ABI);
#   libfleece.macros  the value of every FLEECE_* constant in the header
#                     (flags, levels, engines: ABI too, but invisible to
#                     abidiff).
# Additions pass.  A removed or changed function, variable, type used by
# one, symbol version, soname or constant fails.  A deliberate change
# updates the baseline with --update in the same commit (and bumps the
# soname when it breaks callers).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
update=no
if [ "${1:-}" = --update ]; then update=yes; shift; fi
if [ $# != 2 ]; then
  sed -n '2,3s/^# //p' "$0" >&2
  exit 2
fi
lib=$1 inc=$2
hdr=$inc/fleece/fleece.h
abi=$here/libfleece.abi
macros=$here/libfleece.macros

for tool in abidw abidiff readelf; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "abi/check.sh: $tool is missing: install abigail-tools and binutils" \
         "(scripts/install-deps.sh)" >&2
    exit 1
  fi
done
if ! readelf -S "$lib" | grep -q '\.debug_info'; then
  echo "abi/check.sh: $lib has no debug info; build with -g (buildtype debug or" \
       "debugoptimized)" >&2
  exit 1
fi

# "FLEECE_X value", sorted; the include guard and the export macro are not
# part of the ABI.
constants () {
  sed -n 's/^#define \(FLEECE_[A-Z0-9_]*\)[ \t][ \t]*\([^ \t/]*\).*/\1 \2/p' "$1" \
    | grep -v -E '^FLEECE_(API|H) ' | sort
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
abidw --headers-dir "$inc/fleece" --drop-private-types --no-corpus-path \
      --no-comp-dir-path --short-locs --out-file "$tmp/new.abi" "$lib"
constants "$hdr" > "$tmp/new.macros"

if [ "$update" = yes ]; then
  cp "$tmp/new.abi" "$abi"
  cp "$tmp/new.macros" "$macros"
  echo "abi/check.sh: baseline updated ($(grep -c '<elf-symbol ' "$abi") symbols," \
       "$(wc -l < "$macros") constants); commit abi/ with the change"
  exit 0
fi

status=0
rc=0
abidiff --no-added-syms "$abi" "$tmp/new.abi" > "$tmp/report" 2>&1 || rc=$?
if [ $((rc & 3)) != 0 ]; then
  cat "$tmp/report"
  echo "abi/check.sh: abidiff failed (exit $rc)"
  exit 1
fi
# Exit bit 8 is set only for some incompatible changes (removed symbols);
# a changed parameter type sets 4, like an addition: read the summary.
if [ $((rc & 8)) != 0 ] \
   || grep -q -E '[1-9][0-9]* (Removed|Changed)' "$tmp/report" \
   || grep -q -i -E 'SONAME changed|architecture changed' "$tmp/report"; then
  cat "$tmp/report"
  echo "abi/check.sh: incompatible ABI change against abi/libfleece.abi (above)"
  status=1
fi

# Every constant of the baseline, with its value.
if ! join -a 1 -e MISSING -o 1.1,1.2,2.2 "$macros" "$tmp/new.macros" \
     | awk '$2 != $3 { print "  " $1 ": " $2 " -> " $3; bad = 1 } END { exit bad }'; then
  echo "abi/check.sh: a public constant changed or disappeared (above)"
  status=1
fi

if [ "$status" = 0 ]; then
  added=$(grep -c '<elf-symbol ' "$tmp/new.abi")
  echo "abi/check.sh: ok: compatible with the baseline ($added exported symbols now," \
       "$(grep -c '<elf-symbol ' "$abi") in the baseline)"
else
  echo "abi/check.sh: if the change is deliberate, see \"Changing the ABI\" in" \
       "docs/reliability.md"
fi
exit "$status"
