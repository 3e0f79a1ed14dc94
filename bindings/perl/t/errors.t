# Error paths: bad arguments croak with a plain message before reaching C,
# the library's errors croak with a Fleece::Error (the message without the
# C function in front, errno, function), and a QEMU that goes away is
# reported (and cleaned up after) rather than hanging or crashing.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Errno qw(EBUSY ECANCELED EINVAL ENOENT ENOTCONN);
use POSIX ();
use Test::More;

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir MiB croaks_like fails_like);

my $state = tmpdir('state');

subtest 'Fleece::Error' => sub {
    my $e = Fleece::Error->new(message => 'it broke', code => EBUSY, function => 'fleece_attach');
    is("$e", "it broke\n", 'stringifies to the message with a newline');
    is($e->message, 'it broke', 'message');
    is($e->code, EBUSY, 'code');
    is($e->errno, EBUSY, 'errno');
    is($e->function, 'fleece_attach', 'function');
    ok($e->is_busy, 'is_busy');
    ok(!$e->is_cancelled, 'not is_cancelled');
    ok($e ? 1 : 0, 'true in boolean context');
    like("failed: $e", qr/^failed: it broke$/, 'interpolates');
    ok(Fleece::Error->new(code => ECANCELED)->is_cancelled, 'is_cancelled');
    ok(!eval { die $e }, 'can be thrown');
    is(ref($@), 'Fleece::Error', '... and caught as itself');
};

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
    my $err = fails_like(sub { Fleece->new(vmid => 0) }, 'fleece_set_vmid',
        qr/^invalid vmid 0: must be 1 to 999999999\z/, 'vmid 0 (library)');
    is($err->code, EINVAL, 'the error has the errno');
    ok($err->is_invalid, '... is_invalid');
    is(Fleece::errno(), EINVAL, 'Fleece::errno() too');
    croaks_like(sub { Fleece->new(vmid => 100, state_dir => "/tmp/a\0b") },
        qr/state_dir|dir contains a NUL byte/, 'NUL byte in a path');
    croaks_like(sub { Fleece->new(vmid => 100, engine => 'xen') },
        qr/unknown engine 'xen'/, 'unknown engine');
    fails_like(sub { Fleece->new(vmid => 100, format => 'vmdk') }, 'fleece_set_image_format',
        qr/^unknown image format 'vmdk'/, 'unknown image format');
    fails_like(sub { Fleece->new(vmid => 100, storage => 'relative/dir') },
        'fleece_storage_new_dir', qr/^directory relative\/dir is not an absolute path/,
        'relative storage dir');
    my %cb = (id => 'perl:test', alloc => sub {}, remove => sub {});
    croaks_like(sub { Fleece->new(vmid => 100, storage => { %cb }) },
        qr/^Fleece: a callback storage needs a path or a blockdev callback/, 'storage without path');
    croaks_like(sub { Fleece->new(vmid => 100, storage => { %cb, path => sub {}, free => sub {} }) },
        qr/unknown storage option\(s\): free/, 'free is called remove now');
    croaks_like(sub { Fleece->new(vmid => 100, storage => { %cb, id => undef, path => sub {} }) },
        qr/^Fleece: a callback storage needs an id/, 'storage without id');
    fails_like(sub { Fleece->new(vmid => 100, storage => { %cb, id => "a\tb", path => sub {} }) },
        'fleece_storage_new_callback', qr/^the storage id must be 1 to 256 printable characters/,
        'storage id with a tab');
    croaks_like(sub { Fleece->new(vmid => 100, storage => { %cb, path => sub {},
                supports => { zfs => 1 } }) },
        qr/unknown storage supports option\(s\): zfs/, 'unknown storage capability');
    croaks_like(sub { Fleece->new(vmid => 100, storage => { rbd => { pool => 'rbd', user => 'x' } }) },
        qr/unknown rbd storage option\(s\): user/, 'unknown rbd option');
    croaks_like(sub { Fleece->new(vmid => 100, incremental => 'a', bitmap_new => 'b') },
        qr/^Fleece: give incremental .* or bitmap_new .*, not both/, 'both bitmap options');
    croaks_like(sub { Fleece->new(vmid => 100, record => { load => sub {} }) },
        qr/record store callback must be a code reference/, 'record without store');
    croaks_like(sub { Fleece->new(vmid => 100, log => 'not code') },
        qr/log callback must be a code reference/, 'log not code');
    croaks_like(sub { Fleece->new(vmid => 100, drives => 'scsi0') },
        qr/drives must be an array reference/, 'drives not an array');
    fails_like(sub { Fleece->new(vmid => 100, drives => ['scsi 0']) }, 'fleece_set_drives',
        qr/^invalid drive key 'scsi 0'/, 'bad drive key');
    fails_like(sub { Fleece->new(vmid => 100, qmp => tmpdir('nosock') . '/none.sock',
                state_dir => $state) }, 'fleece_connect', qr/^cannot connect to QMP socket /,
        'no QMP socket');

    fails_like(sub { Fleece::Raw::Target->new_dir('rel', 'raw') }, 'fleece_target_new_dir',
        qr/^the target directory 'rel' must be an absolute path/, 'relative target dir');
    fails_like(sub { Fleece::Raw::Target->new_dir($state, 'vmdk') }, 'fleece_target_new_dir',
        qr/^unknown target format 'vmdk'/, 'bad target format');
    fails_like(sub { Fleece::Raw::Target->new_dir($state, 'raw')->set_base('/nonexistent-base') },
        'fleece_target_set_base', qr/^the base directory '\/nonexistent-base' must be an existing/,
        'missing base dir');
    fails_like(sub { Fleece::Raw::Target->new_nbd('http://x/') }, 'fleece_target_new_nbd',
        qr/^unsupported NBD URI scheme 'http'/, 'bad NBD URI');
    fails_like(sub { Fleece::Raw::Target->new_pve('[1]') }, 'fleece_target_new_pve',
        qr/^the backup arguments must be a JSON object/, 'bad PVE args');
    open(my $ro, '<', '/dev/null') or die;
    fails_like(sub { Fleece::Raw::Target->new_fd(POSIX::dup(fileno($ro)), 'raw') },
        'fleece_target_new_fd', qr/not open read-write|open read-only/, 'read-only fd target');
    fails_like(sub { Fleece::Raw::Target->new_fd(POSIX::dup(fileno($ro)), 'tar') },
        'fleece_target_new_fd', qr/^unknown fd target format 'tar'/, 'bad fd target format');
    croaks_like(sub { Fleece::_target({ fd => 'nope' }) },
        qr/^Fleece: target fd is not an open filehandle or file descriptor/, 'fd target not a fd');
    croaks_like(sub { Fleece::_target({ vma_fd => \*STDOUT, format => 'raw' }) },
        qr/unknown target option\(s\): format/, 'vma_fd takes no format');
    ok(Fleece::Raw::Target->new_pve('{"format":"vma"}'), 'a PVE target');
    ok(Fleece::Raw::Target->new_nbd('nbd+unix:///?socket=/run/x.sock'), 'an NBD target');
    croaks_like(sub { Fleece::Raw::Handle::set_vmid('not a handle', 1) },
        qr/handle is not a Fleece::Raw::Handle object/, 'not a handle');
};

subtest 'the RBD storage' => sub {
    my %rbd = (pool => 'rbd', namespace => 'fleece', conf => '/etc/ceph/ceph.conf',
        id => 'admin', keyring => '/etc/ceph/ceph.client.admin.keyring', object_size => 4194304);
    my $st = eval { Fleece::Raw::Storage->new_rbd('rbd', 'fleece') };
    if (!$st) {
        # Built without librbd: the library says so, the binding passes it on.
        my $err = fails_like(sub { Fleece->new(vmid => 100, storage => { rbd => \%rbd }) },
            'fleece_storage_new_rbd', qr/built without librbd/, 'no RBD in this libfleece');
        ok($err->is_unsupported, 'ENOTSUP');
        return;
    }
    fails_like(sub { $st->set_option('bogus', 'x') }, 'fleece_storage_set_option', qr/bogus/,
        'an unknown option');
    ok(Fleece->new(vmid => 100, storage => { rbd => \%rbd }), 'an RBD storage with every option');
};

subtest 'an unconnected handle' => sub {
    my $f = Fleece->new(vmid => 100, state_dir => $state);
    is($f->vmid, 100, 'vmid');
    fails_like(sub { $f->engine }, 'fleece_get_engine', qr/^the engine is chosen when connecting/,
        'no engine yet');
    my $err = fails_like(sub { $f->plan }, 'fleece_plan',
        qr/^not connected: call fleece_connect\(\) first\z/, 'plan');
    is($err->code, ENOTCONN, 'plan: ENOTCONN');
    fails_like(sub { $f->wait(0) }, 'fleece_wait', qr/^no backup is running/, 'wait');
    is($f->cancel, 0, 'cancel without a run: 0, no croak (it is for signal handlers)');
    fails_like(sub { $f->progress }, 'fleece_get_progress', qr/^no backup is set up/, 'progress');
    fails_like(sub { $f->stats }, 'fleece_get_stat', qr/^no backup is set up/, 'stats');
    my $status = $f->status;
    is($status->{run}, 'none', 'status: no run');
    is($status->{vmid}, 100, 'status: vmid');
    is($status->{record}, undef, 'status: no record');
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
    fails_like(sub { $f->plan(drives => ['scsi7']) }, 'fleece_plan',
        qr/^drive 'scsi7' not found; the VM has: scsi0, virtio0/, 'unknown drive');
    my $plan = $f->plan(drives => undef);
    is(scalar @$plan, 2, 'both drives');
    my $raw = Fleece::Plan::_raw_of($plan);
    fails_like(sub { $raw->get_key(99) }, 'fleece_plan_get_key', qr/^no drive 99 in the plan/,
        'bad index');
    fails_like(sub { $raw->get_size(-1) }, 'fleece_plan_get_size', qr/-1/, 'negative index');
    fails_like(sub { $raw->get_skipped_name(0) }, 'fleece_plan_get_skipped_name',
        qr/^no skipped entry 0/, 'bad skipped index');
    fails_like(sub { $f->start($plan, target => { dir => tmpdir('t') }) }, 'fleece_start',
        qr/^nothing attached: call fleece_attach\(\) with this plan first/,
        'start before attach');
    croaks_like(sub { $f->start($plan, target => { dir => '/x', nbd => 'nbd://h' }) },
        qr/exactly one of dir, fd, nbd, pve, vma_fd/, 'two targets');
    fails_like(sub { $f->{raw}->attach($raw, 4) }, 'fleece_attach', qr/^unknown flags/,
        'attach with an unknown flag');

    # libfleece takes job settings only before attach: start() accepts them
    # unchanged and says where to give them otherwise.
    fails_like(sub { $f->plan(incremental => 'nope') }, 'fleece_plan',
        qr/^drive scsi0 has no dirty bitmap 'nope'/, 'incremental without the bitmap');
    $f->set(incremental => undef, bwlimit => 1024);
    ok($f->attach($plan), 'attach');
    my $err = fails_like(sub { $f->attach($plan) }, 'fleece_attach',
        qr/^a run is already set up on this handle; call fleece_cleanup\(\) first/,
        'attach twice');
    ok($err->is_busy, 'attach twice: EBUSY');
    croaks_like(sub { $f->start($plan, target => { dir => tmpdir('t') }, incremental => 'b9') },
        qr/^Fleece: start: incremental cannot change after attach; give it to new\(\), set\(\), plan\(\) or attach\(\) \(cannot change settings while a run is set up/,
        'incremental changed after attach');
    fails_like(sub { $f->start($plan, target => { dir => '/nonexistent-fleece-target' }) },
        'fleece_target_new_dir', qr/^the target directory \/nonexistent-fleece-target does not exist/,
        'missing target dir');
    fails_like(sub { $f->start($plan, target => { pve => { format => 'vma' } }) }, 'fleece_start',
        qr/./, 'a Proxmox target on the stock engine');
    my $target = tmpdir('t');
    ok($f->start($plan, target => { dir => $target }, bwlimit => 2048),
        'start, changing bwlimit (allowed until start)');
    is($f->cancel, 1, 'cancel');
    $err = fails_like(sub { 1 while !$f->wait(1000) }, 'fleece_wait', qr/cancel/i, 'wait after cancel');
    ok($err->is_cancelled, 'ECANCELED');
    is(Fleece::errno(), ECANCELED, 'Fleece::errno() too');
    is($f->progress->{drives}{scsi0}{result}, 'cancelled', "scsi0's result");
    fails_like(sub { $f->{raw}->get_drive_result('scsi9') }, 'fleece_get_drive_result',
        qr/^drive 'scsi9' is not in the backup/, 'a drive not in the backup');
    ok($f->cleanup, 'cleanup');
    is_deeply([$vm->node_names], [$vm->nodes_before], 'nodes as before');
    fails_like(sub { Fleece->new(qmp => $vm->dir . '/qmp2.sock', vmid => 100,
                state_dir => $state, engine => 'pve') }, 'fleece_connect',
        qr/^the Proxmox engine needs Proxmox's patched QEMU/, 'PVE engine on stock QEMU');
};

subtest 'QEMU gone before the run' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 101, state_dir => $state,
        storage => tmpdir('storage'));
    $vm->kill_now;
    my $err = fails_like(sub { $f->plan }, 'fleece_plan', qr/\S/, 'plan fails');
    isnt($err->code, 0, 'with an errno');
    ok(eval { $f->cleanup }, 'cleanup: nothing recorded, nothing to do') or diag($@);
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
    fails_like(sub { $f->wait }, 'fleece_wait', qr/\S/, 'wait reports it');
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
    my $err = fails_like(sub { Fleece->cleanup(vmid => 103, state_dir => $state) },
        'fleece_cleanup', qr/^the fleecing images of VM 103 are in directory \Q$storage\E, not in the storage given now \(none\)/,
        'without the storage the images are in');
    is(scalar(list_dir($storage)), 2, '... nothing is freed');
    ok(eval { Fleece->cleanup(vmid => 103, state_dir => $state, storage => $storage,
            log => sub { push @log, "$_[0]: $_[1]" }) },
        'Fleece->cleanup from the record file, with its storage') or diag($@);
    like(join("\n", @log), qr/QEMU is gone .*: nothing to undo there/, 'says QEMU is gone')
        or diag(join("\n", @log));
    is_deeply([list_dir($storage)], [], 'images freed');
    is(Fleece->new(vmid => 103, state_dir => $state)->record, undef, 'record removed');
};

done_testing;
