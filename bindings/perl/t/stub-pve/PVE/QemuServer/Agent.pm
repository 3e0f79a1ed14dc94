package PVE::QemuServer::Agent;
# Test stand-in: the test's VMs have no guest agent.
use strict;
use warnings;
sub guest_fs_freeze_applicable { return 0 }
1;
