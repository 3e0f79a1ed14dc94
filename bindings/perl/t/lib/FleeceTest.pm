package FleeceTest;

# Helpers for the Perl tests: a throwaway QEMU without guest OS, shaped like
# a Proxmox VM, a QMP client of its own on a second monitor, guest writes
# through the devices (HMP qemu-io -d), and byte-level reads of images.

use strict;
use warnings;

use Exporter 'import';
use File::Temp ();
use IO::Select;
use IO::Socket::UNIX;
use JSON::PP;
use POSIX ();
use Test::More ();
use Time::HiRes ();

our @EXPORT_OK = qw(
    qemu_binary need_qemu tmpdir make_image read_image allocated_bytes list_dir
    write_file MiB KiB croaks_like fails_like
);

use constant { KiB => 1024, MiB => 1024 * 1024 };

sub qemu_binary {
    my $q = $ENV{FLEECE_QEMU} || 'qemu-system-x86_64';
    return $q if $q =~ m{/} && -x $q;
    for my $dir (split /:/, $ENV{PATH} // '') {
        return "$dir/$q" if -x "$dir/$q";
    }
    return undef;
}

sub qemu_img { return $ENV{FLEECE_QEMU_IMG} || 'qemu-img' }

# QEMU is a test dependency that may truly be absent (not installed): skip
# then, and only then.
sub need_qemu {
    if (!qemu_binary()) {
        Test::More::plan(skip_all => 'qemu-system-x86_64 not found (set FLEECE_QEMU)');
    }
    if (system('sh', '-c', qemu_img() . ' --version >/dev/null 2>&1') != 0) {
        Test::More::plan(skip_all => 'qemu-img not found (set FLEECE_QEMU_IMG)');
    }
}

# $code croaks with a plain message (a Perl-side argument check).
sub croaks_like {
    my ($code, $re, $name) = @_;
    my $ok = eval { $code->(); 1 };
    my $err = $@;
    Test::More::ok(!$ok, "$name: croaks") or return;
    Test::More::ok(!ref($err), "$name: with a plain message") or Test::More::diag(ref($err));
    Test::More::like($err, $re, "$name: message") or Test::More::diag($err);
    return $err;
}

# $code fails in libfleece: a Fleece::Error from function $function whose
# message (without the function's name) matches $re; returns the error.
sub fails_like {
    my ($code, $function, $re, $name) = @_;
    my $ok = eval { $code->(); 1 };
    my $err = $@;
    Test::More::ok(!$ok, "$name: croaks") or return;
    Test::More::isa_ok($err, 'Fleece::Error', "$name: the error")
        or do { Test::More::diag($err); return };
    Test::More::is($err->function, $function, "$name: function");
    Test::More::like($err->message, $re, "$name: message") or Test::More::diag($err->message);
    Test::More::unlike($err->message, qr/^fleece_\w+: /, "$name: no C function in front");
    Test::More::is("$err", $err->message . "\n", "$name: stringifies to the message");
    return $err;
}

sub tmpdir {
    my ($tag) = @_;
    return File::Temp::tempdir("fleece-perl-" . ($tag // 'test') . "-XXXXXX",
        TMPDIR => 1, CLEANUP => 1);
}

sub run_tool {
    my @cmd = @_;
    my $out = `@{[ join ' ', map { "'$_'" } @cmd ]} 2>&1`;
    die "@cmd failed: $out" if $? != 0;
    return $out;
}

sub write_file {
    my ($path, $data) = @_;
    open(my $fh, '>:raw', $path) or die "cannot write $path: $!";
    print {$fh} $data or die "cannot write $path: $!";
    close($fh) or die "cannot write $path: $!";
}

# Deterministic content, distinct per drive (seed) and per 4 KiB block, so
# that a block backed up from the wrong offset or drive shows.
sub pattern {
    my ($size, $seed) = @_;
    my $data = '';
    for (my $off = 0; $off < $size; $off += 4096) {
        my $len = $size - $off < 4096 ? $size - $off : 4096;
        $data .= substr(pack('NN', $seed, $off / 4096) x 512, 0, $len);
    }
    return $data;
}

sub make_image {
    my ($path, $format, $size, $seed, $data) = @_;
    my $raw = $format eq 'raw' ? $path : "$path.raw-tmp";
    $data //= $size;
    write_file($raw, pattern($data, $seed) . ("\0" x ($size - $data)));
    if ($format ne 'raw') {
        run_tool(qemu_img(), 'convert', '-q', '-f', 'raw', '-O', $format, $raw, $path);
        unlink($raw);
    }
    return $path;
}

# The guest-visible bytes of an image.
sub read_image {
    my ($path, $format) = @_;
    my $raw = $path;
    if ($format ne 'raw') {
        $raw = "$path.read-tmp";
        # -U: QEMU may have the image open (and locked).
        run_tool(qemu_img(), 'convert', '-q', '-U', '-f', $format, '-O', 'raw', $path, $raw);
    }
    open(my $fh, '<:raw', $raw) or die "cannot read $raw: $!";
    local $/;
    my $data = <$fh>;
    close($fh);
    unlink($raw) if $raw ne $path;
    return $data;
}

sub allocated_bytes {
    my ($path) = @_;
    my @st = stat($path) or return 0;
    return $st[12] * 512;
}

sub list_dir {
    my ($dir) = @_;
    opendir(my $dh, $dir) or die "cannot list $dir: $!";
    my @names = sort grep { !/^\.\.?$/ } readdir($dh);
    closedir($dh);
    return @names;
}

package FleeceTest::VM;

# A QEMU shaped like a Proxmox VM.  disks: [ { key, format, size, bus } ]
# with bus 'scsi' (scsi-hd on virtio-scsi-pci scsihw0) or 'virtio'
# (virtio-blk-pci), drive ids drive-<key> and device ids <key>; a disk's
# image is made at its 'path' if given (and its first 'data' bytes are the
# pattern, the rest zero, if given).  qemu => [binary, args...] runs another
# QEMU (e.g. Proxmox's, with its firmware paths); running => 1 lets the
# guest CPU run (no -S).

use strict;
use warnings;

use IO::Select;
use IO::Socket::UNIX;
use JSON::PP;
use POSIX ();
use Scalar::Util ();
use Time::HiRes ();

# Stopped at exit before global destruction, when their sockets still work.
my %RUNNING;
END { $_->stop for grep { defined } values %RUNNING }

sub start {
    my ($class, %opts) = @_;
    my $dir = FleeceTest::tmpdir('vm');
    my $self = bless {
        dir    => $dir,
        qmp    => "$dir/qmp.sock",
        disks  => [],
        json   => JSON::PP->new->canonical,
        rbuf   => '',
    }, $class;
    my @args = (
        @{ $opts{qemu} // [FleeceTest::qemu_binary()] },
        '-machine', 'q35', '-accel', 'tcg', ($opts{running} ? () : '-S'), '-nodefaults',
        '-display', 'none',
        '-qmp', "unix:$dir/qmp.sock,server=on,wait=off",
        '-qmp', "unix:$dir/test.sock,server=on,wait=off",
    );
    push @args, '-qmp', "unix:$dir/$_,server=on,wait=off" for @{ $opts{extra_qmp} // [] };
    my $seed = 1;
    my $scsi = 0;
    for my $d (@{ $opts{disks} }) {
        my $path = $d->{path} // "$dir/$d->{key}.$d->{format}";
        FleeceTest::make_image($path, $d->{format}, $d->{size}, $seed++, $d->{data});
        push @{ $self->{disks} }, { %$d, path => $path };
        push @args, '-drive',
            "file=$path,if=none,id=drive-$d->{key},format=$d->{format},discard=unmap";
        if ($d->{bus} eq 'scsi') {
            push @args, '-device', 'virtio-scsi-pci,id=scsihw0' if !$scsi++;
            push @args, '-device', "scsi-hd,bus=scsihw0.0,drive=drive-$d->{key},id=$d->{key}";
        } else {
            push @args, '-device', "virtio-blk-pci,drive=drive-$d->{key},id=$d->{key}";
        }
    }
    $self->{log} = "$dir/qemu.log";
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>', $self->{log});
        open(STDERR, '>&', \*STDOUT);
        exec(@args) or POSIX::_exit(127);
    }
    $self->{pid} = $pid;
    $self->{owner} = $$;
    Scalar::Util::weaken($RUNNING{$self} = $self);
    $self->_connect("$dir/test.sock");
    $self->{nodes_before} = [ $self->node_names ];
    return $self;
}

sub dir { $_[0]{dir} }
sub pid { $_[0]{pid} }
sub qmp_path { $_[0]{qmp} }
sub disks { @{ $_[0]{disks} } }

sub _connect {
    my ($self, $path) = @_;
    my $deadline = Time::HiRes::time() + 20;
    my $sock;
    while (!($sock = IO::Socket::UNIX->new(Type => Type(), Peer => $path))) {
        die "QEMU did not come up: " . $self->log_text if !$self->alive;
        die "QEMU's QMP socket $path did not appear within 20 s" if Time::HiRes::time() > $deadline;
        Time::HiRes::sleep(0.05);
    }
    $self->{sock} = $sock;
    $self->_read_message;    # greeting
    $self->qmp('qmp_capabilities');
}

sub Type { return IO::Socket::UNIX::SOCK_STREAM() }

sub _read_message {
    my ($self) = @_;
    my $sel = IO::Select->new($self->{sock});
    my $deadline = Time::HiRes::time() + 60;
    while ($self->{rbuf} !~ /\n/) {
        my $left = $deadline - Time::HiRes::time();
        die "QMP: no answer from QEMU within 60 s" if $left <= 0;
        next if !$sel->can_read($left);
        my $n = sysread($self->{sock}, my $buf, 65536);
        die "QMP: QEMU closed the connection" if !$n;
        $self->{rbuf} .= $buf;
    }
    $self->{rbuf} =~ s/^([^\n]*)\n//;
    return $self->{json}->decode($1);
}

sub qmp_try {
    my ($self, $cmd, $args) = @_;
    my $msg = { execute => $cmd, defined($args) ? (arguments => $args) : () };
    my $line = $self->{json}->encode($msg) . "\n";
    syswrite($self->{sock}, $line) == length($line) or die "QMP: write failed: $!";
    for (;;) {
        my $r = $self->_read_message;
        next if exists $r->{event};
        return (undef, $r->{error}{desc} // 'unknown error') if $r->{error};
        return ($r->{return});
    }
}

sub qmp {
    my ($self, $cmd, $args) = @_;
    my ($ret, $err) = $self->qmp_try($cmd, $args);
    die "QMP $cmd: $err" if defined($err);
    return $ret;
}

sub log_text {
    my ($self) = @_;
    open(my $fh, '<', $self->{log}) or return '';
    local $/;
    return <$fh> // '';
}

# HMP qemu-io through the guest device (so through any copy-before-write
# filter).  qemu-io prints its errors on QEMU's stdout, i.e. into the log.
sub guest_io {
    my ($self, $key, $io) = @_;
    my ($d) = grep { $_->{key} eq $key } $self->disks;
    my $qdev = $d && $d->{bus} eq 'virtio' ? "/machine/peripheral/$key/virtio-backend" : $key;
    my $before = length($self->log_text);
    my $out = $self->qmp('human-monitor-command',
        { 'command-line' => qq{qemu-io -d $qdev "$io"} });
    my $logged = substr($self->log_text, $before);
    die "qemu-io -d $qdev '$io': $out$logged"
        if "$out$logged" =~ /failed|error|not found|invalid|cannot|No such|unknown/i;
}

sub node_names {
    my ($self) = @_;
    return sort map { $_->{'node-name'} // () }
        @{ $self->qmp('query-named-block-nodes', { flat => JSON::PP::true }) };
}

sub nodes_before { @{ $_[0]{nodes_before} } }

sub job_count { return scalar @{ $_[0]->qmp('query-jobs') } }

# Root node of each device, by device id.
sub device_roots {
    my ($self) = @_;
    my %roots;
    for my $b (@{ $self->qmp('query-block') }) {
        next if !$b->{inserted} || !defined($b->{qdev});
        my $id = $b->{qdev};
        $id =~ s{^/machine/peripheral/([^/]+)/virtio-backend$}{$1};
        $roots{$id} = $b->{inserted}{'node-name'};
    }
    return \%roots;
}

sub alive {
    my ($self) = @_;
    return 0 if !$self->{pid};
    return waitpid($self->{pid}, POSIX::WNOHANG()) == 0;
}

sub kill_now {
    my ($self) = @_;
    return if !$self->{pid};
    local $?;
    kill('KILL', $self->{pid});
    waitpid($self->{pid}, 0);
    delete $self->{pid};
}

sub stop {
    my ($self) = @_;
    return if !$self->{pid} || $self->{owner} != $$;
    local $?;    # waitpid must not change the test's exit status
    delete $RUNNING{$self};
    eval { $self->qmp('quit') };
    my $deadline = Time::HiRes::time() + 5;
    while (Time::HiRes::time() < $deadline) {
        if (waitpid($self->{pid}, POSIX::WNOHANG()) != 0) {
            delete $self->{pid};
            return;
        }
        Time::HiRes::sleep(0.05);
    }
    $self->kill_now;
}

sub DESTROY { $_[0]->stop }

1;
