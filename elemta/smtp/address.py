"""Envelope addresses and ESMTP parameters: parsing and validation, no I/O.

Used by the protocol core for MAIL FROM / RCPT TO (RFC 5321 4.1.2, RFC 6531 for UTF-8
addresses). Functions raise AddressError with a client-facing reason; the core turns it
into a 501/553 reply. No address holds a control character: C0 and DEL are not in the
grammar, and the non-ASCII that SMTPUTF8 allows leaves out C1 and U+2028/U+2029 too.
See also elemta.smtp.dsn (the DSN parameters ENVID, NOTIFY, ORCPT), elemta.addressing
(what a valid address means: its normal form, local or not).
"""

import ipaddress
import re

# RFC 5321 4.5.3.1: size limits of the parts of a path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_DOT_ATOM = re.compile(r"^[%s]+(\.[%s]+)*$" % (_ATEXT, _ATEXT))
# With SMTPUTF8 (RFC 6531 3.3) any non-ASCII character is also atext, but the C1
# controls and the line and paragraph separators (they would end a line somewhere).
_NON_ASCII = "\u00a0-\u2027\u202a-\U0010ffff"
_DOT_ATOM_UTF8 = re.compile("^[%s%s]+(\\.[%s%s]+)*$"
                            % (_NON_ASCII, _ATEXT, _NON_ASCII, _ATEXT))
_QUOTED = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_QUOTED_UTF8 = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e%s]|\\[\x20-\x7e])*"$'
                          % _NON_ASCII)
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_LABEL_UTF8 = re.compile(r"^[A-Za-z0-9%s]([A-Za-z0-9%s-]*[A-Za-z0-9%s])?$"
                         % (_NON_ASCII, _NON_ASCII, _NON_ASCII))
_PARAM_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


class AddressError(ValueError):
    """A path or parameter the client sent is malformed; str() is the reason."""


def split_path(argument, keyword):
    """Split 'FROM:<path> params' into (path, params text).

    keyword is "FROM" or "TO". A space after the colon is tolerated, as Postfix does;
    the angle brackets are required (RFC 5321 4.1.2).
    """
    head = keyword + ":"
    if argument[:len(head)].upper() != head:
        raise AddressError("Syntax: %s <address>" % ("MAIL FROM:" if keyword == "FROM"
                                                     else "RCPT TO:"))
    rest = argument[len(head):].lstrip(" ")
    if not rest.startswith("<"):
        raise AddressError("address must be enclosed in <>")
    # Find the closing '>' outside any quoted string.
    i, quoted = 1, False
    while i < len(rest):
        ch = rest[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            break
        i += 1
    else:
        raise AddressError("missing closing '>'")
    path, params = rest[1:i], rest[i + 1:]
    if params and not params.startswith(" "):
        raise AddressError("garbage after address")
    return path, params.strip(" ")


def validate_mailbox(path, utf8=False):
    """Check a path (without <>); return the mailbox with any source route removed.

    Raises AddressError. utf8 allows RFC 6531 non-ASCII local parts and domains.
    """
    if len(path.encode("utf-8")) > MAX_PATH:
        raise AddressError("address too long")
    if path.startswith("@"):
        # RFC 5321 4.1.2 / C: a source route "@a,@b:" must be accepted and ignored.
        colon = path.find(":")
        if colon < 0:
            raise AddressError("bad source route")
        for hop in path[:colon].split(","):
            _check_domain(hop[1:] if hop.startswith("@") else "", utf8)
        path = path[colon + 1:]
    if not utf8 and not path.isascii():
        raise NonAsciiAddress("non-ASCII address requires SMTPUTF8")
    at = path.rfind("@")
    if at <= 0:
        raise AddressError("address must be user@domain")
    local, domain = path[:at], path[at + 1:]
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    dot_atom, quoted = (_DOT_ATOM_UTF8, _QUOTED_UTF8) if utf8 else (_DOT_ATOM, _QUOTED)
    if not (dot_atom.match(local) or quoted.match(local)):
        raise AddressError("bad local part")
    _check_domain(domain, utf8)
    return path


class NonAsciiAddress(AddressError):
    """A non-ASCII address sent without SMTPUTF8 (553 5.6.7, RFC 6531 3.7.4.1)."""


def _check_domain(domain, utf8):
    if not domain:
        raise AddressError("missing domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("bad address literal")
        literal = domain[1:-1]
        if literal[:5].upper() == "IPV6:":
            literal = literal[5:]
            try:
                ipaddress.IPv6Address(literal)
            except ValueError:
                raise AddressError("bad IPv6 address literal") from None
        else:
            try:
                ipaddress.IPv4Address(literal)
            except ValueError:
                raise AddressError("bad address literal") from None
        return
    # One trailing dot (the root) is tolerated and dropped later, as Postfix's
    # trivial-rewrite does; an empty label anywhere else ("b..", ".b", "b..c") is not.
    labels = (domain[:-1] if domain.endswith(".") else domain).split(".")
    if "" in labels:
        where = ("starts with a dot" if domain.startswith(".")
                 else "has an empty label (two dots in a row)")
        raise AddressError("bad domain name %r: it %s" % (domain, where))
    label = _LABEL_UTF8 if utf8 else _LABEL
    for part in labels:
        if not label.match(part):
            raise AddressError("bad domain name")


def parse_params(text):
    """Parse ESMTP parameters 'A=1 B' into an ordered dict {KEY: value or None}."""
    params = {}
    for token in text.split(" "):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if not _PARAM_KEY.match(key):
            raise AddressError("bad parameter %r" % token)
        key = key.upper()
        if key in params:
            raise AddressError("duplicate parameter %s" % key)
        if eq and not value:
            raise AddressError("empty value for %s" % key)
        params[key] = value if eq else None
    return params
