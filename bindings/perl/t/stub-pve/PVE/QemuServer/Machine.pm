package PVE::QemuServer::Machine;
# Test stand-in: the machine type QEMU runs, from QEMU.
use strict;
use warnings;
use PVE::QemuServer::Monitor;

sub get_current_qemu_machine {
    my ($vmid) = @_;
    my $res = PVE::QemuServer::Monitor::mon_cmd($vmid, 'query-machines');
    # Proxmox's QEMU marks the current one; else the default, as qemu-server falls back
    my ($current) = grep { $_->{'is-current'} } @$res;
    my ($default) = grep { $_->{'is-default'} } @$res;
    return $current ? $current->{name} : $default ? $default->{name} : 'pc';
}

sub latest_installed_machine_version { return '10.0' }
1;
