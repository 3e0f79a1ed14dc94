# wait() without timeout and Perl's signals: a %SIG handler that calls
# cancel() ends the wait (ECANCELED), one that dies ends it with its
# exception and leaves the run for cleanup; and while wait() runs, another
# client of QEMU's monitor (qemu-server's own QMP commands) gets its
# greeting at once.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Select;
use IO::Socket::UNIX;
use JSON::PP qw(decode_json encode_json);
use POSIX ();
use Test::More;
use Time::HiRes ();

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir MiB);

need_qemu();

my @disks = ({ key => 'scsi0', format => 'raw', size => 16 * MiB, bus => 'scsi' });

# A run that takes a while: 16 MiB at 1 MiB/s.
sub slow_backup {
    my ($vm, $storage) = @_;
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 100, state_dir => tmpdir('state'),
        storage => $storage, bwlimit => 1024);
    my $plan = $f->plan;
    $f->attach($plan);
    $f->start($plan, target => { dir => tmpdir('target'), format => 'raw' });
    return $f;
}

# Send $sig to this process after $delay seconds, from a child.
sub signal_later {
    my ($sig, $delay) = @_;
    my $parent = $$;
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        Time::HiRes::sleep($delay);
        kill($sig, $parent);
        POSIX::_exit(0);
    }
    return $pid;
}

subtest '$SIG{INT} = sub { $f->cancel } ends a wait without timeout' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $storage = tmpdir('storage');
    my $f = slow_backup($vm, $storage);
    my $handled = 0;
    local $SIG{INT} = sub { $handled++; $f->cancel };
    my $child = signal_later('INT', 1);
    my $t0 = Time::HiRes::time();
    my $ok = eval { $f->wait; 1 };
    my $err = $@;
    my $took = Time::HiRes::time() - $t0;
    waitpid($child, 0);
    ok(!$ok, 'wait croaked');
    is($handled, 1, 'the handler ran while wait() was waiting');
    isa_ok($err, 'Fleece::Error');
    ok(ref($err) && $err->is_cancelled, 'ECANCELED') or diag($err);
    cmp_ok($took, '<', 5, "within seconds of the signal, not at the end of the backup ($took s)");
    is($f->progress->{drives}{scsi0}{result}, 'cancelled', 'the drive was cancelled');
    ok($f->cleanup, 'cleanup');
    is_deeply([list_dir($storage)], [], 'nothing left in the storage');
    is_deeply([$vm->node_names], [$vm->nodes_before], "QEMU's nodes as before");
    is($vm->job_count, 0, 'no jobs');
};

subtest 'a handler that dies ends the wait with its exception' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $storage = tmpdir('storage');
    my $f = slow_backup($vm, $storage);
    # vzdump's handler.
    local $SIG{TERM} = sub { die "interrupted by signal\n" };
    my $child = signal_later('TERM', 1);
    my $ok = eval { $f->wait; 1 };
    my $err = $@;
    waitpid($child, 0);
    ok(!$ok, 'wait croaked');
    is($err, "interrupted by signal\n", "with the handler's exception");
    is($vm->job_count, 1, 'the backup still runs');
    is($f->cancel, 1, 'cancel');
    my $cerr = eval { $f->wait; 1 } ? undef : $@;
    ok(ref($cerr) && $cerr->is_cancelled, 'the next wait sends the cancel') or diag($cerr);
    ok($f->cleanup, 'cleanup');
    is_deeply([list_dir($storage)], [], 'nothing left in the storage');
    is($vm->job_count, 0, 'no jobs');
};

# Connect to the monitor $n times, one after the other; the seconds each
# waited for QEMU's greeting.
sub greeting_delays {
    my ($path, $n) = @_;
    my @delays;
    for (1 .. $n) {
        my $t0 = Time::HiRes::time();
        my $s = IO::Socket::UNIX->new(Type => IO::Socket::UNIX::SOCK_STREAM(), Peer => $path)
            or return "connect: $!";
        my $line = '';
        my $sel = IO::Select->new($s);
        while ($line !~ /\n/) {
            last if !$sel->can_read(10);
            sysread($s, $line, 4096, length($line)) or last;
        }
        return "no greeting: '$line'" if $line !~ /"QMP"/;
        push @delays, Time::HiRes::time() - $t0;
        close($s);
        Time::HiRes::sleep(0.02);
    }
    return \@delays;
}

subtest 'wait() lets go of the monitor between its looks' => sub {
    my $vm = FleeceTest::VM->start(disks => \@disks);
    my $f = slow_backup($vm, tmpdir('storage'));
    pipe(my $r, my $w) or die "pipe: $!";
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        close($r);
        print {$w} encode_json({ delays => greeting_delays($vm->qmp_path, 100) });
        close($w);
        POSIX::_exit(0);
    }
    close($w);
    # The parent waits (and polls QEMU) while the child knocks.
    my $running = 1;
    while ($running && !waitpid($pid, POSIX::WNOHANG())) {
        $running = !$f->wait(500);
    }
    waitpid($pid, 0) if $running;
    my $res = decode_json(do { local $/; <$r> } || '{}');
    my $delays = $res->{delays};
    ok($running, 'the backup ran all along') or diag('it ended before the child was done');
    is(ref($delays), 'ARRAY', '100 connections got a greeting') or return diag($delays);
    is(scalar(@$delays), 100, '... all of them');
    my ($max) = sort { $b <=> $a } @$delays;
    cmp_ok($max, '<', 1, "none waited a second for the greeting (longest $max s)");
    ok($f->cancel, 'cancel');
    eval { $f->wait };
    ok($f->cleanup, 'cleanup');
};

done_testing;
