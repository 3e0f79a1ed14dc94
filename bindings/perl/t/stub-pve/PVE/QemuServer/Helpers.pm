package PVE::QemuServer::Helpers;

# Test stand-in: a VM is the test's QEMU, its QMP socket where the test
# put it, and it runs while that process lives.

use strict;
use warnings;

our %QMP_SOCKET;    # vmid => path, set by the test
our %PID;           # vmid => pid of its QEMU, set by the test
our $var_run_tmpdir = '/nonexistent/qemu-server';

sub qmp_socket {
    my ($peer) = @_;
    my ($id, $type) = @$peer{qw(id type)};
    return $QMP_SOCKET{$id} // die "no QMP socket for VM $id in the test\n" if $type eq 'qmp';
    return "$var_run_tmpdir/$id.$type";
}

sub vm_running_locally {
    my ($vmid) = @_;
    my $pid = $PID{$vmid} or return undef;
    open(my $fh, '<', "/proc/$pid/stat") or return undef;
    my $stat = <$fh> // '';
    return $stat =~ /^\d+ \(.*\) [^ZX]/ ? $pid : undef;   # not a zombie
}

sub qsd_running_locally { return undef }

1;
