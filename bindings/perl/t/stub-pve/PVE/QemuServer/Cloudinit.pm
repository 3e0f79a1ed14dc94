package PVE::QemuServer::Cloudinit;
# Test stand-in: QemuServer.pm uses this constant as a bareword.
use strict;
use warnings;
use constant CLOUDINIT_DISK_SIZE => 4 * 1024 * 1024;
sub import { PVEStubs::export(@_) }
1;
