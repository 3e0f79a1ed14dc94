#!/bin/sh
# Usage: check-docs.sh HEADER MANDIR
# Every function the public header declares has its man page MANDIR/<name>.3,
# every .3 page names (in its NAME section) only functions the header
# declares, including the one it is named after, and every page formats
# without warnings when groff is installed.  A page may be a link
# (".so man3/<other>.3", for functions documented together): then the page
# it points to must exist and name it.
set -eu

if [ $# -ne 2 ]; then
  echo "usage: $0 HEADER MANDIR" >&2
  exit 2
fi
header=$1 mandir=$2
[ -r "$header" ] || { echo "error: cannot read $header" >&2; exit 2; }
[ -d "$mandir" ] || { echo "error: $mandir is not a directory" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0

# Declared functions: fleece_<name> followed by "(" outside comments, so a
# call mentioned in a comment does not count and a typedef's "(*fleece_x_fn)"
# does not match.
awk '
  {
    line = $0; out = ""
    while (line != "") {
      if (incomment) {
        i = index(line, "*/")
        if (i == 0) { line = ""; break }
        line = substr(line, i + 2); incomment = 0
      } else {
        i = index(line, "/*"); j = index(line, "//")
        if (j > 0 && (i == 0 || j < i)) { out = out substr(line, 1, j - 1); line = ""; break }
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
  }' "$header" | sort -u > "$tmp/declared"

if [ ! -s "$tmp/declared" ]; then
  echo "error: no fleece_ functions found in $header" >&2
  exit 1
fi

# Pages that are missing.
: > "$tmp/missing"
while read -r fn; do
  [ -f "$mandir/$fn.3" ] || echo "$fn" >> "$tmp/missing"
done < "$tmp/declared"
if [ -s "$tmp/missing" ]; then
  echo "FAIL: functions declared in $header without a page in $mandir:"
  sed 's/^/  /; s/$/.3/' "$tmp/missing"
  status=1
fi

# The NAME section of each page: the names before "\-", comma separated.
: > "$tmp/undeclared"
: > "$tmp/unnamed"
npages=0
# The page a ".so" link page points to, or the page itself.
resolve () {
  so=$(sed -n 's/^\.so[[:space:]]*man3\/\([^[:space:]]*\)$/\1/p' "$1" | head -n 1)
  if [ -n "$so" ]; then echo "$mandir/$so"; else echo "$1"; fi
}

for page in "$mandir"/*.3; do
  [ -e "$page" ] || continue
  npages=$((npages + 1))
  base=$(basename "$page" .3)
  target=$(resolve "$page")
  if [ ! -f "$target" ]; then
    echo "$page (links to the missing $target)" >> "$tmp/unnamed"
    continue
  fi
  awk '
    /^\.SH/ { if (in_name) exit; if ($2 == "NAME" || $2 == "\"NAME\"") in_name = 1; next }
    in_name && !/^\./ { printf "%s ", $0 }
  ' "$target" |
    sed 's/\\-.*//; s/\\f[BIRP]//g; s/,/ /g' |
    awk '{ for (i = 1; i <= NF; i++) print $i }' > "$tmp/names"
  grep -qxF "$base" "$tmp/names" || echo "$page (names: $(tr '\n' ' ' < "$tmp/names"))" >> "$tmp/unnamed"
  grep '^fleece_' "$tmp/names" | while read -r fn; do
    grep -qxF "$fn" "$tmp/declared" || echo "$fn ($page)" >> "$tmp/undeclared"
  done
done
if [ -s "$tmp/undeclared" ]; then
  echo "FAIL: pages name functions that $header does not declare:"
  sed 's/^/  /' "$tmp/undeclared"
  status=1
fi
if [ -s "$tmp/unnamed" ]; then
  echo "FAIL: pages whose NAME section does not name the page itself:"
  sed 's/^/  /' "$tmp/unnamed"
  status=1
fi

# Formatting warnings.
if command -v groff >/dev/null 2>&1; then
  for page in "$mandir"/*.3; do
    [ -e "$page" ] || continue
    [ "$(resolve "$page")" = "$page" ] || continue   # the target is checked
    if ! groff -man -ww -z -Tutf8 "$page" > "$tmp/warn" 2>&1 || [ -s "$tmp/warn" ]; then
      echo "FAIL: $page has formatting warnings:"
      sed 's/^/  /' "$tmp/warn"
      status=1
    fi
  done
else
  echo "note: groff not found, formatting not checked"
fi

if [ "$status" -ne 0 ]; then
  exit 1
fi
echo "ok: $npages pages"
