package PVE::QemuServer::Fleecing;

# Example: how qemu-server's VZDump plugin (PVE::VZDump::QemuServer) would
# hand its fleecing code to libfleece through the Fleece binding.
#
# What it replaces in qemu-server (see docs/design.md and
# /work/shared/reference/proxmox-integration.md for the current flow):
#
#   allocate_fleecing_images   -> $f->plan + $f->attach, allocating through
#                                 PVE::Storage::vdisk_alloc (the alloc
#                                 callback), names and exact sizes from the
#                                 plan (efidisk/tpmstate excluded there)
#   attach_fleecing_images     -> $f->attach (blockdev-add, or drive_add on
#                                 older pve-qemu: the library's PVE engine)
#   detach_fleecing_images     -> $f->cleanup
#   cleanup_fleecing_images    -> $f->cleanup, and Fleece->cleanup from the
#     (VZDump and QemuConfig)     record for leftovers: start of a backup,
#                                 migration, VM destroy
#   record_fleecing_images     -> the record callbacks: the record lives in
#                                 the guest config's [special:fleecing]
#                                 section, written before each step (not
#                                 only after every allocation succeeded, so
#                                 a crash in the middle no longer leaks)
#   the "backup" QMP command   -> $f->start($plan, target => { pve => ... })
#     with fleecing => true       (devlist and fleecing are added by the
#                                 library), query-backup -> $f->wait /
#                                 progress, backup-cancel -> $f->cancel
#
# The section gets a new key, 'fleecing-record' (the library's JSON record
# on one line); 'fleecing-images' is still kept in step with it, so that
# code reading it (unused-disk detection, an older qemu-server's cleanup)
# keeps working.  qemu-server's $fleecing_section_schema would need:
#
#   'fleecing-record' => { type => 'string', optional => 1,
#       description => "For internal use only. libfleece's record of a backup run." },

use strict;
use warnings;

use JSON::PP ();
use Scalar::Util ();

use Fleece;
use PVE::QemuConfig;
use PVE::QemuServer::Helpers;
use PVE::Storage;

# Where libfleece keeps its per-VM lock files (the record itself is in the
# guest config).  On a tmpfs: a lock must not outlive a reboot.
our $STATE_DIR = '/run/qemu-server/fleece';

my $json = JSON::PP->new->canonical;

# ---- callbacks ---------------------------------------------------------

# The fleecing storage, as libfleece's storage callbacks over PVE::Storage.
# $storeid is only needed to allocate; freeing and paths go by volid (so a
# cleanup from the record works without knowing which storage was used).
sub storage_callbacks {
    my ($storecfg, $vmid, $storeid) = @_;

    my $scfg = defined($storeid) ? PVE::Storage::storage_config($storecfg, $storeid) : {};
    my $format = defined($storeid)
        ? PVE::Storage::resolve_format_hint($storecfg, $storeid, 'qcow2') : 'raw';

    return {
        alloc => sub {
            my ($name, $fmt, $size) = @_;
            die "internal error - no fleecing storage specified\n" if !defined($storeid);
            # vdisk_alloc takes KiB.  Raw images are attached with their
            # exact byte size, so rounding up is fine; qcow2 cannot be, so
            # it gets the exact (fractional) size, as qemu-server does.
            my $kib = $fmt eq 'raw' ? int(($size + 1023) / 1024) : $size / 1024;
            return PVE::Storage::vdisk_alloc($storecfg, $storeid, $vmid, $fmt, $name, $kib);
        },
        free => sub {
            my ($volid) = @_;
            PVE::Storage::vdisk_free($storecfg, $volid);
            return;
        },
        path => sub {
            my ($volid) = @_;
            PVE::Storage::activate_volumes($storecfg, [$volid]);
            my ($path) = PVE::Storage::path($storecfg, $volid);
            return $path;
        },
        supports => {
            qcow2   => $format eq 'qcow2',
            path    => $scfg->{path} ? 1 : 0,   # directory-like: names get .<format>
            discard => 1,
        },
    };
}

# The durable record, kept in the guest config under the config lock.
sub record_callbacks {
    return {
        load => sub {
            my ($vmid) = @_;
            my $conf = PVE::QemuConfig->load_config($vmid);
            return $conf->{'special-sections'}->{fleecing}->{'fleecing-record'};
        },
        store => sub {
            my ($vmid, $record) = @_;
            PVE::QemuConfig->lock_config($vmid, sub {
                my $conf = PVE::QemuConfig->load_config($vmid);
                my $section = $conf->{'special-sections'}->{fleecing} //= {};
                if (defined($record)) {
                    my $r = $json->decode($record);
                    $section->{'fleecing-record'} = $json->encode($r);    # one line
                    my @volids = map { $_->{volid} // () } @{ $r->{drives} // [] };
                    if (@volids) {
                        $section->{'fleecing-images'} = join(',', @volids);
                    } else {
                        delete $section->{'fleecing-images'};
                    }
                } else {
                    delete $section->{'fleecing-record'};
                    delete $section->{'fleecing-images'};
                }
                delete $conf->{'special-sections'}->{fleecing} if !%$section;
                PVE::QemuConfig->write_config($vmid, $conf);
            });
            return;
        },
    };
}

# The vzdump task log: libfleece's levels as vzdump's.
my %LEVEL = (error => 'err', warning => 'warn', info => 'info');

sub log_callback {
    my ($log) = @_;
    return sub {
        my ($level, $msg) = @_;
        $log->($LEVEL{$level}, $msg) if $LEVEL{$level};    # no debug
    };
}

sub plugin_log {
    my ($plugin) = @_;
    Scalar::Util::weaken($plugin);    # the handle must not keep the plugin alive
    return sub { $plugin->log(@_) if $plugin };
}

# ---- what the VZDump plugin calls ----------------------------------------

# A handle on the VM's QMP socket with qemu-server's storage, record and log.
sub handle {
    my ($plugin, $vmid, %opts) = @_;
    return Fleece->new(
        qmp       => PVE::QemuServer::Helpers::qmp_socket($vmid),
        vmid      => $vmid,
        state_dir => $opts{state_dir} // $STATE_DIR,
        engine    => $opts{engine} // 'auto',
        storage   => storage_callbacks($plugin->{storecfg}, $vmid, $opts{storage}),
        record    => record_callbacks(),
        log       => log_callback(plugin_log($plugin)),
        defined($opts{bwlimit}) ? (bwlimit => $opts{bwlimit}) : (),
    );
}

# Replaces PVE::QemuConfig::cleanup_fleecing_images($vmid, $storecfg, $log):
# undo whatever an earlier run left, from the record in the config.  Works
# with QEMU running or not (the record knows its socket).
sub cleanup_leftovers {
    my ($vmid, $storecfg, $log, %opts) = @_;
    return if !PVE::QemuConfig->load_config($vmid)->{'special-sections'}->{fleecing};
    Fleece->cleanup(
        vmid      => $vmid,
        state_dir => $opts{state_dir} // $STATE_DIR,
        record    => record_callbacks(),
        storage   => storage_callbacks($storecfg, $vmid, undef),
        $log ? (log => log_callback($log)) : (),
    );
}

# Replaces check_and_prepare_fleecing: returns ($f, $plan) with the images
# attached, or () when not fleecing (then back up as before).
sub prepare_fleecing {
    my ($plugin, $vmid, $fleecing_opts, $is_template, %opts) = @_;

    return () if !$fleecing_opts || !$fleecing_opts->{enabled} || $is_template;

    # Leftovers of a previous attempt: attach() would also clean them up
    # (it finds the record), but doing it here keeps qemu-server's order.
    eval { cleanup_leftovers($vmid, $plugin->{storecfg}, plugin_log($plugin), %opts) };
    $plugin->log('warn', "attempt to clean up left-over fleecing images failed - $@") if $@;

    my $f = handle($plugin, $vmid, %opts, storage => $fleecing_opts->{storage});
    # Without Proxmox's backup-fleecing, qemu-server warns and continues
    # without fleecing; libfleece does that with fleecing_optional.
    $f->set(fleecing_optional => 1) if Fleece->can('PLAN_FLEECING_OPTIONAL');
    my $plan = $f->plan(all_drives => $opts{all_drives} ? 1 : 0);
    for my $d (@$plan) {
        $plugin->log('info', "$d->{key}: " . ($d->{fleeced}
            ? "fleecing image $d->{image} ($d->{format}, $d->{size} bytes)"
            : "no fleecing ($d->{reason})"));
    }
    eval { $f->attach($plan) };
    if (my $err = $@) {
        # attach() undid what it did; the record is gone with it.
        die "setting up fleecing failed - $err";
    }
    return ($f, $plan);
}

# Starts the backup and waits for it, logging progress like vzdump.
# $target: { pve => { 'backup-file' => ..., format => 'vma', ... } } (the
# patched QEMU's backup arguments, without devlist and fleecing), or
# { dir => ... } / { nbd => ... } on stock QEMU.
sub run_backup {
    my ($plugin, $f, $plan, $target) = @_;
    my $last = 0;
    $f->start($plan, target => $target);
    for (;;) {
        # wait() slices its timeout, so vzdump's signal handlers run.
        last if $f->wait(1000);
        my $p = $f->progress;
        my $pct = $p->{total} ? int($p->{done} * 100 / $p->{total}) : 0;
        if ($pct >= $last + 10) {
            $last = $pct;
            $plugin->log('info', "$pct% ($p->{done} of $p->{total} bytes)");
        }
    }
    $plugin->log('info', 'backup finished');
}

# The end of every backup task, success or not (replaces
# detach_fleecing_images + cleanup_fleecing_images).
sub finish {
    my ($plugin, $f) = @_;
    return if !$f;
    eval { $f->cleanup };
    $plugin->log('warn', "cleaning up fleecing failed - $@") if $@;
}

# The whole flow, as archive_vma/archive_pbs would use it.
sub backup_vm {
    my ($plugin, $vmid, $fleecing_opts, $target, %opts) = @_;
    my ($f, $plan) = prepare_fleecing($plugin, $vmid, $fleecing_opts, 0, %opts);
    die "fleecing not enabled\n" if !$f;    # (the example always fleeces)
    eval { run_backup($plugin, $f, $plan, $target) };
    my $err = $@;
    if ($err) {
        $plugin->log('err', $err);
        eval { $f->cancel };
    }
    finish($plugin, $f);
    die $err if $err;
}

1;
