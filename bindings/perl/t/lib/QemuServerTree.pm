package QemuServerTree;

# The qemu-server tree the patch series in bindings/perl/qemu-server/ is
# for (its unmodified source root in $FLEECE_QEMU_SERVER_SRC), and copies
# of it with the series applied.

use strict;
use warnings;

use Exporter 'import';
use File::Basename qw(dirname);
use File::Temp ();
use Test::More ();

our @EXPORT_OK = qw(source need_source patches apply_series);

my $PATCH_DIR = dirname(__FILE__) . '/../../qemu-server';

sub source { return $ENV{FLEECE_QEMU_SERVER_SRC} }

# The upstream tree is data from outside the project: the tests need it
# given, and say so otherwise.
sub need_source {
    my $src = source();
    Test::More::plan(skip_all => 'the unmodified qemu-server source is needed: set '
        . 'FLEECE_QEMU_SERVER_SRC to its source root (with src/PVE/VZDump/QemuServer.pm)')
        if !$src || !-e "$src/src/PVE/VZDump/QemuServer.pm";
    Test::More::plan(skip_all => 'git is needed to apply the patch series')
        if system('git --version >/dev/null 2>&1') != 0;
    return $src;
}

# The patches of the series in order (not the cover letter).
sub patches {
    opendir(my $dh, $PATCH_DIR) or die "cannot list $PATCH_DIR: $!";
    my @p = sort grep { /^\d{4}-.*\.patch$/ && !/^0000-/ } readdir($dh);
    return map { "$PATCH_DIR/$_" } @p;
}

sub cover_letter {
    my ($c) = glob("$PATCH_DIR/0000-*.patch");
    return $c;
}

# A writable copy of the upstream tree; with $check, `git apply --check`
# of each patch in turn (applying it) and the output of a failure.
sub copy_tree {
    my $dir = File::Temp::tempdir('fleece-qemu-server-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    system('cp', '-R', source() . '/.', $dir) == 0 or die "cannot copy the qemu-server tree";
    system('chmod', '-R', 'u+w', $dir) == 0 or die "chmod failed";
    return $dir;
}

sub git_apply {
    my ($dir, $patch, @opts) = @_;
    my $out = `git -C '$dir' apply @opts '$patch' 2>&1`;
    return ($? == 0, $out);
}

# A copy with the whole series applied (dies if a patch does not apply).
sub apply_series {
    my $dir = copy_tree();
    for my $p (patches()) {
        my ($ok, $out) = git_apply($dir, $p);
        die "$p does not apply: $out" if !$ok;
    }
    return $dir;
}

1;
