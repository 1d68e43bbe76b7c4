"""One connection to one milter, for one SMTP session (or one local submission).

Owned by elemta.milter.chain, in the smtpd worker or pickup. Every wait goes through
gevent sockets with a deadline, so a slow milter delays only its own session:
connect_timeout bounds connecting and the option negotiation, command_timeout each
command from CONNECT to DATA (and EOH, ABORT, QUIT), content_timeout each header, body
chunk and the end of message. PROGRESS from the milter starts the wait afresh, as
libmilter intends. Anything that goes wrong (refused, timed out, a packet the protocol
does not allow) raises MilterError with one sentence and a kind from KINDS (counted in
elemta_milter_failures_total); the chain then applies the milter's default_action.

A stage's answer is a Response: the final action and, at the end of message, the
modifications the milter asked for, in the order it sent them. A replacement body is
spooled to a temporary file past REPLACEMENT_IN_MEMORY bytes, not held in memory, with
its line endings made CRLF chunk by chunk as it arrives (edits.CrlfStream), the event
loop given a turn after each chunk so a fast milter's 30 MB cannot hold other sessions
up. One larger than max_body (limits.message_size) is not kept: the Response says so
(Modifications.body_too_large) and the chain tempfails the message.
"""

import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import gevent
from gevent import socket

from elemta.milter import protocol as p
from elemta.milter.edits import CrlfStream

# A replacement body is kept in memory up to this size, then spooled to a temporary file.
REPLACEMENT_IN_MEMORY = 1 << 20

# Final answers -> the action names the chain (and the log and metrics) use.
FINAL = {p.SMFIR_ACCEPT: "accept", p.SMFIR_CONTINUE: "continue",
         p.SMFIR_DISCARD: "discard", p.SMFIR_REJECT: "reject",
         p.SMFIR_TEMPFAIL: "tempfail", p.SMFIR_REPLYCODE: "reply",
         p.SMFIR_SKIP: "skip", p.SMFIR_CONN_FAIL: "tempfail"}
# Modifications allowed at the end of message -> the action flag that permits them.
MODIFICATIONS = {p.SMFIR_ADDHEADER: p.SMFIF_ADDHDRS, p.SMFIR_INSHEADER: p.SMFIF_ADDHDRS,
                 p.SMFIR_CHGHEADER: p.SMFIF_CHGHDRS, p.SMFIR_REPLBODY: p.SMFIF_CHGBODY,
                 p.SMFIR_ADDRCPT: p.SMFIF_ADDRCPT, p.SMFIR_ADDRCPT_PAR: p.SMFIF_ADDRCPT_PAR,
                 p.SMFIR_DELRCPT: p.SMFIF_DELRCPT, p.SMFIR_CHGFROM: p.SMFIF_CHGFROM,
                 p.SMFIR_QUARANTINE: p.SMFIF_QUARANTINE}


# Why a conversation failed, a bounded set (the `kind` label of the failure metric):
# connect: nothing listens or the connection was refused; timeout: connecting, a write
# or the wait for an answer took longer than its timeout; io: the connection broke (a
# reset, or the milter closed it); protocol: a packet the protocol does not allow.
CONNECT, TIMEOUT, IO, PROTOCOL = "connect", "timeout", "io", "protocol"
KINDS = (CONNECT, TIMEOUT, IO, PROTOCOL)


class MilterError(Exception):
    """The milter could not be reached, timed out, or broke the protocol; kind: one of
    KINDS."""

    def __init__(self, message, kind=PROTOCOL):
        super().__init__(message)
        self.kind = kind


@dataclass
class Modifications:
    """What a milter asked to change at the end of message, in its order.

    headers: ("add", name, value, 0) | ("insert", name, value, index) |
             ("change", name, value, index); change with value "" deletes.
    body: the replacement body (a file object at its start, every line ending CRLF) or
          None.
    body_size: the bytes of replacement body the milter sent (with CRLF endings).
    body_too_large: it sent more than the connection's max_body; body is then None.
    recipients: ("add" | "delete", address without angle brackets), in the milter's
                order (an add then a delete of one address is not a delete then an add).
    sender: the new envelope sender, or None.
    quarantine: the reason, when the milter asked for the message to be held.
    ignored_parameters: (what, address, parameters) of each add-recipient or
        change-sender that came with ESMTP parameters (SMFIR_ADDRCPT_PAR, SMFIR_CHGFROM):
        the address is taken, the parameters are not, as Postfix's cleanup ignores them
        (with a warning); the chain logs them.
    """
    headers: List[Tuple[str, str, str, int]] = field(default_factory=list)
    body: Any = None
    body_size: int = 0
    body_too_large: bool = False
    recipients: List[Tuple[str, str]] = field(default_factory=list)
    sender: Optional[str] = None
    quarantine: Optional[str] = None
    ignored_parameters: List[Tuple[str, str, str]] = field(default_factory=list)
    _line_endings: Any = None           # the body's CrlfStream while it comes

    def __bool__(self):
        return bool(self.headers or self.body is not None or self.body_too_large
                    or self.recipients or self.sender is not None
                    or self.quarantine is not None)

    def add_body(self, chunk, max_body):
        """One REPLBODY chunk, its line endings made CRLF; past max_body (0: no
        limit) the body is dropped and body_too_large set."""
        if self._line_endings is None:
            self._line_endings = CrlfStream()
        chunk = self._line_endings.feed(chunk)
        self.body_size += len(chunk)
        if self.body_too_large:
            return
        if max_body and self.body_size > max_body:
            self.body_too_large = True
            self.close()
            self.body = None
            return
        if self.body is None:
            self.body = tempfile.SpooledTemporaryFile(REPLACEMENT_IN_MEMORY)
        self.body.write(chunk)

    def finish(self):
        """The final answer came: the body complete and at its start."""
        if self.body is not None:
            self.body.write(self._line_endings.end())
            self.body.seek(0)

    def close(self):
        if self.body is not None:
            self.body.close()


@dataclass
class Response:
    """A milter's answer to one stage. action: accept, continue, discard, reject,
    tempfail, reply (a REPLYCODE: reject or tempfail by its code) or skip;
    reply: the ReplyCode of a "reply"."""
    action: str
    reply: Optional[p.ReplyCode] = None
    modifications: Modifications = field(default_factory=Modifications)


CONTINUE = Response("continue")


def _address(text):
    """A milter's address argument without its angle brackets."""
    text = text.strip()
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def _address_and_parameters(data, what):
    """(address, ESMTP parameters or "") of an ADDRCPT, ADDRCPT_PAR or CHGFROM packet:
    the address string, then, for the last two, an optional string of parameters."""
    address = _address(p.split_strings(data, 1, what)[0])
    rest = data.split(b"\0")[1:]            # the strings after the address
    parameters = b" ".join(part for part in rest if part.strip())
    return address, parameters.decode("utf-8", "surrogateescape").strip()


class MilterConnection:
    """One open conversation with a milter (see the module docstring)."""

    def __init__(self, name, address, connect_timeout, command_timeout, content_timeout,
                 version=p.VERSION, max_body=0):
        self.name = name
        self.max_body = max_body        # the largest replacement body kept; 0: any
        self.version = version
        self.address = address          # protocol.parse_socket's answer
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.content_timeout = content_timeout
        self.sock = None
        self.negotiated = None          # protocol.Negotiated, once open

    def describe(self):
        kind, where = self.address
        return "unix:%s" % where if kind == "unix" else "inet:%s:%d" % where

    # ---- life cycle ----------------------------------------------------------------

    def open(self):
        """Connect and negotiate; MilterError when the milter is not there or refuses."""
        kind, where = self.address
        try:
            if kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                try:
                    sock.connect(where)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(where, timeout=self.connect_timeout)
        except socket.timeout:
            raise MilterError("connect to %s timed out after %gs"
                              % (self.describe(), self.connect_timeout), TIMEOUT) from None
        except OSError as error:
            raise MilterError("cannot connect to %s: %s"
                              % (self.describe(), error.strerror or error), CONNECT) from None
        self.sock = sock
        self._send(p.optneg(self.version, steps=p.offered_steps(self.version)),
                   self.connect_timeout)
        command, data = self._read(self.connect_timeout, "option negotiation")
        if command != p.SMFIR_OPTNEG:
            raise MilterError("answered option negotiation with %r" % command)
        try:
            self.negotiated = p.parse_optneg(data, p.offered_steps(self.version))
            # The version both speak: the lower of ours (configured) and the milter's.
            self.negotiated.version = min(self.negotiated.version, self.version)
        except p.MilterProtocolError as error:
            raise MilterError(str(error)) from None
        return self.negotiated

    def close(self, quit=True):
        """QUIT (when the conversation is in order) and close; never raises."""
        if self.sock is None:
            return
        try:
            if quit:
                self.sock.settimeout(self.command_timeout)
                self.sock.sendall(p.simple(p.SMFIC_QUIT))
        except OSError:
            pass
        finally:
            self.sock.close()
            self.sock = None

    # ---- stages --------------------------------------------------------------------

    def stage(self, command, data, macros, content=False, eom=False):
        """Send one stage's command (a packet from protocol) preceded by its macros;
        the milter's Response, or CONTINUE when it negotiated that stage away or
        sends no reply to it. The macros go even to a milter that negotiated the
        stage away, as Postfix sends them: libmilter keeps them for the later stages,
        where a milter that has no HELO callback (opendkim) reads the TLS macros."""
        negotiated = self.negotiated
        if not negotiated.defines(command):
            return CONTINUE
        timeout = self.content_timeout if content else self.command_timeout
        if macros:
            self._send(p.macros(command, macros), timeout)
        if negotiated.skips(command):
            return CONTINUE
        self._send(data, timeout)
        if not eom and not negotiated.replies_to(command):
            return CONTINUE
        return self._response(timeout, eom)

    def abort(self):
        """ABORT the message in hand (no reply comes)."""
        self._send(p.simple(p.SMFIC_ABORT), self.command_timeout)

    def _response(self, timeout, eom):
        modifications = Modifications()
        try:
            while True:
                command, data = self._read(timeout, "a reply")
                if command == p.SMFIR_PROGRESS:
                    continue
                if command in FINAL:
                    reply = p.parse_replycode(data) if command == p.SMFIR_REPLYCODE \
                        else None
                    modifications.finish()
                    return Response(FINAL[command], reply, modifications)
                if command not in MODIFICATIONS:
                    raise MilterError("sent an unknown reply %r" % command)
                if not eom:
                    raise MilterError("sent modification %r before the end of message"
                                      % command)
                if not self.negotiated.actions & MODIFICATIONS[command]:
                    raise MilterError("sent modification %r it did not negotiate"
                                      % command)
                self._modification(modifications, command, data)
        except p.MilterProtocolError as error:
            modifications.close()
            raise MilterError(str(error)) from None
        except BaseException:
            modifications.close()
            raise

    def _modification(self, mods, command, data):
        if command == p.SMFIR_ADDHEADER:
            name, value = p.split_strings(data, 2, "add header")
            mods.headers.append(("add", name, value, 0))
        elif command in (p.SMFIR_INSHEADER, p.SMFIR_CHGHEADER):
            index, rest = p.parse_index(data, "header change")
            name, value = p.split_strings(rest, 2, "header change")
            kind = "insert" if command == p.SMFIR_INSHEADER else "change"
            mods.headers.append((kind, name, value, index))
        elif command == p.SMFIR_REPLBODY:
            mods.add_body(data, self.max_body)
            # The chunks of a fast milter may all be in the socket buffer already, so
            # reading them would never wait: let the other sessions have their turn.
            gevent.sleep(0)
        elif command in (p.SMFIR_ADDRCPT, p.SMFIR_ADDRCPT_PAR):
            address, parameters = _address_and_parameters(data, "add rcpt")
            mods.recipients.append(("add", address))
            if parameters:
                mods.ignored_parameters.append(("add rcpt", address, parameters))
        elif command == p.SMFIR_DELRCPT:
            mods.recipients.append(("delete", _address(p.split_strings(data, 1,
                                                                     "del rcpt")[0])))
        elif command == p.SMFIR_CHGFROM:
            mods.sender, parameters = _address_and_parameters(data, "change from")
            if parameters:
                mods.ignored_parameters.append(("change sender", mods.sender, parameters))
        elif command == p.SMFIR_QUARANTINE:
            mods.quarantine = p.split_strings(data, 1, "quarantine")[0] or "quarantined"

    # ---- the wire ------------------------------------------------------------------

    def _send(self, data, timeout):
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise MilterError("write timed out after %gs" % timeout, TIMEOUT) from None
        except OSError as error:
            raise MilterError("write failed: %s" % (error.strerror or error), IO) from None

    def _read(self, timeout, what):
        header = self._exactly(5, timeout, what)
        (length,) = struct.unpack("!I", header[:4])
        if length < 1 or length > p.MAX_PACKET:
            raise MilterError("sent a packet of %d bytes" % length)
        return header[4:5], self._exactly(length - 1, timeout, what)

    def _exactly(self, count, timeout, what):
        parts, left = [], count
        self.sock.settimeout(timeout)
        while left:
            try:
                piece = self.sock.recv(min(left, 65536))
            except socket.timeout:
                raise MilterError("timed out after %gs waiting for %s"
                                  % (timeout, what), TIMEOUT) from None
            except OSError as error:
                raise MilterError("read failed waiting for %s: %s"
                                  % (what, error.strerror or error), IO) from None
            if not piece:
                raise MilterError("closed the connection while we waited for %s" % what,
                                  IO)
            parts.append(piece)
            left -= len(piece)
        return b"".join(parts)
