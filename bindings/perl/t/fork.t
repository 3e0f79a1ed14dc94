# A handle used after fork is refused with a clear error; a copy of it
# destroyed in the child runs no callbacks and disturbs neither QEMU, nor the
# parent's run, nor the parent's lock.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Errno ();
use JSON::PP qw(encode_json decode_json);
use POSIX ();
use Test::More;

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir MiB);

# Run $code in a child; it returns a hash of results, sent back as JSON.
sub in_child {
    my ($code) = @_;
    pipe(my $r, my $w) or die "pipe: $!";
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        close($r);
        my $res = eval { $code->() } // { died => "$@" };
        print {$w} encode_json($res);
        close($w);
        exit(0);    # a normal exit: global destruction runs in the child
    }
    close($w);
    my $json = do { local $/; <$r> };
    waitpid($pid, 0);
    is($?, 0, 'the child exited normally');
    return decode_json($json || '{"died":"no answer"}');
}

my $state = tmpdir('state');

subtest 'refused in the child' => sub {
    my $f = Fleece->new(vmid => 100, state_dir => $state);
    my $parent = $$;
    my $res = in_child(sub {
        my %r;
        for my $m (qw(vmid record cleanup progress cancel plan)) {
            eval { $f->$m };
            $r{$m} = "$@";
        }
        eval { $f->set(bwlimit => 1) };
        $r{set} = "$@";
        # Below the .pm's check, the library refuses too.
        eval { $f->{raw}->get_vmid };
        $r{raw} = ref($@) ? [$@->function, $@->code, $@->message] : "$@";
        return \%r;
    });
    is_deeply(delete $res->{raw}, ['fleece_get_vmid', Errno::EPERM(),
        "the handle belongs to process $parent; it cannot be used after fork()"],
        'the library refuses a forked child with EPERM');
    for my $m (sort keys %$res) {
        like($res->{$m}, qr/^Fleece: handle used after fork \(created in pid $parent, this is pid \d+\); make a new handle in this process at /,
            "$m refused");
    }
    is($f->vmid, 100, 'the parent still uses it');
};

need_qemu();

subtest 'a child destroys its copy in the middle of a backup' => sub {
    my $vm = FleeceTest::VM->start(disks => [
        { key => 'scsi0', format => 'raw', size => 8 * MiB, bus => 'scsi' },
    ]);
    my $storage = tmpdir('storage');
    my $target = tmpdir('target');
    my $logfile = "$state/log";
    my $f = Fleece->new(qmp => $vm->qmp_path, vmid => 100, state_dir => $state,
        storage => $storage, bwlimit => 2048,
        log => sub {
            open(my $fh, '>>', $logfile) or die;
            print {$fh} "$$ $_[0] $_[1]\n";
        });
    my $plan = $f->plan;
    ok($f->attach($plan), 'attach');
    ok($f->start($plan, target => { dir => $target, format => 'raw' }), 'start');
    my $parent = $$;

    my $res = in_child(sub {
        my %r;
        eval { $f->progress };
        $r{progress} = "$@";
        # Destroy the child's copy explicitly (fleece_free in the child).
        undef $f;
        # The parent's lock must still be held: a new handle here cannot
        # take it.
        eval { Fleece->new(vmid => 100, state_dir => $state)->cleanup };
        $r{cleanup} = ref($@) ? $@->function . ': ' . $@->message : "$@";
        return \%r;
    });
    like($res->{progress}, qr/^Fleece: handle used after fork \(created in pid $parent/,
        'the child is refused');
    like($res->{cleanup}, qr/^fleece_cleanup: another run holds the lock for VM 100/,
        "destroying the child's copy left the parent's lock in place");

    # A child that just exits: its copy goes in global destruction.
    in_child(sub { return {} });

    my $r;
    1 while !($r = $f->wait(1000));
    is($r, 1, 'the backup completed in the parent');
    ok($f->cleanup, 'cleanup in the parent');
    is_deeply([list_dir($storage)], [], 'storage empty');
    is_deeply([$vm->node_names], [$vm->nodes_before], 'nodes as before');

    open(my $fh, '<', $logfile) or die "no log: $!";
    my @pids = map { (split ' ')[0] } <$fh>;
    ok(@pids > 0, 'the parent logged');
    is_deeply([grep { $_ != $parent } @pids], [], 'no log callback ran in a child');
};

done_testing;
