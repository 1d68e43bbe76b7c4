"""What the SMTP state machine tells its driver.

The protocol core (elemta.smtp.protocol) returns these from next_event(). Events whose
class sets needs_decision=True pause the core until the driver calls accept() or
reject(): that is where policy (relay control, AUTH checks, queueing) plugs in.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


class _Sentinel:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")   # feed more bytes with receive_data()
CLOSED = _Sentinel("CLOSED")         # the session is over; close the connection


@dataclass
class RecipientInfo:
    """One accepted RCPT TO with its RFC 3461 DSN parameters."""
    address: str
    notify: Optional[Tuple[str, ...]] = None
    orcpt: Optional[str] = None


@dataclass
class Transaction:
    """The per-transaction envelope (design rule 4): replaced by RSET, EHLO and end of data."""
    sender: str
    body: str = "7BIT"
    smtputf8: bool = False
    declared_size: Optional[int] = None
    ret: Optional[str] = None
    envid: Optional[str] = None
    requiretls: bool = False        # RFC 8689: every hop onward must be TLS, verified
    recipients: List[RecipientInfo] = field(default_factory=list)
    data_started: bool = False
    data_size: int = 0


class Event:
    needs_decision = False


@dataclass
class Helo(Event):
    """HELO or EHLO; accepting it answers with the greeting or capability list."""
    name: str
    esmtp: bool
    needs_decision = True


@dataclass
class MailFrom(Event):
    """MAIL FROM, already parsed and checked for syntax and size."""
    transaction: Transaction
    needs_decision = True


@dataclass
class RcptTo(Event):
    """RCPT TO; accepting adds the recipient to the transaction."""
    transaction: Transaction
    recipient: RecipientInfo
    needs_decision = True


@dataclass
class DataStart(Event):
    """DATA, or the first BDAT chunk: the driver prepares to store content."""
    transaction: Transaction
    needs_decision = True


@dataclass
class DataChunk(Event):
    """Message content, dot-unstuffed, in order. Write it; no answer needed."""
    data: bytes


@dataclass
class MessageReceived(Event):
    """The end of the content. Accept (after making it durable) or reject it."""
    transaction: Transaction
    needs_decision = True


@dataclass
class DataAborted(Event):
    """The content begun by DataStart will not complete: discard what was written."""
    reason: str


@dataclass
class AuthRequest(Event):
    """AUTH credentials to check; accept() means they are right."""
    mechanism: str
    username: str
    password: str
    authzid: str = ""
    needs_decision = True


@dataclass
class StartTLS(Event):
    """The 220 to STARTTLS is out: do the TLS handshake, then call tls_started()."""


@dataclass
class ImproperPipelining(Event):
    """A command line came with more input behind it where the client may not pipeline:
    it has not seen PIPELINING in an EHLO reply of this session (before EHLO, after HELO,
    after STARTTLS), or the command is DATA (RFC 2920 3.1: the client waits for the 354).
    Only when Settings.pipelining_test is on, once per session. `command` is the verb,
    `following` the first input after it (up to 100 bytes). accept(): the command is
    obeyed; reject(reply): the reply (a closing one) ends the session instead."""
    command: str
    following: bytes
    needs_decision = True


@dataclass
class UnknownCommand(Event):
    """A line that is no SMTP command (only when Settings.report_unknown_commands is on).
    It is refused either way: accept() gives the core's 500 5.5.1, reject(reply) that
    reply instead. `line` is the whole line as the client sent it, without its CRLF."""
    line: str
    needs_decision = True
