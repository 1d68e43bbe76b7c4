"""Small gevent socket operations done often, done cheaply (issue #20).

Used by the smtpd session and the delivery SMTP client, several times per command:
gevent's sendall() asks the kernel for SO_SNDBUF on every call to size its chunks (a
system call per SMTP reply, about 2% of a worker's CPU), while what Elemta writes is
nearly always a few hundred bytes one send() takes whole; settimeout() validates and
stores a value that mostly did not change; and unread_bytes() lets the smtpd close at
once after QUIT when the client left nothing unread (no lingering read).
"""

import fcntl
import struct
import termios


def send_all(sock, data):
    """Write all of data (bytes) to sock, as sock.sendall. The socket's timeout bounds
    each of the two calls: a peer that stops reading mid-write may hold it twice that."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def set_timeout(sock, seconds):
    """sock.settimeout(seconds), only when that changes it."""
    if sock.timeout != seconds:
        sock.settimeout(seconds)


def unread_bytes(sock):
    """Bytes the peer sent that the kernel holds, not read yet (FIONREAD); raises
    OSError when the socket cannot tell."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
