package PVE::Storage;

# Test stand-in for Proxmox's PVE::Storage, with the real functions'
# signatures: storages are directories under $PVE::Storage::BASE.  'local'
# is a directory storage (path-based: image names carry the format, qcow2
# allowed); 'thin' stands for LVM-thin (raw only, names without suffix).
# Volume IDs are <storeid>:<vmid>/<name>; QEMU opens them as files.
# @CALLS records what was called, for the test to check.

use strict;
use warnings;

use File::Path ();

our $BASE;       # set by the test
our @CALLS;

sub config {
    return {
        ids => {
            local => { type => 'dir', path => "$BASE/local", content => { images => 1 } },
            thin  => { type => 'lvmthin', vgname => 'pve', content => { images => 1 } },
        },
    };
}

sub storage_config {
    my ($cfg, $storeid, $noerr) = @_;
    my $scfg = $cfg->{ids}->{$storeid};
    die "storage '$storeid' does not exist\n" if !$scfg && !$noerr;
    return $scfg;
}

sub resolve_format_hint {
    my ($cfg, $storeid, $hint) = @_;
    my $scfg = storage_config($cfg, $storeid);
    return $scfg->{type} eq 'dir' ? ($hint // 'raw') : 'raw';
}

sub parse_volume_id {
    my ($volid, $noerr) = @_;
    if ($volid =~ m{^([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)$}i) {
        return ($1, $2);
    }
    return if $noerr;
    die "unable to parse volume ID '$volid'\n";
}

sub _parse {
    my ($volid) = @_;
    my ($storeid, $volname) = parse_volume_id($volid);
    my ($vmid, $name) = $volname =~ m{^(\d+)/([\w.\-]+)$}
        or die "unable to parse volume name '$volname'\n";
    return ($storeid, $vmid, $name);
}

sub parse_volname {
    my ($cfg, $volid) = @_;
    my ($storeid, $vmid, $name) = _parse($volid);
    my $format = $name =~ /\.(qcow2|raw)$/ ? $1 : 'raw';
    return ('images', $name, $vmid, undef, undef, undef, $format);
}

sub _dir {
    my ($storeid, $vmid) = @_;
    my $dir = "$BASE/$storeid/images/$vmid";
    File::Path::make_path($dir);
    return $dir;
}

sub path {
    my ($cfg, $volid) = @_;
    my ($storeid, $vmid, $name) = _parse($volid);
    my $path = "$BASE/$storeid/images/$vmid/$name";
    return wantarray ? ($path, $vmid, 'images') : $path;
}

sub activate_volumes {
    my ($cfg, $vollist) = @_;
    push @CALLS, "activate_volumes @$vollist";
}

sub volume_size_info {
    my ($cfg, $volid, $timeout) = @_;
    my $path = path($cfg, $volid);
    my $format = $path =~ /\.qcow2$/ ? 'qcow2' : 'raw';
    my $size = -s $path;
    if ($format eq 'qcow2') {
        my $info = `qemu-img info -U --output=json '$path'`;
        ($size) = $info =~ /"virtual-size":\s*(\d+)/;
    }
    die "volume '$volid' does not exist\n" if !defined($size);
    return wantarray ? ($size, $format) : $size;
}

# $size in KiB, as the real one; fails if the volume exists.
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
        # LVM-thin rounds up to its chunks
        $bytes = (int(($bytes + 65535) / 65536)) * 65536 if $scfg->{type} ne 'dir';
        open(my $fh, '>', $path) or die "cannot create $path: $!\n";
        truncate($fh, $bytes) or die "cannot size $path: $!\n";
        close($fh);
    }
    return "$storeid:$vmid/$name";
}

sub vdisk_free {
    my ($cfg, $volid) = @_;
    push @CALLS, "vdisk_free $volid";
    my $path = path($cfg, $volid);
    die "volume '$volid' does not exist\n" if !-e $path;
    unlink($path) or die "cannot remove $path: $!\n";
}

sub vdisk_list {
    my ($cfg, $storeid, $vmid, $vollist) = @_;
    my @res;
    for my $volid (@{ $vollist // [] }) {
        my ($sid) = parse_volume_id($volid);
        next if $sid ne $storeid || !-e path($cfg, $volid);
        push @res, { volid => $volid };
    }
    return { $storeid => \@res };
}

# What a storage plugin gives qemu-server's Blockdev for the volume.
sub qemu_blockdev_options {
    my ($cfg, $volid, $machine_version, $opts) = @_;
    push @CALLS, "qemu_blockdev_options $volid";
    return { driver => 'file', filename => scalar(path($cfg, $volid)) };
}

1;
