#!/bin/sh
# Usage: check-symbols.sh LIB SYMFILE HEADER
# Fails if the library exports a symbol that is not a versioned fleece_*
# symbol of the map, if the map lists one the library lacks, or if the
# header declares a function the map does not export.
set -eu
lib=$1 map=$2 hdr=$3
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# Defined dynamic symbols with their version: "name@@FLEECE_0.1".
nm -D --defined-only --with-symbol-versions "$lib" | awk '{print $3}' \
  | grep -v '^FLEECE_[0-9.]*$' | sort > "$tmp/exported" || true
grep -oE '^[[:space:]]+fleece_[a-z0-9_]+;' "$map" | tr -d ' \t;' | sort > "$tmp/map"
grep -oE '\bfleece_[a-z0-9_]+[[:space:]]*\(' "$hdr" | tr -d '( ' | sort -u > "$tmp/header"

status=0
if grep -v -E '^fleece_[a-z0-9_]+@@?FLEECE_[0-9.]+$' "$tmp/exported" > "$tmp/bad"; then
  echo "exported symbols that are not versioned fleece_* symbols:"; cat "$tmp/bad"; status=1
fi
sed 's/@.*//' "$tmp/exported" | sort > "$tmp/names"
if ! diff -u "$tmp/map" "$tmp/names"; then
  echo "the version script and the library's exports differ (- map, + library)"; status=1
fi
if ! diff -u "$tmp/header" "$tmp/map"; then
  echo "the header and the version script differ (- header, + map)"; status=1
fi
[ "$status" = 0 ] && echo "ok: $(wc -l < "$tmp/names") versioned fleece_* symbols, matching map and header"
exit $status
