# Error paths: bad arguments croak before reaching C, the library's errors
# croak with its message, and a QEMU that goes away is reported (and cleaned
# up after) rather than hanging or crashing.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Errno qw(ENOENT);
use POSIX ();
use Test::More;

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir MiB);

my $state = tmpdir('state');

sub croaks_like {
    my ($code, $re, $name) = @_;
    my $ok = eval { $code->(); 1 };
    my $err = $@;
    ok(!$ok, "$name: croaks") or return;
    like($err, $re, "$name: message") or diag($err);
    return $err;
}

subtest 'arguments' => sub {
    croaks_like(sub { Fleece->new }, qr/vmid is required/, 'no vmid');
    croaks_like(sub { Fleece->new(vmid => 100, bogus => 1) },
        qr/unknown new option\(s\): bogus/, 'unknown option');
    croaks_like(sub { Fleece->new(vmid => 'abc') },
        qr/^Fleece: vmid must be an integer from 0 to 4294967295, not 'abc'$/, 'vmid not a number');
    croaks_like(sub { Fleece->new(vmid => -1) }, qr/vmid must be an integer/, 'negative vmid');
    croaks_like(sub { Fleece->new(vmid => 2**32 + 1) }, qr/vmid must be an integer/,
        'vmid too large for uint32_t is not truncated');
    croaks_like(sub { Fleece->new(vmid => 1.5) }, qr/vmid must be an integer/, 'fractional vmid');
    my $err = croaks_like(sub { Fleece->new(vmid => 0) },
        qr/^fleece_set_vmid: invalid vmid 0: must be 1 to 999999999\n\z/, 'vmid 0 (library)');
    is(Fleece::errno(), Errno::EINVAL(), 'errno of the library error');
    croaks_like(sub { Fleece->new(vmid => 100, state_dir => "/tmp/a\0b") },
        qr/state_dir|dir contains a NUL byte/, 'NUL byte in a path');
    croaks_like(sub { Fleece->new(vmid => 100, engine => 'xen') },
        qr/unknown engine 'xen'/, 'unknown engine');
    croaks_like(sub { Fleece->new(vmid => 100, format => 'vmdk') },
        qr/^fleece_set_image_format: unknown image format 'vmdk'/, 'unknown image format');
    croaks_like(sub { Fleece->new(vmid => 100, storage => 'relative/dir') },
        qr/^fleece_storage_new_dir: directory relative\/dir is not an absolute path/,
        'relative storage dir');
    croaks_like(sub { Fleece->new(vmid => 100, storage => { alloc => sub {}, free => sub {} }) },
        qr/storage path callback must be a code reference/, 'storage without path');
    croaks_like(sub { Fleece->new(vmid => 100, storage => { alloc => sub {}, free => sub {},
                path => sub {}, supports => { zfs => 1 } }) },
        qr/unknown storage supports option\(s\): zfs/, 'unknown storage capability');
    croaks_like(sub { Fleece->new(vmid => 100, record => { load => sub {} }) },
        qr/record store callback must be a code reference/, 'record without store');
    croaks_like(sub { Fleece->new(vmid => 100, log => 'not code') },
        qr/log callback must be a code reference/, 'log not code');
    croaks_like(sub { Fleece->new(vmid => 100, drives => 'scsi0') },
        qr/drives must be an array reference/, 'drives not an array');
    croaks_like(sub { Fleece->new(vmid => 100, drives => ['scsi 0']) },
        qr/^fleece_set_drives: invalid drive key 'scsi 0'/, 'bad drive key');
    croaks_like(sub { Fleece->new(vmid => 100, qmp => tmpdir('nosock') . '/none.sock',
                state_dir => $state) },
        qr/^fleece_connect: /, 'no QMP socket');

    croaks_like(sub { Fleece::Raw::Target->new_dir('rel', 'raw') },
        qr/^fleece_target_new_dir: the target directory 'rel' must be an absolute path/,
        'relative target dir');
    croaks_like(sub { Fleece::Raw::Target->new_dir($state, 'vmdk') },
        qr/^fleece_target_new_dir: unknown target format 'vmdk'/, 'bad target format');
    croaks_like(sub { Fleece::Raw::Target->new_nbd('http://x/') },
        qr/^fleece_target_new_nbd: unsupported NBD URI scheme 'http'/, 'bad NBD URI');
    croaks_like(sub { Fleece::Raw::Target->new_pve('[1]') },
        qr/^fleece_target_new_pve: the backup arguments must be a JSON object/, 'bad PVE args');
    ok(Fleece::Raw::Target->new_pve('{"format":"vma"}'), 'a PVE target');
    ok(Fleece::Raw::Target->new_nbd('nbd+unix:///?socket=/run/x.sock'), 'an NBD target');
    croaks_like(sub { Fleece::Raw::Handle::set_vmid('not a handle', 1) },
        qr/handle is not a Fleece::Raw::Handle object/, 'not a handle');
};

subtest 'an unconnected handle' => sub {
    my $f = Fleece->new(vmid => 100, state_dir => $state);
    is($f->vmid, 100, 'vmid');
    croaks_like(sub { $f->engine }, qr/^fleece_get_engine: the engine is chosen when connecting/,
        'no engine yet');
    croaks_like(sub { $f->plan }, qr/^fleece_plan: not connected: call fleece_connect\(\) first\n\z/,
        'plan');
    croaks_like(sub { $f->wait(0) }, qr/^fleece_wait: no backup is running/, 'wait');
    croaks_like(sub { $f->cancel }, qr/^fleece_cancel: no backup is running/, 'cancel');
    croaks_like(sub { $f->progress }, qr/^fleece_get_progress: no backup is set up/, 'progress');
    croaks_like(sub { $f->attach([]) }, qr/expected a plan returned by \$f->plan/, 'attach a non-plan');
    croaks_like(sub { $f->start(undef, target => { dir => $state }) },
        qr/expected a plan/, 'start without a plan');
    croaks_like(sub { $f->plan(qmp_timeout => 1) }, qr/unknown plan option\(s\): qmp_timeout/,
        'a handle setting given to plan');
    is($f->record, undef, 'no record');
    is(Fleece::errno(), ENOENT, '... ENOENT');
    ok($f->cleanup, 'nothing to clean up is success');
};

need_qemu();

my @disks = (
    { key => 'scsi0', format => 'qcow2', size => 8 * MiB, bus => 'scsi' },
    { key => 'virtio0', format => 'raw', size => 4 * MiB, bus => 'virtio' },
);

subtest 'a live QEMU' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks, extra_qmp => ['qmp2.sock']);
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 100, state_dir => $state,
        storage => tmpdir('storage'));
    is($f->engine, 'qemu', 'stock QEMU engine');
    croaks_like(sub { $f->plan(drives => ['scsi7']) },
        qr/^fleece_plan: drive 'scsi7' not found; the VM has: scsi0, virtio0/, 'unknown drive');
    my $plan = $f->plan(drives => undef);
    is(scalar @$plan, 2, 'both drives');
    my $raw = Fleece::Plan::_raw_of($plan);
    croaks_like(sub { $raw->get_key(99) }, qr/^fleece_plan_get_key: no drive 99 in the plan/,
        'bad index');
    croaks_like(sub { $f->start($plan, target => { dir => tmpdir('t') }) },
        qr/^fleece_start: nothing attached: call fleece_attach\(\) with this plan first/,
        'start before attach');
    croaks_like(sub { $f->start($plan, target => { dir => '/x', nbd => 'nbd://h' }) },
        qr/exactly one of dir, nbd or pve/, 'two targets');

    # libfleece takes job settings only before attach: start() accepts them
    # unchanged and says where to give them otherwise.
    croaks_like(sub { $f->plan(incremental => 'nope') },
        qr/^fleece_plan: drive scsi0 has no dirty bitmap 'nope' on its node \S+: add it with block-dirty-bitmap-add/,
        'incremental without the bitmap');
    $f->set(incremental => undef, bwlimit => 1024);
    ok($f->attach($plan), 'attach');
    croaks_like(sub { $f->attach($plan) },
        qr/^fleece_attach: a run is already set up on this handle; call fleece_cleanup\(\) first/,
        'attach twice');
    croaks_like(sub { $f->start($plan, target => { dir => tmpdir('t') }, incremental => 'b9') },
        qr/^Fleece: start: incremental cannot change after attach; give it to new\(\), set\(\), plan\(\) or attach\(\) \(fleece_set_bitmap: cannot change settings while a run is set up/,
        'incremental changed after attach');
    croaks_like(sub { $f->start($plan, target => { dir => '/nonexistent-fleece-target' }) },
        qr/^fleece_target_new_dir: the target directory \/nonexistent-fleece-target does not exist/,
        'missing target dir');
    my $target = tmpdir('t');
    ok($f->start($plan, target => { dir => $target }, bwlimit => 1024), 'start with the same bwlimit');
    ok($f->cancel, 'cancel');
    my $err = croaks_like(sub { 1 while !$f->wait(1000) }, qr/^fleece_wait: .*cancel/i, 'wait after cancel');
    is(Fleece::errno(), Errno::ECANCELED(), 'ECANCELED');
    is($f->progress->{drives}{scsi0}{result}, 'cancelled', "scsi0's result");
    croaks_like(sub { $f->{raw}->get_drive_result('scsi9') },
        qr/^fleece_get_drive_result: /, 'a drive not in the backup');
    ok($f->cleanup, 'cleanup');
    is_deeply([$vm->node_names], [$vm->nodes_before], 'nodes as before');
    # A QMP monitor serves one client at a time: a second handle needs its own.
    croaks_like(sub { Fleece->new(qmp => $vm->dir . '/qmp2.sock', vmid => 100,
                state_dir => $state, engine => 'pve') },
        qr/^fleece_connect: the Proxmox engine needs Proxmox's patched QEMU/,
        'PVE engine on stock QEMU');
};

subtest 'QEMU gone before the run' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 101, state_dir => $state,
        storage => tmpdir('storage'));
    $vm->kill_now;
    croaks_like(sub { $f->plan }, qr/^fleece_plan: .*\S/, 'plan fails');
    isnt(Fleece::errno(), 0, 'with an errno');
    ok($f->cleanup, 'cleanup: nothing recorded, nothing to do');
};

subtest 'QEMU gone in the middle of a backup' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $storage = tmpdir('storage');
    my @log;
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 102, state_dir => $state,
        storage => $storage, bwlimit => 256, log => sub { push @log, "$_[0]: $_[1]" });
    my $plan = $f->plan;
    ok($f->attach($plan), 'attached');
    ok($f->start($plan, target => { dir => tmpdir('target'), format => 'raw' }), 'started');
    is($f->wait(200), 0, 'running');
    $vm->kill_now;
    my $t0 = time;
    croaks_like(sub { 1 while !$f->wait(1000) }, qr/^fleece_wait: .*\S/, 'wait reports it');
    cmp_ok(time - $t0, '<', 60, '... without hanging');
    ok(defined($f->record), 'the record is kept');
    ok(eval { $f->cleanup }, 'cleanup frees the images of a VM whose QEMU is gone')
        or diag($@, join("\n", @log));
    is_deeply([list_dir($storage)], [], 'storage empty');
    is($f->record, undef, 'record removed');
};

subtest 'the process and QEMU gone: recovery from the record' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $storage = tmpdir('storage');
    my $target = tmpdir('target');
    pipe(my $r, my $w) or die "pipe: $!";
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        close($r);
        my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 103, state_dir => $state,
            storage => $storage, bwlimit => 256);
        my $plan = $f->plan;
        $f->attach($plan);
        $f->start($plan, target => { dir => $target, format => 'raw' });
        syswrite($w, "started\n");
        sleep(60);
        POSIX::_exit(0);
    }
    close($w);
    is(scalar(<$r>), "started\n", 'a child started a backup');
    kill('KILL', $pid);
    waitpid($pid, 0);
    $vm->kill_now;
    is(scalar(list_dir($storage)), 2, 'its images are left');

    my @log;
    ok(eval { Fleece->cleanup(vmid => 103, state_dir => $state,
            log => sub { push @log, "$_[0]: $_[1]" }) },
        'Fleece->cleanup from the record file') or diag($@);
    like(join("\n", @log), qr/QEMU of VM 103 is gone|cannot reach QEMU/, 'says QEMU is gone')
        or diag(join("\n", @log));
    is_deeply([list_dir($storage)], [], 'images freed');
    is(Fleece->new(vmid => 103, state_dir => $state)->record, undef, 'record removed');
};

done_testing;
