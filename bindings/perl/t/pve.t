# The Proxmox engine from Perl: the example's flow (qemu-server's fleecing
# through Fleece) against pve-double, the tests' stand-in for Proxmox's
# patched QEMU (tests/pve-double.c: it implements "backup" with fleecing
# over a stock QEMU and writes <drive>.raw next to the backup file in place
# of a VMA archive).  Guest writes land ahead of the slowed backup; the
# backup must be the point in time and nothing may be left.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use POSIX ();
use Test::More;

use FleeceTest qw(need_qemu tmpdir list_dir read_image write_file MiB KiB);

use lib "$FindBin::Bin/stub-pve";
unshift @INC, $ENV{FLEECE_PERL_EXAMPLES} // "$FindBin::Bin/../examples";

need_qemu();
my $double = $ENV{FLEECE_PVE_DOUBLE};
# Built with the C tests (meson -Dtests=true); without them it cannot exist.
plan(skip_all => 'pve-double not built (FLEECE_PVE_DOUBLE unset)') if !$double || !-x $double;

require PVE::QemuServer::Fleecing;

{
    package TestPlugin;
    sub new { bless { storecfg => PVE::Storage::config(), logs => [] }, $_[0] }
    sub log { my ($self, $level, $msg) = @_; chomp $msg; push @{ $self->{logs} }, "$level: $msg" }
}

my $VMID = 100;
my @disks = (
    { key => 'efidisk0', format => 'raw', size => 528 * KiB, bus => 'virtio' },
    { key => 'scsi0', format => 'qcow2', size => 16 * MiB, bus => 'scsi' },
    { key => 'virtio0', format => 'raw', size => 8 * MiB, bus => 'virtio' },
);
my $vm = FleeceTest::VM->start(disks => \@disks);

# The double between the library and QEMU.
my $sock = $vm->dir . '/pve.sock';
my $dlog = $vm->dir . '/double.log';
my $dpid = fork() // die "fork: $!";
if ($dpid == 0) {
    open(STDOUT, '>>', $vm->dir . '/double.out');
    open(STDERR, '>&', \*STDOUT);
    exec($double, "--listen=$sock", '--qemu=' . $vm->qmp_path, "--log=$dlog")
        or POSIX::_exit(127);
}
END { if ($dpid) { local $?; kill('TERM', $dpid); waitpid($dpid, 0) } }
for (1 .. 400) {
    last if -S $sock;
    select(undef, undef, undef, 0.05);
}
ok(-S $sock, 'pve-double is up') or BAIL_OUT('pve-double did not come up');

no warnings 'once';
$PVE::Storage::BASE = tmpdir('pve-storage');
$PVE::QemuConfig::DIR = tmpdir('pve-config');
$PVE::QemuServer::Helpers::QMP_SOCKET{$VMID} = $sock;
PVE::QemuConfig->write_config($VMID, { scsi0 => 'local:100/vm-100-disk-0.qcow2' });
my $state = tmpdir('state');
my $target = tmpdir('target');
my $plugin = TestPlugin->new;

my ($f, $plan) = PVE::QemuServer::Fleecing::prepare_fleecing($plugin, $VMID,
    { enabled => 1, storage => 'local' }, 0, state_dir => $state, bwlimit => 2048);
ok($f, 'fleecing set up') or diag(join("\n", @{ $plugin->{logs} }));
is($f->engine, 'pve', 'the Proxmox engine was chosen');
is_deeply([map { $_->{image} // '-' } @$plan], ['-', 'vm-100-fleece-0.qcow2', 'vm-100-fleece-1.qcow2'],
    'plan');
ok(PVE::QemuConfig->load_config($VMID)->{'special-sections'}{fleecing}{'fleecing-record'},
    'record in the config');

my %pit = map { $_->{key} => read_image($vm->dir . "/$_->{key}.$_->{format}", $_->{format}) } @disks;
write_file("$target/qemu-server.conf", "memory: 512\n");
ok($f->start($plan, target => { pve => {
    'backup-file' => "$target/vzdump-qemu-100.vma",
    format        => 'vma',
    'config-file' => "$target/qemu-server.conf",
} }), 'backup started with the patched QEMU\'s arguments');

# Ahead of the backup cursor, through the guest devices.
for my $d (@disks) {
    my $len = $d->{size} / 2 < MiB ? int($d->{size} / 2) : MiB;
    my $off = ($d->{size} - $len) & ~4095;
    $vm->guest_io($d->{key}, sprintf('write -P 0xee %d %d', $off, $d->{size} - $off));
}
is($f->wait(0), 0, 'still running after the writes');
my $r = eval { 1 while !$f->wait(1000); 1 };
ok($r, 'the backup succeeded') or diag($@, join("\n", @{ $plugin->{logs} }));
PVE::QemuServer::Fleecing::finish($plugin, $f);

open(my $fh, '<', $dlog) or die "no double log: $!";
my @sent = grep { /^> / } <$fh>;
my ($backup) = grep { /^> backup / } @sent;
like($backup // '', qr/"fleecing":\s*true/, 'backup was sent with fleecing: true');
like($backup // '', qr/"devlist":\s*"drive-efidisk0,drive-scsi0,drive-virtio0"/, '... and the devlist');

for my $d (@disks) {
    my $got = read_image("$target/$d->{key}.raw", 'raw');
    ok($got eq $pit{ $d->{key} }, "$d->{key}: the backup is the point-in-time content");
}
is(PVE::QemuConfig->load_config($VMID)->{'special-sections'}{fleecing}, undef, 'record removed');
is_deeply([list_dir("$PVE::Storage::BASE/local/images/$VMID")], [], 'images freed');
is_deeply([$vm->node_names], [$vm->nodes_before], "QEMU's nodes as before");
is($vm->job_count, 0, 'no jobs');

done_testing;
