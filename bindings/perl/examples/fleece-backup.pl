#!/usr/bin/perl
# A fleecing backup of a running VM from Perl, the way a backup tool would
# do it with the Fleece module:
#
#   fleece-backup.pl --qmp /var/run/qemu-server/100.qmp --vmid 100 \
#       --fleecing-storage /var/lib/vz/fleece --target /backup/vm100 \
#       [--format raw|qcow2] [--drive scsi0 ...] [--bwlimit KiB/s] [--state-dir DIR]
#
# Progress goes to standard error.  Ctrl-C (or SIGTERM) cancels the
# backup; the run is cleaned up in every case.  Exit status: 0 backed up,
# 1 failed, 130 cancelled.
use strict;
use warnings;

use Getopt::Long;

use Fleece;

my %opt = (format => 'raw');
GetOptions(\%opt, 'qmp=s', 'vmid=i', 'fleecing-storage=s', 'target=s', 'format=s',
    'drive=s@', 'bwlimit=i', 'state-dir=s')
    or die "usage: $0 --qmp SOCKET --vmid ID --fleecing-storage DIR --target DIR [...]\n";
for my $required (qw(qmp vmid fleecing-storage target)) {
    die "$0: --$required is required\n" if !defined($opt{$required});
}

my $f = Fleece->new(
    qmp     => $opt{qmp},
    vmid    => $opt{vmid},
    log     => sub { my ($level, $msg) = @_; print STDERR "$level: $msg\n" if $level ne 'debug' },
    defined($opt{'state-dir'}) ? (state_dir => $opt{'state-dir'}) : (),
);
my $plan = $f->plan(storage => $opt{'fleecing-storage'}, drives => $opt{drive});
for my $d (@$plan) {
    printf STDERR "%s: %d bytes, %s\n", $d->{key}, $d->{size},
        $d->{fleeced} ? "fleecing image $d->{image}" : "not fleeced ($d->{reason})";
}
printf STDERR "%s: not backed up (%s)\n", $_->{name}, $_->{reason} for $plan->skipped;

# cancel() only records the request: safe in a signal handler.  wait()
# runs the handler within a quarter second and then croaks (ECANCELED).
local $SIG{INT} = local $SIG{TERM} = sub { print STDERR "cancelling\n"; $f->cancel };

my $stats;
my $ok = eval {
    $f->attach($plan, bwlimit => $opt{bwlimit} // 0);
    $f->start($plan, target => { dir => $opt{target}, format => $opt{format} });
    while (!$f->wait(1000)) {
        my $s = $f->stats;
        printf STDERR "%3d%% (%d of %d bytes)\n", $s->{total} ? 100 * $s->{done} / $s->{total} : 0,
            $s->{done}, $s->{total};
    }
    $stats = $f->stats;
    1;
};
my $err = $@;

# Always: undoes the run, frees the fleecing images, drops the record.
eval { $f->cleanup };
print STDERR "cleaning up failed: $@" if $@;

if (!$ok) {
    if (ref($err) && $err->isa('Fleece::Error') && $err->is_cancelled) {
        print STDERR "cancelled\n";
        exit(130);
    }
    print STDERR "backup failed: $err";
    exit(1);
}
printf STDERR "backed up %d bytes in %.1f s%s\n", $stats->{done}, $stats->{elapsed_ms} / 1000,
    defined($stats->{zero}) ? ", $stats->{zero} of them zero" : '';
exit(0);
