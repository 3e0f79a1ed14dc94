package PVE::SafeSyslog;
# Test stand-in: syslog goes to the test's log.
use strict;
use warnings;
sub import { PVEStubs::export(@_) }
our @EXPORT = qw(syslog);
our @LOG;
sub syslog { my ($level, $fmt, @args) = @_; push @LOG, "$level: " . sprintf($fmt, @args) }
1;
