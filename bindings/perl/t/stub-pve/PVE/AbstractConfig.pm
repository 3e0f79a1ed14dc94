package PVE::AbstractConfig;

# Test stand-in for pve-guest-common's PVE::AbstractConfig, the base of the
# real PVE::QemuConfig: a guest's configuration is a file per VM under
# $PVE::AbstractConfig::DIR/qemu-server/ (it outlives a process, as
# /etc/pve does), in qemu-server's own format: it is read and written with
# parse_vm_config() and write_vm_config() of the qemu-server tree under test
# (see PVE::QemuServer).  lock_config() is an flock that the process holding
# it may take again, as the real one allows.

use strict;
use warnings;

use Fcntl qw(:flock);

our $DIR;       # set by the test
my %held;       # vmid => depth, in this process

sub config_file {
    my ($class, $vmid) = @_;
    die "PVE::AbstractConfig stand-in: \$DIR is not set\n" if !$DIR;
    mkdir("$DIR/qemu-server");
    return "$DIR/qemu-server/$vmid.conf";
}

sub lock_config {
    my ($class, $vmid, $code, @param) = @_;
    return $code->(@param) if $held{$vmid};
    open(my $lock, '>>', "$DIR/lock-$vmid.conf") or die "can't lock config of VM $vmid: $!\n";
    flock($lock, LOCK_EX) or die "can't lock config of VM $vmid: $!\n";
    local $held{$vmid} = 1;
    my @res = wantarray ? $code->(@param) : scalar($code->(@param));
    close($lock);
    return wantarray ? @res : $res[0];
}

sub load_config {
    my ($class, $vmid) = @_;
    my $file = $class->config_file($vmid);
    open(my $fh, '<', $file) or die "Configuration file '$file' does not exist\n";
    my $raw = do { local $/; <$fh> };
    return PVE::QemuServer::parse_vm_config($file, $raw, 1);
}

sub write_config {
    my ($class, $vmid, $conf) = @_;
    my $file = $class->config_file($vmid);
    my $raw = PVE::QemuServer::write_vm_config($file, $conf);
    open(my $fh, '>', "$file.tmp") or die "cannot write $file: $!\n";
    print {$fh} $raw;
    close($fh) or die "cannot write $file: $!\n";
    rename("$file.tmp", $file) or die "cannot write $file: $!\n";
}

sub is_template {
    my ($class, $conf) = @_;
    return $conf->{template} ? 1 : 0;
}

sub set_lock {
    my ($class, $vmid, $lock) = @_;
    $class->lock_config($vmid, sub {
        my $conf = $class->load_config($vmid);
        die "VM $vmid is locked ($conf->{lock})\n" if $conf->{lock};
        $conf->{lock} = $lock;
        $class->write_config($vmid, $conf);
    });
}

sub remove_lock {
    my ($class, $vmid, $lock) = @_;
    $class->lock_config($vmid, sub {
        my $conf = $class->load_config($vmid);
        delete $conf->{lock};
        $class->write_config($vmid, $conf);
    });
}

sub foreach_volume {
    my ($class, $conf, $func, @param) = @_;
    for my $key ($class->valid_volume_keys()) {
        next if !defined($conf->{$key});
        my $volume = $class->parse_volume($key, $conf->{$key}, 1) or next;
        $func->($key, $volume, @param);
    }
}

1;
