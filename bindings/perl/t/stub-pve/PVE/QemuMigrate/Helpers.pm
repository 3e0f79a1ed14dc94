package PVE::QemuMigrate::Helpers;
# Test stand-in.
use strict;
use warnings;
1;
