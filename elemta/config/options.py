"""How a config option is declared: its default, its one-line doc and its value check.

Owned by no process: imported by elemta.config.schema and by the settings modules of the
built-in plugins (elemta.plugins.settings), whose tables the schema embeds, so each
option is declared once, where its owner is, and still reaches the loader and the man
page. Light on purpose: config loading must not pull in what the plugins run on.
See also: elemta.config.schema, elemta.config.loader, elemta.config.manpage.
"""

import ipaddress
import re
from dataclasses import field


def opt(default, doc, check=None, restart=None):
    """A config field: its default, its one-line doc, an optional value check
    (callable(value) -> error message or None) and, for the few options the master uses
    once at start (before it forks), `restart`: why a reload (SIGHUP) cannot apply a
    change, which then waits for a restart. elemtactl config set says which one a
    change needs; elemta.conf(5) marks them."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults (the config is frozen)")
    return field(default=default, metadata={"doc": doc, "check": check, "restart": restart})


def one_of(choices):
    def check(value):
        if value not in choices:
            return "must be one of %s, not %r" % (", ".join(choices), value)
        return None
    return check


def between(low, high):
    def check(value):
        if not low <= value <= high:
            return "must be between %d and %d, not %r" % (low, high, value)
        return None
    return check


def positive(value):
    if value <= 0:
        return "must be greater than 0, not %r" % (value,)
    return None


def not_negative(value):
    if value < 0:
        return "must be 0 or more, not %r" % (value,)
    return None


def networks(values):
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return "%r is not an IP network (write 192.0.2.0/24 or 2001:db8::/32)" % value
    return None


# Letters, digits, '-' and '_' (seen in real host names), or non-ASCII (IDN U-labels).
_LABEL = re.compile("^[\\w\u0080-\U0010ffff]([\\w\u0080-\U0010ffff-]{0,61}"
                    "[\\w\u0080-\U0010ffff])?$")


def domains(values):
    for value in values:
        name = value.rstrip(".")
        if not name or len(name) > 253 or not all(
                _LABEL.match(label) for label in name.split(".")):
            return "%r is not a domain name" % value
    return None
