package PVE::Tools;
# Test stand-in: the helpers the code under test calls.
use strict;
use warnings;
use POSIX ();
sub import { PVEStubs::export(@_) }
our @EXPORT_OK = qw(run_command split_list file_get_contents file_set_contents);

sub run_command { die "PVE::Tools stand-in: run_command is not available\n" }

# qemu-server calls it as "PVE::Tools::run_fork sub { ... }": declared here, like the real one.
sub run_fork { die "PVE::Tools stand-in: run_fork is not available\n" }

sub split_list {
    my ($list) = @_;
    return () if !defined($list);
    return grep { length } split(/[\s,;]+/, $list);
}

# Units as the real one; rounds up.
sub convert_size {
    my ($value, $from, $to) = @_;
    my %u = (b => 0, kb => 1, mb => 2, gb => 3, tb => 4, pb => 5);
    return POSIX::ceil($value * 1024**$u{$from} / 1024**$u{$to});
}

sub file_get_contents {
    my ($path) = @_;
    open(my $fh, '<', $path) or die "unable to open file '$path' - $!\n";
    local $/;
    return <$fh>;
}

sub file_set_contents {
    my ($path, $data, $perm) = @_;
    open(my $fh, '>', $path) or die "unable to open file '$path' - $!\n";
    print {$fh} $data;
    close($fh);
    chmod($perm, $path) if defined($perm);
}

sub file_read_firstline {
    my ($path) = @_;
    open(my $fh, '<', $path) or return undef;
    my $line = <$fh>;
    chomp $line if defined($line);
    return $line;
}

sub decode_text { my ($s) = @_; $s =~ s/%([0-9a-fA-F]{2})/chr(hex($1))/eg; return $s }
sub encode_text { my ($s) = @_; $s =~ s/([^A-Za-z0-9\-_.!~*'() ])/sprintf("%%%02X", ord($1))/eg; return $s }

sub file_copy {
    my ($from, $to) = @_;
    file_set_contents($to, file_get_contents($from));
}
1;
