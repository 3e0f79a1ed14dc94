package PVE::Storage::Plugin;
# Test stand-in.
use strict;
use warnings;
1;
