package Fleece;

# The Perl binding of libfleece: options by name, plans as Perl data, and
# refusal of handles used after fork.  The C calls themselves are in
# Fleece.xs, one method per C function (Fleece::Raw::*).

use strict;
use warnings;

use Carp ();
use JSON::PP ();
use POSIX ();
use Scalar::Util ();
use Time::HiRes ();

our $VERSION = '0.1.0';

require XSLoader;
XSLoader::load('Fleece', $VERSION);

# Every public C function and its Perl binding; the API-coverage test checks
# this against fleece.h, so a function added there must be bound here or
# listed in %NOT_BOUND with the reason.
our %BINDINGS = (
    fleece_get_version           => 'Fleece::Raw::get_version',
    fleece_get_error             => 'Fleece::Raw::get_error',
    fleece_get_errno             => 'Fleece::Raw::get_errno',
    fleece_storage_new_dir       => 'Fleece::Raw::Storage::new_dir',
    fleece_storage_new_callback  => 'Fleece::Raw::Storage::new_callback',
    fleece_storage_free          => 'Fleece::Raw::Storage::DESTROY',
    fleece_target_new_dir        => 'Fleece::Raw::Target::new_dir',
    fleece_target_new_nbd        => 'Fleece::Raw::Target::new_nbd',
    fleece_target_new_pve        => 'Fleece::Raw::Target::new_pve',
    fleece_target_free           => 'Fleece::Raw::Target::DESTROY',
    fleece_new                   => 'Fleece::Raw::Handle::new',
    fleece_free                  => 'Fleece::Raw::Handle::DESTROY',
    fleece_connect               => 'Fleece::Raw::Handle::connect',
    fleece_connect_fd            => 'Fleece::Raw::Handle::connect_fd',
    fleece_set_vmid              => 'Fleece::Raw::Handle::set_vmid',
    fleece_get_vmid              => 'Fleece::Raw::Handle::get_vmid',
    fleece_set_state_dir         => 'Fleece::Raw::Handle::set_state_dir',
    fleece_set_storage           => 'Fleece::Raw::Handle::set_storage',
    fleece_set_engine            => 'Fleece::Raw::Handle::set_engine',
    fleece_get_engine            => 'Fleece::Raw::Handle::get_engine',
    fleece_set_qmp_timeout       => 'Fleece::Raw::Handle::set_qmp_timeout',
    fleece_set_drives            => 'Fleece::Raw::Handle::set_drives',
    fleece_set_plan_flags        => 'Fleece::Raw::Handle::set_plan_flags',
    fleece_set_image_format      => 'Fleece::Raw::Handle::set_image_format',
    fleece_set_bwlimit           => 'Fleece::Raw::Handle::set_bwlimit',
    fleece_set_bitmap            => 'Fleece::Raw::Handle::set_bitmap',
    fleece_set_cbw_timeout       => 'Fleece::Raw::Handle::set_cbw_timeout',
    fleece_set_log_callback      => 'Fleece::Raw::Handle::set_log_callback',
    fleece_set_progress_callback => 'Fleece::Raw::Handle::set_progress_callback',
    fleece_set_record_callback   => 'Fleece::Raw::Handle::set_record_callback',
    fleece_plan                  => 'Fleece::Raw::Handle::plan',
    fleece_attach                => 'Fleece::Raw::Handle::attach',
    fleece_start                 => 'Fleece::Raw::Handle::start',
    fleece_wait                  => 'Fleece::Raw::Handle::wait',
    fleece_cancel                => 'Fleece::Raw::Handle::cancel',
    fleece_get_progress          => 'Fleece::Raw::Handle::get_progress',
    fleece_get_drive_progress    => 'Fleece::Raw::Handle::get_drive_progress',
    fleece_get_drive_result      => 'Fleece::Raw::Handle::get_drive_result',
    fleece_get_drive_elapsed_ms  => 'Fleece::Raw::Handle::get_drive_elapsed_ms',
    fleece_get_record            => 'Fleece::Raw::Handle::get_record',
    fleece_cleanup               => 'Fleece::Raw::Handle::cleanup',
    fleece_plan_free             => 'Fleece::Raw::Plan::DESTROY',
    fleece_plan_get_drive_count  => 'Fleece::Raw::Plan::get_drive_count',
    fleece_plan_get_key          => 'Fleece::Raw::Plan::get_key',
    fleece_plan_get_device       => 'Fleece::Raw::Plan::get_device',
    fleece_plan_get_size         => 'Fleece::Raw::Plan::get_size',
    fleece_plan_get_fleeced      => 'Fleece::Raw::Plan::get_fleeced',
    fleece_plan_get_reason       => 'Fleece::Raw::Plan::get_reason',
    fleece_plan_get_image        => 'Fleece::Raw::Plan::get_image',
    fleece_plan_get_format       => 'Fleece::Raw::Plan::get_format',
    fleece_plan_get_cluster_size => 'Fleece::Raw::Plan::get_cluster_size',
    fleece_plan_to_json          => 'Fleece::Raw::Plan::to_json',
);

# Public C functions deliberately not bound, with the reason.  None so far.
our %NOT_BOUND = ();

my @LEVEL_NAME = ('error', 'warning', 'info', 'debug');
my %ENGINE = (auto => ENGINE_AUTO(), qemu => ENGINE_QEMU(), pve => ENGINE_PVE());
my %ENGINE_NAME = reverse %ENGINE;
my %STORAGE_FLAG = (
    qcow2   => STORAGE_QCOW2(),
    discard => STORAGE_DISCARD(),
    path    => STORAGE_PATH(),
);

# How each setting reaches the handle, in the order new() applies them: the
# log callback first, so that connecting already logs through it.
my @SETTINGS = (
    log => sub {
        my ($self, $log) = @_;
        my $cb = defined($log) ? _code($log, 'log') : undef;
        $self->{raw}->set_log_callback($cb && sub { $cb->($LEVEL_NAME[$_[0]] // $_[0], $_[1]) });
    },
    progress => sub {
        my ($self, $cb) = @_;
        $self->{raw}->set_progress_callback(defined($cb) ? _code($cb, 'progress') : undef);
    },
    vmid      => sub { $_[0]{raw}->set_vmid($_[1]) },
    state_dir => sub { $_[0]{raw}->set_state_dir($_[1]) },
    record    => sub {
        my ($self, $record) = @_;
        if (!defined($record)) {
            $self->{raw}->set_record_callback(undef, undef);
            return;
        }
        Carp::croak("Fleece: record must be a hash of load and store code refs")
            if ref($record) ne 'HASH';
        _known_keys($record, 'record', qw(load store));
        $self->{raw}->set_record_callback(
            _code($record->{load}, 'record load'), _code($record->{store}, 'record store'),
        );
    },
    engine => sub {
        my ($self, $engine) = @_;
        my $n = $ENGINE{ $engine // '' } // $engine;
        Carp::croak("Fleece: unknown engine '" . ($engine // 'undef') . "': use auto, qemu or pve")
            if !defined($n) || !defined($ENGINE_NAME{$n});
        $self->{raw}->set_engine($n);
    },
    qmp_timeout => sub { $_[0]{raw}->set_qmp_timeout($_[1]) },
    storage     => sub { $_[0]{raw}->set_storage(_storage($_[1])) },
    format      => sub { $_[0]{raw}->set_image_format($_[1]) },
    drives      => sub { $_[0]{raw}->set_drives($_[1]) },
    all_drives  => sub { $_[0]->_set_flag(PLAN_ALL_DRIVES(), $_[1]) },
    no_fleecing => sub { $_[0]->_set_flag(PLAN_NO_FLEECING(), $_[1]) },
    fleecing_optional => sub {
        my $flag = Fleece->can('PLAN_FLEECING_OPTIONAL')
            or Carp::croak("Fleece: fleecing_optional needs a newer libfleece");
        $_[0]->_set_flag($flag->(), $_[1]);
    },
    bwlimit     => sub { $_[0]{raw}->set_bwlimit($_[1] // 0) },
    incremental => sub { $_[0]{raw}->set_bitmap($_[1]) },
    cbw_timeout => sub { $_[0]{raw}->set_cbw_timeout($_[1]) },
);
my %SETTING = @SETTINGS;
my @SETTING_ORDER = @SETTINGS[grep { $_ % 2 == 0 } 0 .. $#SETTINGS];
my %PLAN_SETTING = map { $_ => 1 } qw(storage format drives all_drives no_fleecing fleecing_optional);
my %JOB_SETTING = map { $_ => 1 } qw(bwlimit incremental cbw_timeout);

sub _code {
    my ($cb, $what) = @_;
    Carp::croak("Fleece: the $what callback must be a code reference")
        if ref($cb) ne 'CODE';
    return $cb;
}

sub _known_keys {
    my ($hash, $what, @known) = @_;
    my %known = map { $_ => 1 } @known;
    my @bad = sort grep { !$known{$_} } keys %$hash;
    Carp::croak("Fleece: unknown $what option(s): @bad (known: @known)") if @bad;
}

sub _storage {
    my ($storage) = @_;
    Carp::croak("Fleece: storage is undefined") if !defined($storage);
    return Fleece::Raw::Storage->new_dir($storage) if !ref($storage);
    return $storage if Scalar::Util::blessed($storage) && $storage->isa('Fleece::Raw::Storage');
    Carp::croak("Fleece: storage must be a directory or a hash of callbacks")
        if ref($storage) ne 'HASH';
    _known_keys($storage, 'storage', qw(alloc free path supports));
    my $supports = $storage->{supports} // {};
    Carp::croak("Fleece: storage supports must be a hash such as { qcow2 => 1, path => 1 }")
        if ref($supports) ne 'HASH';
    _known_keys($supports, 'storage supports', sort keys %STORAGE_FLAG);
    my $flags = 0;
    $flags |= $STORAGE_FLAG{$_} for grep { $supports->{$_} } keys %$supports;
    return Fleece::Raw::Storage->new_callback(
        $flags,
        _code($storage->{alloc}, 'storage alloc'),
        _code($storage->{free}, 'storage free'),
        _code($storage->{path}, 'storage path'),
    );
}

sub _target {
    my ($target) = @_;
    Carp::croak("Fleece: start needs a target such as { dir => \$dir, format => 'raw' }")
        if ref($target) ne 'HASH';
    my @kinds = grep { defined($target->{$_}) } qw(dir nbd pve);
    Carp::croak("Fleece: the target needs exactly one of dir, nbd or pve") if @kinds != 1;
    if ($kinds[0] eq 'dir') {
        _known_keys($target, 'target', qw(dir format));
        return Fleece::Raw::Target->new_dir($target->{dir}, $target->{format});
    }
    _known_keys($target, 'target', $kinds[0]);
    return Fleece::Raw::Target->new_nbd($target->{nbd}) if $kinds[0] eq 'nbd';
    my $args = $target->{pve};
    $args = JSON::PP->new->canonical->encode($args) if ref($args);
    return Fleece::Raw::Target->new_pve($args);
}

sub _set_flag {
    my ($self, $flag, $on) = @_;
    my $flags = $on ? ($self->{flags} | $flag) : ($self->{flags} & ~$flag);
    $self->{raw}->set_plan_flags($flags);
    $self->{flags} = $flags;
}

# Apply settings; what was applied is remembered for start() (see there).
sub _apply {
    my ($self, $opts) = @_;
    for my $key (grep { exists $opts->{$_} } @SETTING_ORDER) {
        $SETTING{$key}->($self, $opts->{$key});
        $self->{settings}{$key} = $opts->{$key};
    }
}

sub _raw {
    my ($self) = @_;
    Carp::croak("Fleece: handle used after fork (created in pid $self->{pid}, this is "
        . "pid $$); make a new handle in this process")
        if $self->{pid} != $$;
    return $self->{raw};
}

sub new {
    my ($class, %opts) = @_;
    _known_keys(\%opts, 'new', 'qmp', 'qmp_fd', @SETTING_ORDER);
    Carp::croak("Fleece->new: vmid is required") if !defined($opts{vmid});
    Carp::croak("Fleece->new: give qmp or qmp_fd, not both")
        if defined($opts{qmp}) && defined($opts{qmp_fd});

    my $self = bless {
        raw      => Fleece::Raw::Handle->new,
        pid      => $$,
        flags    => 0,
        settings => { bwlimit => 0 },
    }, $class;
    $self->_apply(\%opts);
    if (defined($opts{qmp})) {
        $self->{raw}->connect($opts{qmp});
    } elsif (defined($opts{qmp_fd})) {
        my $fd = $opts{qmp_fd};
        $fd = fileno($fd) if ref($fd);
        Carp::croak("Fleece->new: qmp_fd is not an open file descriptor") if !defined($fd);
        # The library takes the descriptor it is given; the caller keeps its own.
        my $dup = POSIX::dup($fd) // Carp::croak("Fleece->new: dup($fd): $!");
        $self->{raw}->connect_fd($dup);
    }
    return $self;
}

sub set {
    my ($self, %opts) = @_;
    _known_keys(\%opts, 'set', @SETTING_ORDER);
    $self->_raw;
    $self->_apply(\%opts);
    return $self;
}

sub vmid { return $_[0]->_raw->get_vmid }

sub engine { return $ENGINE_NAME{ $_[0]->_raw->get_engine } }

sub plan {
    my ($self, %opts) = @_;
    _known_keys(\%opts, 'plan', sort(keys %PLAN_SETTING), sort(keys %JOB_SETTING));
    my $raw = $self->_raw;
    $self->_apply(\%opts);
    return Fleece::Plan->_new($raw->plan);
}

sub attach {
    my ($self, $plan, %opts) = @_;
    _known_keys(\%opts, 'attach', sort keys %JOB_SETTING);
    my $raw = $self->_raw;
    $self->_apply(\%opts);
    $raw->attach(Fleece::Plan::_raw_of($plan));
    $self->{keys} = [ map { $_->{key} } @$plan ];
    return 1;
}

# bwlimit and cbw_timeout only matter when the jobs start, and libfleece
# takes them until then; incremental shapes the plan and is refused once a
# run is attached.  So start() applies what the library takes, and
# otherwise says where to give it.
sub start {
    my ($self, $plan, %opts) = @_;
    my $target = delete $opts{target};
    _known_keys(\%opts, 'start', sort keys %JOB_SETTING);
    my $raw = $self->_raw;
    my $p = Fleece::Plan::_raw_of($plan);
    for my $key (sort keys %opts) {
        my ($old, $new) = ($self->{settings}{$key}, $opts{$key});
        next if (defined($old) ? $old : "\0undef") eq (defined($new) ? $new : "\0undef");
        eval { $self->_apply({ $key => $new }) };
        if (my $err = $@) {
            chomp $err;
            Carp::croak("Fleece: start: $key cannot change after attach; give it to new(), "
                . "set(), plan() or attach() ($err)");
        }
    }
    $raw->start($p, _target($target));
    return 1;
}

# Waits in slices so that Perl's (deferred) signal handlers run meanwhile,
# e.g. vzdump's "interrupted by signal" handler.
my $WAIT_SLICE_MS = 500;

sub wait {
    my ($self, $timeout_ms) = @_;
    my $raw = $self->_raw;
    $timeout_ms //= -1;
    my $deadline = $timeout_ms < 0 ? undef : Time::HiRes::time() + $timeout_ms / 1000;
    for (;;) {
        my $slice = $WAIT_SLICE_MS;
        if (defined($deadline)) {
            my $left = int(($deadline - Time::HiRes::time()) * 1000);
            $left = 0 if $left < 0;
            $slice = $left if $left < $slice;
        }
        my $r = $raw->wait($slice);
        return $r if $r || (defined($deadline) && Time::HiRes::time() >= $deadline);
    }
}

sub cancel {
    my ($self) = @_;
    $self->_raw->cancel;
    return 1;
}

sub progress {
    my ($self) = @_;
    my $raw = $self->_raw;
    my ($done, $total) = $raw->get_progress;
    my %drives;
    for my $key (@{ $self->{keys} // [] }) {
        my ($d, $t) = $raw->get_drive_progress($key);
        $drives{$key} = {
            done       => $d,
            total      => $t,
            result     => $raw->get_drive_result($key),
            elapsed_ms => $raw->get_drive_elapsed_ms($key),
        };
    }
    return { done => $done, total => $total, drives => \%drives };
}

sub record { return $_[0]->_raw->get_record }

sub cleanup {
    my ($self, %opts) = @_;
    return _recover($self, %opts) if !ref($self);
    Carp::croak("Fleece: cleanup takes no options on a handle") if %opts;
    $self->_raw->cleanup;
    delete $self->{keys};
    return 1;
}

# Fleece->cleanup(vmid => ..., record => ..., storage => ...): undo a run
# from its record alone, e.g. after the process that ran it died.  record is
# the record itself (a JSON string, as kept in a guest config) or load/store
# callbacks; without it, the record file in the state dir is used.
sub _recover {
    my ($class, %opts) = @_;
    my $record = $opts{record};
    if (defined($record) && !ref($record)) {
        my $current = $record;
        $opts{record} = {
            load  => sub { return $current },
            store => sub { $current = $_[1]; return },
        };
    }
    my $f = $class->new(%opts);
    $f->cleanup;
    return 1;
}

sub version { return Fleece::Raw::get_version() }

# The errno of the last failed library call in this thread, e.g. to tell a
# cancelled backup (ECANCELED) from a failed one after wait() croaked.
sub errno { return Fleece::Raw::get_errno() }

sub DESTROY {
    my ($self) = @_;
    # The raw handle's DESTROY frees the C handle; in a forked child it runs
    # no callbacks and only closes the child's copies of the descriptors.
    delete $self->{raw};
}

package Fleece::Plan;

# A plan is a blessed array of plain hashes, one per drive in drive-key
# order: @$plan is ordinary Perl data.  The C plan it came from is kept
# outside the array (inside-out), for attach() and start().

use strict;
use warnings;

use Carp ();
use Hash::Util::FieldHash ();
use Scalar::Util ();

Hash::Util::FieldHash::fieldhash(my %RAW);

sub _new {
    my ($class, $raw) = @_;
    my @drives;
    for my $i (0 .. $raw->get_drive_count - 1) {
        push @drives, {
            key          => $raw->get_key($i),
            device       => $raw->get_device($i),
            size         => $raw->get_size($i),
            fleeced      => $raw->get_fleeced($i) ? 1 : 0,
            reason       => $raw->get_reason($i),
            image        => $raw->get_image($i),
            format       => $raw->get_format($i),
            cluster_size => $raw->get_cluster_size($i),
        };
    }
    my $self = bless \@drives, $class;
    $RAW{$self} = $raw;
    return $self;
}

sub _raw_of {
    my ($plan) = @_;
    my $raw = Scalar::Util::blessed($plan) && $plan->isa('Fleece::Plan') ? $RAW{$plan} : undef;
    Carp::croak("Fleece: expected a plan returned by \$f->plan") if !$raw;
    return $raw;
}

sub drives {
    my ($self) = @_;
    return wantarray ? @$self : [@$self];
}

sub drive {
    my ($self, $key) = @_;
    my ($d) = grep { $_->{key} eq $key } @$self;
    return $d;
}

sub fleeced {
    my ($self) = @_;
    return grep { $_->{fleeced} } @$self;
}

sub to_json { return _raw_of($_[0])->to_json }

# Perl ithreads would clone the C pointers and free them twice.
package Fleece::Raw::Handle;
sub CLONE_SKIP { 1 }
package Fleece::Raw::Plan;
sub CLONE_SKIP { 1 }
package Fleece::Raw::Storage;
sub CLONE_SKIP { 1 }
package Fleece::Raw::Target;
sub CLONE_SKIP { 1 }

package Fleece;

1;

__END__

=head1 NAME

Fleece - fleecing backups of running QEMU VMs (Perl binding of libfleece)

=head1 SYNOPSIS

  use Fleece;

  my $f = Fleece->new(
      qmp       => '/var/run/qemu-server/100.qmp',
      vmid      => 100,
      state_dir => '/var/lib/fleece',
      log       => sub { my ($level, $msg) = @_; print "$level: $msg\n" },
  );
  my $plan = $f->plan(storage => '/mnt/fleece', format => 'qcow2');
  for my $d (@$plan) {
      printf "%s: %s\n", $d->{key}, $d->{fleeced} ? $d->{image} : "not fleeced: $d->{reason}";
  }
  eval {
      $f->attach($plan, bwlimit => 10240);
      $f->start($plan, target => { dir => '/backup/100', format => 'raw' });
      $f->wait;
  };
  my $err = $@;
  $f->cleanup;      # always: undoes the run, frees the images, drops the record
  die $err if $err;

  # After a crash: undo a run from its record alone.
  Fleece->cleanup(vmid => 100, record => $json, storage => $storage_callbacks);

=head1 DESCRIPTION

A thin binding of libfleece (see fleece(3)).  Every public C function is
bound as a method of C<Fleece::Raw::Handle>, C<Fleece::Raw::Plan>,
C<Fleece::Raw::Storage> or C<Fleece::Raw::Target>, named after it
(C<%Fleece::BINDINGS> lists them); C<Fleece> and C<Fleece::Plan> are the
idiomatic layer on top, described here.

Errors croak with the library's message, e.g.
C<"fleece_attach: another run holds the lock for VM 100 (...)\n">; the C
objects involved are freed first.  C<Fleece::errno()> returns the errno of
the last failure (e.g. C<ECANCELED> after C<wait> croaked for a cancelled
backup).  Bad arguments croak with a message starting with C<Fleece:>.

=head1 THE HANDLE

=over

=item Fleece->new(qmp => $path, vmid => $id, %settings)

Makes a handle, applies the settings and connects to QEMU's QMP socket.
C<qmp_fd =E<gt> $fh_or_fd> connects over an already connected socket instead
(the handle works on a dup of it).  Without either, the handle is not
connected: it can read the record and clean up (the record knows the socket).

Settings, accepted by C<new> and C<set> (and some by C<plan> and C<attach>),
stay in effect for later calls:

  vmid        the Proxmox VM id (required)
  state_dir   where records and locks live (default $FLEECE_STATE_DIR,
              else /var/lib/fleece)
  engine      'auto' (default), 'qemu' or 'pve'
  qmp_timeout timeout of one QMP command in ms
  storage     a directory, or callbacks (see STORAGE)
  record      { load => sub, store => sub } (see RECORD); default: a file
              in the state dir
  log         sub { my ($level, $msg) = @_ } with $level 'error',
              'warning', 'info' or 'debug'
  progress    sub { my ($drive, $done, $total) = @_ }, in bytes, called
              while wait() runs
  format      'raw' or 'qcow2' for the fleecing images; undef: qcow2 where
              the storage supports it
  drives      [ 'scsi0', ... ] to restrict the backup; undef: every drive
  all_drives  1 to fleece EFI disks and TPM state too
  no_fleecing 1 to back up without fleecing
  fleecing_optional
              1 to back up without fleecing, with a warning, when QEMU
              cannot fleece (else that fails)
  bwlimit     KiB/s, 0 for no limit
  incremental the name of a dirty bitmap on every drive; undef: full backup
  cbw_timeout copy-before-write timeout in seconds (0 disables)

libfleece refuses to change settings while a run is attached, so give
C<bwlimit>, C<incremental> and C<cbw_timeout> before C<attach> (to C<new>,
C<set>, C<plan> or C<attach>); C<start> accepts them only if they are
unchanged.  C<incremental> is checked when planning (every drive must have
the bitmap), so give it to C<plan> at the latest.

=item $f->plan(storage => ..., format => ..., drives => [...], all_drives => 0|1, ...)

Reads the VM's drives and decides what to fleece; changes nothing.  Returns a
C<Fleece::Plan>: a blessed array of plain hashes, one per drive in drive-key
order, with the keys C<key>, C<device>, C<size> (bytes), C<fleeced> (1 or 0),
C<reason> (why not fleeced, else undef), C<image> (the fleecing image name,
or undef), C<format> and C<cluster_size>.  C<< $plan->drives >>,
C<< $plan->drive($key) >>, C<< $plan->fleeced >> and C<< $plan->to_json >>
are there for convenience.

=item $f->attach($plan, %job_settings)

Allocates the fleecing images and attaches them to QEMU, after recording what
it is about to do; on failure it undoes what it did.

=item $f->start($plan, target => {...}, bwlimit => ..., incremental => ...)

Starts the backup of every drive in the plan with one point in time.  The
target is one of

  { dir => $dir, format => 'raw' | 'qcow2' }   one image per drive key
  { nbd => 'nbd+unix:///?socket=/run/x.sock' } one export per drive key
  { pve => { 'backup-file' => ..., format => 'vma' } }   Proxmox engine only

=item $f->wait / $f->wait($timeout_ms)

Waits for the backup to end (forever, or up to the timeout), calling the
progress callback meanwhile.  Returns 1 when it ended successfully, 0 if it
still runs at the timeout; croaks if it failed or was cancelled.  Perl
signal handlers run while it waits.

=item $f->cancel

Asks the running backup to stop; C<wait> then croaks with ECANCELED.

=item $f->progress

  { done => $bytes, total => $bytes,
    drives => { scsi0 => { done => $bytes, total => $bytes,
                           result => undef | 'ok' | 'cancelled' | $why_it_failed,
                           elapsed_ms => $ms }, ... } }

C<result> is undef while the drive's backup runs.

=item $f->record

The durable record of this VM as a JSON string, or undef if there is none.

=item $f->cleanup

Undoes everything the run did (also a run of an earlier process found in the
record): cancels jobs, restores the devices' nodes, removes added nodes,
frees the images and removes the record.  Nothing to do is success.

=item Fleece->cleanup(vmid => $id, record => $json_or_callbacks, %settings)

The same as a class method, for recovery: from the vmid and the record (the
JSON string itself, or load/store callbacks, or the state dir's file).  A
record made with callback storage needs the same C<storage> callbacks to free
its images.  A C<qmp> socket may be given; otherwise the record's is used.

=item Fleece::version(), Fleece::errno()

=back

=head1 STORAGE

A string is a directory (the built-in storage).  A hash plugs in the caller's
storage, e.g. Proxmox's:

  storage => {
      alloc    => sub { my ($name, $format, $size) = @_; ...; return $volid },
      free     => sub { my ($volid) = @_; ... },     # a missing image is fine
      path     => sub { my ($volid) = @_; ...; return $path },
      supports => { qcow2 => 1, discard => 1, path => 1 },
  }

C<alloc> must create an image of exactly C<$size> bytes (virtual size);
C<path =E<gt> 1> makes names carry a C<.raw>/C<.qcow2> suffix.

=head1 RECORD

  record => {
      load  => sub { my ($vmid) = @_; return $json_or_undef },
      store => sub { my ($vmid, $json_or_undef) = @_; ... },   # undef: remove
  }

C<store> must make the record durable before returning.

=head1 CALLBACKS AND EXCEPTIONS

A callback that dies does not crash anything: for C<alloc>, C<free>,
C<path>, C<load> and C<store> the library sees a failure (errno EIO) and the
call fails as it would for any storage or record error; the croak message
then ends with C<(the Perl storage alloc callback died: ...)>.  The
exceptions of C<log> and C<progress>, which cannot fail a call, and of
callbacks in calls that still succeeded, are passed to C<warn>.  Callbacks
may not call methods of the handle they belong to (that croaks, inside the
callback).  A callback that refers to its handle makes a reference cycle;
use a weak reference.

No callback runs during global destruction (their closures may be half
gone): clean up before the program ends.  A handle destroyed then with a run
still set up says so through C<warn>.

=head1 FORK

A handle records the pid that made it.  Every method croaks with
C<"Fleece: handle used after fork ..."> in another process.  When a copy of
the handle is destroyed in a child, no callbacks run and only the child's
copies of the QMP socket and lock descriptors are closed: QEMU, the lock and
the parent's run are not disturbed.

=head1 THREADS

A handle is used by one thread at a time; handles are not cloned into new
Perl threads (they are undef there).

=cut
