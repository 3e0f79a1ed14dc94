#!/usr/bin/perl
# Builds the XS module for meson (bindings/perl/meson.build), out of tree:
# copies the Perl sources to a directory in the build tree, runs
# Makefile.PL there against the uninstalled libfleece and make, and touches
# a stamp file.  Nothing is written to the source tree.
#
#   build-xs.pl SRCDIR OUTDIR PKGCONFIGDIR STAMP [werror] [install=PREFIX]
#
# Without install=, the module is for the tests: it loads the library in
# the build tree (rpath).  With it, the module is the one `meson install`
# installs (install-xs.pl): no rpath, and Perl's directories for PREFIX —
# vendor for /usr, site for Perl's site prefix (/usr/local), else
# PREFIX/lib/perl5 (INSTALL_BASE).
use strict;
use warnings;

use Config;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Compare qw(compare);
use File::Copy qw(copy);
use File::Path qw(make_path);

my ($srcdir, $outdir, $pcdir, $stamp, @flags) = @ARGV;
die "usage: $0 SRCDIR OUTDIR PKGCONFIGDIR STAMP [werror] [install=PREFIX]\n"
    if !defined($stamp);
my $werror = grep { $_ eq 'werror' } @flags;
my ($prefix) = map { m/^install=(.+)$/ ? $1 : () } @flags;
# Relative to ninja's directory; this script changes directory.
$stamp = abs_path(dirname($stamp)) . '/' . (split m{/}, $stamp)[-1];

# Copy only what changed, so that make rebuilds only what it must.
for my $file (qw(Makefile.PL Fleece.xs typemap lib/Fleece.pm lib/Fleece/Error.pm)) {
    my ($from, $to) = ("$srcdir/$file", "$outdir/$file");
    make_path(dirname($to));
    next if -e $to && compare($from, $to) == 0;
    copy($from, $to) or die "$0: cannot copy $from to $to: $!\n";
}

chdir($outdir) or die "$0: cannot chdir to $outdir: $!\n";
$ENV{PKG_CONFIG_PATH} = join(':', $pcdir, grep { defined && length } $ENV{PKG_CONFIG_PATH});
if (defined($prefix)) {
    delete $ENV{FLEECE_UNINSTALLED};
} else {
    $ENV{FLEECE_UNINSTALLED} = 1;
}
$ENV{FLEECE_WERROR} = $werror ? 1 : 0;
# An install by meson (or a package built from it) is not CPAN's to track:
# no .packlist.
my @where = !defined($prefix) ? ()
    : ('NO_PACKLIST=1', $prefix eq '/usr' ? ('INSTALLDIRS=vendor')
        : $prefix eq $Config{siteprefix} ? ('INSTALLDIRS=site')
        : ("INSTALL_BASE=$prefix"));
# ninja's jobserver is not make's; keep make's output in order.
delete @ENV{qw(MAKEFLAGS MFLAGS)};

# Quiet unless something fails: the output goes to build.log.
sub run {
    my @cmd = @_;
    open(my $log, '>>', 'build.log') or die "$0: cannot write $outdir/build.log: $!\n";
    print {$log} "+ @cmd\n";
    close($log);
    # No shell: a prefix may hold anything.
    my $pid = fork() // die "$0: fork: $!\n";
    if (!$pid) {
        open(STDOUT, '>>', 'build.log') && open(STDERR, '>&', \*STDOUT) or exit(126);
        exec { $cmd[0] } @cmd or exit(127);
    }
    waitpid($pid, 0);
    if ($? != 0) {
        open(my $fh, '<', 'build.log');
        print STDERR <$fh>;
        die "$0: '@cmd' failed in $outdir\n";
    }
}

unlink('build.log');

# Always: the flags depend on the environment (pkg-config, werror) as well.
run($^X, 'Makefile.PL', @where);
run($Config{make});

open(my $fh, '>', $stamp) or die "$0: cannot write $stamp: $!\n";
close($fh);
