package Fleece::Error;

# What the Fleece binding croaks with when libfleece fails: the message an
# admin reads (a task log shows it as is), plus the errno and the C
# function for code that wants to tell errors apart.  Modelled on
# Sys::Virt::Error.

use strict;
use warnings;

use Errno ();

use overload
    '""'     => \&stringify,
    bool     => sub { 1 },
    fallback => 1;

our $VERSION = '1.0.0';

sub new {
    my ($class, %args) = @_;
    return bless {
        message  => $args{message} // 'unknown error',
        code     => $args{code} // 0,
        function => $args{function},
    }, $class;
}

sub message { return $_[0]{message} }

sub code { return $_[0]{code} }

sub errno { return $_[0]{code} }

sub function { return $_[0]{function} }

# One line with a newline at the end, as Proxmox code dies with: a caller
# that prints or re-dies it adds no "at FILE line N".
sub stringify {
    my ($self) = @_;
    my $msg = $self->{message};
    return $msg =~ /\n\z/ ? $msg : "$msg\n";
}

sub _is {
    my ($self, @names) = @_;
    for my $name (@names) {
        my $code = Errno->can($name) or next;
        return 1 if $self->{code} == $code->();
    }
    return 0;
}

sub is_busy        { return $_[0]->_is('EBUSY') }
sub is_cancelled   { return $_[0]->_is('ECANCELED') }
sub is_unsupported { return $_[0]->_is('ENOTSUP', 'EOPNOTSUPP') }
sub is_not_found   { return $_[0]->_is('ENOENT') }
sub is_invalid     { return $_[0]->_is('EINVAL') }
sub is_timeout     { return $_[0]->_is('ETIMEDOUT') }

1;

__END__

=head1 NAME

Fleece::Error - what the Fleece binding croaks with when libfleece fails

=head1 SYNOPSIS

  my $ok = eval { $f->attach($plan); 1 };
  if (!$ok) {
      my $err = $@;
      die $err if !ref($err) || !$err->isa('Fleece::Error');   # not ours
      if ($err->is_busy) {
          print "another backup of this VM is set up: ", $err->message, "\n";
      }
      printf "%s failed: %s (errno %d)\n", $err->function, $err, $err->code;
  }

=head1 DESCRIPTION

Every method of L<Fleece> that fails in libfleece croaks with a
C<Fleece::Error>.  It stringifies to the user-facing message with a
trailing newline, so C<die $@>, C<"$@"> and C<< $@ =~ /.../ >> work as with
a plain message; the C function's name, which every libfleece message
starts with, is not part of it but available through C<function>.

Mistakes in the arguments of a method (a vmid that is not a number, an
unknown option) are programming errors and croak with a plain string
starting with C<Fleece:>, as Sys::Virt does.

=head1 METHODS

=over

=item $err->message

The message, without trailing newline, e.g. C<"VM 100 has another
libfleece run (...) set up in QEMU: process 1234 runs it; ...">.

=item $err->code, $err->errno

The errno of the failure (C<fleece_get_errno()>), e.g. C<EBUSY>; compare
with the constants of L<Errno> or L<POSIX>.  A Perl callback that died
makes it the errno its code left in C<$!> (or the code of a
C<Fleece::Error> it died with), else C<EIO>.

=item $err->function

The libfleece function that failed, e.g. C<"fleece_attach">, or undef.

=item $err->stringify

The message with a trailing newline; also what C<"$err"> gives.

=item $err->is_busy, is_cancelled, is_unsupported, is_not_found, is_invalid, is_timeout

True for C<EBUSY> (another run of the VM is set up, a setting that cannot
change while a run is), C<ECANCELED> (the backup was cancelled),
C<ENOTSUP> (e.g. an RBD storage in a libfleece built without librbd),
C<ENOENT>, C<EINVAL> and C<ETIMEDOUT>.

=item Fleece::Error->new(message => $msg, code => $errno, function => $name)

For code that wants to throw one itself, e.g. from a storage callback so
that the library's error carries that errno.

=back

=head1 SEE ALSO

L<Fleece>, fleece(3)

=cut
