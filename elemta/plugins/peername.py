"""The client's name: reverse DNS (PTR) confirmed by a forward lookup (FCrDNS).

Owned by the smtpd worker: a Session looks the name up once, at connect, before the
greeting (elemta.smtpd.session), through the plugin resolver (elemta.plugins.resolver,
gevent sockets: a slow nameserver delays that one session, never the worker) and under
the session's own time limit. The result goes into the log lines and the Received
header as Postfix writes them ("name[ip]", "unknown[ip]") and to the plugins as
ctx.client_lookup, where the client host restrictions read it
(elemta.restrictions.clienthost: reject_unknown_reverse_client_hostname,
reject_unknown_client_hostname).

As Postfix's smtpd_peer.c: the reverse name is the PTR name, unconfirmed; the client name
is a PTR name whose forward lookup (A for IPv4, AAAA for IPv6) gives the client's address
back, else "unknown". Each carries a status, OK, TEMP (a DNS failure or timeout: ask
again later) or PERM (no name, or a name that does not give the address back):

    look_up(resolver, "192.0.2.1")
        -> PeerName(name="mail.example.com", reverse_name="mail.example.com", ...)

See also: elemta.restrictions.clienthost, tests/test_client_name.py.
"""

import ipaddress
import re
from dataclasses import dataclass

from elemta.plugins.resolver import TemporaryDNSError

OK, TEMP, PERM = "ok", "temp", "perm"
UNKNOWN = "unknown"
# PTR names tried for a forward match at most (a PTR set is normally one name).
MAX_NAMES = 10
# A host name as Postfix's valid_hostname() takes it: letters, digits, '-' and '_'
# in labels of up to 63, at most 255 in all, and not all digits at the end (that would
# pass an address off as a name).
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class PeerName:
    """What is known of a client's name. problem: why it is not OK, for the log."""
    name: str = UNKNOWN
    reverse_name: str = UNKNOWN
    name_status: str = TEMP
    reverse_status: str = TEMP
    problem: str = ""


def valid_hostname(name):
    """True for a syntactically valid host name (not an address in disguise)."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 255:
        return False
    labels = name.split(".")
    return all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def timed_out(seconds):
    """The PeerName of a lookup that did not finish in time."""
    return PeerName(problem="lookup timed out after %gs" % seconds)


def look_up(resolver, address):
    # type: (object, str) -> PeerName
    """The client's names and their statuses; never raises for DNS trouble."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return PeerName(name_status=PERM, reverse_status=PERM,
                        problem="not an IP address: %r" % (address,))
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    try:
        answer = resolver.query(ip.reverse_pointer, "PTR")
    except TemporaryDNSError as error:
        return PeerName(problem="reverse lookup failed: %s" % error.reason)
    names = []
    for record in answer.records:
        name = record.target.to_text(omit_final_dot=True)
        if valid_hostname(name) and name.lower() not in (n.lower() for n in names):
            names.append(name)
    if not names:
        return PeerName(name_status=PERM, reverse_status=PERM,
                        problem="no valid PTR name for %s" % ip)
    rdtype = "A" if ip.version == 4 else "AAAA"
    trouble = ""
    for name in names[:MAX_NAMES]:
        try:
            forward = resolver.query(name, rdtype)
        except TemporaryDNSError as error:
            trouble = "hostname %s verification failed: %s" % (name, error.reason)
            continue
        for record in forward.records:
            try:
                if ipaddress.ip_address(record.address) == ip:
                    return PeerName(name, names[0], OK, OK)
            except (AttributeError, ValueError):
                continue
    if trouble:
        return PeerName(UNKNOWN, names[0], TEMP, OK, trouble)
    return PeerName(UNKNOWN, names[0], PERM, OK,
                    "hostname %s does not resolve to address %s" % (names[0], ip))
