#!/bin/sh
# Usage: check-header.sh c|c++ INCLUDEDIR
# The public header must compile alone, warning-free, as strict C99 and as C++.
set -eu
lang=$1 inc=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if [ "$lang" = c ]; then
  printf '#include <fleece/fleece.h>\nint main (void) { return fleece_get_errno (); }\n' > "$tmp/t.c"
  ${CC:-cc} -std=c99 -pedantic -Wall -Wextra -Werror -I"$inc" -c "$tmp/t.c" -o "$tmp/t.o"
else
  printf '#include <fleece/fleece.h>\nint main () { struct fleece_handle *h = fleece_new (); fleece_free (h); return 0; }\n' > "$tmp/t.cc"
  ${CXX:-c++} -std=c++11 -pedantic -Wall -Wextra -Werror -I"$inc" -c "$tmp/t.cc" -o "$tmp/t.o"
fi
echo "ok: fleece.h compiles alone as $lang"
