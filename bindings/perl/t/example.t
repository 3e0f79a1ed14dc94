# The example (examples/PVE/QemuServer/Fleecing.pm, qemu-server's fleecing
# done through Fleece) against a real QEMU, with stand-ins for PVE::Storage
# and PVE::QemuConfig (t/stub-pve) that keep the real signatures: images
# allocated through vdisk_alloc, the record in the guest config's
# [special:fleecing] section, leftovers cleaned up from it.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use JSON::PP qw(decode_json);
use Test::More;

use FleeceTest qw(need_qemu tmpdir list_dir read_image MiB KiB);

use lib "$FindBin::Bin/stub-pve";
unshift @INC, $ENV{FLEECE_PERL_EXAMPLES} // "$FindBin::Bin/../examples";

require_ok('PVE::QemuServer::Fleecing');

need_qemu();

{
    package TestPlugin;    # the parts of PVE::VZDump::QemuServer the example uses
    sub new { bless { storecfg => PVE::Storage::config(), logs => [] }, $_[0] }
    sub log { my ($self, $level, $msg) = @_; chomp $msg; push @{ $self->{logs} }, "$level: $msg" }
}

my $VMID = 100;
my @disks = (
    { key => 'efidisk0', format => 'raw', size => 528 * KiB, bus => 'virtio' },
    { key => 'scsi0', format => 'qcow2', size => 8 * MiB, bus => 'scsi' },
    { key => 'virtio0', format => 'raw', size => 4 * MiB + 512, bus => 'virtio' },
);
my $vm = FleeceTest::VM->start(disks => \@disks);
no warnings 'once';
$PVE::Storage::BASE = tmpdir('pve-storage');
$PVE::QemuConfig::DIR = tmpdir('pve-config');
$PVE::QemuServer::Helpers::QMP_SOCKET{$VMID} = $vm->qmp_path;
my $state = tmpdir('state');
my %opts = (state_dir => $state, engine => 'qemu');

PVE::QemuConfig->write_config($VMID, {
    scsi0 => 'local:100/vm-100-disk-0.qcow2,size=8M',
    virtio0 => 'local:100/vm-100-disk-1.raw,size=4100K',
    efidisk0 => 'local:100/vm-100-disk-2.raw,size=528K',
});

sub section { PVE::QemuConfig->load_config($VMID)->{'special-sections'}->{fleecing} }
sub images { my $dir = "$PVE::Storage::BASE/$_[0]/images/$VMID"; -d $dir ? list_dir($dir) : () }

sub nothing_left {
    my ($name) = @_;
    is(section(), undef, "$name: no [special:fleecing] section");
    is_deeply([images('local'), images('thin')], [], "$name: no images");
    is_deeply([$vm->node_names], [$vm->nodes_before], "$name: QEMU's nodes as before");
    is($vm->job_count, 0, "$name: no jobs");
}

subtest 'prepare: images through vdisk_alloc, record in the config' => sub {
    my $plugin = TestPlugin->new;
    @PVE::Storage::CALLS = ();
    my ($f, $plan) = PVE::QemuServer::Fleecing::prepare_fleecing($plugin, $VMID,
        { enabled => 1, storage => 'local' }, 0, %opts);
    ok($f, 'fleecing set up') or diag(join("\n", @{ $plugin->{logs} }));
    is_deeply([grep { /^vdisk_alloc/ } @PVE::Storage::CALLS], [
        'vdisk_alloc local 100 qcow2 vm-100-fleece-0.qcow2 8192',
        'vdisk_alloc local 100 qcow2 vm-100-fleece-1.qcow2 4096.5',
    ], 'vdisk_alloc with exact KiB (fractional for qcow2), efidisk0 excluded');
    my $section = section();
    is($section->{'fleecing-images'},
        'local:100/vm-100-fleece-0.qcow2,local:100/vm-100-fleece-1.qcow2',
        'fleecing-images kept for existing readers');
    my $rec = decode_json($section->{'fleecing-record'});
    is($rec->{vmid}, $VMID, 'the record is in the config');
    like(join("\n", @{ $plugin->{logs} }), qr/^info: efidisk0: no fleecing \(/m, 'task log');

    my $target = tmpdir('target');
    my %pit = map { $_->{key} => read_image($vm->dir . "/$_->{key}.$_->{format}", $_->{format}) } @disks;
    PVE::QemuServer::Fleecing::run_backup($plugin, $f, $plan, { dir => $target, format => 'raw' });
    like(join("\n", @{ $plugin->{logs} }), qr/^info: backup finished$/m, 'backup finished');
    for my $d (@disks) {
        ok(read_image("$target/$d->{key}.raw", 'raw') eq $pit{ $d->{key} }, "$d->{key} backed up");
    }
    PVE::QemuServer::Fleecing::finish($plugin, $f);
    nothing_left('after finish');
};

subtest 'a raw-only storage (LVM-thin like)' => sub {
    my $plugin = TestPlugin->new;
    @PVE::Storage::CALLS = ();
    my ($f, $plan) = PVE::QemuServer::Fleecing::prepare_fleecing($plugin, $VMID,
        { enabled => 1, storage => 'thin' }, 0, %opts);
    is_deeply([grep { /^vdisk_alloc/ } @PVE::Storage::CALLS], [
        'vdisk_alloc thin 100 raw vm-100-fleece-0 8192',
        'vdisk_alloc thin 100 raw vm-100-fleece-1 4097',
    ], 'raw, no suffix, KiB rounded up');
    PVE::QemuServer::Fleecing::finish($plugin, $f);
    nothing_left('thin');
};

subtest 'leftovers of a crashed run' => sub {
    my $plugin = TestPlugin->new;
    {
        my ($f) = PVE::QemuServer::Fleecing::prepare_fleecing($plugin, $VMID,
            { enabled => 1, storage => 'local' }, 0, %opts);
        ok($f, 'set up');
        # the task dies here: the handle goes without cleanup
    }
    ok(section(), 'the record is left in the config');
    is(scalar(images('local')), 2, 'the images are left');
    my @log;
    PVE::QemuServer::Fleecing::cleanup_leftovers($VMID, PVE::Storage::config(),
        sub { push @log, "@_" }, %opts);
    nothing_left('cleanup_leftovers');
    ok(eval { PVE::QemuServer::Fleecing::cleanup_leftovers($VMID, PVE::Storage::config(),
        undef, %opts); 1 }, 'again: nothing to do') or diag($@);

    # A leftover is also cleaned up by the next backup's prepare.
    {
        my ($f) = PVE::QemuServer::Fleecing::prepare_fleecing($plugin, $VMID,
            { enabled => 1, storage => 'local' }, 0, %opts);
    }
    my ($f) = PVE::QemuServer::Fleecing::prepare_fleecing($plugin, $VMID,
        { enabled => 1, storage => 'local' }, 0, %opts);
    ok($f, 'the next backup sets up over the leftovers');
    PVE::QemuServer::Fleecing::finish($plugin, $f);
    nothing_left('next backup');
};

subtest 'the whole flow: backup_vm' => sub {
    my $plugin = TestPlugin->new;
    my $target = tmpdir('target');
    PVE::QemuServer::Fleecing::backup_vm($plugin, $VMID, { enabled => 1, storage => 'local' },
        { dir => $target, format => 'qcow2' }, %opts, bwlimit => 4096);
    is_deeply([list_dir($target)], [map { "$_->{key}.qcow2" } @disks], 'backed up');
    nothing_left('backup_vm');

    # A failing target: the error reaches the caller, nothing is left.
    my $err = eval { PVE::QemuServer::Fleecing::backup_vm($plugin, $VMID,
        { enabled => 1, storage => 'local' }, { dir => "$target/missing" }, %opts); 1 } ? '' : $@;
    like($err, qr/^fleece_target_new_dir: the target directory .* does not exist/, 'error');
    nothing_left('failed backup_vm');
};

subtest 'templates and disabled fleecing' => sub {
    my $plugin = TestPlugin->new;
    is_deeply([PVE::QemuServer::Fleecing::prepare_fleecing($plugin, $VMID, { enabled => 0 }, 0, %opts)],
        [], 'disabled');
    is_deeply([PVE::QemuServer::Fleecing::prepare_fleecing($plugin, $VMID,
        { enabled => 1, storage => 'local' }, 1, %opts)], [], 'template');
};

done_testing;
