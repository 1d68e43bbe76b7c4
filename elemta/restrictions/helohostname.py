"""Checks of the HELO/EHLO name: reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname.

Owned by the smtpd worker (the `helo_hostname` built-in, helo stage): the reply to the
HELO or EHLO itself, with Postfix's codes and words:

    501 5.5.2 <NAME>: Helo command rejected: Invalid name
        not a host name (letters, digits, '-', '_' in labels of 1 to 63, a trailing dot
        allowed) nor an address literal ([192.0.2.1], [IPv6:2001:db8::1]); a bare IP
        address passes, as in Postfix
    504 5.5.2 <NAME>: Helo command rejected: need fully-qualified hostname
        no dot, or ends in a number (a bare IP address); address literals pass

The client may try again with another name. Clients in mynetworks and those that did
AUTH are not checked (elemta.restrictions.scope).
See also: elemta.plugins.peername.valid_hostname, tests/test_client_checks.py.
"""

import ipaddress

from elemta.plugins.api import Plugin, Result
from elemta.plugins.peername import valid_hostname
from elemta.plugins.settings import HeloHostnameSettings
from elemta.restrictions.scope import skip


def address_literal(name):
    """True for [192.0.2.1] or [IPv6:2001:db8::1]."""
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    if inner[:5].upper() == "IPV6:":
        inner = inner[5:]
    try:
        ipaddress.ip_address(inner)
        return True
    except ValueError:
        return False


def bare_address(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HeloHostnamePlugin(Plugin):
    name = "helo_hostname"
    Settings = HeloHostnameSettings
    order = 1            # syntax only: first

    def init(self, settings):
        self.settings = settings or HeloHostnameSettings()

    def on_helo(self, ctx):
        name = ctx.helo
        if not name or skip(ctx, self.settings) or address_literal(name):
            return None
        if self.settings.reject_invalid and not (valid_hostname(name)
                                                 or bare_address(name)):
            return Result.reject(501, "5.5.2", "<%s>: Helo command rejected: Invalid name"
                                 % name)
        if self.settings.reject_non_fqdn and (
                "." not in name.rstrip(".") or not valid_hostname(name)):
            return Result.reject(504, "5.5.2", "<%s>: Helo command rejected: need "
                                 "fully-qualified hostname" % name)
        return None
