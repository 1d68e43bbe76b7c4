"""Client-side SMTP AUTH credentials: delivery.sasl_password_file, looked up per next hop.

Owned by the delivery worker (`elemta: delivery`); elemta.delivery.smtp_transport asks it
for the user name and password of the next hop it is about to connect to, and
elemta.delivery.smtp_client sends them (AUTH PLAIN or LOGIN, RFC 4954).

The file is Postfix's smtp_sasl_password_maps source format, read as it is (no postmap):

    # relay host, no MX lookup: the key is written as relayhost is
    [smtp.provider.example]:587   elemta@example.org:secret
    # a domain looked up by MX, on the default port or another one
    partner.example                user:pass:with:colons
    partner.example:2525           other:secret

A line that starts with whitespace continues the one before (as in every Postfix table).
The password is everything after the first ':' of the value. The file is read again when it
changes (size, mtime or inode), so editing it needs no reload. Any problem with it (missing,
unreadable, a bad line) is a SASLFileError whose text names the file, and the line for
syntax errors: the transport logs it and defers, as Postfix does on a table lookup error.
See also: elemta.config.schema (Delivery.sasl_password_file), RFC 4954, Postfix SASL_README.
"""

import logging
import os
from typing import Dict, Optional, Tuple

from elemta.addressing.normal import normal_domain
from elemta.config.schema import parse_nexthop

log = logging.getLogger("elemta.delivery")


class SASLFileError(Exception):
    """The password file cannot be used; str() says which file and why (file:line)."""


def nexthop_key(host, port, mx_lookup, default_port):
    # type: (str, int, bool, int) -> Tuple[str, ...]
    """The keys a next hop is looked up by, most specific first: "[host]:port" then
    "[host]" for a bracketed next hop, "host:port" then "host" for an MX-looked-up one
    (the port-less form only when the port is the default, as relayhost would omit it)."""
    host = normal_domain(host)
    bare = "[%s]" % host if not mx_lookup else host
    keys = ("%s:%d" % (bare, port),)
    if port == default_port:
        keys += (bare,)
    return keys


def _normal_key(text):
    """A file key as nexthop_key() writes keys; raises ValueError."""
    host, port, mx_lookup = parse_nexthop(text)
    host = normal_domain(host)
    bare = "[%s]" % host if not mx_lookup else host
    return bare if port is None else "%s:%d" % (bare, port)


def parse_password_lines(path, lines):
    # type: (str, object) -> Dict[str, Tuple[str, str]]
    """{key: (user, password)} from the file's lines; raises SASLFileError("path:line: ...")."""
    table = {}        # type: Dict[str, Tuple[str, str]]
    first_seen = {}   # type: Dict[str, int]
    logical = []      # [(line number, text)], continuation lines joined
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                raise SASLFileError("%s:%d: a continuation line (it starts with whitespace) "
                                    "with no line before it" % (path, number))
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
        else:
            logical.append((number, line.strip()))
    for number, text in logical:
        parts = text.split(None, 1)
        if len(parts) != 2:
            raise SASLFileError("%s:%d: expected \"next-hop user:password\", found only %r"
                                % (path, number, parts[0]))
        key_text, value = parts
        try:
            key = _normal_key(key_text)
        except ValueError as error:
            raise SASLFileError("%s:%d: %s" % (path, number, error))
        user, colon, password = value.strip().partition(":")
        if not colon or not user:
            raise SASLFileError("%s:%d: the value for %s must be user:password"
                                % (path, number, key_text))
        if key in table:
            # As postmap does: a warning, and the first entry stands (one duplicate line
            # must not hold up all mail to every next hop).
            log.warning("%s:%d: a second entry for %s is ignored (the first, on line %d, "
                        "is used)", path, number, key_text, first_seen[key])
            continue
        table[key] = (user, password)
        first_seen[key] = number
    return table


class SASLPasswords:
    """The credentials in one file, re-read when it changes."""

    def __init__(self, path):
        self.path = path
        self._signature = None
        self._table = {}      # type: Dict[str, Tuple[str, str]]

    def lookup(self, keys):
        # type: (Tuple[str, ...]) -> Optional[Tuple[str, str]]
        """(user, password) for the first key found, or None; raises SASLFileError."""
        self._refresh()
        for key in keys:
            found = self._table.get(key)
            if found is not None:
                return found
        return None

    def _refresh(self):
        try:
            stat = os.stat(self.path)
        except OSError as error:
            self._signature = None
            raise SASLFileError("cannot read the SASL password file %s: %s"
                                % (self.path, error.strerror or error))
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if signature == self._signature:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                table = parse_password_lines(self.path, f)
        except OSError as error:
            raise SASLFileError("cannot read the SASL password file %s: %s"
                                % (self.path, error.strerror or error))
        except UnicodeDecodeError as error:
            raise SASLFileError("%s: not UTF-8 text (%s)" % (self.path, error.reason))
        self._table, self._signature = table, signature
