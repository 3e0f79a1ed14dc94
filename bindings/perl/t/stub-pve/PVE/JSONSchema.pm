package PVE::JSONSchema;
# Test stand-in: what the code under test calls.
use strict;
use warnings;
use JSON ();
sub import { PVEStubs::export(@_) }
our @EXPORT_OK = qw(json_bool get_standard_option parse_property_string print_property_string);

sub json_bool { return $_[0] ? JSON::true : JSON::false }

sub format_size {
    my ($size) = @_;
    for my $u (['T', 1024**4], ['G', 1024**3], ['M', 1024**2], ['K', 1024]) {
        return ($size / $u->[1]) . $u->[0] if $size >= $u->[1] && $size % $u->[1] == 0;
    }
    return $size;
}

sub get_standard_option { return {} }
sub check_format { return }
1;
