package PVE::VZDump;
# Test stand-in: what the plugin under test calls of pve-manager's vzdump.
use strict;
use warnings;
sub check_bin { return $_[0] }
1;
