package UUID;
# Test stand-in for libuuid-perl (Proxmox ships it), which qemu-server uses.
use strict;
use warnings;
sub import { PVEStubs::export(@_) }
our @EXPORT_OK = qw(uuid);
sub generate { die "UUID stand-in\n" }
sub unparse { die "UUID stand-in\n" }
1;
