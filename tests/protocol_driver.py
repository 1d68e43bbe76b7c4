"""A test driver for the sans-IO SMTP core: feeds bytes, answers decisions, keeps
what the client would see and the messages that would be queued. No sockets."""

from elemta.smtp.events import (CLOSED, NEED_DATA, AuthRequest, DataAborted, DataChunk,
                                DataStart, MessageReceived, RcptTo, StartTLS)
from elemta.smtp.protocol import ServerProtocol, Settings
from elemta.smtp.replies import Reply


class Driver:
    """Plays the smtpd's part: accepts everything unless told otherwise.

    decide(event) -> bool, when given, answers every decision first (False: reject with
    the core's default reply); refused=(code, status, text) starts the session refused
    as a connection-stage plugin would (ServerProtocol.start_refused)."""

    def __init__(self, users=None, relay_ok=lambda address: True, decide=None,
                 refused=None, **settings):
        settings.setdefault("hostname", "mx.test")
        self.proto = ServerProtocol(Settings(**settings))
        self.users = users or {}
        self.relay_ok = relay_ok
        self.wire = b""
        self.messages = []        # (transaction, content bytes) accepted
        self.aborted = []
        self.starttls = 0
        self._content = None
        self.closed = False
        self.decide = decide
        if refused is None:
            self.proto.start()
        else:
            self.proto.start_refused(*refused, client="unknown[192.0.2.1]")
        self._pump()

    def send(self, data):
        """Feed client bytes; return what the server wrote in answer."""
        before = len(self.wire)
        self.proto.receive_data(data)
        self._pump()
        return self.wire[before:]

    def replies(self, data):
        """Send and return the answer as a list of reply lines (str)."""
        return self.send(data).decode("ascii").splitlines()

    def _pump(self):
        proto = self.proto
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                return
            if event is CLOSED:
                self.closed = True
                return
            if isinstance(event, Reply):
                self.wire += event.encode()
            elif (self.decide is not None and event.needs_decision
                  and not self.decide(event)):
                if isinstance(event, MessageReceived):
                    self._content = None
                proto.reject()
            elif isinstance(event, DataStart):
                self._content = bytearray()
                proto.accept()
            elif isinstance(event, DataChunk):
                assert self._content is not None, "content outside DATA"
                self._content += event.data
            elif isinstance(event, DataAborted):
                self.aborted.append(event.reason)
                self._content = None
            elif isinstance(event, MessageReceived):
                self.messages.append((event.transaction, bytes(self._content)))
                self._content = None
                proto.accept("Ok: queued as Q%d" % len(self.messages))
            elif isinstance(event, RcptTo):
                if self.relay_ok(event.recipient.address):
                    proto.accept()
                else:
                    proto.reject(Reply(554, "5.7.1", "Relay access denied"))
            elif isinstance(event, AuthRequest):
                if self.users.get(event.username) == event.password:
                    proto.accept()
                else:
                    proto.reject()
            elif isinstance(event, StartTLS):
                self.starttls += 1
                proto.tls_started()
            elif event.needs_decision:
                proto.accept()
