# The Proxmox engine from Perl, against pve-double, the tests' stand-in for
# Proxmox's patched QEMU (tests/pve-double.c: it implements "backup" with
# fleecing over a stock QEMU and writes <drive>.raw next to the backup file
# in place of a VMA archive).  The patched QEMU's arguments pass through,
# query-backup's figures (zero, reused, finishing) reach stats(), guest
# writes land ahead of the slowed backup, and the backup must be the point
# in time with nothing left.  The real patched QEMU is exercised by
# qemu-server.t (FLEECE_PVE_QEMU).
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use JSON::PP qw(decode_json);
use POSIX ();
use Test::More;

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir read_image write_file MiB KiB fails_like);

need_qemu();
my $double = $ENV{FLEECE_PVE_DOUBLE};
# Built with the C tests (meson -Dtests=true); without them it cannot exist.
plan(skip_all => 'pve-double not built (FLEECE_PVE_DOUBLE unset)') if !$double || !-x $double;

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

my $store_dir = tmpdir('storage');
my (%records, @log);
my $f = Fleece->new(
    qmp       => $sock,
    vmid      => $VMID,
    state_dir => tmpdir('state'),
    bwlimit   => 2048,
    log       => sub { push @log, "$_[0]: $_[1]" },
    record    => {
        load  => sub { $records{ $_[0] } },
        store => sub { defined($_[1]) ? ($records{ $_[0] } = $_[1]) : delete $records{ $_[0] } },
    },
    storage   => {
        id       => 'pve:local',
        alloc    => sub {
            my ($img, $format, $size) = @_;
            system('qemu-img', 'create', '-q', '-f', $format, "$store_dir/$img", $size) == 0
                or die "qemu-img create $img failed\n";
            return "local:$img";
        },
        remove   => sub { (my $img = $_[0]) =~ s/^local://; unlink("$store_dir/$img"); return },
        blockdev => sub {
            (my $img = $_[0]) =~ s/^local://;
            return { driver => 'file', filename => "$store_dir/$img", aio => 'threads' };
        },
        supports => { qcow2 => 1, discard => 1, path => 1 },
    },
);
is($f->engine, 'pve', 'the Proxmox engine was chosen');

my $plan = $f->plan;
is_deeply([map { $_->{image} // '-' } @$plan], ['-', 'vm-100-fleece-0.qcow2', 'vm-100-fleece-1.qcow2'],
    'plan: EFI disk not fleeced');
ok($f->attach($plan), 'attach') or diag(join("\n", @log));
ok($records{$VMID}, 'the record is kept through the callbacks');

my $target = tmpdir('target');
my %pit = map { $_->{key} => read_image($vm->dir . "/$_->{key}.$_->{format}", $_->{format}) } @disks;
write_file("$target/qemu-server.conf", "memory: 512\n");
fails_like(sub { $f->start($plan, target => { pve => { devlist => 'drive-scsi0' } }) },
    'fleece_start', qr/must not contain "devlist": libfleece sets it from the plan/,
    'devlist is the library\'s');
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
# query-backup's figures, from the engine's last look (wait polls).
my $stats = $f->stats;
for my $k (qw(done total zero reused finishing elapsed_ms)) {
    ok(exists $stats->{$k}, "stats: the Proxmox engine reports $k") or diag(explain($stats));
}
my $r = eval { $f->wait };
is($r, 1, 'the backup succeeded') or diag($@, join("\n", @log));
my $end = $f->stats;
is($end->{done}, $end->{total}, 'stats: done');
ok(defined($end->{zero}) && defined($end->{reused}), 'stats: zero and reused at the end');

open(my $fh, '<', $dlog) or die "no double log: $!";
my @sent = grep { /^> / } <$fh>;
my ($backup) = grep { /^> backup / } @sent;
like($backup // '', qr/"fleecing":\s*true/, 'backup was sent with fleecing: true');
like($backup // '', qr/"devlist":\s*"drive-efidisk0,drive-scsi0,drive-virtio0"/, '... and the devlist');
like($backup // '', qr/"config-file":/, "... and the caller's arguments");
like($backup // '', qr/"speed":\s*2097152/, '... and the speed limit');

for my $d (@disks) {
    my $got = read_image("$target/$d->{key}.raw", 'raw');
    ok($got eq $pit{ $d->{key} }, "$d->{key}: the backup is the point-in-time content");
}
ok($f->cleanup, 'cleanup');
is_deeply(\%records, {}, 'record removed');
is_deeply([list_dir($store_dir)], [], 'images freed');
is_deeply([$vm->node_names], [$vm->nodes_before], "QEMU's nodes as before");
is($vm->job_count, 0, 'no jobs');

done_testing;
