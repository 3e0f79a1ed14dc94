# The qemu-server patch series (bindings/perl/qemu-server/*.patch) against
# the unmodified qemu-server tree ($FLEECE_QEMU_SERVER_SRC): it is a
# well-formed git series, each patch applies in turn, the patched modules
# compile (with stand-ins for the PVE modules they use, t/stub-pve and
# generated ones), and the configuration format keeps libfleece's record.
# The patched code runs against QEMU in qemu-server-backup.t.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use File::Temp ();
use Test::More;

use QemuServerTree qw(need_source patches);

my $src = need_source();
my @patches = patches();
is(scalar(@patches), 4, 'four patches') or diag("@patches");

sub slurp {
    my ($path) = @_;
    open(my $fh, '<', $path) or die "cannot read $path: $!";
    local $/;
    return <$fh>;
}

# ---- the form of the series ----------------------------------------------

my %touched;
for my $i (0 .. $#patches) {
    my $p = $patches[$i];
    my $text = slurp($p);
    my $n = $i + 1;
    (my $name = $p) =~ s{.*/}{};
    like($text, qr/^From [0-9a-f]{40} Mon Sep 17 00:00:00 2001\n/, "$name: git format-patch");
    like($text, qr/^Subject: \[PATCH $n\/4\] \S.{10,70}\n/m, "$name: subject $n/4, one line");
    my ($body) = $text =~ /\n\n(.*?)\n---\n/s;
    ok(defined($body) && length($body) > 200, "$name: a commit message that explains");
    ok(!grep({ length($_) > 74 } split(/\n/, $body // '')), "$name: message lines wrapped");
    like($body // '', qr/^Signed-off-by: .+ <.+>$/m, "$name: Signed-off-by");
    unlike($text, qr{/work/|libfleece\.invalid/|TODO|XXX}, "$name: no local paths or leftovers");
    $touched{$_} = 1 for $text =~ m{^\+\+\+ b/(\S+)$}mg;
    # every added line of Perl is in qemu-server's style: no tabs, <= 100 columns
    my @long = grep { /^\+(?!\+\+)/ && !/^\+\t/ && (length($_) > 101 || /^\+.*\t/) }
        grep { !m{Makefile} } split(/\n/, $text =~ s/^diff --git a\/\S*Makefile.*?(?=^diff |\z)//msgr);
    is_deeply(\@long, [], "$name: added lines without tabs, at most 100 columns");
}
is_deeply([sort keys %touched], [qw(
    src/PVE/QemuConfig.pm src/PVE/QemuServer.pm src/PVE/QemuServer/Fleecing.pm
    src/PVE/QemuServer/Makefile src/PVE/VZDump/QemuServer.pm
)], 'the series changes the fleecing code and adds the glue module');

# ---- it applies ------------------------------------------------------------

my $tree = QemuServerTree::copy_tree();
for my $p (@patches) {
    (my $name = $p) =~ s{.*/}{};
    my ($ok, $out) = QemuServerTree::git_apply($tree, $p, '--check');
    ok($ok, "$name: git apply --check") or diag($out);
    ($ok, $out) = QemuServerTree::git_apply($tree, $p);
    ok($ok, "$name: applies") or diag($out);
}
my ($again) = QemuServerTree::git_apply($tree, $patches[-1], '--check');
ok(!$again, 'the last patch does not apply twice (git apply --check can fail)');
for my $p (reverse @patches) {
    my ($ok, $out) = QemuServerTree::git_apply($tree, $p, '--check', '-R');
    ok($ok, "reverts cleanly: $p") or diag($out);
}
like(slurp("$tree/src/PVE/QemuServer/Makefile"), qr/^\s+Fleecing\.pm\s+\\$/m,
    'the new module is installed');

# ---- the patched modules compile ------------------------------------------

sub compile {
    my ($root, $file) = @_;
    my $out = `'$^X' -I'$FindBin::Bin/lib' -MPVEStubs=tree,'$root/src' -c '$root/src/$file' 2>&1`;
    return ($? == 0 && $out =~ /syntax OK/, $out);
}

for my $file (sort map { m{^src/(.+\.pm)$} ? $1 : () } keys %touched) {
    my ($ok, $out) = compile($tree, $file);
    ok($ok, "patched $file compiles") or diag($out);
}
{
    # The check can fail: a patched module with a syntax error does not compile.
    my $broken = QemuServerTree::copy_tree();
    QemuServerTree::git_apply($broken, $_) for @patches;
    my $f = "$broken/src/PVE/QemuServer/Fleecing.pm";
    my $text = slurp($f);
    open(my $fh, '>', $f) or die;
    print {$fh} $text =~ s/^sub new_handle \{/sub new_handle {{/mr;
    close($fh);
    my ($ok) = compile($broken, 'PVE/QemuServer/Fleecing.pm');
    ok(!$ok, 'a broken module does not compile (the check works)');
}

# ---- the configuration keeps the record -------------------------------------

# parse_vm_config() of the tree in $root on a config with a record, in a
# child (the functions are loaded from the tree under test).
sub parse_record {
    my ($root) = @_;
    my $script = <<'EOF';
use strict; use warnings;
use PVEStubs;
use JSON::PP;
require PVE::QemuServer;
my ($root) = @ARGV;
PVE::QemuServer::load_config_format("$root/src/PVE/QemuServer.pm", qw(name memory scsi0));
my $record = '{"drives":[{"key":"scsi0","volid":"local:100/vm-100-fleece-0.qcow2"}],"version":2}';
my $conf = {
    name => 'vm100', memory => 512, scsi0 => 'local:100/vm-100-disk-0.qcow2,size=8M',
    'special-sections' => { fleecing => {
        'fleecing-images' => 'local:100/vm-100-fleece-0.qcow2', 'fleecing-record' => $record,
    } },
};
my $warnings = '';
local $SIG{__WARN__} = sub { $warnings .= $_[0] };
my $raw = PVE::QemuServer::write_vm_config('/etc/pve/qemu-server/100.conf', $conf);
my $back = PVE::QemuServer::parse_vm_config('/etc/pve/qemu-server/100.conf', $raw);
print JSON::PP->new->canonical->encode({
    raw => $raw, fleecing => $back->{'special-sections'}{fleecing}, warnings => $warnings,
});
EOF
    my ($fh, $file) = File::Temp::tempfile('fleece-parse-XXXXXX', TMPDIR => 1, UNLINK => 1);
    print {$fh} $script;
    close($fh);
    my $out = `'$^X' -I'$FindBin::Bin/lib' '$file' '$root' 2>&1`;
    my $res = eval { JSON::PP::decode_json($out) };
    return $res // { error => $out };
}

require JSON::PP;
my $patched = parse_record($tree);
is($patched->{error}, undef, 'the patched config format loads') or diag($patched->{error});
like($patched->{raw} // '', qr/^\[special:fleecing\]\nfleecing-images: \S+\nfleecing-record: \{"drives":/m,
    'write_vm_config writes the record in the [special:fleecing] section, one line');
is($patched->{fleecing}{'fleecing-record'},
    '{"drives":[{"key":"scsi0","volid":"local:100/vm-100-fleece-0.qcow2"}],"version":2}',
    'parse_vm_config keeps the record');
is($patched->{fleecing}{'fleecing-images'}, 'local:100/vm-100-fleece-0.qcow2',
    '... and fleecing-images');
is($patched->{warnings}, '', '... without warnings');

my $upstream = parse_record($src);
is($upstream->{fleecing}{'fleecing-record'}, undef,
    'the unpatched parse_vm_config drops the record (why patch 1 is needed)');
like($upstream->{warnings} // '', qr/unknown setting 'fleecing-record'/, '... with a warning');

done_testing;
