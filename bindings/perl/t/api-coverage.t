# Every public C function of fleece.h is bound (%Fleece::BINDINGS names the
# Perl sub) or listed in %Fleece::NOT_BOUND with the reason; every binding
# exists; the constants match the header's macros.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;

use Fleece;

# The header the module was built against: meson passes it; in the source
# tree it is three levels up; else where pkg-config says it is installed.
my $header = $ENV{FLEECE_HEADER};
$header //= "$FindBin::Bin/../../../include/fleece/fleece.h"
    if -e "$FindBin::Bin/../../../include/fleece/fleece.h";
$header //= do {
    chomp(my $inc = `pkg-config --variable=includedir fleece 2>/dev/null` // '');
    "$inc/fleece/fleece.h";
};
open(my $fh, '<', $header) or BAIL_OUT("cannot read $header: $! (set FLEECE_HEADER)");
my $text = do { local $/; <$fh> };
close($fh);

# FLEECE_API <type> [*]name (...
my @functions = sort $text =~ m/^FLEECE_API\b[^(;]*?\b(fleece_\w+)\s*\(/mg;
# ... and declarations whose name is on the next line.
push @functions, $text =~ m/^FLEECE_API\b[^(;]*\n(fleece_\w+)\s*\(/mg;
my %seen;
@functions = sort grep { !$seen{$_}++ } @functions;
cmp_ok(scalar @functions, '>=', 50, 'found the public functions in fleece.h')
    or diag("found: @functions");

for my $fn (@functions) {
    if (exists $Fleece::NOT_BOUND{$fn}) {
        ok(length($Fleece::NOT_BOUND{$fn}) > 10, "$fn: not bound, because: $Fleece::NOT_BOUND{$fn}");
        next;
    }
    my $perl = $Fleece::BINDINGS{$fn};
    ok(defined($perl), "$fn is bound") or next;
    no strict 'refs';
    ok(defined(&{$perl}), "$fn: $perl exists");
}

for my $fn (sort keys %Fleece::BINDINGS) {
    ok($seen{$fn}, "binding $fn is a function of fleece.h");
}
for my $fn (sort keys %Fleece::NOT_BOUND) {
    ok($seen{$fn}, "not-bound $fn is a function of fleece.h");
    ok(!exists $Fleece::BINDINGS{$fn}, "$fn is either bound or not");
}

# Constants: every #define FLEECE_<NAME> <number> is Fleece::<NAME>.
my %macros = $text =~ m/^#define\s+FLEECE_(\w+)\s+(0x[0-9a-fA-F]+|\d+)u?\b/mg;
ok(scalar(keys %macros) >= 16, 'found the constants');
for my $name (sort keys %macros) {
    my $want = $macros{$name} =~ /^0x/ ? hex($macros{$name}) : $macros{$name};
    no strict 'refs';
    ok(defined(&{"Fleece::$name"}), "Fleece::$name exists") or next;
    is(&{"Fleece::$name"}(), $want, "Fleece::$name == FLEECE_$name");
}

like(Fleece::version(), qr/^\d+\.\d+\.\d+$/, 'version');

done_testing;
