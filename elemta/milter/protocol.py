"""The Sendmail milter protocol, version 6, MTA side: packets in and out, no I/O.

Owned by no process (elemta.milter.client drives it over a socket). Every packet is a
4-byte big-endian length (counting the command byte), one command byte and its data;
strings are NUL-terminated. The MTA opens with OPTNEG (version, the actions it allows,
the protocol steps it can skip), the milter answers with what it wants, then each stage
is one command (preceded by a MACRO packet carrying that stage's macros) and, unless the
milter negotiated "no reply" for it, one reply. At end of message the milter may send
modifications (add header, change body ...) before its final reply, and PROGRESS at any
time to say it is still working.

The constants keep libmilter's names (mfapi.h, mfdef.h) so the next engineer can compare
them with the reference; this module builds and parses packets and checks what a milter
sends, so a hostile or broken milter gives a MilterProtocolError, never an exception of
another kind.
"""

import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

VERSION = 6

# Commands, MTA -> milter (SMFIC_*).
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies, milter -> MTA (SMFIR_*). The first group ends a stage; the second are the
# modifications allowed at end of message; PROGRESS only resets the timeout.
SMFIR_ACCEPT = b"a"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_REJECT = b"r"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"
SMFIR_SKIP = b"s"
SMFIR_QUARANTINE = b"q"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_REPLBODY = b"b"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_CHGHEADER = b"m"
SMFIR_CHGFROM = b"e"
SMFIR_PROGRESS = b"p"
SMFIR_OPTNEG = b"O"

# Actions the MTA allows (SMFIF_*): all of them.
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# Protocol steps (SMFIP_*): NO* skip a stage, NR_* mean the milter sends no reply to it.
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
# What we offer: every skip and no-reply step, and SKIP (the rest of the body). Not
# offered: RCPT_REJ (rejected recipients are not sent), HDR_LEADSPC (header values are
# sent without the space after the colon, as Sendmail does), bigger body chunks.
OFFERED_STEPS = (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY
                 | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_NOUNKNOWN | SMFIP_NODATA
                 | SMFIP_SKIP | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL
                 | SMFIP_NR_RCPT | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH
                 | SMFIP_NR_BODY)

# Protocol versions before 6 know only the skips of the first seven steps.
OLD_STEPS = 0x7F
VERSIONS = (2, 3, 4, 6)


def offered_steps(version):
    return OFFERED_STEPS if version >= 6 else OLD_STEPS


# A command -> (the step that skips it, the step that says no reply comes).
STEPS = {
    SMFIC_CONNECT: (SMFIP_NOCONNECT, SMFIP_NR_CONN),
    SMFIC_HELO: (SMFIP_NOHELO, SMFIP_NR_HELO),
    SMFIC_MAIL: (SMFIP_NOMAIL, SMFIP_NR_MAIL),
    SMFIC_RCPT: (SMFIP_NORCPT, SMFIP_NR_RCPT),
    SMFIC_DATA: (SMFIP_NODATA, SMFIP_NR_DATA),
    SMFIC_HEADER: (SMFIP_NOHDRS, SMFIP_NR_HDR),
    SMFIC_EOH: (SMFIP_NOEOH, SMFIP_NR_EOH),
    SMFIC_BODY: (SMFIP_NOBODY, SMFIP_NR_BODY),
    SMFIC_BODYEOB: (0, 0),
    SMFIC_UNKNOWN: (SMFIP_NOUNKNOWN, SMFIP_NR_UNKN),
}
# Commands later protocol versions added -> the first version that knows them (mfdef.h:
# UNKNOWN came with version 3, DATA with 4); an older milter is never sent them.
FIRST_VERSION = {SMFIC_UNKNOWN: 3, SMFIC_DATA: 4}

# The macro lists a milter may ask for in its OPTNEG reply (SMFIM_*) -> the command
# they are sent with.
MACRO_STAGES = {0: SMFIC_CONNECT, 1: SMFIC_HELO, 2: SMFIC_MAIL, 3: SMFIC_RCPT,
                4: SMFIC_DATA, 5: SMFIC_BODYEOB, 6: SMFIC_EOH}

# Body bytes per BODY packet (libmilter's MILTER_CHUNK_SIZE without MDS_256K/1M).
CHUNK_SIZE = 65535
# The largest packet we accept from a milter: a replacement body chunk of 1 MB (what
# MDS_1M allows) with room for its header; anything longer is a broken milter.
MAX_PACKET = (1 << 20) + 64

_LENGTH = struct.Struct("!I")


class MilterProtocolError(Exception):
    """The milter sent something the protocol does not allow."""


def packet(command, data=b""):
    # type: (bytes, bytes) -> bytes
    """One packet: length, command byte, data."""
    return _LENGTH.pack(len(data) + 1) + command + data


def _cstr(text):
    """A NUL-terminated string; NUL inside the text would end it early, so it is cut."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogateescape")
    return text.replace(b"\0", b"") + b"\0"


def optneg(version=VERSION, actions=ALL_ACTIONS, steps=OFFERED_STEPS):
    return packet(SMFIC_OPTNEG, struct.pack("!III", version, actions, steps))


def macros(command, values):
    # type: (bytes, List[Tuple[str, str]]) -> bytes
    """The MACRO packet sent before `command`: name, value pairs ({name} kept as named)."""
    return packet(SMFIC_MACRO, command + b"".join(_cstr(n) + _cstr(v) for n, v in values))


def connect(hostname, family, port, address):
    """family: b"4", b"6", b"L" (unix socket) or b"U" (unknown: no address or port)."""
    data = _cstr(hostname) + family
    if family != b"U":
        data += struct.pack("!H", port or 0) + _cstr(address)
    return packet(SMFIC_CONNECT, data)


def helo(name):
    return packet(SMFIC_HELO, _cstr(name))


def mail(sender, args=()):
    """The sender in angle brackets, then its ESMTP parameters, each a string."""
    return packet(SMFIC_MAIL, _cstr("<%s>" % sender) + b"".join(_cstr(a) for a in args))


def rcpt(recipient, args=()):
    return packet(SMFIC_RCPT, _cstr("<%s>" % recipient) + b"".join(_cstr(a) for a in args))


def unknown(line):
    """An SMTP command the MTA does not know: the whole line, without its CRLF."""
    return packet(SMFIC_UNKNOWN, _cstr(line))


def header(name, value):
    return packet(SMFIC_HEADER, _cstr(name) + _cstr(value))


def simple(command):
    """DATA, EOH, BODYEOB, ABORT, QUIT: no data."""
    return packet(command)


def body(chunk):
    return packet(SMFIC_BODY, bytes(chunk))


# ---- what a milter sends --------------------------------------------------------------

@dataclass
class Negotiated:
    """The milter's OPTNEG reply: the version, the actions it will use, the protocol steps
    it asked for (only those we offered are kept), and the macro lists it asked for
    (command -> names) in place of the configured ones."""
    version: int
    actions: int
    steps: int
    macros: Dict[bytes, List[str]] = field(default_factory=dict)

    def defines(self, command):
        """True when the protocol version spoken has this command at all."""
        return self.version >= FIRST_VERSION.get(command, 0)

    def skips(self, command):
        """True when the command is not sent: not in the version spoken, or the milter
        negotiated it away (SMFIP_NOHELO ...)."""
        return (not self.defines(command)
                or bool(self.steps & STEPS.get(command, (0, 0))[0]))

    def replies_to(self, command):
        return not self.steps & STEPS.get(command, (0, 0))[1]


def parse_optneg(data, offered=OFFERED_STEPS):
    # type: (bytes, int) -> Negotiated
    """The data of the milter's OPTNEG reply (offered: the steps we offered)."""
    if len(data) < 12:
        raise MilterProtocolError("option negotiation reply of %d bytes, not 12 or more"
                                  % len(data))
    version, actions, steps = struct.unpack("!III", data[:12])
    if version < 2:
        raise MilterProtocolError("milter speaks protocol version %d, older than 2"
                                  % version)
    if actions & ~ALL_ACTIONS:
        raise MilterProtocolError("milter wants actions 0x%x we do not know"
                                  % (actions & ~ALL_ACTIONS))
    negotiated = Negotiated(min(version, VERSION), actions, steps & offered)
    rest = data[12:]
    while len(rest) >= 4:
        (where,) = _LENGTH.unpack(rest[:4])
        end = rest.find(b"\0", 4)
        if end < 0:
            raise MilterProtocolError("macro list without its NUL")
        command = MACRO_STAGES.get(where)
        if command is not None:
            negotiated.macros[command] = rest[4:end].decode("ascii", "replace").split()
        rest = rest[end + 1:]
    return negotiated


def split_strings(data, count, what):
    """The first `count` NUL-terminated strings of data (decoded, bytes kept by
    surrogateescape); MilterProtocolError naming `what` when they are not there."""
    parts = data.split(b"\0")
    if len(parts) <= count:
        raise MilterProtocolError("%s without its %d NUL-terminated string(s)"
                                  % (what, count))
    return [part.decode("utf-8", "surrogateescape") for part in parts[:count]]


def parse_index(data, what):
    # type: (bytes, str) -> Tuple[int, bytes]
    if len(data) < 4:
        raise MilterProtocolError("%s without its index" % what)
    return _LENGTH.unpack(data[:4])[0], data[4:]


@dataclass(frozen=True)
class ReplyCode:
    """A REPLYCODE's text: code, enhanced status (None when absent) and text."""
    code: int
    status: Optional[str]
    text: str


def parse_replycode(data):
    # type: (bytes) -> ReplyCode
    """SMFIR_REPLYCODE: "550 5.7.1 text" (one or more lines, as smfi_setmlreply gives
    them; the lines' texts are joined with a space). Only 4xx and 5xx are allowed."""
    text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    if not lines or len(lines[0]) < 3 or not lines[0][:3].isdigit():
        raise MilterProtocolError("reply code %r is not a 3-digit SMTP code" % text[:60])
    code = int(lines[0][:3])
    if not 400 <= code <= 599:
        raise MilterProtocolError("reply code %d is not 4xx or 5xx" % code)
    status, texts = None, []
    for line in lines:
        rest = line[4:] if line[:3] == lines[0][:3] else line
        first, _, after = rest.partition(" ")
        parts = first.split(".")
        if (len(parts) == 3 and all(p.isdigit() for p in parts)
                and first[0] == str(code)[0]):
            status = status or first
            rest = after
        texts.append(rest.strip())
    return ReplyCode(code, status, " ".join(t for t in texts if t))


def parse_socket(text):
    """A milter's address as Postfix writes it: ("unix", path) for unix:/path (or a bare
    /path), ("inet", (host, port)) for inet:host:port or inet:[ipv6]:port. Raises
    ValueError saying what is wrong."""
    kind, colon, rest = text.strip().partition(":")
    if not colon and kind.startswith("/"):
        return "unix", kind
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError("%r: a unix socket is unix:/absolute/path" % (text,))
        return "unix", rest
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("%r: an inet socket is inet:host:port (port 1-65535)"
                             % (text,))
        return "inet", (host, int(port))
    raise ValueError("%r is not a milter socket: write unix:/path or inet:host:port"
                     % (text,))
