"""Local delivery of one group of recipients (Postfix's local): handed to the local
agent, the one process that keeps root to write mailboxes as their users.

Owned by the delivery worker (`elemta: delivery`), which runs as master.user; the same
interface as elemta.delivery.smtp_transport. deliver() connects to spool/run/local.sock,
sends one request naming the message and its recipients (elemta.addressing.local_protocol) and
reads one reply per recipient. Aliases, .forward files, mailboxes, files, commands and
the re-queueing of forwarded mail all happen in the agent (elemta.local.agent). When the
agent is not there (not started yet, or restarting) every recipient defers with 4.3.0.

"The agent went away" (no agent listening, or the connection closed before every reply
came: it was killed, crashed or restarted) is not the mail's fault, and the master starts
a new agent within seconds: the worker retries such a deferral after AGENT_RETRY seconds,
doubling while the agent stays away, never later than the normal backoff would
(went_away() tells these replies apart). An agent that is there but does not answer in
time gets the normal backoff.
See also: elemta.delivery.worker, man/newaliases.1.
"""

import socket

from gevent import socket as gsocket

from elemta.addressing import local_protocol
from elemta.queue.model import RCPT_DEFERRED

RELAY = "local"
CONNECT_TIMEOUT = 10.0
# Every reply meaning "the agent went away" starts so (see went_away).
_AWAY = "451 4.3.0 local delivery agent "
NOT_RUNNING = _AWAY + "is not running (%s: %s)"
CUT_SHORT = _AWAY + "ended the conversation early (%s)"
NO_ANSWER = "451 4.3.0 no answer from the local delivery agent within %d seconds"
# Seconds before a recipient deferred because the agent went away is tried again.
AGENT_RETRY = 1.0


def went_away(reply):
    """Whether a deferral's reply says the agent went away (retry soon) rather than
    that the delivery itself was put off."""
    return reply.startswith(_AWAY)


class LocalTransport:
    """Asks the local agent to deliver; one short connection per message and destination."""

    def __init__(self, config, store):
        self.path = local_protocol.socket_path(config.queue.spool_dir)
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
        timed_out = False
        try:
            sock.settimeout(self.reply_timeout)
            sock.sendall(local_protocol.encode_request(record.queue_id, items))
            replies = sock.makefile("rb")
            while wanted - set(results):
                line = replies.readline(local_protocol.MAX_LINE)
                if not line:
                    break
                index, status, reply = local_protocol.decode_reply(line)
                if index in wanted:
                    results[index] = (status, reply, RELAY)
        except (OSError, local_protocol.ProtocolError) as error:
            timed_out = isinstance(error, socket.timeout)
            why = str(error) if isinstance(error, local_protocol.ProtocolError) else (
                error.strerror or str(error))
        reply = NO_ANSWER % self.reply_timeout if timed_out else CUT_SHORT % why
        for index in wanted - set(results):
            results[index] = (RCPT_DEFERRED, reply, RELAY)
        return results
