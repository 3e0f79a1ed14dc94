package PVE::QemuServer::Helpers;

# Test stand-in: the QMP socket of a VM is where the test's QEMU has it.

use strict;
use warnings;

our %QMP_SOCKET;    # vmid => path, set by the test

sub qmp_socket {
    my ($vmid) = @_;
    return $QMP_SOCKET{$vmid} // "/var/run/qemu-server/$vmid.qmp";
}

1;
