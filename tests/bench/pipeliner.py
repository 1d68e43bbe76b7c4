#!/usr/bin/env python3
"""A load generator that pipelines (RFC 2920), for the benchmarks: smtp-source does not.

Runs SESSIONS concurrent sessions (gevent) until MESSAGES messages of SIZE bytes are sent,
PER_CONNECTION messages over each connection. Each message goes as one write of
MAIL FROM, RCPT TO and DATA, then the content once the 354 is in, as a pipelining client
does; the server must advertise PIPELINING. Prints one line, "sent N accepted N refused N
broken N", and exits 1 if anything was not accepted.

    pipeliner.py --sessions 20 --messages 5000 --per-connection 10 --size 5120 127.0.0.1:2525

See also: tests/bench/bench_accept.py (which runs it next to smtp-source).
"""

import argparse
import sys

import gevent
from gevent import socket

SENDER = b"sender@bench.test"
RECIPIENT = b"rcpt@bench.test"


class Broken(Exception):
    """The server closed the connection or answered what a session cannot go on from."""


def message(size, number):
    """About `size` bytes of message: a few headers, then 78-character lines."""
    head = (b"From: <%s>\r\nTo: <%s>\r\nSubject: bench %d\r\nMessage-ID: <%d.bench@bench.test>"
            b"\r\n\r\n" % (SENDER, RECIPIENT, number, number))
    line = b"x" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class Replies:
    """SMTP replies read off a socket: (code, last line)."""

    def __init__(self, sock):
        self.file = sock.makefile("rb")

    def next(self):
        while True:
            line = self.file.readline(4096)
            if not line:
                raise Broken("connection closed")
            if len(line) >= 4 and line[3:4] != b"-":
                return int(line[:3]), line.rstrip()


class Counts:
    def __init__(self, total):
        self.left = total
        self.sent = self.accepted = self.refused = self.broken = 0

    def take(self):
        if self.left <= 0:
            return None
        self.left -= 1
        self.sent += 1
        return self.sent


def session(address, counts, per_connection, size):
    while counts.left > 0:
        try:
            sock = socket.create_connection(address, timeout=120)
        except OSError as error:
            print("cannot connect: %s" % error, file=sys.stderr)
            return
        in_flight = 0
        try:
            replies = Replies(sock)
            if replies.next()[0] != 220:
                raise Broken("no greeting")
            sock.sendall(b"EHLO bench.test\r\n")
            code, text = replies.next()
            if code != 250:
                raise Broken("EHLO: %s" % text)
            for _ in range(per_connection):
                number = counts.take()
                if number is None:
                    break
                in_flight = 1
                sock.sendall(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (SENDER, RECIPIENT))
                codes = [replies.next()[0] for _ in range(3)]
                if codes[2] != 354:
                    counts.refused += 1
                    in_flight = 0
                    continue
                sock.sendall(message(size, number) + b".\r\n")
                if replies.next()[0] == 250:
                    counts.accepted += 1
                else:
                    counts.refused += 1
                in_flight = 0
            sock.sendall(b"QUIT\r\n")
            replies.next()
        except (OSError, Broken):
            counts.broken += in_flight
        finally:
            sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--per-connection", type=int, default=10)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("server", help="host:port")
    args = parser.parse_args()
    host, _, port = args.server.rpartition(":")
    counts = Counts(args.messages)
    gevent.joinall([gevent.spawn(session, (host, int(port)), counts, args.per_connection,
                                 args.size) for _ in range(args.sessions)])
    print("sent %d accepted %d refused %d broken %d"
          % (counts.sent, counts.accepted, counts.refused, counts.broken))
    return 0 if counts.accepted == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
