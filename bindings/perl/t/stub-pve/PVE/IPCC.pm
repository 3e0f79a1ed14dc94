package PVE::IPCC;

# Test stand-in for pve-cluster's PVE::IPCC: only sendfd(), which
# qemu-server's QMP client uses to hand QEMU a file descriptor (getfd),
# as sendmsg(2) with SCM_RIGHTS; Perl has no sendmsg, so it is made with
# syscall() (Linux, 64-bit).

use strict;
use warnings;

require 'sys/syscall.ph';

use constant { SOL_SOCKET => 1, SCM_RIGHTS => 1 };

sub sendfd {
    my ($sockfd, $fd, $data) = @_;
    my $buf = $data // '';
    my $iov = pack('Q Q', unpack('Q', pack('p', $buf)), length($buf));
    # struct cmsghdr { size_t len; int level; int type; int fd; } padded to 24
    my $cmsg = pack('Q i i i x4', 20, SOL_SOCKET, SCM_RIGHTS, $fd);
    my $msghdr = pack('Q L x4 Q Q Q Q i x4',
        0, 0,
        unpack('Q', pack('p', $iov)), 1,
        unpack('Q', pack('p', $cmsg)), length($cmsg),
        0);
    my $r = syscall(&SYS_sendmsg, $sockfd, $msghdr, 0);
    return $r < 0 ? -1 : $r;
}

1;
