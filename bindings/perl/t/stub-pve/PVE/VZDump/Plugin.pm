package PVE::VZDump::Plugin;

# Test stand-in for pve-manager's PVE::VZDump::Plugin, the base of the
# plugin under test: the task log is kept in $self->{logs} (and printed
# when FLEECE_TEST_VERBOSE is set).

use strict;
use warnings;

sub log {
    my ($self, $level, $msg) = @_;
    chomp $msg;
    push @{ $self->{logs} }, "$level: $msg";
    print STDERR "# task log: $level: $msg\n" if $ENV{FLEECE_TEST_VERBOSE};
}

sub loginfo { $_[0]->log('info', $_[1]) }
sub logerr  { $_[0]->log('err', $_[1]) }

sub cmd { die "PVE::VZDump::Plugin stand-in: cmd(@_[1..$#_]) is not available\n" }

1;
