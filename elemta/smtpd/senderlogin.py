"""Sender login maps: which envelope senders an authenticated user may use (Postfix's
smtpd_sender_login_maps with reject_sender_login_mismatch).

Owned by the smtpd worker; asked at MAIL FROM. smtpd.sender_login_maps maps an envelope
sender to the login names that own it, several separated by commas or spaces; the keys
are looked up in virtual(5)'s order (elemta.maps.search): user+ext@domain, user@domain,
user (local domains only), @domain. smtpd.reject_sender_login_mismatch says whom the
rule binds:

    authenticated   a client that authenticated may use only a sender the table gives
                    to its login name; a sender the table does not list is refused too
                    (Postfix's reject_authenticated_sender_login_mismatch)
    all             that, and a client that did not authenticate may not use a sender
                    the table gives to someone (Postfix's reject_sender_login_mismatch)
    none            the table is not enforced

The null sender <> (bounces, DSNs) is never refused. Refusals are Postfix's words:
"553 5.7.1 <sender>: Sender address rejected: not owned by user LOGIN" and, for a client
that did not log in, "... not logged in". A table that cannot answer is 451 4.3.0.
Login names are compared without case, as Postfix's SASL names usually are.
See also: elemta.smtpd.session (on_mail_from), man/elemta.conf.5.
"""

import logging
import re

from elemta.maps import TableUnavailable, lookup_address, values
from elemta.maps.spec import LazyTable
from elemta.smtp.replies import Reply, lookup_failure
from elemta.util.text import printable

log = logging.getLogger("elemta.smtpd")

NOT_OWNED = "<%s>: Sender address rejected: not owned by user %s"
NOT_LOGGED_IN = "<%s>: Sender address rejected: not logged in"
# Postfix's owner lists: "alice, bob" or "alice bob".
_OWNER_SEPARATORS = re.compile(r"[\s,]+")


class SenderLogins:
    """The sender login table of one configuration and the rule that enforces it."""

    def __init__(self, table, mode, addressing):
        self.table = table
        self.mode = mode
        self.addressing = addressing

    @classmethod
    def from_config(cls, config, addressing):
        """The check of config.smtpd, or None when there is nothing to enforce."""
        s = config.smtpd
        if s.sender_login_maps is None or s.reject_sender_login_mismatch == "none":
            return None
        return cls(LazyTable(s.sender_login_maps), s.reject_sender_login_mismatch,
                   addressing)

    def owners(self, sender):
        """The login names that own sender (lower case), or None when the table has no
        entry for it; raises TableUnavailable."""
        match = lookup_address(self.table, sender, self.addressing.delimiter,
                               local_part=self.addressing.is_local(sender))
        if match is None:
            return None
        return {name.lower() for item in values(match.value)
                for name in _OWNER_SEPARATORS.split(item) if name}

    def check(self, sender, auth_user):
        """The refusal Reply for this sender and login name (None: not logged in), or
        None when it may be used."""
        if not sender:
            return None                 # <>: bounces must always get through
        if auth_user is None and self.mode != "all":
            return None
        try:
            owners = self.owners(sender)
        except TableUnavailable as error:
            log.warning("<%s>: sender login lookup failed: %s", printable(sender), error)
            return lookup_failure(sender)
        if auth_user is None:
            return Reply(553, "5.7.1", NOT_LOGGED_IN % sender) if owners else None
        if owners is None or auth_user.lower() not in owners:
            return Reply(553, "5.7.1", NOT_OWNED % (sender, printable(auth_user)))
        return None
