package PVE::QMPClient;

# Test stand-in for qemu-server's QMP client, with its interface (new,
# queue_cmd, queue_execute, cmd, {errors}) and its use of the monitor: one
# connection per queue_execute, held only while its commands run, a file
# descriptor for getfd sent along with the command (PVE::IPCC::sendfd), a
# timeout per command (5 s unless given, as the real default).  The real
# one needs IO::Multiplex; this one is plain sockets.
#
# @WAITS records, per connection, how long QEMU took to greet: qemu-server
# connects per command, and QEMU greets a client only while no other holds
# the monitor.

use strict;
use warnings;

use IO::Select;
use IO::Socket::UNIX;
use JSON;
use Time::HiRes ();

use PVE::IPCC;
use PVE::QemuServer::Helpers;

our @WAITS;     # [command, seconds until the greeting]

sub new {
    my ($class, $eventcb) = @_;
    return bless { queue => [], errors => {}, eventcb => $eventcb }, $class;
}

sub queue_cmd {
    my ($self, $peer, $callback, $execute, %params) = @_;
    my $timeout = delete $params{timeout};
    delete $params{noerr};
    push @{ $self->{queue} }, {
        peer => $peer, callback => $callback, execute => $execute, arguments => \%params,
        timeout => $timeout,
    };
}

sub _read_json {
    my ($sock, $buf, $deadline) = @_;
    my $sel = IO::Select->new($sock);
    for (;;) {
        while ($$buf =~ s/^([^\n]*)\n//) {
            my $line = $1;
            next if $line !~ /\S/;
            my $obj = decode_json($line);
            next if $obj->{event};
            return $obj;
        }
        my $left = $deadline - Time::HiRes::time();
        die "got timeout\n" if $left <= 0;
        next if !$sel->can_read($left);
        my $n = sysread($sock, $$buf, 65536, length($$buf));
        die "connection closed by QEMU\n" if !$n;
    }
}

sub _execute_one {
    my ($sock, $buf, $cmd, $id) = @_;
    my $deadline = Time::HiRes::time() + ($cmd->{timeout} // 5);
    my %args = %{ $cmd->{arguments} };
    my $fd = $cmd->{execute} =~ /^(getfd|add-fd)$/ ? delete $args{fd} : undef;
    my $line = encode_json({ execute => $cmd->{execute}, arguments => \%args, id => $id }) . "\n";
    if (defined($fd)) {
        PVE::IPCC::sendfd(fileno($sock), $fd, $line) > 0 or die "sendfd failed: $!\n";
    } else {
        syswrite($sock, $line) == length($line) or die "write to QEMU failed: $!\n";
    }
    return _read_json($sock, $buf, $deadline);
}

# All queued commands of each peer over one connection, in order.
sub queue_execute {
    my ($self, $timeout, $noerr) = @_;
    my @queue = @{ $self->{queue} };
    $self->{queue} = [];
    my %by_peer;
    push @{ $by_peer{"$_->{peer}{type}:$_->{peer}{id}"} }, $_ for @queue;
    my $errors = '';
    for my $cmds (values %by_peer) {
        my $peer = $cmds->[0]{peer};
        my $id = $peer->{id};
        eval {
            my $path = PVE::QemuServer::Helpers::qmp_socket($peer);
            my $t0 = Time::HiRes::time();
            my $sock = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $path)
                or die "unable to connect to VM $id qmp socket - $!\n";
            my $buf = '';
            my $greeting = _read_json($sock, \$buf, $t0 + ($timeout // $cmds->[0]{timeout} // 5));
            die "no QMP greeting\n" if !$greeting->{QMP};
            push @WAITS, [$cmds->[0]{execute}, Time::HiRes::time() - $t0];
            my $r = _execute_one($sock, \$buf, { execute => 'qmp_capabilities', arguments => {} }, 0);
            die "qmp_capabilities failed\n" if $r->{error};
            my $n = 1;
            while (my $cmd = shift @$cmds) {
                $cmd->{timeout} //= $timeout;
                my $resp = _execute_one($sock, \$buf, $cmd, $n++);
                if ($resp->{error}) {
                    my $desc = $resp->{error}{desc} // 'unknown error';
                    die "VM $id qmp command '$cmd->{execute}' failed - $desc\n";
                }
                $cmd->{callback}->($id, $resp) if $cmd->{callback};
                # what a callback queued for this peer runs on this connection, as with the real one
                my @more = grep { $_->{peer}{id} eq $id && $_->{peer}{type} eq $peer->{type} }
                    @{ $self->{queue} };
                $self->{queue} = [grep { !($_->{peer}{id} eq $id && $_->{peer}{type} eq $peer->{type}) }
                    @{ $self->{queue} }];
                push @$cmds, @more;
            }
            close($sock);
        };
        if (my $err = $@) {
            $self->{errors}{$id} = $err;
            $errors .= $err;
        }
    }
    die $errors if $errors && !$noerr;
}

sub cmd {
    my ($self, $peer, $cmd, $timeout, $noerr) = @_;
    my $result;
    push @{ $self->{queue} }, {
        peer => $peer, execute => $cmd->{execute}, arguments => $cmd->{arguments} // {},
        timeout => $timeout,
        callback => sub { $result = $_[1]->{return} },
    };
    eval { $self->queue_execute($timeout) };
    if (my $err = $@) {
        die $err if !$noerr;
        return { error => $err };
    }
    return $result;
}

1;
