package PVE::QemuServer::Memory;
# Test stand-in.
use strict;
use warnings;
sub import { PVEStubs::export(@_) }
our @EXPORT_OK = qw(get_current_memory);
sub get_current_memory { die "PVE::QemuServer::Memory stand-in\n" }
1;
