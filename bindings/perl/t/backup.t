# End to end, driven entirely from Perl: a fleecing backup of a real QEMU
# (no guest OS) shaped like a Proxmox VM, slowed down so that guest writes
# land ahead of the backup cursor; the backup must hold the point-in-time
# content, the guest the new data, and nothing may be left behind.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use JSON::PP qw(decode_json);
use Test::More;

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir read_image allocated_bytes MiB KiB);

need_qemu();

my $VMID = 100;
my @disks = (
    { key => 'efidisk0', format => 'raw', size => 528 * KiB, bus => 'virtio', fleeced => 0 },
    { key => 'scsi0', format => 'qcow2', size => 16 * MiB, bus => 'scsi', fleeced => 1 },
    { key => 'scsi1', format => 'raw', size => 8 * MiB + 4096, bus => 'scsi', fleeced => 1 },
    { key => 'tpmstate0', format => 'raw', size => 4 * MiB, bus => 'virtio', fleeced => 0 },
    { key => 'virtio0', format => 'raw', size => 8 * MiB, bus => 'virtio', fleeced => 1 },
);

# Overwrite the end of every disk through the guest device: ahead of the
# backup cursor, which starts at 0.  Returns the bytes written to fleeced
# drives.
sub overwrite_tails {
    my ($vm, $byte) = @_;
    my $written = 0;
    for my $d (@disks) {
        my $len = $d->{size} / 2 < MiB ? int($d->{size} / 2) : MiB;
        my $off = ($d->{size} - $len) & ~4095;
        $len = $d->{size} - $off;
        $vm->guest_io($d->{key}, sprintf('write -P 0x%02x %d %d', $byte, $off, $len));
        $written += $len if $d->{fleeced};
    }
    return $written;
}

sub run_backup {
    my (%opt) = @_;
    my $name = $opt{name};
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $state = tmpdir('state');
    my $target = tmpdir('target');
    my $store_dir = tmpdir('storage');
    my (@log, %progress, %records);

    my $storage = $store_dir;
    my @record;
    if ($opt{perl_callbacks}) {
        # qemu-server's shape: its own storage and its own record.
        $storage = {
            id    => 'pve:local',
            alloc => sub {
                my ($img, $format, $size) = @_;
                my $path = "$store_dir/$img";
                system('qemu-img', 'create', '-q', '-f', $format, $path, $size) == 0
                    or die "qemu-img create $path failed\n";
                return "local:$img";
            },
            remove => sub { (my $img = $_[0]) =~ s/^local://; unlink("$store_dir/$img"); return },
            path => sub { (my $img = $_[0]) =~ s/^local://; return "$store_dir/$img" },
            supports => { qcow2 => 1, discard => 1, path => 1 },
        };
        @record = (record => {
            load  => sub { $records{ $_[0] } },
            store => sub { defined($_[1]) ? ($records{ $_[0] } = $_[1]) : delete $records{ $_[0] } },
        });
    }

    my $f = Fleece->new(
        qmp       => $vm->qmp_path,
        vmid      => $VMID,
        state_dir => $state,
        storage   => $storage,
        @record,
        log       => sub { push @log, "$_[0]: $_[1]" },
        progress  => sub { my ($drive, $done, $total) = @_; push @{ $progress{$drive} }, [$done, $total] },
    );
    is($f->engine, 'qemu', "$name: engine");

    my $plan = $f->plan;
    is_deeply([map { $_->{key} } @$plan], [map { $_->{key} } @disks], "$name: plan drives");
    is_deeply([map { $_->{fleeced} } @$plan], [map { $_->{fleeced} } @disks], "$name: fleeced");
    is_deeply([map { $_->{size} } @$plan], [map { $_->{size} } @disks], "$name: exact sizes");
    my @images = map { $_->{image} } $plan->fleeced;
    is_deeply(\@images, [map { "vm-100-fleece-$_.qcow2" } 0 .. 2], "$name: image names");

    # The point in time: the guest-visible content now (the VM is paused).
    my %pit = map { $_->{key} => read_image($vm->dir . "/$_->{key}.$_->{format}", $_->{format}) } @disks;

    # 2 MiB/s per job: the 16 MiB disk takes ~8 s, time to write ahead.
    ok($f->attach($plan, bwlimit => 2048), "$name: attach");
    is_deeply([list_dir($store_dir)], \@images, "$name: images allocated");
    ok($f->start($plan, target => { dir => $target, format => $opt{format} }, bwlimit => 2048),
        "$name: start");

    my $written = overwrite_tails($vm, 0xee);
    my $peak = 0;
    $peak += allocated_bytes("$store_dir/$_") for @images;
    # What the guest overwrote on fleeced drives, not yet backed up, went to
    # the fleecing images first.
    cmp_ok($peak, '>=', $written - 2 * 4096,
        "$name: the old data went to the fleecing images ($peak bytes for $written written)");

    my $mid = $f->progress;
    cmp_ok($mid->{done}, '<=', $mid->{total}, "$name: progress while running");
    my $stats = $f->stats;
    is($stats->{total}, $mid->{total}, "$name: stats total = progress total");
    cmp_ok($stats->{done}, '<', $stats->{total}, "$name: stats: not done yet");
    is($stats->{finishing}, 0, "$name: stats: not finishing");
    ok(!exists $stats->{dirty}, "$name: stats: no dirty figure without a bitmap");
    is($f->stats('scsi1')->{total}, 8 * MiB + 4096, "$name: stats of one drive");
    is($f->status->{run}, 'active', "$name: status: the run is active");
    is_deeply([sort keys %{ $mid->{drives} }], [sort map { $_->{key} } @disks],
        "$name: progress per drive");
    is($f->wait(0), 0, "$name: still running after the writes") or diag(join("\n", @log));

    my $r = eval { $f->wait };
    is($r, 1, "$name: the backup succeeded") or diag($@, join("\n", @log));
    is($mid->{drives}{scsi0}{result}, undef, "$name: scsi0 had no result while running");
    my $end = $f->progress;
    is($end->{done}, $end->{total}, "$name: progress complete");
    my $end_stats = $f->stats;
    is($end_stats->{done}, $end_stats->{total}, "$name: stats complete");
    cmp_ok($end_stats->{elapsed_ms}, '>=', 4000, "$name: stats: elapsed");
    is_deeply([map { $end->{drives}{$_}{result} } sort keys %{ $end->{drives} }],
        [('ok') x @disks], "$name: every drive's result is ok");
    # 16 MiB at 2 MiB/s
    cmp_ok($end->{drives}{scsi0}{elapsed_ms}, '>=', 4000, "$name: scsi0 took its time");
    ok(scalar(keys %progress) >= 3, "$name: progress callback per drive");
    for my $key (sort keys %progress) {
        my @p = @{ $progress{$key} };
        is_deeply([grep { $p[$_][0] < $p[$_ - 1][0] } 1 .. $#p], [],
            "$name: $key: progress never goes back");
    }

    # discard-source freed what the backup copied.
    my $after = 0;
    $after += allocated_bytes("$store_dir/$_") for @images;
    cmp_ok($after, '<', $peak / 2, "$name: fleecing images emptied as the backup copied");

    if ($opt{perl_callbacks}) {
        ok($records{$VMID}, "$name: record kept through the callbacks meanwhile");
    } else {
        ok(-e "$state/$VMID.json", "$name: record file meanwhile");
    }
    ok($f->cleanup, "$name: cleanup");

    # Nothing left.
    is_deeply([$vm->node_names], [$vm->nodes_before], "$name: QEMU's nodes as before");
    is($vm->job_count, 0, "$name: no jobs");
    is_deeply([list_dir($store_dir)], [], "$name: storage empty");
    ok(!-e "$state/$VMID.json", "$name: no record file");
    is_deeply(\%records, {}, "$name: no record");
    is($f->record, undef, "$name: \$f->record is undef");
    my $roots = $vm->device_roots;
    is_deeply([grep { $roots->{$_} =~ /fleece/ } sort keys %$roots], [],
        "$name: devices back on their own nodes");

    # The backup is the point in time, the guest has the new data.
    for my $d (@disks) {
        my $got = read_image("$target/$d->{key}.$opt{format}", $opt{format});
        is(length($got), $d->{size}, "$name: $d->{key}: backup size");
        ok($got eq $pit{ $d->{key} }, "$name: $d->{key}: backup is the point-in-time content");
        my $now = read_image($vm->dir . "/$d->{key}.$d->{format}", $d->{format});
        is(ord(substr($now, -1)), 0xee, "$name: $d->{key}: the guest's write is on the disk");
        ok($now ne $pit{ $d->{key} }, "$name: $d->{key}: which differs from the backup");
    }
    $vm->stop;
}

subtest 'directory storage, raw target' => sub {
    run_backup(name => 'dir/raw', format => 'raw');
};

subtest 'Perl storage and record, qcow2 target' => sub {
    run_backup(name => 'perl/qcow2', format => 'qcow2', perl_callbacks => 1);
};

done_testing;
