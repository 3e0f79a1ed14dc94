#!/usr/bin/perl
# `meson install` step of the Perl binding (bindings/perl/meson.build):
# installs the module build-xs.pl built for installing (no rpath, Perl's
# directories for meson's prefix), honouring DESTDIR.
#
#   install-xs.pl OUTDIR
use strict;
use warnings;

use Config;

my ($outdir) = @ARGV;
die "usage: $0 OUTDIR\n" if !defined($outdir);
chdir($outdir) or die "$0: cannot chdir to $outdir: $!\n";
delete @ENV{qw(MAKEFLAGS MFLAGS)};
my @cmd = ($Config{make}, 'pure_install');
push @cmd, "DESTDIR=$ENV{DESTDIR}" if defined($ENV{DESTDIR}) && length($ENV{DESTDIR});
exec { $cmd[0] } @cmd or die "$0: cannot run $cmd[0]: $!\n";
