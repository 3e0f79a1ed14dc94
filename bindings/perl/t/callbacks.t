# Callbacks as Perl code: a storage that allocates files in a temp dir, a
# record kept in a hash, log and progress; exceptions thrown in each of them
# become the reason (and errno) of a library error, or warnings, never
# crashes, and leave nothing behind; the binding holds a callback exactly
# as long as the library does (free functions); recovery from the record
# with the same callbacks.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Errno qw(EINVAL EIO ENOSPC EROFS);
use JSON::PP qw(decode_json);
use Scalar::Util qw(weaken);
use Test::More;

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir MiB KiB croaks_like fails_like);

need_qemu();

my @disks = (
    { key => 'efidisk0', format => 'raw', size => 528 * KiB, bus => 'virtio' },
    { key => 'scsi0', format => 'qcow2', size => 8 * MiB, bus => 'scsi' },
    { key => 'scsi1', format => 'raw', size => 4 * MiB + 4096, bus => 'scsi' },
);
my $vm = FleeceTest::VM->start(disks => \@disks);
my $state = tmpdir('state');
my $VMID = 100;

# ---- a Perl storage and a Perl record ----------------------------------

my $store_dir = tmpdir('perl-storage');
my (@calls, %fail);

sub maybe_die {
    my ($what) = @_;
    my $f = $fail{$what} or return;
    if (ref($f) eq 'CODE') {
        my ($e) = $f->();
        die $e if defined($e);
        return;
    }
    die "$f\n";
}

my $storage = {
    id    => 'perl:store',
    alloc => sub {
        my ($name, $format, $size) = @_;
        push @calls, "alloc $name $format $size";
        maybe_die('alloc');
        return undef if $fail{alloc_undef};
        my $path = "$store_dir/$name";
        if ($format eq 'qcow2') {
            system('qemu-img', 'create', '-q', '-f', 'qcow2', $path, $size) == 0
                or die "qemu-img create failed\n";
        } else {
            open(my $fh, '>', $path) or die "cannot create $path: $!\n";
            truncate($fh, $size) or die "cannot size $path: $!\n";
            close($fh);
        }
        return "perl:$name";
    },
    remove => sub {
        my ($volid) = @_;
        push @calls, "remove $volid";
        maybe_die('remove');
        (my $name = $volid) =~ s/^perl://;
        unlink("$store_dir/$name") or $!{ENOENT} or die "cannot remove $name: $!\n";
        return;
    },
    path => sub {
        my ($volid) = @_;
        push @calls, "path $volid";
        maybe_die('path');
        (my $name = $volid) =~ s/^perl:// or die "not my volume: $volid\n";
        return "$store_dir/$name";
    },
    supports => { qcow2 => 1, discard => 1, path => 1 },
};

my (%records, @stores);
my $record = {
    load => sub {
        my ($vmid) = @_;
        maybe_die('load');
        return $records{$vmid};
    },
    store => sub {
        my ($vmid, $json) = @_;
        push @stores, defined($json) ? 'store' : 'remove';
        maybe_die('store');
        if (defined($json)) {
            $records{$vmid} = $json;
        } else {
            delete $records{$vmid};
        }
        return;
    },
};

my @log;
sub handle {
    return Fleece->new(qmp => $vm->qmp_path, vmid => $VMID, state_dir => $state,
        storage => $storage, record => $record,
        log => sub { push @log, [@_] }, @_);
}

sub nothing_left {
    my ($name) = @_;
    is_deeply([list_dir($store_dir)], [], "$name: storage empty");
    is_deeply(\%records, {}, "$name: no record");
    is_deeply([$vm->node_names], [$vm->nodes_before], "$name: QEMU's nodes as before");
    is($vm->job_count, 0, "$name: no jobs");
    is_deeply([list_dir($state)], [grep { /\.lock$/ } list_dir($state)],
        "$name: no record file in the state dir either");
}


# ---- the happy path -------------------------------------------------------

subtest 'Perl storage and record' => sub {
    @calls = @stores = @log = ();
    my $f = handle();
    my $plan = $f->plan;
    is_deeply([map { $_->{image} } @$plan],
        [undef, 'vm-100-fleece-0.qcow2', 'vm-100-fleece-1.qcow2'], 'image names');
    is_deeply([map { $_->{size} } @$plan], [map { $_->{size} } @disks], 'sizes');
    is($plan->[0]{fleeced}, 0, 'EFI disk not fleeced');
    like($plan->[0]{reason}, qr/EFI disk or TPM state/, '... and why');
    is($plan->drive('scsi1')->{device}, 'drive-scsi1', 'device');
    is(scalar $plan->fleeced, 2, 'two fleeced');
    is(decode_json($plan->to_json)->{drives}[1]{image}, 'vm-100-fleece-0.qcow2', 'to_json');

    ok($f->attach($plan), 'attach');
    is_deeply([grep { /^alloc/ } @calls],
        ['alloc vm-100-fleece-0.qcow2 qcow2 8388608', 'alloc vm-100-fleece-1.qcow2 qcow2 4198400'],
        'alloc called with exact sizes');
    ok(grep({ $_ eq 'path perl:vm-100-fleece-0.qcow2' } @calls), 'path called with the volid');
    is_deeply([list_dir($store_dir)], ['vm-100-fleece-0.qcow2', 'vm-100-fleece-1.qcow2'],
        'images allocated in the Perl storage');
    ok($records{$VMID}, 'record stored through the callback');
    my $rec = decode_json($records{$VMID});
    is_deeply([map { $_->{volid} } grep { $_->{fleeced} } @{ $rec->{drives} }],
        ['perl:vm-100-fleece-0.qcow2', 'perl:vm-100-fleece-1.qcow2'], 'record holds the volids');
    is_deeply(decode_json($f->record), $rec, '$f->record reads it through load');
    ok(!-e "$state/$VMID.json", 'no record file');
    like(join("\n", map { "$_->[0]: $_->[1]" } @log), qr/^info: attached vm-100-fleece-0.qcow2/m,
        'log callback with level names');

    @calls = ();
    ok($f->cleanup, 'cleanup');
    is_deeply([sort grep { /^remove/ } @calls],
        ['remove perl:vm-100-fleece-0.qcow2', 'remove perl:vm-100-fleece-1.qcow2'], 'remove called');
    is($stores[-1], 'remove', 'record removed through store(undef)');
    nothing_left('after cleanup');
};

# ---- exceptions in callbacks ----------------------------------------------

subtest 'alloc dies' => sub {
    @calls = ();
    # The second allocation fails, after the first image is attached.
    my $n = 0;
    local $fail{alloc} = sub { ++$n == 2 ? "no space left on fleece-store\n" : () };
    my $f = handle();
    my $plan = $f->plan;
    my $err = fails_like(sub { $f->attach($plan) }, 'fleece_attach',
        qr/^the storage perl:store could not allocate image vm-100-fleece-1\.qcow2 \(qcow2, 4198400 bytes\): no space left on fleece-store\z/,
        'attach');
    is($err->code, EIO, 'a die without errno: EIO');
    ok(grep({ $_ eq 'remove perl:vm-100-fleece-0.qcow2' } @calls), 'the first image was freed');
    nothing_left('alloc died');
};

subtest 'alloc dies with errno' => sub {
    local $fail{alloc} = sub { $! = ENOSPC; "cannot create image: $!\n" };
    my $f = handle();
    my $err = fails_like(sub { $f->attach($f->plan) }, 'fleece_attach',
        qr/could not allocate image vm-100-fleece-0\.qcow2 .*: cannot create image: No space left on device\z/,
        'attach');
    is($err->code, ENOSPC, "the callback's errno is the error's");
    nothing_left('alloc died with errno');
};

subtest 'alloc dies with a Fleece::Error' => sub {
    local $fail{alloc} = sub { Fleece::Error->new(message => 'storage is read-only', code => EROFS) };
    my $f = handle();
    my $err = fails_like(sub { $f->attach($f->plan) }, 'fleece_attach',
        qr/: storage is read-only\z/, 'attach');
    is($err->code, EROFS, "the Fleece::Error's code is the error's");
    nothing_left('alloc died with a Fleece::Error');
};

subtest 'alloc returns undef' => sub {
    local $fail{alloc_undef} = 1;
    my $f = handle();
    my $err = fails_like(sub { $f->attach($f->plan) }, 'fleece_attach',
        qr/: the Perl storage alloc callback returned undef, not a volume id\z/, 'attach');
    is($err->code, EINVAL, 'EINVAL');
    nothing_left('alloc returned undef');
};

subtest 'path dies' => sub {
    local $fail{path} = 'path lookup exploded';
    my $f = handle();
    fails_like(sub { $f->attach($f->plan) }, 'fleece_attach',
        qr/^the storage perl:store has no path for volume perl:vm-100-fleece-0\.qcow2: path lookup exploded\z/,
        'attach');
    nothing_left('path died');
};

subtest 'record store dies' => sub {
    local $fail{store} = sub { "config locked by another task\n" };
    my $f = handle();
    fails_like(sub { $f->attach($f->plan) }, 'fleece_attach',
        qr/^the record store callback failed .*: config locked by another task\z/, 'attach');
    delete $fail{store};
    nothing_left('store died');
};

subtest 'record load dies' => sub {
    my $f = handle();
    local $fail{load} = 'cannot read the guest config';
    fails_like(sub { $f->record }, 'fleece_get_record',
        qr/^the record load callback failed for VM 100: cannot read the guest config\z/, 'record');
    fails_like(sub { $f->attach($f->plan) }, 'fleece_attach', qr/cannot read the guest config/,
        'attach');
    delete $fail{load};
    nothing_left('load died');
};

subtest 'exception objects and multi-line messages' => sub {
    local $fail{path} = sub { bless { msg => "obj" }, 'My::Error' };
    my $f = handle();
    fails_like(sub { $f->attach($f->plan) }, 'fleece_attach', qr/: My::Error=HASH/, 'an object');
    local $fail{path} = "first line\nsecond line\n";
    fails_like(sub { $f->attach($f->plan) }, 'fleece_attach', qr/: first line second line\z/,
        'a multi-line message becomes one line');
    nothing_left('object exception');
};

subtest 'remove dies during cleanup' => sub {
    my $f = handle();
    ok($f->attach($f->plan), 'attach');
    {
        local $fail{remove} = 'storage offline';
        fails_like(sub { $f->cleanup }, 'fleece_cleanup',
            qr/^the storage perl:store could not free volume perl:vm-100-fleece-\d\.qcow2: storage offline\z/,
            'cleanup');
        ok($records{$VMID}, 'the record is kept for a later cleanup');
        is_deeply([$vm->node_names], [$vm->nodes_before], 'QEMU restored all the same');
    }
    ok($f->cleanup, 'a second cleanup once the storage is back');
    nothing_left('remove died');
};

subtest 'log and progress die' => sub {
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, $_[0] };
    my $f = handle(log => sub { die "log sink closed\n" },
        progress => sub { die "progress bar broken\n" });
    my $target = tmpdir('target');
    my $plan = $f->plan;
    ok($f->attach($plan), 'attach succeeds');
    like(join('', @warnings), qr/^Fleece: the Perl log callback died: log sink closed$/m,
        'the log exception is a warning');
    @warnings = ();
    ok($f->start($plan, target => { dir => $target, format => 'raw' }), 'start');
    1 while !$f->wait(1000);
    pass('the backup completed');
    like(join('', @warnings), qr/the Perl progress callback died: progress bar broken/,
        'the progress exception is a warning');
    ok($f->cleanup, 'cleanup');
    nothing_left('log died');
};

subtest 'callbacks cannot re-enter their handle' => sub {
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, $_[0] };
    my $f;
    $f = handle(log => sub { $f->set(bwlimit => 1) if $_[1] =~ /attached/ });
    ok($f->attach($f->plan), 'attach');
    like(join('', @warnings), qr/the Perl log callback died: Fleece: the handle's methods cannot be called from its own callbacks/,
        'refused');
    ok($f->cleanup, 'cleanup');
    undef $f;    # the closure refers to it
    nothing_left('re-entered');
};

# ---- blockdev definitions and the lifetime of callbacks -------------------

subtest 'blockdev callback: a hash of QEMU options' => sub {
    @calls = ();
    my @defs;
    my %bd = (%$storage, blockdev => sub {
        my ($volid) = @_;
        push @calls, "blockdev $volid";
        (my $name = $volid) =~ s/^perl://;
        my $def = { driver => 'file', filename => "$store_dir/$name", 'aio' => 'threads' };
        push @defs, $def;
        return $def;
    });
    delete $bd{path};
    my $f = handle(storage => \%bd);
    my $plan = $f->plan;
    ok($f->attach($plan), 'attach') or return;
    is_deeply([grep { /^(blockdev|path)/ } @calls],
        ['blockdev perl:vm-100-fleece-0.qcow2', 'blockdev perl:vm-100-fleece-1.qcow2'],
        'QEMU got the blockdev definitions (no path asked)');
    my %file = map { $_->{'node-name'} => $_ }
        @{ $vm->qmp('query-named-block-nodes', { flat => JSON::PP::true }) };
    my @ours = grep { $_->{drv} eq 'file' && ($_->{file} // '') =~ m{^\Q$store_dir\E/} } values %file;
    is(scalar(@ours), 2, 'two file nodes over the images the callback named');
    ok($f->cleanup, 'cleanup');
    nothing_left('blockdev');

    # Not a hash with a driver: the library says so.
    $bd{blockdev} = sub { return { filename => '/x' } };
    $f = handle(storage => \%bd);
    fails_like(sub { $f->attach($f->plan) }, 'fleece_attach',
        qr/has no QEMU blockdev definition for volume perl:vm-100-fleece-0\.qcow2: it is not a JSON object with a "driver"/,
        'a definition without driver');
    nothing_left('blockdev without driver');
};

{
    package Guard;
    our $freed = 0;
    sub new { bless {}, $_[0] }
    sub DESTROY { $freed++ }
}

subtest 'the library decides how long a callback lives' => sub {
    local $Guard::freed = 0;
    # Each callback closes over a Guard, destroyed when the binding lets go of the code.
    my $f = handle(log => do { my $g = Guard->new; sub { push @log, [@_] if $g } });
    is($Guard::freed, 0, 'the log callback is held');
    $f->set(log => do { my $g = Guard->new; sub { $g } });
    is($Guard::freed, 1, 'replaced: the old one is released (its free function ran)');
    $f->set(progress => do { my $g = Guard->new; sub { $g } },
        record => do { my $g = Guard->new; { load => sub { $g && undef }, store => sub { $g } } });
    my $st = Fleece::_storage({ %$storage, alloc => do { my $g = Guard->new; sub { $g } } });
    $f->set(storage => $st);
    is($Guard::freed, 1, 'progress, record and storage callbacks are held');
    croaks_like(sub { $st->set_alloc_callback(sub {}) }, qr/has been freed or given away/,
        'a storage given to a handle is no longer the Perl object\'s');
    undef $st;
    undef $f;
    is($Guard::freed, 5, 'the handle freed: every callback released');
};

# ---- recovery -----------------------------------------------------------

subtest 'recovery with the record and the Perl storage' => sub {
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, $_[0] };
    {
        my $f = handle(log => sub { push @log, [@_] });
        ok($f->attach($f->plan), 'attach');
        my $plan = $f->plan;
        @log = ();
        # The process "dies": the handle goes without cleanup.
    }
    like(join("\n", map { $_->[1] } @log), qr/handle freed with a run still set up/,
        'freeing a handle with a run set up says so');
    ok($records{$VMID}, 'the record is left');
    is(scalar(list_dir($store_dir)), 2, 'so are the images');
    isnt(join(',', $vm->node_names), join(',', $vm->nodes_before), 'and the nodes');

    my $json = $records{$VMID};
    ok(Fleece->cleanup(vmid => $VMID, record => $json, storage => $storage, state_dir => $state),
        'Fleece->cleanup from the vmid and the record (a JSON string)');
    is_deeply([list_dir($store_dir)], [], 'images freed');
    is_deeply([$vm->node_names], [$vm->nodes_before], 'nodes removed');

    # The hash still has the record (the string form cannot remove it); a
    # second recovery through the callbacks is harmless and removes it.
    ok(Fleece->cleanup(vmid => $VMID, record => $record, storage => $storage, state_dir => $state),
        'again with record callbacks');
    nothing_left('recovered');

    fails_like(sub { Fleece->cleanup(vmid => $VMID, record => $json, state_dir => $state,
                qmp => $vm->qmp_path) }, 'fleece_cleanup',
        qr/^the fleecing images of VM 100 are in .*perl:store.*, not in the storage given now \(none\)/,
        'a record of callback storage needs the storage to clean up');
    fails_like(sub { Fleece->cleanup(vmid => $VMID, record => $json, state_dir => $state,
                storage => { %$storage, id => 'perl:other' }) }, 'fleece_cleanup',
        qr/are in .*perl:store.*, not in the storage given now/,
        '... the storage with the id the record names');
    is_deeply(\@warnings, [], 'no warnings');
};

done_testing;
