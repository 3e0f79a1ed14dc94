package PVE::QemuServer::Drive;

# Test stand-in: the drive helpers the code under test calls, for the
# drives of a config such as "scsi0: local:100/vm-100-disk-0.qcow2,size=8M".

use strict;
use warnings;

sub import { PVEStubs::export(@_) }
our @EXPORT_OK = qw(checked_volume_format drive_is_cdrom parse_drive print_drive);

our $MAX_UNUSED_DISKS = 256;

# QemuServer.pm uses it as a bareword.
use constant TPMSTATE_DISK_SIZE => 4 * 1024 * 1024;

sub valid_drive_names {
    return ((map { "ide$_" } 0 .. 3), (map { "sata$_" } 0 .. 5), (map { "scsi$_" } 0 .. 30),
        (map { "virtio$_" } 0 .. 15), 'efidisk0', 'tpmstate0');
}

sub is_valid_drivename {
    my ($key) = @_;
    return scalar(grep { $_ eq $key } valid_drive_names());
}

sub parse_drive_interface {
    my ($key) = @_;
    my ($interface, $index) = $key =~ m/^([a-z]+)(\d+)$/ or return;
    return ($interface, $index);
}

sub parse_drive {
    my ($key, $value) = @_;
    my ($interface, $index) = parse_drive_interface($key) or return;
    my ($file, @opts) = split(/,/, $value);
    my $drive = { interface => $interface, index => $index };
    for my $opt (@opts) {
        my ($k, $v) = split(/=/, $opt, 2);
        $drive->{$k} = $v;
    }
    $file = $1 if $file =~ m/^file=(.*)$/;
    $drive->{file} = $file;
    my %unit = (K => 1024, M => 1024**2, G => 1024**3, T => 1024**4);
    $drive->{size} = $1 * ($unit{$2} // 1) if ($drive->{size} // '') =~ m/^(\d+)([KMGT])?$/;
    return $drive;
}

sub print_drive {
    my ($drive) = @_;
    return join(',', $drive->{file},
        map { "$_=$drive->{$_}" } sort grep { !/^(file|interface|index)$/ } keys %$drive);
}

sub get_drive_id {
    my ($drive) = @_;
    return "$drive->{interface}$drive->{index}";
}

sub drive_is_cdrom {
    my ($drive) = @_;
    return $drive && ($drive->{media} // '') eq 'cdrom';
}

sub checked_volume_format {
    my ($storecfg, $volid) = @_;
    return $volid =~ /\.qcow2$/ ? 'qcow2' : 'raw';
}

# The test's storages are files on any file system: no O_DIRECT, thread pool.
sub drive_uses_cache_direct { return 0 }
sub aio_cmdline_option { return 'threads' }

sub detect_zeroes_cmdline_option {
    my ($drive) = @_;
    return ($drive->{discard} // '') eq 'on' ? 'unmap' : 'on';
}

sub get_iso_path { die "PVE::QemuServer::Drive stand-in: no ISO images\n" }

1;
