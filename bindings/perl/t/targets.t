# The 1.0 additions end to end, from Perl: an incremental chain (a full
# backup that starts the bitmap, then an incremental into qcow2 images
# backed by it, each the point in time), a backup into a Perl filehandle,
# and what the plan skips.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use JSON::PP ();
use POSIX ();
use Test::More;

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir read_image allocated_bytes MiB KiB croaks_like fails_like);

need_qemu();

my @disks = (
    { key => 'scsi0', format => 'qcow2', size => 8 * MiB, bus => 'scsi' },
    { key => 'virtio0', format => 'raw', size => 4 * MiB, bus => 'virtio' },
);

sub disk_now {
    my ($vm, $key) = @_;
    my ($d) = grep { $_->{key} eq $key } $vm->disks;
    return read_image($d->{path}, $d->{format});
}

sub backup {
    my ($f, $target, %opts) = @_;
    my $plan = $f->plan(%opts);
    $f->attach($plan);
    $f->start($plan, target => $target);
    my $mid = $f->stats;
    my $ok = eval { $f->wait };
    my $err = $@;
    my $end = $f->stats;
    $f->cleanup;
    die $err if !$ok;
    return ($plan, $mid, $end);
}

subtest 'an incremental chain: bitmap_new, then incremental with a base' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 100, state_dir => tmpdir('state'),
        storage => tmpdir('storage'), drives => ['scsi0']);
    fails_like(sub { $f->plan(incremental => 'chain') }, 'fleece_plan',
        qr/has no dirty bitmap 'chain'/, 'no incremental before the bitmap exists');

    my $full = tmpdir('full');
    my $pit0 = disk_now($vm, 'scsi0');
    my ($plan, $mid, $end) = backup($f, { dir => $full, format => 'raw' },
        incremental => undef, bitmap_new => 'chain');
    ok(read_image("$full/scsi0.raw", 'raw') eq $pit0, 'the full backup is the point in time');
    my @bitmaps = map { @{ $_->{'dirty-bitmaps'} // [] } }
        @{ $vm->qmp('query-named-block-nodes', { flat => JSON::PP::true }) };
    is_deeply([map { $_->{name} } @bitmaps], ['chain'], 'the full backup started the bitmap');
    ok($bitmaps[0]{persistent}, '... persistent in the qcow2 image');

    $vm->guest_io('scsi0', 'write -P 0xaa 1048576 65536');
    $vm->guest_io('scsi0', 'write -P 0xbb 6291456 4096');
    my $pit1 = disk_now($vm, 'scsi0');
    my $inc = tmpdir('inc');
    ($plan, $mid, $end) = backup($f, { dir => $inc, format => 'qcow2', base => $full },
        bitmap_new => undef, incremental => 'chain');
    ok(exists $mid->{dirty}, 'an incremental reports the dirty figure');
    cmp_ok($end->{dirty} // 0, '>=', 65536 + 4096, 'dirty covers what the guest wrote');
    cmp_ok($end->{dirty} // 0, '<=', 4 * MiB, '... and not the whole disk');
    my $got = read_image("$inc/scsi0.qcow2", 'qcow2');
    ok($got eq $pit1, 'the incremental over its base reads as the disk at its point in time');
    cmp_ok(allocated_bytes("$inc/scsi0.qcow2"), '<', 4 * MiB, 'the incremental holds only what changed');
    my $info = `qemu-img info -U --output=json '$inc/scsi0.qcow2'`;
    like($info, qr/"backing-filename":\s*"[^"]*full[^"]*\/scsi0\.raw"/, 'backed by the full backup');
};

subtest 'a backup into a Perl filehandle (stock engine, one drive)' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 101, state_dir => tmpdir('state'),
        storage => tmpdir('storage'));
    my $dir = tmpdir('fd');
    # The image must have the drive's size (libfleece does not size it).
    open(my $fh, '+>', "$dir/scsi0.img") or die "open: $!";
    truncate($fh, 8 * MiB) or die "truncate: $!";
    my $pit = disk_now($vm, 'scsi0');
    backup($f, { fd => $fh }, drives => ['scsi0']);
    ok(defined(fileno($fh)), "the caller's filehandle is still open (the target had a dup)");
    ok(print({$fh} ''), '... and usable');
    close($fh);
    is(-s "$dir/scsi0.img", 8 * MiB, 'the image has the drive size');
    ok(read_image("$dir/scsi0.img", 'raw') eq $pit, 'and the point-in-time content');

    $f->set(drives => undef);
    my $plan = $f->plan;
    $f->attach($plan);
    open($fh, '+>', "$dir/two.img") or die "open: $!";
    fails_like(sub { $f->start($plan, target => { fd => $fh }) }, 'fleece_start',
        qr/single|one drive/, 'a raw fd holds one drive');
    fails_like(sub { $f->start($plan, target => { vma_fd => $fh }) }, 'fleece_start',
        qr/VMA|vma/, 'VMA is for the Proxmox engine');
    ok($f->cleanup, 'cleanup');
};

subtest 'the plan lists what it skips' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 102, state_dir => tmpdir('state'),
        storage => tmpdir('storage'));
    my $plan = $f->plan(drives => ['virtio0']);
    is_deeply([map { $_->{key} } @$plan], ['virtio0'], 'the drive asked for');
    my @skipped = $plan->skipped;
    ok((grep { $_->{name} eq 'scsi0' } @skipped), 'scsi0 is listed as skipped')
        or diag(explain(\@skipped));
    like(join("\n", map { "$_->{name}: $_->{reason}" } @skipped), qr/^scsi0: \S/m, 'with a reason');
    $_->{reason} = 'changed' for $plan->skipped;
    unlike(join(',', map { $_->{reason} } $plan->skipped), qr/changed/,
        'skipped() hands out copies');
};

subtest 'a VMA into a pipe to zstd (Proxmox engine, vma_fd)' => sub {
    my $pve_qemu = $ENV{FLEECE_PVE_QEMU};
    plan(skip_all => 'FLEECE_PVE_QEMU not set (Proxmox\'s patched QEMU)') if !$pve_qemu || !-x $pve_qemu;
    plan(skip_all => 'zstd not installed') if system('zstd --version >/dev/null 2>&1') != 0;
    (my $vma = $pve_qemu) =~ s{[^/]+$}{vma};
    my $vm = FleeceTest::VM->start(disks => \@disks, qemu => [$pve_qemu,
        map { ('-L', $_) } qw(/usr/share/seabios /usr/lib/ipxe/qemu /usr/share/qemu)]);
    my $storage = tmpdir('storage');
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 103, state_dir => tmpdir('state'),
        storage => $storage);
    is($f->engine, 'pve', 'the Proxmox engine');
    my %pit = map { $_->{key} => disk_now($vm, $_->{key}) } @disks;

    my $dir = tmpdir('vma');
    pipe(my $r, my $w) or die "pipe: $!";
    my $zstd = fork() // die "fork: $!";
    if ($zstd == 0) {
        close($w);
        open(STDIN, '<&', $r) or POSIX::_exit(126);
        open(STDOUT, '>', "$dir/backup.vma.zst") or POSIX::_exit(126);
        exec('zstd', '-q', '-c') or POSIX::_exit(127);
    }
    close($r);
    backup($f, { vma_fd => $w });
    ok(defined(fileno($w)), "the caller's end of the pipe is still open (the target had a dup)");
    close($w);    # the last writer: zstd ends
    waitpid($zstd, 0);
    is($?, 0, 'zstd ended fine');
    system("zstd -q -d -c '$dir/backup.vma.zst' > '$dir/backup.vma'") == 0 or die "zstd -d failed";
    my $out = "$dir/extract";
    my $x = `'$vma' extract '$dir/backup.vma' '$out' 2>&1`;
    is($?, 0, 'vma extract') or diag($x);
    for my $d (@disks) {
        ok(read_image("$out/disk-drive-$d->{key}.raw", 'raw') eq $pit{ $d->{key} },
            "$d->{key}: the point in time");
    }
    is_deeply([list_dir($storage)], [], 'fleecing storage empty');
    is_deeply([$vm->node_names], [$vm->nodes_before], "QEMU's nodes as before");
};

done_testing;
