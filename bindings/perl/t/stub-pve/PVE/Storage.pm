package PVE::Storage;

# Test stand-in for Proxmox's PVE::Storage, only what the example uses, with
# the real functions' signatures: storages are directories under
# $PVE::Storage::BASE; 'path' storages (dir) name images <name> with a
# .<format> suffix and hold qcow2, others ('thin', like LVM-thin) hold raw.

use strict;
use warnings;

our $BASE;       # set by the test
our @CALLS;      # what was called, for the test to check

sub config {
    return {
        ids => {
            local => { type => 'dir', path => "$BASE/local", content => { images => 1 } },
            thin  => { type => 'lvmthin', content => { images => 1 } },
        },
    };
}

sub storage_config {
    my ($cfg, $storeid) = @_;
    return $cfg->{ids}->{$storeid} // die "storage '$storeid' does not exist\n";
}

sub resolve_format_hint {
    my ($cfg, $storeid, $hint) = @_;
    my $scfg = storage_config($cfg, $storeid);
    return $scfg->{type} eq 'dir' ? ($hint // 'raw') : 'raw';
}

sub _dir {
    my ($storeid, $vmid) = @_;
    my $dir = "$BASE/$storeid/images/$vmid";
    require File::Path;
    File::Path::make_path($dir);
    return $dir;
}

sub parse_volname {
    my ($volid) = @_;
    my ($storeid, $vmid, $name) = $volid =~ m{^([a-z][a-z0-9]*):(\d+)/([\w.-]+)$}
        or die "unable to parse volume ID '$volid'\n";
    return ($storeid, $vmid, $name);
}

# $size in KiB, as the real one.
sub vdisk_alloc {
    my ($cfg, $storeid, $vmid, $fmt, $name, $size) = @_;
    push @CALLS, "vdisk_alloc $storeid $vmid $fmt $name $size";
    my $scfg = storage_config($cfg, $storeid);
    die "unsupported format '$fmt'\n" if $fmt ne 'raw' && $scfg->{type} ne 'dir';
    my $path = _dir($storeid, $vmid) . "/$name";
    die "volume '$storeid:$vmid/$name' already exists\n" if -e $path;
    my $bytes = $size * 1024;
    if ($fmt eq 'qcow2') {
        system('qemu-img', 'create', '-q', '-f', 'qcow2', $path, $bytes) == 0
            or die "qemu-img create failed\n";
    } else {
        open(my $fh, '>', $path) or die "cannot create $path: $!\n";
        truncate($fh, $bytes) or die "cannot size $path: $!\n";
        close($fh);
    }
    return "$storeid:$vmid/$name";
}

sub vdisk_free {
    my ($cfg, $volid) = @_;
    push @CALLS, "vdisk_free $volid";
    my ($storeid, $vmid, $name) = parse_volname($volid);
    my $path = "$BASE/$storeid/images/$vmid/$name";
    unlink($path) or $!{ENOENT} or die "cannot remove $path: $!\n";
}

sub path {
    my ($cfg, $volid) = @_;
    my ($storeid, $vmid, $name) = parse_volname($volid);
    my $path = "$BASE/$storeid/images/$vmid/$name";
    return wantarray ? ($path, $vmid, 'images') : $path;
}

sub activate_volumes { push @CALLS, "activate_volumes @{ $_[1] }" }

1;
