package PVE::QemuServer;

# Test stand-in for qemu-server's PVE::QemuServer: the VM is the test's
# QEMU.  The configuration format is the real one: load_config_format()
# takes check_type(), the [special:fleecing] schema, parse_vm_config() and
# write_vm_config() out of the QemuServer.pm under test, with a main
# section schema that accepts the keys the tests' configs use.

use strict;
use warnings;

use PVE::QemuServer::Helpers;
use PVE::QemuServer::Monitor qw(mon_cmd);

sub vzlist { return {} }

sub check_running {
    my ($vmid) = @_;
    return PVE::QemuServer::Helpers::vm_running_locally($vmid);
}

sub vm_is_paused {
    my ($vmid, $include_suspended) = @_;
    my $status = mon_cmd($vmid, 'query-status');
    return $status->{status} eq 'paused' || $status->{status} eq 'prelaunch';
}

sub register_qmeventd_handle { return undef }

sub vm_start { die "PVE::QemuServer stand-in: the test starts the VM\n" }
sub vm_stop { die "PVE::QemuServer stand-in: the test stops the VM\n" }

sub is_valid_drivename { return 0 }

# The text of "my $name = ...;" or "sub name {...}" at the top level of $src.
sub _piece {
    my ($src, $start) = @_;
    my $i = index($src, $start);
    die "load_config_format: '$start' not found\n" if $i < 0;
    my $end = $start =~ /^sub / ? "\n}\n" : "\n};\n";
    my $j = index($src, $end, $i);
    die "load_config_format: end of '$start' not found\n" if $j < 0;
    return substr($src, $i, $j + length($end) - $i);
}

sub load_config_format {
    my ($path, @main_keys) = @_;
    open(my $fh, '<', $path) or die "cannot read $path: $!\n";
    my $src = do { local $/; <$fh> };
    my $code = join("\n",
        'package PVE::QemuServer;',
        'use strict; use warnings; use Digest::SHA; use PVE::JSONSchema; use PVE::Tools;',
        'my $confdesc = { map { $_ => { type => "string", optional => 1 } } @main_keys };',
        _piece($src, 'sub check_type {'),
        _piece($src, 'my $fleecing_section_schema = {'),
        _piece($src, 'sub parse_vm_config {'),
        _piece($src, 'sub write_vm_config {'),
        '1;');
    no warnings 'redefine';
    eval $code or die "load_config_format: $@";
}

1;
