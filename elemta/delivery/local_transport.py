"""Local delivery of one group of recipients (Postfix's local): handed to the local
agent, the one process that keeps root to write mailboxes as their users.

Owned by the delivery worker (`elemta: delivery`), which runs as master.user; the same
interface as elemta.delivery.smtp_transport. deliver() connects to spool/run/local.sock,
sends one request naming the message and its recipients (elemta.local.protocol) and
reads one reply per recipient. Aliases, .forward files, mailboxes, files, commands and
the re-queueing of forwarded mail all happen in the agent (elemta.local.agent). When the
agent is not there (not started yet, or restarting) every recipient defers with 4.3.0.
See also: elemta.delivery.worker, man/newaliases.1.
"""

import socket

from gevent import socket as gsocket

from elemta.local import protocol
from elemta.queue.model import RCPT_DEFERRED

RELAY = "local"
CONNECT_TIMEOUT = 10.0
NOT_RUNNING = "451 4.3.0 local delivery agent is not running (%s: %s)"
CUT_SHORT = "451 4.3.0 local delivery agent ended the conversation early (%s)"


class LocalTransport:
    """Asks the local agent to deliver; one short connection per message and destination."""

    def __init__(self, config, store):
        self.path = protocol.socket_path(config.queue.spool_dir)
        # Each reply may wait for a command to run out its time (local.command_timeout).
        self.reply_timeout = 2 * config.local.command_timeout + 60

    def close(self):
        pass

    def deliver(self, record, destination, items):
        """Deliver recipients [(index, Recipient)]; returns {index: (status, reply, relay)}."""
        sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(self.path)
            except OSError as error:
                reply = NOT_RUNNING % (self.path, error.strerror or error)
                return {index: (RCPT_DEFERRED, reply, RELAY) for index, _ in items}
            return self._converse(sock, record, items)
        finally:
            sock.close()

    def _converse(self, sock, record, items):
        wanted = {index for index, _ in items}
        results = {}
        why = "connection closed"
        try:
            sock.settimeout(self.reply_timeout)
            sock.sendall(protocol.encode_request(record.queue_id, items))
            replies = sock.makefile("rb")
            while wanted - set(results):
                line = replies.readline(protocol.MAX_LINE)
                if not line:
                    break
                index, status, reply = protocol.decode_reply(line)
                if index in wanted:
                    results[index] = (status, reply, RELAY)
        except (OSError, protocol.ProtocolError) as error:
            why = str(error) if isinstance(error, protocol.ProtocolError) else (
                "timed out" if isinstance(error, socket.timeout) else
                error.strerror or str(error))
        for index in wanted - set(results):
            results[index] = (RCPT_DEFERRED, CUT_SHORT % why, RELAY)
        return results
