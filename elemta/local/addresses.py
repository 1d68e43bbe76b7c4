"""Local addresses: which domains are local, and a recipient's user name and extension.

Used by the local agent (elemta.local.expand) and the smtpd's RCPT check
(elemta.local.recipients). Postfix's rules: the local part is matched without case,
user+ext (local.recipient_delimiter) is delivered to user, a bare name belongs to
the host name's domain (myorigin), and a quoted local part that needs no quotes is the
same mailbox as the unquoted one ("root"@example.org is root@example.org, RFC 5321
4.1.2), as Postfix's address rewriting makes it.
See also: elemta.delivery.routing (which sends local domains to the local transport).
"""

import encodings.idna  # noqa: F401  (loaded now: forked workers may not read the library)
import string

from elemta.config.schema import parse_transport


def normal_domain(domain):
    """A domain in one spelling: lower case, no final dot, IDN U-labels as A-labels."""
    domain = domain.lower().rstrip(".")
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def split_address(address):
    """(local part, domain) of an address; the domain is "" for a bare name."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


# RFC 5322 atext; UTF-8 beyond ASCII is atext too under SMTPUTF8 (RFC 6531).
ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")


def is_dot_atom(text):
    """True when text can be written as a local part without quotes (RFC 5321 Dot-string)."""
    return all(atom and all(ch in ATEXT or ord(ch) > 127 for ch in atom)
               for atom in text.split("."))


def _unquoted(local):
    """The content of a quoted local part, backslash pairs undone; None if it is not one
    whole quoted string."""
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return None
    out, escaped = [], False
    for ch in local[1:-1]:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return None
        else:
            out.append(ch)
    return None if escaped else "".join(out)


def normal_local_part(local):
    """local without quotes it does not need: '"root"' -> 'root', '"a.b"' -> 'a.b';
    '"a b"' and '"a..b"' stay as written (only the quoted form says them)."""
    content = _unquoted(local)
    return content if content is not None and is_dot_atom(content) else local


def normal_address(address):
    """The address with its local part in normal form (see normal_local_part)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return normal_local_part(address)
    return normal_local_part(local) + at + domain


class LocalAddressing:
    """The local domains and the extension rule of one configuration."""

    def __init__(self, config):
        self.hostname = normal_domain(config.hostname)
        self.domains = {normal_domain(d) for d in config.relay.local_domains}
        self.domains.add(self.hostname)
        self.transport_local = set()
        for entry in config.delivery.transport:
            if parse_transport(entry.nexthop)[0] == "local":
                self.transport_local.add(normal_domain(entry.domain))
        self.delimiter = config.local.recipient_delimiter

    def is_local(self, address):
        """True for a bare name and for an address in a local domain (relay.local_domains,
        the host name, or a transport map entry that says local)."""
        domain = normal_domain(split_address(address)[1])
        if not domain or domain in self.domains or domain in self.transport_local:
            return True
        labels = domain.split(".")
        return any("." + ".".join(labels[i:]) in self.transport_local
                   for i in range(1, len(labels)))

    def qualify(self, name):
        """A bare name as an address in the host name's domain."""
        return name if "@" in name else "%s@%s" % (name, self.hostname)

    def user_and_extension(self, local):
        """("user", "ext") for "User+ext" with delimiter "+"; ("user", None) otherwise."""
        local = local.lower()
        if self.delimiter and self.delimiter in local[1:]:
            user, _, extension = local.partition(self.delimiter)
            if user:
                return user, extension
        return local, None
