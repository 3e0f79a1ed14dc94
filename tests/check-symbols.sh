#!/bin/sh
# Usage: check-symbols.sh LIB SYMFILE HEADER
# The library's exports are exactly the version script's: every exported
# symbol is a fleece_* function with the version of the map node that
# lists it (fleece_x@@FLEECE_1.0 for a symbol of the FLEECE_1.0 node), the
# map has the FLEECE_1.0 node of soname 1, nothing in the map is missing
# from the library, and the header declares exactly the map's functions.
set -eu
lib=$1 map=$2 hdr=$3
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
base_node=FLEECE_1.0

# "name node" of every defined dynamic symbol, and the version nodes the
# library defines (absolute symbols named after them).
nm -D --defined-only --with-symbol-versions "$lib" > "$tmp/nm"
awk '$2 != "A" { print $3 }' "$tmp/nm" | sed 's/@@*/ /' | sort > "$tmp/exported"
awk '$2 == "A" { print $3 }' "$tmp/nm" | sort > "$tmp/lib-nodes"
# "name node" of every global of the map, tracking the node it is in.
awk '
  /^[[:space:]]*FLEECE_[0-9.]+[[:space:]]*\{/ { node = $1; sub(/\{.*/, "", node); next }
  /^[[:space:]]*local:/ { node = "" }
  node != "" && /^[[:space:]]+fleece_[a-z0-9_]+;/ { s = $1; sub(/;/, "", s); print s, node }
' "$map" | sort > "$tmp/map"
cut -d' ' -f2 "$tmp/map" | sort -u > "$tmp/map-nodes"
# Declared functions: fleece_<name> followed by "(" outside comments (a
# call named in a comment is no declaration; "(*fleece_x_fn)" no function).
awk '
  {
    line = $0; out = ""
    while (line != "") {
      if (incomment) {
        i = index(line, "*/")
        if (i == 0) { line = ""; break }
        line = substr(line, i + 2); incomment = 0
      } else {
        i = index(line, "/*")
        if (i == 0) { out = out line; line = ""; break }
        out = out substr(line, 1, i - 1) " "; line = substr(line, i + 2); incomment = 1
      }
    }
    line = " " out
    while (match(line, /[^A-Za-z0-9_]fleece_[a-z0-9_]+[ \t]*\(/)) {
      name = substr(line, RSTART + 1, RLENGTH - 1)
      sub(/[ \t]*\($/, "", name)
      print name
      line = substr(line, RSTART + RLENGTH)
    }
  }' "$hdr" | sort -u > "$tmp/header"

status=0
if ! grep -qx "$base_node" "$tmp/map-nodes"; then
  echo "the version script has no $base_node node (soname 1's ABI)"; status=1
fi
if ! grep -qx "$base_node" "$tmp/lib-nodes"; then
  echo "the library defines no $base_node version"; status=1
fi
if grep -v -E '^fleece_[a-z0-9_]+ FLEECE_[0-9.]+$' "$tmp/exported" > "$tmp/bad"; then
  echo "exported symbols that are not versioned fleece_* symbols:"; cat "$tmp/bad"; status=1
fi
if ! diff -u "$tmp/map" "$tmp/exported"; then
  echo "the library's exports differ from the version script, by name or node (- map, + library)"
  status=1
fi
cut -d' ' -f1 "$tmp/map" > "$tmp/map-names"
if ! diff -u "$tmp/header" "$tmp/map-names"; then
  echo "the header and the version script differ (- header, + map)"; status=1
fi
if [ "$status" = 0 ]; then
  echo "ok: $(wc -l < "$tmp/exported") fleece_* symbols, each in its node of the map" \
       "($(tr '\n' ' ' < "$tmp/map-nodes")), matching the header"
fi
exit $status
