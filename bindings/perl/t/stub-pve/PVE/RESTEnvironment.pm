package PVE::RESTEnvironment;
# Test stand-in.
use strict;
use warnings;
sub import { PVEStubs::export(@_) }
our @EXPORT_OK = qw(log_warn);
sub log_warn { my ($msg) = @_; chomp $msg; warn "WARN: $msg\n" }
1;
