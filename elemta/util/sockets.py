"""Writing to a gevent socket without sendall()'s fixed cost.

gevent's sendall() asks the kernel for SO_SNDBUF on every call to size its chunks: a
system call per SMTP reply or command, about 2% of a worker's CPU (issue #20). What
Elemta writes is nearly always a few hundred bytes that one send() takes whole; sendall()
is left for the rest. Used by the smtpd session and the delivery SMTP client.
"""


def send_all(sock, data):
    """Write all of data (bytes) to sock, as sock.sendall. The socket's timeout bounds
    each of the two calls: a peer that stops reading mid-write may hold it twice that."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
