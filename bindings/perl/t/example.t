# examples/fleece-backup.pl, as a user runs it: a backup of a real QEMU
# into a directory (the point in time, nothing left), and one cancelled
# with SIGINT (exit 130, nothing left either).
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use POSIX ();
use Test::More;
use Time::HiRes ();

use FleeceTest qw(need_qemu tmpdir list_dir read_image MiB);

need_qemu();

my $example = "$FindBin::Bin/../examples/fleece-backup.pl";
my @disks = (
    { key => 'scsi0', format => 'qcow2', size => 8 * MiB, bus => 'scsi' },
    { key => 'virtio0', format => 'raw', size => 4 * MiB, bus => 'virtio' },
);

# Runs the example; returns (exit status, stderr), sending $signal after
# $delay seconds if given.
sub run_example {
    my ($args, $signal, $delay) = @_;
    my $err = tmpdir('example') . '/stderr';
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        open(STDERR, '>', $err) or POSIX::_exit(126);
        exec($^X, $example, @$args) or POSIX::_exit(127);
    }
    if ($signal) {
        Time::HiRes::sleep($delay);
        kill($signal, $pid);
    }
    waitpid($pid, 0);
    my $status = $?;
    open(my $fh, '<', $err) or die;
    return ($status, do { local $/; <$fh> });
}

subtest 'a backup' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my ($storage, $target) = (tmpdir('storage'), tmpdir('target'));
    my %pit = map { $_->{key} => read_image($vm->dir . "/$_->{key}.$_->{format}", $_->{format}) } @disks;
    my ($status, $err) = run_example(['--qmp', $vm->qmp_path, '--vmid', 100,
        '--fleecing-storage', $storage, '--target', $target, '--state-dir', tmpdir('state')]);
    is($status, 0, 'exit status 0') or diag($err);
    like($err, qr/^scsi0: 8388608 bytes, fleecing image vm-100-fleece-0\.qcow2$/m, 'prints the plan');
    like($err, qr/^backed up 12582912 bytes in /m, 'prints the figures');
    for my $d (@disks) {
        ok(read_image("$target/$d->{key}.raw", 'raw') eq $pit{ $d->{key} }, "$d->{key}: the point in time");
    }
    is_deeply([list_dir($storage)], [], 'fleecing storage empty');
    is_deeply([$vm->node_names], [$vm->nodes_before], "QEMU's nodes as before");
};

subtest 'Ctrl-C' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my ($storage, $target) = (tmpdir('storage'), tmpdir('target'));
    my $t0 = Time::HiRes::time();
    my ($status, $err) = run_example(['--qmp', $vm->qmp_path, '--vmid', 100,
        '--fleecing-storage', $storage, '--target', $target, '--bwlimit', 256,
        '--state-dir', tmpdir('state')], 'INT', 2);
    is($status >> 8, 130, 'exit status 130') or diag($err);
    like($err, qr/^cancelling\n.*^cancelled$/ms, 'says so') or diag($err);
    cmp_ok(Time::HiRes::time() - $t0, '<', 15, 'at once, not after the whole backup');
    is_deeply([list_dir($storage)], [], 'fleecing storage empty');
    is_deeply([list_dir($target)], [], 'no unfinished backup left in the target');
    is_deeply([$vm->node_names], [$vm->nodes_before], "QEMU's nodes as before");
    is($vm->job_count, 0, 'no jobs');
};

done_testing;
