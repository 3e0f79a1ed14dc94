package PVE::QemuConfig;

# Test stand-in for Proxmox's PVE::QemuConfig: the guest config as a JSON
# file per VM under $PVE::QemuConfig::DIR (so that it survives a process,
# like /etc/pve), locked with flock like the real lock_config.

use strict;
use warnings;

use Fcntl qw(:flock);
use JSON::PP;

our $DIR;    # set by the test

my $json = JSON::PP->new->canonical;

sub _path { return "$DIR/$_[0].conf.json" }

sub lock_config {
    my ($class, $vmid, $code, @param) = @_;
    open(my $lock, '>>', "$DIR/$vmid.lock") or die "cannot lock config of VM $vmid: $!\n";
    flock($lock, LOCK_EX) or die "cannot lock config of VM $vmid: $!\n";
    my @res = $code->(@param);
    close($lock);
    return wantarray ? @res : $res[0];
}

sub load_config {
    my ($class, $vmid) = @_;
    open(my $fh, '<', _path($vmid)) or die "Configuration file '$vmid.conf' does not exist\n";
    local $/;
    return $json->decode(<$fh>);
}

sub write_config {
    my ($class, $vmid, $conf) = @_;
    # Special section values are single lines in the real config format.
    for my $section (values %{ $conf->{'special-sections'} // {} }) {
        for my $v (values %$section) {
            die "multi-line value in a special section\n" if $v =~ /\n/;
        }
    }
    my $tmp = _path($vmid) . '.tmp';
    open(my $fh, '>', $tmp) or die "cannot write config: $!\n";
    print {$fh} $json->encode($conf);
    close($fh) or die "cannot write config: $!\n";
    rename($tmp, _path($vmid)) or die "cannot write config: $!\n";
}

1;
