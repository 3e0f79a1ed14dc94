package PVE::INotify;
# Test stand-in.
use strict;
use warnings;
sub nodename { return 'fleece-test' }
1;
