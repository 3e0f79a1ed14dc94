# The qemu-server patch series at work: the patched PVE::VZDump::QemuServer,
# PVE::QemuServer::Fleecing, PVE::QemuConfig and the real
# PVE::QemuServer::Blockdev and ::Monitor (from $FLEECE_QEMU_SERVER_SRC
# with the series applied) against a real QEMU, with stand-ins for the rest
# of Proxmox (t/stub-pve): a directory-backed PVE::Storage, guest configs
# in qemu-server's format in files, qemu-server's QMP client without
# IO::Multiplex.
#
#  - Stock QEMU, stock engine: fleecing set up through the glue module (the
#    fleecing storage as libfleece callback storage, images attached with
#    what Blockdev generates), the record in the config; a worker killed in
#    the middle of a backup is cleaned up by QemuConfig's
#    cleanup_fleecing_images() from the record, as are left-overs recorded
#    the old way; vzdump's archive step on a QEMU without Proxmox's patches
#    goes on without fleecing, as before.
#  - Proxmox's patched QEMU ($FLEECE_PVE_QEMU): vzdump's prepare, assemble,
#    archive (VMA through a compressor pipe) and cleanup steps with
#    fleecing; the archive extracts (vma extract) to the point-in-time
#    bytes of the backed-up disks (not the one with backup=0), the task log
#    has what qemu-server's status loop prints, qemu-server's own QMP
#    commands and another client get the monitor at once while libfleece
#    follows the backup, the record is in the config during the backup and
#    gone after; an interrupted backup (SIGTERM) leaves nothing either.
use strict;
use warnings;

# The real PVE::QemuConfig creates /etc/pve/nodes/<node>/qemu-server and
# /var/lock/qemu-server when it is loaded: not on the test machine.
BEGIN {
    *CORE::GLOBAL::mkdir = sub {
        my ($dir, @mode) = @_;
        return 1 if $dir =~ m{^/(?:etc/pve|var/lock)/};
        return CORE::mkdir($dir, @mode ? $mode[0] : 0777);
    };
}

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Select;
use IO::Socket::UNIX;
use JSON::PP qw(decode_json encode_json);
use POSIX ();
use Test::More;
use Time::HiRes ();

use Fleece;
use FleeceTest qw(need_qemu tmpdir list_dir read_image write_file MiB KiB);
use QemuServerTree qw(need_source);

need_source();
need_qemu();

my $tree = QemuServerTree::apply_series();
require PVEStubs;
PVEStubs->import(tree => "$tree/src", real => [qw(
    PVE::QemuConfig PVE::QemuServer::Fleecing PVE::VZDump::QemuServer
    PVE::QemuServer::Blockdev PVE::QemuServer::Monitor
)]);
require PVE::QemuServer;
PVE::QemuServer::load_config_format("$tree/src/PVE/QemuServer.pm",
    qw(name memory bios scsihw scsi0 scsi1 virtio0 efidisk0 lock template));
require PVE::VZDump::QemuServer;
require PVE::QemuConfig;
require PVE::QemuServer::Fleecing;

my $VMID = 100;

# ---- the stand-ins' state ------------------------------------------------

{
    no warnings 'once';
    $PVE::Storage::BASE = tmpdir('pve-storage');
    $PVE::AbstractConfig::DIR = tmpdir('pve-config');
    $PVE::QemuServer::Fleecing::STATE_DIR = tmpdir('fleece-state') . '/fleece';
}
my $storecfg = PVE::Storage::config();

sub conf { return PVE::QemuConfig->load_config($VMID) }
sub fleecing_section { return conf()->{'special-sections'}->{fleecing} }
sub images { my $d = "$PVE::Storage::BASE/local/images/$VMID"; return grep { /fleece/ } (-d $d ? list_dir($d) : ()) }
sub disk_path { return "$PVE::Storage::BASE/local/images/$VMID/$_[0]" }

# The VM's disks live in the 'local' storage, as the config says.
my @DISKS = (
    { key => 'efidisk0', format => 'raw', size => 528 * KiB, bus => 'virtio',
      volid => 'local:100/vm-100-disk-3.raw', backup => 1 },
    { key => 'scsi0', format => 'qcow2', size => 16 * MiB, bus => 'scsi',
      volid => 'local:100/vm-100-disk-0.qcow2', backup => 1 },
    { key => 'scsi1', format => 'raw', size => 4 * MiB, bus => 'scsi',
      volid => 'local:100/vm-100-disk-1.raw', backup => 0 },
    # half of it zero: the task log reports a sparse backup
    { key => 'virtio0', format => 'raw', size => 8 * MiB, bus => 'virtio', data => 4 * MiB,
      volid => 'local:100/vm-100-disk-2.raw', backup => 1 },
);

sub start_vm {
    my (%opts) = @_;
    File::Path::make_path("$PVE::Storage::BASE/local/images/$VMID");
    for my $d (@DISKS) {
        unlink(disk_path((split m{/}, $d->{volid})[1]));
        $d->{path} = PVE::Storage::path($storecfg, $d->{volid});
    }
    my $vm = FleeceTest::VM->start(disks => \@DISKS, extra_qmp => ['other.sock'], %opts);
    no warnings 'once';
    $PVE::QemuServer::Helpers::QMP_SOCKET{$VMID} = $vm->qmp_path;
    $PVE::QemuServer::Helpers::PID{$VMID} = $vm->pid;
    my $conf = { name => 'fleece-test', memory => 512, bios => 'ovmf' };
    for my $d (@DISKS) {
        $conf->{ $d->{key} } = "$d->{volid},size=" . ($d->{size} / KiB) . 'K'
            . ($d->{backup} ? '' : ',backup=0');
    }
    unlink(PVE::QemuConfig->config_file($VMID));
    PVE::QemuConfig->write_config($VMID, $conf);
    return $vm;
}

require File::Path;

sub plugin {
    my (%opts) = @_;
    my $vzdump = bless { opts => { storage => 'backup', %opts } }, 'FakeVZDump';
    my $plugin = PVE::VZDump::QemuServer->new($vzdump);
    $plugin->{logs} = [];
    return $plugin;
}

sub task_log { return join("\n", @{ $_[0]{logs} }) }

sub nothing_left {
    my ($vm, $name) = @_;
    is_deeply([images()], [], "$name: no fleecing images in the storage");
    is(fleecing_section(), undef, "$name: no [special:fleecing] section in the config");
    is_deeply([$vm->node_names], [$vm->nodes_before], "$name: QEMU's nodes as before");
    is($vm->job_count, 0, "$name: no jobs in QEMU");
}

# A QMP client of its own on other.sock (the library and qemu-server use
# the VM's main socket).
sub other_qmp {
    my ($vm) = @_;
    my $s = IO::Socket::UNIX->new(Type => IO::Socket::UNIX::SOCK_STREAM(),
        Peer => $vm->dir . '/other.sock') or die "other.sock: $!";
    my $buf = '';
    my $read = sub {
        for (;;) {
            while ($buf =~ s/^([^\n]*)\n//) {
                my $o = decode_json($1);
                return $o if !$o->{event};
            }
            sysread($s, $buf, 65536, length($buf)) or die "other.sock closed";
        }
    };
    $read->();
    my $cmd = sub {
        my ($execute, $args) = @_;
        syswrite($s, encode_json({ execute => $execute, $args ? (arguments => $args) : () }) . "\n");
        my $r = $read->();
        die "QMP $execute: $r->{error}{desc}\n" if $r->{error};
        return $r->{return};
    };
    $cmd->('qmp_capabilities');
    return $cmd;
}

# Seconds until QEMU greets a client on the VM's main socket, $n times.
sub greeting_delays {
    my ($path, $n) = @_;
    my @d;
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
        return "no greeting after " . (Time::HiRes::time() - $t0) . " s" if $line !~ /"QMP"/;
        push @d, Time::HiRes::time() - $t0;
        close($s);
        Time::HiRes::sleep(0.02);
    }
    return \@d;
}

{
    package FakeVZDump;    # what the plugin reads of vzdump
}

# ---- stock QEMU ---------------------------------------------------------

subtest 'stock engine: fleecing through the glue, crash, clean-up from the record' => sub {
    my $vm = start_vm();
    my $plugin = plugin();
    my $task = { mode => 'snapshot', tmpdir => tmpdir('task') };

    # prepare() asks a running QEMU for its backup state (query-backup,
    # Proxmox's): it is told the VM does not run.
    {
        local $PVE::QemuServer::Helpers::PID{$VMID} = undef;
        $plugin->prepare($task, $VMID, 'snapshot');
    }
    is_deeply([map { $_->{virtdev} } @{ $task->{disks} }], [qw(efidisk0 scsi0 virtio0)],
        'prepare: the task has the disks to back up (not scsi1, backup=0)');
    like(task_log($plugin), qr/exclude disk 'scsi1' 'local:100\/vm-100-disk-1.raw' \(backup=no\)/,
        'prepare: excludes scsi1');

    # The worker: sets up fleecing (stock engine) and starts a slow backup,
    # then dies without cleaning up.
    my $target = tmpdir('target');
    pipe(my $r, my $w) or die "pipe: $!";
    @PVE::Storage::CALLS = ();
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        close($r);
        my @log;
        my $res = eval {
            my $f = PVE::QemuServer::Fleecing::new_handle($VMID, $storecfg, 'local',
                sub { push @log, "$_[0]: $_[1]" }, engine => 'qemu', bwlimit => 1024,
                drives => [map { $_->{virtdev} } @{ $task->{disks} }]);
            my $plan = $f->plan;
            $f->attach($plan);
            my %out = (
                plan => [map { { %$_ } } @$plan],
                skipped => [$plan->skipped],
                calls => [@PVE::Storage::CALLS],
                section => fleecing_section(),
                nodes => $vm->qmp('query-named-block-nodes', { flat => JSON::PP::true }),
            );
            $f->start($plan, target => { dir => $target, format => 'raw' });
            $out{running} = $f->wait(0) == 0 ? 1 : 0;
            \%out;
        } // { error => "$@" };
        $res->{log} = \@log;
        print {$w} encode_json($res);
        close($w);
        kill('KILL', $$);    # no cleanup, no destructors
    }
    close($w);
    my $res = decode_json(do { local $/; <$r> } || '{"error":"no answer"}');
    waitpid($pid, 0);
    is($res->{error}, undef, 'the worker set up fleecing and started the backup')
        or return diag(join("\n", @{ $res->{log} // [] }));

    my %planned = map { $_->{key} => $_ } @{ $res->{plan} };
    is_deeply([sort keys %planned], [qw(efidisk0 scsi0 virtio0)], 'planned: the task\'s disks');
    is($planned{efidisk0}{fleeced}, 0, 'the EFI disk is not fleeced');
    ok((grep { $_->{name} eq 'scsi1' } @{ $res->{skipped} }), 'scsi1 is skipped by the plan');
    is_deeply([grep { /^vdisk_alloc/ } @{ $res->{calls} }], [
        'vdisk_alloc local 100 qcow2 vm-100-fleece-0.qcow2 16384',
        'vdisk_alloc local 100 qcow2 vm-100-fleece-1.qcow2 8192',
    ], 'images allocated through PVE::Storage, named and sized as qemu-server does');
    is(scalar(grep { /^qemu_blockdev_options local:100\/vm-100-fleece-/ } @{ $res->{calls} }), 2,
        "QEMU got the storage's block device options (Blockdev::generate_file_blockdev)");
    my @files = grep { ($_->{file} // '') =~ /vm-100-fleece-\d\.qcow2$/ && $_->{drv} eq 'file' }
        @{ $res->{nodes} };
    is(scalar(@files), 2, 'two file nodes over the fleecing images');
    my $record = decode_json($res->{section}{'fleecing-record'} // '{}');
    is($record->{vmid}, $VMID, 'the record was in the config, [special:fleecing] fleecing-record');
    is($record->{storage}{id}, 'pve:local', '... naming the storage pve:local');
    is($res->{section}{'fleecing-images'},
        'local:100/vm-100-fleece-0.qcow2,local:100/vm-100-fleece-1.qcow2',
        '... and fleecing-images lists the volumes');
    ok($res->{running}, 'the backup ran when the worker died');
    like(join("\n", @{ $res->{log} }), qr/^info: .*attached vm-100-fleece-0\.qcow2/m,
        "libfleece's messages reached the task log");

    # What the dead worker left.
    is(scalar(images()), 2, 'the images are left');
    ok(fleecing_section()->{'fleecing-record'}, 'the record is left');
    is($vm->job_count, 3, 'the backup jobs still run (the EFI disk\'s too)');

    my @log;
    ok(eval { PVE::QemuConfig::cleanup_fleecing_images($VMID, $storecfg,
        sub { push @log, "$_[0]: $_[1]" }); 1 }, 'cleanup_fleecing_images()') or diag($@);
    nothing_left($vm, 'after the clean-up from the record');
    ok(eval { PVE::QemuConfig::cleanup_fleecing_images($VMID, $storecfg, sub {}); 1 },
        'again: nothing to do') or diag($@);
    $vm->stop;
};

subtest 'left-overs recorded the old way are still freed' => sub {
    my $vm = start_vm();
    # An unpatched qemu-server's fleecing: image, node drive-scsi0-fleecing,
    # volume listed in fleecing-images only.
    my $volid = PVE::Storage::vdisk_alloc($storecfg, 'local', $VMID, 'qcow2',
        'vm-100-fleece-0.qcow2', 16384);
    $vm->qmp('blockdev-add', { driver => 'qcow2', 'node-name' => 'drive-scsi0-fleecing',
        file => { driver => 'file', filename => scalar(PVE::Storage::path($storecfg, $volid)),
            'node-name' => 'scsi0-fleecing-file' } });
    PVE::QemuConfig->lock_config($VMID, sub {
        my $conf = conf();
        $conf->{'special-sections'}{fleecing}{'fleecing-images'} = $volid;
        PVE::QemuConfig->write_config($VMID, $conf);
    });
    my @log;
    ok(eval { PVE::QemuConfig::cleanup_fleecing_images($VMID, $storecfg,
        sub { push @log, "$_[0]: $_[1]" }); 1 }, 'cleanup_fleecing_images()') or diag($@);
    like(join("\n", @log), qr/detaching \(old\) fleecing image 'drive-scsi0-fleecing'/,
        'the old node was detached');
    like(join("\n", @log), qr/removing \(old\) fleecing image 'local:100\/vm-100-fleece-0.qcow2'/,
        'the old image was freed');
    nothing_left($vm, 'old left-overs');
    note(join("\n", @log));
    $vm->stop;
};

subtest "vzdump's archive step on stock QEMU goes on without fleecing" => sub {
    my $vm = start_vm();
    my $plugin = plugin(fleecing => { enabled => 1, storage => 'local' });
    my $task = { mode => 'snapshot', tmpdir => tmpdir('task') };
    {
        local $PVE::QemuServer::Helpers::PID{$VMID} = undef;
        $plugin->prepare($task, $VMID, 'snapshot');
    }
    $plugin->assemble($task, $VMID);
    my $warnings = '';
    local $SIG{__WARN__} = sub { $warnings .= $_[0] };
    my $ok = eval { $plugin->archive($task, $VMID, tmpdir('dump') . '/vzdump.vma', undef); 1 };
    my $err = $@;
    ok(!$ok, 'the archive step fails: stock QEMU has no backup command');
    like($err, qr/The command backup has not been found/, '... saying so') or diag($err);
    like(task_log($plugin), qr/running QEMU version does not support backup fleecing - continuing without/,
        'the task log says why there is no fleecing');
    is_deeply([images()], [], 'no fleecing images were allocated');
    $plugin->cleanup($task, $VMID);
    nothing_left($vm, 'after cleanup');
    $vm->stop;
};

# ---- Proxmox's patched QEMU ------------------------------------------------

my $PVE_QEMU = $ENV{FLEECE_PVE_QEMU};
if (!$PVE_QEMU || !-x $PVE_QEMU) {
    diag('FLEECE_PVE_QEMU not set: the archive step with fleecing (patched QEMU) is not run');
    done_testing;
    exit(0);
}
(my $VMA = $PVE_QEMU) =~ s{[^/]+$}{vma};
my @PVE_QEMU = ($PVE_QEMU, map { ('-L', $_) } qw(/usr/share/seabios /usr/lib/ipxe/qemu /usr/share/qemu));

# The guest-visible content of the disks now.
sub point_in_time {
    return { map { $_->{key} => read_image($_->{path}, $_->{format}) } @DISKS };
}

# Runs in a child while the backup runs: waits for it, writes ahead of the
# backup cursor on every disk, knocks on the monitor 100 times and reads
# the config; reports in JSON.
sub during_backup {
    my ($vm, $w) = @_;
    my %res;
    eval {
        my $qmp = other_qmp($vm);
        my $deadline = time() + 60;
        while (($qmp->('query-backup')->{status} // '') ne 'active') {
            die "no backup started\n" if time() > $deadline;
            Time::HiRes::sleep(0.05);
        }
        # libfleece records the run as running once QEMU has answered
        for (1 .. 100) {
            $res{section} = fleecing_section();
            last if ($res{section}{'fleecing-record'} // '') =~ /"state":"running"/;
            Time::HiRes::sleep(0.05);
        }
        for my $d (@DISKS) {
            my $len = $d->{size} / 2 < MiB ? int($d->{size} / 2) : MiB;
            my $off = ($d->{size} - $len) & ~4095;
            my $qdev = $d->{bus} eq 'virtio' ? "/machine/peripheral/$d->{key}/virtio-backend" : $d->{key};
            $qmp->('human-monitor-command',
                { 'command-line' => "qemu-io -d $qdev \"write -P 0xee $off " . ($d->{size} - $off) . '"' });
        }
        $res{written} = 1;
        $res{greetings} = greeting_delays($vm->qmp_path, 100);
        $res{status_after} = $qmp->('query-backup')->{status};
    };
    $res{error} = $@ if $@;
    print {$w} encode_json(\%res);
    close($w);
    POSIX::_exit(0);
}

subtest 'Proxmox engine: vzdump with fleecing writes a VMA of the point in time' => sub {
    my $vm = start_vm(qemu => \@PVE_QEMU, running => 1);
    my $plugin = plugin(fleecing => { enabled => 1, storage => 'local' }, bwlimit => 2048);
    my $task = { mode => 'snapshot', tmpdir => tmpdir('task') };
    $plugin->prepare($task, $VMID, 'snapshot');
    is_deeply([map { $_->{virtdev} } @{ $task->{disks} }], [qw(efidisk0 scsi0 virtio0)],
        'prepare: the disks to back up');
    $plugin->assemble($task, $VMID);
    my $pit = point_in_time();

    pipe(my $r, my $w) or die "pipe: $!";
    my $child = fork() // die "fork: $!";
    during_backup($vm, $w) if $child == 0;
    close($w);

    @PVE::QMPClient::WAITS = ();
    my $dump = tmpdir('dump');
    my $t0 = time();
    my $ok = eval { $plugin->archive($task, $VMID, "$dump/vzdump-qemu-100.vma.zst", 'zstd -q -c'); 1 };
    my $err = $@;
    my $during = decode_json(do { local $/; <$r> } || '{"error":"no answer"}');
    waitpid($child, 0);
    ok($ok, 'archive: the backup succeeded') or diag($err, task_log($plugin));
    is($during->{error}, undef, 'the guest wrote while the backup ran') or diag($during->{error});
    ok(time() - $t0 >= 4, 'the backup took its time (the writes landed ahead of it)');

    my $log = task_log($plugin);
    like($log, qr/^info: starting backup via QMP command$/m, 'task log: starting the backup');
    like($log, qr/^info: started backup task '[0-9a-f-]{36}'$/m, 'task log: the backup task UUID');
    like($log, qr/^info: resuming VM again$/m, "task log: qemu-server's cont");
    like($log, qr/^info: +\d+% \(\S+ \S+ of \S+ \S+\) in \d\d:\d\d:\d\d, read: \S+ \S+\/s, write: \S+ \S+\/s$/m,
        'task log: the status lines (percent, rate)');
    like($log, qr/^info: +100% /m, 'task log: 100%');
    like($log, qr/^info: backup is sparse: \S+ \S+ \(\d+%\) total zero data$/m,
        'task log: the zero bytes (libfleece passes query-backup\'s zero-bytes on)');
    like($log, qr/^info: transferred \S+ \S+ in \d+ seconds/m, 'task log: transferred');
    like($log, qr/drive-scsi0: attached fleecing image vm-100-fleece-0\.qcow2/,
        "task log: libfleece's messages");

    # qemu-server's own QMP commands and another client meanwhile.
    my $greetings = $during->{greetings};
    is(ref($greetings), 'ARRAY', 'another client got the monitor 100 times during the backup')
        or diag($greetings);
    my ($max) = sort { $b <=> $a } @{ ref($greetings) ? $greetings : [99] };
    cmp_ok($max, '<', 1, "... each within a second (longest $max s)");
    is($during->{status_after}, 'active', '... while the backup ran');
    my @qs = grep { $_->[0] =~ /^(cont|query-status|getfd)$/ } @PVE::QMPClient::WAITS;
    ok(scalar(@qs) >= 2, "qemu-server's own commands (getfd, cont) ran") or diag(explain(\@PVE::QMPClient::WAITS));
    my ($qmax) = sort { $b <=> $a } map { $_->[1] } @PVE::QMPClient::WAITS;
    cmp_ok($qmax, '<', 1, "qemu-server's QMP client never waited a second for the monitor ($qmax s)");

    # The record during the backup, in the config.
    my $record = decode_json($during->{section}{'fleecing-record'} // '{}');
    is($record->{state}, 'running', 'during the backup, the record is in the config');
    like($record->{'backup-uuid'} // '', qr/^[0-9a-f-]{36}$/, '... with the backup UUID');
    is(scalar(grep { $_->{volid} } @{ $record->{drives} }), 2, '... and the two images');

    $plugin->cleanup($task, $VMID);
    nothing_left($vm, 'after cleanup');

    # The archive is the point in time of the backed-up disks.
    my $out = tmpdir('extract');
    rmdir($out);
    system("zstd -q -d -c '$dump/vzdump-qemu-100.vma.zst' > '$dump/vzdump.vma'") == 0
        or die "zstd failed";
    my $x = `'$VMA' extract '$dump/vzdump.vma' '$out' 2>&1`;
    is($?, 0, 'vma extract') or diag($x);
    like(`cat '$out/qemu-server.conf' 2>&1`, qr/^name: fleece-test$/m, 'the archive has the config');
    for my $d (@DISKS) {
        my $file = "$out/disk-drive-$d->{key}.raw";
        if (!$d->{backup}) {
            ok(!-e $file, "$d->{key} (backup=0) is not in the archive");
            next;
        }
        ok(-e $file, "$d->{key} is in the archive") or next;
        ok(read_image($file, 'raw') eq $pit->{ $d->{key} }, "$d->{key}: the point-in-time bytes");
        ok(read_image($d->{path}, $d->{format}) ne $pit->{ $d->{key} },
            "$d->{key}: the guest's writes are on the disk");
    }
    $vm->stop;
};

subtest 'Proxmox engine: a backup interrupted by a signal leaves nothing' => sub {
    my $vm = start_vm(qemu => \@PVE_QEMU, running => 1);
    my $plugin = plugin(fleecing => { enabled => 1, storage => 'local' }, bwlimit => 1024);
    my $task = { mode => 'snapshot', tmpdir => tmpdir('task') };
    $plugin->prepare($task, $VMID, 'snapshot');
    $plugin->assemble($task, $VMID);
    my $parent = $$;
    my $child = fork() // die "fork: $!";
    if ($child == 0) {
        my $qmp = other_qmp($vm);
        for (1 .. 600) {
            last if ($qmp->('query-backup')->{status} // '') eq 'active';
            Time::HiRes::sleep(0.05);
        }
        Time::HiRes::sleep(1);
        kill('TERM', $parent);
        POSIX::_exit(0);
    }
    my $t0 = time();
    my $ok = eval { $plugin->archive($task, $VMID, tmpdir('dump') . '/vzdump.vma', undef); 1 };
    my $err = $@;
    waitpid($child, 0);
    local $SIG{TERM} = 'DEFAULT';
    ok(!$ok, 'archive failed');
    is($err, "interrupted by signal\n", "with vzdump's signal handler's message");
    cmp_ok(time() - $t0, '<', 20, 'at once, not at the end of the backup');
    like(task_log($plugin), qr/^info: aborting backup job$/m, 'the backup job was aborted');
    $plugin->cleanup($task, $VMID);
    nothing_left($vm, 'after the interrupted backup');
    is(other_qmp($vm)->('query-backup')->{status}, 'error', "QEMU's backup ended as failed");
    $vm->stop;
};

done_testing;
