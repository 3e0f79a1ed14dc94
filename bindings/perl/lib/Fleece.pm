package Fleece;

# The Perl binding of libfleece 1.0: options by name, plans and figures as
# Perl data, targets from Perl filehandles, and refusal of handles used
# after fork.  The C calls themselves are in Fleece.xs, one method per C
# function (Fleece::Raw::*); failures croak with a Fleece::Error.

use strict;
use warnings;

use Carp ();
use JSON::PP ();
use POSIX ();
use Scalar::Util ();

use Fleece::Error;

our $VERSION = '1.0.0';

require XSLoader;
XSLoader::load('Fleece', $VERSION);

# Every public C function and its Perl binding; the API-coverage test checks
# this against fleece.h, so a function added there must be bound here or
# listed in %NOT_BOUND with the reason.
our %BINDINGS = (
    fleece_get_version                   => 'Fleece::Raw::get_version',
    fleece_get_error                     => 'Fleece::Raw::get_error',
    fleece_get_errno                     => 'Fleece::Raw::get_errno',
    fleece_storage_new_dir               => 'Fleece::Raw::Storage::new_dir',
    fleece_storage_new_rbd               => 'Fleece::Raw::Storage::new_rbd',
    fleece_storage_set_option            => 'Fleece::Raw::Storage::set_option',
    fleece_storage_new_callback          => 'Fleece::Raw::Storage::new_callback',
    fleece_storage_set_alloc_callback    => 'Fleece::Raw::Storage::set_alloc_callback',
    fleece_storage_set_remove_callback   => 'Fleece::Raw::Storage::set_remove_callback',
    fleece_storage_set_path_callback     => 'Fleece::Raw::Storage::set_path_callback',
    fleece_storage_set_blockdev_callback => 'Fleece::Raw::Storage::set_blockdev_callback',
    fleece_storage_free                  => 'Fleece::Raw::Storage::DESTROY',
    fleece_target_new_dir                => 'Fleece::Raw::Target::new_dir',
    fleece_target_set_base               => 'Fleece::Raw::Target::set_base',
    fleece_target_set_pve_args           => 'Fleece::Raw::Target::set_pve_args',
    fleece_target_new_nbd                => 'Fleece::Raw::Target::new_nbd',
    fleece_target_new_pve                => 'Fleece::Raw::Target::new_pve',
    fleece_target_new_fd                 => 'Fleece::Raw::Target::new_fd',
    fleece_target_free                   => 'Fleece::Raw::Target::DESTROY',
    fleece_new                           => 'Fleece::Raw::Handle::new',
    fleece_free                          => 'Fleece::Raw::Handle::DESTROY',
    fleece_connect                       => 'Fleece::Raw::Handle::connect',
    fleece_connect_fd                    => 'Fleece::Raw::Handle::connect_fd',
    fleece_set_vmid                      => 'Fleece::Raw::Handle::set_vmid',
    fleece_get_vmid                      => 'Fleece::Raw::Handle::get_vmid',
    fleece_set_state_dir                 => 'Fleece::Raw::Handle::set_state_dir',
    fleece_set_storage                   => 'Fleece::Raw::Handle::set_storage',
    fleece_set_engine                    => 'Fleece::Raw::Handle::set_engine',
    fleece_get_engine                    => 'Fleece::Raw::Handle::get_engine',
    fleece_set_qmp_timeout               => 'Fleece::Raw::Handle::set_qmp_timeout',
    fleece_set_drives                    => 'Fleece::Raw::Handle::set_drives',
    fleece_set_plan_flags                => 'Fleece::Raw::Handle::set_plan_flags',
    fleece_set_image_format              => 'Fleece::Raw::Handle::set_image_format',
    fleece_set_bwlimit                   => 'Fleece::Raw::Handle::set_bwlimit',
    fleece_set_bitmap                    => 'Fleece::Raw::Handle::set_bitmap',
    fleece_set_cbw_timeout               => 'Fleece::Raw::Handle::set_cbw_timeout',
    fleece_set_log_callback              => 'Fleece::Raw::Handle::set_log_callback',
    fleece_set_progress_callback         => 'Fleece::Raw::Handle::set_progress_callback',
    fleece_set_record_callback           => 'Fleece::Raw::Handle::set_record_callback',
    fleece_plan                          => 'Fleece::Raw::Handle::plan',
    fleece_plan_free                     => 'Fleece::Raw::Plan::DESTROY',
    fleece_plan_get_drive_count          => 'Fleece::Raw::Plan::get_drive_count',
    fleece_plan_get_key                  => 'Fleece::Raw::Plan::get_key',
    fleece_plan_get_device               => 'Fleece::Raw::Plan::get_device',
    fleece_plan_get_size                 => 'Fleece::Raw::Plan::get_size',
    fleece_plan_get_fleeced              => 'Fleece::Raw::Plan::get_fleeced',
    fleece_plan_get_reason               => 'Fleece::Raw::Plan::get_reason',
    fleece_plan_get_image                => 'Fleece::Raw::Plan::get_image',
    fleece_plan_get_format               => 'Fleece::Raw::Plan::get_format',
    fleece_plan_get_cluster_size         => 'Fleece::Raw::Plan::get_cluster_size',
    fleece_plan_get_skipped_count        => 'Fleece::Raw::Plan::get_skipped_count',
    fleece_plan_get_skipped_name         => 'Fleece::Raw::Plan::get_skipped_name',
    fleece_plan_get_skipped_reason       => 'Fleece::Raw::Plan::get_skipped_reason',
    fleece_plan_to_json                  => 'Fleece::Raw::Plan::to_json',
    fleece_attach                        => 'Fleece::Raw::Handle::attach',
    fleece_start                         => 'Fleece::Raw::Handle::start',
    fleece_wait                          => 'Fleece::Raw::Handle::wait',
    fleece_cancel                        => 'Fleece::Raw::Handle::cancel',
    fleece_get_progress                  => 'Fleece::Raw::Handle::get_progress',
    fleece_get_drive_progress            => 'Fleece::Raw::Handle::get_drive_progress',
    fleece_get_stat                      => 'Fleece::Raw::Handle::get_stat',
    fleece_get_drive_result              => 'Fleece::Raw::Handle::get_drive_result',
    fleece_get_drive_elapsed_ms          => 'Fleece::Raw::Handle::get_drive_elapsed_ms',
    fleece_get_record                    => 'Fleece::Raw::Handle::get_record',
    fleece_get_status                    => 'Fleece::Raw::Handle::get_status',
    fleece_cleanup                       => 'Fleece::Raw::Handle::cleanup',
);

# Public C functions deliberately not bound, with the reason.  None so far.
our %NOT_BOUND = ();

my $JSON = JSON::PP->new->canonical;

my @LEVEL_NAME = ('error', 'warning', 'info', 'debug');
my %ENGINE = (auto => ENGINE_AUTO(), qemu => ENGINE_QEMU(), pve => ENGINE_PVE());
my %ENGINE_NAME = reverse %ENGINE;
my %STORAGE_FLAG = (
    qcow2   => STORAGE_QCOW2(),
    discard => STORAGE_DISCARD(),
    path    => STORAGE_PATH(),
);
# stats(): each figure by name, in fleece.h's order.
my @STAT = (
    done       => STAT_DONE(),
    total      => STAT_TOTAL(),
    zero       => STAT_ZERO(),
    reused     => STAT_REUSED(),
    dirty      => STAT_DIRTY(),
    finishing  => STAT_FINISHING(),
    elapsed_ms => STAT_ELAPSED_MS(),
);
my %RBD_OPTION = (conf => 'conf', id => 'id', keyring => 'keyring', object_size => 'object-size');

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
    fleecing_optional => sub { $_[0]->_set_flag(PLAN_FLEECING_OPTIONAL(), $_[1]) },
    bwlimit     => sub { $_[0]{raw}->set_bwlimit($_[1] // 0) },
    incremental => sub { $_[0]->_set_bitmap($_[1], BITMAP_USE()) },
    bitmap_new  => sub { $_[0]->_set_bitmap($_[1], BITMAP_NEW()) },
    cbw_timeout => sub { $_[0]{raw}->set_cbw_timeout($_[1]) },
);
my %SETTING = @SETTINGS;
my @SETTING_ORDER = @SETTINGS[grep { $_ % 2 == 0 } 0 .. $#SETTINGS];
my %PLAN_SETTING = map { $_ => 1 } qw(storage format drives all_drives no_fleecing fleecing_optional);
my %JOB_SETTING = map { $_ => 1 } qw(bwlimit incremental bitmap_new cbw_timeout);

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

# A file descriptor the library may own: a dup of the caller's filehandle
# or descriptor number, so that the caller's stays open and its own.
sub _dup_fd {
    my ($fh, $what) = @_;
    my $fd = ref($fh) ? fileno($fh) : $fh;
    Carp::croak("Fleece: $what is not an open filehandle or file descriptor")
        if !defined($fd) || $fd !~ /^\d+$/;
    my $dup = POSIX::dup($fd);
    Carp::croak("Fleece: $what: dup($fd): $!") if !defined($dup);
    return $dup;
}

sub _rbd_storage {
    my ($rbd) = @_;
    Carp::croak("Fleece: storage rbd must be a hash such as { pool => 'rbd' }")
        if ref($rbd) ne 'HASH';
    _known_keys($rbd, 'rbd storage', 'pool', 'namespace', sort keys %RBD_OPTION);
    my $st = Fleece::Raw::Storage->new_rbd($rbd->{pool}, $rbd->{namespace});
    for my $key (sort keys %RBD_OPTION) {
        $st->set_option($RBD_OPTION{$key}, $rbd->{$key}) if defined($rbd->{$key});
    }
    return $st;
}

# The blockdev callback may return a hash (QEMU's BlockdevOptions as Perl
# data) or its JSON text; the library takes text.
sub _blockdev_encoder {
    my ($cb) = @_;
    return sub {
        my $def = $cb->(@_);
        return ref($def) eq 'HASH' ? $JSON->encode($def) : $def;
    };
}

sub _callback_storage {
    my ($storage) = @_;
    _known_keys($storage, 'storage', qw(id alloc remove path blockdev supports));
    Carp::croak("Fleece: a callback storage needs an id that names it in the record, "
        . "e.g. 'pve:local-lvm'")
        if !defined($storage->{id});
    my $supports = $storage->{supports} // {};
    Carp::croak("Fleece: storage supports must be a hash such as { qcow2 => 1, path => 1 }")
        if ref($supports) ne 'HASH';
    _known_keys($supports, 'storage supports', sort keys %STORAGE_FLAG);
    my $flags = 0;
    $flags |= $STORAGE_FLAG{$_} for grep { $supports->{$_} } keys %$supports;

    my $st = Fleece::Raw::Storage->new_callback($storage->{id}, $flags);
    $st->set_alloc_callback(_code($storage->{alloc}, 'storage alloc'));
    $st->set_remove_callback(_code($storage->{remove}, 'storage remove'));
    Carp::croak("Fleece: a callback storage needs a path or a blockdev callback (or both)")
        if !defined($storage->{path}) && !defined($storage->{blockdev});
    $st->set_path_callback(_code($storage->{path}, 'storage path'))
        if defined($storage->{path});
    $st->set_blockdev_callback(_blockdev_encoder(_code($storage->{blockdev}, 'storage blockdev')))
        if defined($storage->{blockdev});
    return $st;
}

sub _storage {
    my ($storage) = @_;
    Carp::croak("Fleece: storage is undefined") if !defined($storage);
    return Fleece::Raw::Storage->new_dir($storage) if !ref($storage);
    return $storage if Scalar::Util::blessed($storage) && $storage->isa('Fleece::Raw::Storage');
    Carp::croak("Fleece: storage must be a directory, { rbd => {...} } or a hash of callbacks")
        if ref($storage) ne 'HASH';
    if (exists $storage->{rbd}) {
        _known_keys($storage, 'storage', 'rbd');
        return _rbd_storage($storage->{rbd});
    }
    return _callback_storage($storage);
}

my %TARGET_KEYS = (
    dir    => [qw(dir format base)],
    nbd    => [qw(nbd)],
    pve    => [qw(pve)],
    vma_fd => [qw(vma_fd pve)],
    fd     => [qw(fd format)],
);

sub _target {
    my ($target) = @_;
    my @kinds = sort keys %TARGET_KEYS;
    Carp::croak("Fleece: start needs a target such as { dir => \$dir, format => 'raw' }")
        if ref($target) ne 'HASH';
    my @given = grep { defined($target->{$_}) } @kinds;
    Carp::croak("Fleece: the target needs exactly one of " . join(', ', @kinds)) if @given != 1;
    my $kind = $given[0];
    _known_keys($target, 'target', @{ $TARGET_KEYS{$kind} });
    if ($kind eq 'dir') {
        my $t = Fleece::Raw::Target->new_dir($target->{dir}, $target->{format});
        $t->set_base($target->{base}) if defined($target->{base});
        return $t;
    }
    return Fleece::Raw::Target->new_nbd($target->{nbd}) if $kind eq 'nbd';
    if ($kind eq 'pve') {
        my $args = $target->{pve};
        return Fleece::Raw::Target->new_pve(ref($args) ? $JSON->encode($args) : $args);
    }
    my $fh = $target->{$kind};
    my $format = $kind eq 'vma_fd' ? 'vma' : $target->{format} // 'raw';
    my $t = Fleece::Raw::Target->new_fd(_dup_fd($fh, "target $kind"), $format);
    # A VMA's other backup arguments (config-file, firewall-file, ...).
    if (defined(my $args = $target->{pve})) {
        $t->set_pve_args(ref($args) ? $JSON->encode($args) : $args);
    }
    return $t;
}

sub _set_flag {
    my ($self, $flag, $on) = @_;
    my $flags = $on ? ($self->{flags} | $flag) : ($self->{flags} & ~$flag);
    $self->{raw}->set_plan_flags($flags);
    $self->{flags} = $flags;
}

sub _set_bitmap {
    my ($self, $name, $mode) = @_;
    $self->{raw}->set_bitmap($name, defined($name) ? $mode : 0);
}

# Apply settings; what was applied is remembered for start() (see there).
sub _apply {
    my ($self, $opts) = @_;
    Carp::croak("Fleece: give incremental (back up what the bitmap marks) or bitmap_new "
        . "(a full backup that starts the bitmap), not both")
        if defined($opts->{incremental}) && defined($opts->{bitmap_new});
    # One bitmap setting in the library: the defined one is applied last.
    my @order = @SETTING_ORDER;
    @order = ((grep { $_ ne 'incremental' } @order), 'incremental') if defined($opts->{incremental});
    for my $key (grep { exists $opts->{$_} } @order) {
        $SETTING{$key}->($self, $opts->{$key});
        $self->{settings}{$key} = $opts->{$key};
        # The other bitmap option is no longer in force.
        delete $self->{settings}{ $key eq 'incremental' ? 'bitmap_new' : 'incremental' }
            if $key eq 'incremental' || $key eq 'bitmap_new';
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
        # The library takes the descriptor it is given; the caller keeps its own.
        $self->{raw}->connect_fd(_dup_fd($opts{qmp_fd}, 'qmp_fd'));
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
    $raw->attach(Fleece::Plan::_raw_of($plan), 0);
    $self->{keys} = [ map { $_->{key} } @$plan ];
    return 1;
}

# bwlimit and cbw_timeout only matter when the jobs start, and libfleece
# takes them until then; the bitmap shapes the plan and is refused once a
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
    $raw->start($p, _target($target), 0);
    return 1;
}

# The XS waits in slices and runs Perl's signal handlers between them: a
# handler may call cancel() (the wait then croaks with ECANCELED) or die.
sub wait {
    my ($self, $timeout_ms) = @_;
    return $self->_raw->wait($timeout_ms // -1);
}

sub cancel { return $_[0]->_raw->cancel }

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

sub stats {
    my ($self, $key) = @_;
    my $raw = $self->_raw;
    my %stats;
    for (my $i = 0; $i < @STAT; $i += 2) {
        my $v = $raw->get_stat($key, $STAT[$i + 1]);
        $stats{ $STAT[$i] } = $v if defined($v);
    }
    return \%stats;
}

sub status { return $JSON->decode($_[0]->_raw->get_status(0)) }

sub record { return $_[0]->_raw->get_record }

sub cleanup {
    my ($self, %opts) = @_;
    return _recover($self, %opts) if !ref($self);
    Carp::croak("Fleece: cleanup takes no options on a handle") if %opts;
    $self->_raw->cleanup(0);
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

# The errno of the last failed library call in this thread.
sub errno { return Fleece::Raw::get_errno() }

sub DESTROY {
    my ($self) = @_;
    # The raw handle's DESTROY frees the C handle; in a forked child it runs
    # no callbacks and only closes the child's copies of the descriptors.
    delete $self->{raw};
}

package Fleece::Plan;

# A plan is a blessed array of plain hashes, one per drive in drive-key
# order: @$plan is ordinary Perl data.  The C plan it came from and what
# QEMU has that is not backed up are kept outside the array (inside-out).

use strict;
use warnings;

use Carp ();
use Hash::Util::FieldHash ();
use Scalar::Util ();

Hash::Util::FieldHash::fieldhash(my %RAW);
Hash::Util::FieldHash::fieldhash(my %SKIPPED);

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
    my @skipped = map { { name => $raw->get_skipped_name($_), reason => $raw->get_skipped_reason($_) } }
        0 .. $raw->get_skipped_count - 1;
    my $self = bless \@drives, $class;
    $RAW{$self} = $raw;
    $SKIPPED{$self} = \@skipped;
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

sub skipped {
    my ($self) = @_;
    my @s = map { {%$_} } @{ $SKIPPED{$self} // [] };
    return wantarray ? @s : \@s;
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
  printf "not backed up: %s (%s)\n", $_->{name}, $_->{reason} for $plan->skipped;

  local $SIG{INT} = sub { $f->cancel };    # safe: wait() then croaks
  eval {
      $f->attach($plan, bwlimit => 10240);
      $f->start($plan, target => { dir => '/backup/100', format => 'raw' });
      $f->wait;
  };
  my $err = $@;
  $f->cleanup;      # always: undoes the run, frees the images, drops the record
  die $err if $err; # a Fleece::Error: "the backup of VM 100 was cancelled\n"

  # After a crash: undo a run from its record alone.
  Fleece->cleanup(vmid => 100, record => $json, storage => $storage_callbacks);

=head1 DESCRIPTION

A thin binding of libfleece 1.0 (see fleece(3)).  Every public C function
is bound as a method of C<Fleece::Raw::Handle>, C<Fleece::Raw::Plan>,
C<Fleece::Raw::Storage> or C<Fleece::Raw::Target>, named after it
(C<%Fleece::BINDINGS> lists them; C<attach>, C<start>, C<cleanup> and
C<get_status> take the C flags as their last argument); C<Fleece> and
C<Fleece::Plan> are the idiomatic layer on top, described here.

=head1 ERRORS

A failure in libfleece croaks with a L<Fleece::Error>: it stringifies to
the message for the admin (without the C function name libfleece puts in
front), with C<code> (the errno), C<function> and predicates such as
C<is_busy> and C<is_cancelled>:

  eval { $f->attach($plan) };
  if (ref($@) && $@->isa('Fleece::Error') && $@->is_busy) { ... }
  print "backup failed: $@" if $@;        # the message, one line

Bad arguments (an unknown option, a vmid that is not a number, a missing
callback) are programming errors and croak with a plain string starting
with C<Fleece:>.  C<Fleece::errno()> returns the errno of the last failed
library call in this thread.

=head1 THE HANDLE

=over

=item Fleece->new(qmp => $path, vmid => $id, %settings)

Makes a handle, applies the settings and connects to QEMU's QMP socket:
libfleece probes QEMU once (choosing the engine) and then holds the monitor
only while one of its calls runs, so other clients of the monitor
(qemu-server's own QMP commands) are not kept waiting between calls.
C<qmp_fd =E<gt> $fh_or_fd> uses an already connected socket instead (the
handle keeps a dup of it, and with it the monitor).  Without either, the
handle is not connected: it can read the record and status and clean up
(the record knows the socket).

Settings, accepted by C<new> and C<set> (and some by C<plan> and C<attach>),
stay in effect for later calls:

  vmid        the Proxmox VM id (required)
  state_dir   where records and locks live (default $FLEECE_STATE_DIR,
              else /var/lib/fleece)
  engine      'auto' (default), 'qemu' or 'pve'
  qmp_timeout timeout of one QMP command in ms
  storage     a directory, { rbd => {...} }, or callbacks (see STORAGE)
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
  bwlimit     KiB/s per drive's job, 0 for no limit
  incremental NAME: an incremental backup of what the dirty bitmap NAME
              marks on every backed-up drive; from the backup's point in
              time the bitmap tracks the next one (FLEECE_BITMAP_USE)
  bitmap_new  NAME: a full backup that (re)starts the bitmap NAME at its
              point in time, atomically with the jobs' start: the first
              link of an incremental chain, with no gap (FLEECE_BITMAP_NEW)
  cbw_timeout copy-before-write timeout in seconds (0 disables)

C<incremental> and C<bitmap_new> are one setting of the library, the
dirty bitmap and what to do with it: giving one replaces the other, undef
for either means a full backup without bitmap, and giving both defined at
once croaks.

libfleece refuses settings that shape a run while one is set up (from
C<attach> until C<cleanup>); C<bwlimit> and C<cbw_timeout> may change until
C<start>.  So give the bitmap options before C<attach> (to C<new>, C<set>,
C<plan> or C<attach>); C<start> accepts them only if they are unchanged.
The bitmap is checked when planning (every drive must have it for
C<incremental>), so give it to C<plan> at the latest.

=item $f->plan(storage => ..., format => ..., drives => [...], all_drives => 0|1, ...)

Reads the VM's drives and decides what to fleece; changes nothing.  Returns a
C<Fleece::Plan>: a blessed array of plain hashes, one per drive in drive-key
order, with the keys C<key>, C<device>, C<size> (bytes), C<fleeced> (1 or 0),
C<reason> (why not fleeced, else undef), C<image> (the fleecing image name,
or undef), C<format> and C<cluster_size>.  C<< $plan->skipped >> lists what
QEMU has that is not backed up, as hashes C<{ name, reason }> (CD-ROMs,
firmware code, drives without a guest device, drives not asked for).
C<< $plan->drives >>, C<< $plan->drive($key) >>, C<< $plan->fleeced >> and
C<< $plan->to_json >> are there for convenience.

=item $f->attach($plan, %job_settings)

Allocates the fleecing images and attaches them to QEMU, after recording what
it is about to do; on failure it undoes what it did.  Refused (C<is_busy>)
while QEMU shows another run of this VM.

=item $f->start($plan, target => {...}, bwlimit => ..., cbw_timeout => ...)

Starts the backup of every drive in the plan with one point in time.  The
target is one of

  { dir => $dir, format => 'raw' | 'qcow2' }   one image per drive key
  { dir => $dir, format => 'qcow2', base => $previous_dir }
                                  incremental: qcow2 images backed by the
                                  previous backup of the chain in $previous_dir
  { nbd => 'nbd+unix:///?socket=/run/x.sock' } one export per drive key
  { vma_fd => $fh }               Proxmox engine: a VMA archive into $fh,
                                  e.g. the pipe to a compressor
  { vma_fd => $fh, pve => { 'config-file' => ... } }
                                  the same with more backup arguments
  { fd => $fh, format => 'raw' }  stock engine, one drive: its image
  { pve => { 'backup-file' => ..., format => 'vma' | 'pbs', ... } }
                                  Proxmox engine: the patched QEMU's backup
                                  arguments, passed through (devlist and
                                  fleecing are added by the library)

A filehandle (or descriptor number) given as C<vma_fd> or C<fd> stays the
caller's: the target gets a dup of it, which it owns and closes.

=item $f->wait / $f->wait($timeout_ms)

Waits for the backup to end (forever, or up to the timeout), calling the
progress callback meanwhile.  Returns 1 when it ended successfully, 0 if it
still runs at the timeout; croaks if it failed or was cancelled
(C<is_cancelled>).  Perl signal handlers run while it waits (within a
quarter second), so C<$SIG{INT} = sub { $f-E<gt>cancel }> ends a wait
without timeout, and a handler that dies ends it with its exception.

=item $f->cancel

Asks the run to stop; the wait that runs or the next one sends the cancel
to QEMU and croaks with ECANCELED, and C<start> refuses a cancelled run.
Safe in a signal handler: it only records the request.  Returns 1, or 0 if
no run is set up on the handle (it never croaks for that).

=item $f->progress

  { done => $bytes, total => $bytes,
    drives => { scsi0 => { done => $bytes, total => $bytes,
                           result => undef | 'ok' | 'cancelled' | $why_it_failed,
                           elapsed_ms => $ms }, ... } }

C<result> is undef while the drive's backup runs.

=item $f->stats / $f->stats($key)

The figures of the whole backup, or of drive C<$key>, while it runs or
after it ended:

  { done       => $bytes,   # backed up so far
    total      => $bytes,   # to back up
    zero       => $bytes,   # of done, zero
    reused     => $bytes,   # reused from the previous backup
    dirty      => $bytes,   # incremental: what the bitmap marked
    finishing  => 0 | 1,    # the data is out and the backup ends
    elapsed_ms => $ms }

A figure the engine does not report (C<ENOTSUP>) is absent, e.g. C<reused>
on the stock engine; the Proxmox engine reports query-backup's figures,
which qemu-server's task log prints.

=item $f->status

What is known of this VM's runs, read-only, as Perl data (the JSON of
C<fleece_get_status()> decoded): C<record>, C<lock>, C<qemu> (markers and
traces of runs in QEMU) and C<run>, one of C<none>, C<active>, C<crashed>,
C<leftovers>.

=item $f->record

The durable record of this VM as a JSON string, or undef if there is none.

=item $f->cleanup

Undoes everything the run did (also a run of an earlier process found in the
record): cancels jobs, restores the devices' nodes, removes added nodes,
frees the images and removes the record.  Nothing to do is success.

=item Fleece->cleanup(vmid => $id, record => $json_or_callbacks, %settings)

The same as a class method, for recovery: from the vmid and the record (the
JSON string itself, or load/store callbacks, or the state dir's file).  A
record made with callback storage needs a storage with the same C<id> to
free its images.  A C<qmp> socket may be given; otherwise the record's is
used.

=item Fleece::version(), Fleece::errno()

=back

=head1 STORAGE

A string is a directory (the built-in storage).

  storage => { rbd => { pool => 'rbd', namespace => 'fleece',
                        conf => '/etc/ceph/ceph.conf', id => 'admin',
                        keyring => '/etc/ceph/ceph.client.admin.keyring',
                        object_size => 4194304 } }

is the built-in Ceph RBD storage; a libfleece built without librbd croaks
with C<is_unsupported>.  A hash of callbacks plugs in the caller's storage,
e.g. Proxmox's:

  storage => {
      id       => 'pve:local-lvm',   # names it in the record
      alloc    => sub { my ($name, $format, $size) = @_; ...; return $volid },
      remove   => sub { my ($volid) = @_; ... },     # a missing image is fine
      path     => sub { my ($volid) = @_; ...; return $path },
      blockdev => sub { my ($volid) = @_; ...;
                        return { driver => 'rbd', pool => ..., image => ... } },
      supports => { qcow2 => 1, discard => 1, path => 1 },
  }

C<alloc> must create an image of exactly C<$size> bytes (virtual size) and
fail if one of that name exists.  C<blockdev> returns QEMU's
BlockdevOptions of the image's protocol layer (a hash, or its JSON text);
the library adds the format layer and its node names and asks for discard.
One of C<path> and C<blockdev> is needed; with both, QEMU gets the
blockdev definition.  C<path =E<gt> 1> makes names carry a C<.raw>/C<.qcow2>
suffix.  A cleanup frees a run's images only through a storage with the id
the record names.

=head1 RECORD

  record => {
      load  => sub { my ($vmid) = @_; return $json_or_undef },
      store => sub { my ($vmid, $json_or_undef) = @_; ... },   # undef: remove
  }

C<store> must make the record durable before returning.

=head1 CALLBACKS AND EXCEPTIONS

Callbacks are registered with the library together with a free function:
the binding holds a reference to the code until the library drops the
callback (replaced, or its handle or storage freed).  A callback that
refers to its handle makes a reference cycle; use a weak reference.

A storage or record callback that dies fails the library's step, and the
exception's text becomes the reason in the library's error, e.g.
C<"the storage pve:local could not allocate image vm-100-fleece-0.qcow2
(qcow2, 8388608 bytes): no space left on device">; its errno is the code
of a L<Fleece::Error> the callback died with, else what the Perl code left
in C<$!>, else EIO.  Returning undef or an empty string where a value is
expected is a failure too (EINVAL), with a reason that says so.  The
exceptions of C<log> and C<progress>, which cannot fail a call, are passed
to C<warn> once per call.  Callbacks may not call methods of the handle
they belong to (that croaks, inside the callback), except C<cancel>.

libfleece holds QEMU's monitor while one of its calls runs, and callbacks
run inside those calls: a callback must not talk to the same QEMU's
monitor (it would wait for the library, which waits for the callback).
Query what a callback needs from QEMU before the call.

No callback runs during global destruction (their closures may be half
gone) or in a forked child: a storage or record callback then fails with a
reason saying so.  Clean up before the program ends; a handle destroyed
with a run still set up says so through C<warn>.

=head1 SIGNALS

C<wait> runs Perl's (deferred) signal handlers every quarter second; other
calls run them when they return, or when a Perl callback runs.
C<cancel> is safe in any handler.  A handler that dies (vzdump's
"interrupted by signal") leaves the run set up: cancel and clean up in the
code that catches it.

=head1 FORK

A handle records the pid that made it.  Every method croaks with
C<"Fleece: handle used after fork ..."> in another process.  When a copy of
the handle is destroyed in a child, no callbacks run and only the child's
copies of the QMP socket and lock descriptors are closed: QEMU, the lock and
the parent's run are not disturbed.

=head1 THREADS

A handle is used by one thread at a time; handles are not cloned into new
Perl threads (they are undef there).

=head1 SEE ALSO

L<Fleece::Error>, fleece(3), fleece(1)

=cut
