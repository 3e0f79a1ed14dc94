package PVE::Cluster;
# Test stand-in: nothing of the cluster file system is read by the code under test.
use strict;
use warnings;
sub import { PVEStubs::export(@_) }
our @EXPORT_OK = qw(cfs_read_file);
sub cfs_read_file { die "PVE::Cluster stand-in: cfs_read_file($_[0]) is not available\n" }
1;
