package PVE::Format;
# Test stand-in: human-readable sizes and durations for the task log.
use strict;
use warnings;
sub import { PVEStubs::export(@_) }
our @EXPORT_OK = qw(render_bytes render_duration);

sub render_bytes {
    my ($value, $precision) = @_;
    my @units = qw(B KiB MiB GiB TiB);
    my $i = 0;
    while ($value >= 1024 && $i < $#units) {
        $value /= 1024;
        $i++;
    }
    return $i ? sprintf("%.*f %s", $precision // 2, $value, $units[$i]) : "$value B";
}

sub render_duration {
    my ($seconds) = @_;
    my ($h, $m, $s) = (int($seconds / 3600), int($seconds / 60) % 60, $seconds % 60);
    return sprintf("%02d:%02d:%02d", $h, $m, $s);
}
1;
