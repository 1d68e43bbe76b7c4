"""A known mix of mail through a real Elemta, for the tests that read its log back
(tests/test_log_json.py, tests/test_pflogsumm.py, tests/test_report.py).

`run_traffic(elemta_server, log_format)` starts Elemta relaying to a scripted sink
(tests/peers/sink.py) that takes most recipients, defers one once (450, then 250) and
refuses one for good (550: a bounce, which the sink then takes too), sends that mail from
127.0.0.1 and sends a relay attempt from 127.0.0.2, which mynetworks does not trust (554
Relay access denied), waits until every message has left the queue, stops the server and
returns a Traffic: the server, the sink and what was sent, so each test checks its reader
against the facts here rather than against the log.
"""

import smtplib
import threading
from dataclasses import dataclass, field
from typing import List

from tests.harness import wait_for
from tests.peers.sink import ScriptedServer

SENDER = "alice@client.test"
OTHER_SENDER = "bob@other.test"
DELIVERED = ["x@remote.test", "y@remote.test", "z@far.test"]
DEFERRED_ONCE = "later@remote.test"       # 450 at first, then 250
BOUNCED = "bad@remote.test"               # 550 5.1.1, a bounce to SENDER
# A quoted local part with a quote, a backslash and spaces: what JSON must escape.
ODD = '"odd \\"quoted\\" \\\\ name"@remote.test'
REFUSED = "stranger@remote.test"           # relay denied to 127.0.0.2


@dataclass
class Traffic:
    server: object
    sink: object
    # (sender, [recipients]) for each message accepted
    sent: List[tuple] = field(default_factory=list)
    rejected: int = 0


class _RcptScript:
    """The sink's RCPT replies: 550 for BOUNCED, 450 the first time for DEFERRED_ONCE."""

    def __init__(self):
        self.deferred = False
        self.lock = threading.Lock()

    def __call__(self, session, argument):
        if BOUNCED in argument:
            return "550 5.1.1 <%s>: no such user" % BOUNCED
        if DEFERRED_ONCE in argument:
            with self.lock:
                if not self.deferred:
                    self.deferred = True
                    return "450 4.2.0 mailbox busy"
        return "250 2.1.5 Ok"


def run_traffic(elemta_server, log_format="text", log_target=None, journal_socket=None):
    sink = ScriptedServer(script={"RCPT": _RcptScript()}).start()
    try:
        logging_section = {"format": log_format}
        if log_target is not None:
            logging_section["target"] = log_target
        if journal_socket is not None:
            logging_section["journal_socket"] = journal_socket
        server = elemta_server(
            logging=logging_section,
            relay={"local_domains": ["example.test"], "mynetworks": ["127.0.0.1/32"]},
            delivery={"workers": 1, "relayhost": "[127.0.0.1]:%d" % sink.port,
                      "min_backoff": 0.5, "max_backoff": 1.0})
        traffic = Traffic(server, sink)
        messages = [(SENDER, [DELIVERED[0]]),
                    (SENDER, [DELIVERED[1], DELIVERED[2]]),
                    (OTHER_SENDER, [DELIVERED[0]]),
                    (SENDER, [DEFERRED_ONCE]),
                    (SENDER, [BOUNCED]),
                    (OTHER_SENDER, [ODD])]
        for number, (sender, recipients) in enumerate(messages):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail(sender, recipients, b"Subject: message %d\r\n\r\nhello\r\n"
                                % number)
            traffic.sent.append((sender, recipients))
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10,
                          source_address=("127.0.0.2", 0)) as client:
            client.ehlo("stranger.test")
            client.mail(OTHER_SENDER)
            code, _ = client.rcpt(REFUSED)
            assert code == 554, code
            traffic.rejected += 1
        # Every message but the bounced one, and the bounce, delivered: the queue holds
        # only the bounced message, failed (kept for delivery.failed_retention).
        wait_for(lambda: len(sink.messages) == 6 and _states(server) == ["failed"],
                 timeout=30)
        server.stop()
        return traffic
    finally:
        sink.stop()


def _states(server):
    with server.queue() as queue:
        return [record.state for record in queue.index.iter_records()]
