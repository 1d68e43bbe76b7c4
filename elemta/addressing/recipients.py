"""Is this a known local recipient? One answer, as Postfix's local_recipient_maps gives
it: an alias, a system user (the password database), or postmaster and root, which
always exist. The local part is taken in normal form ("root"@... is root@...), without
case, and user+ext is also looked up as user (local.recipient_delimiter).

Asked by the smtpd at RCPT time (550 5.1.1 when local.reject_unknown_users is set; one
table per process, made on first use by elemta.smtpd.policy) and by sendmail -bv, so
the two agree about every alias and user. The aliases file is looked at again at most
once a second and read again when it changed. See also: elemta.addressing.aliases,
elemta.local.expand (the delivery-time answer, which also bounces 5.1.1).
"""

import logging
import pwd
import time

from elemta.addressing.aliases import AliasTable
from elemta.addressing.normal import normal_local_part, split_address

# Names that are never refused: RFC 5321 4.5.1 requires postmaster; root is the usual
# target of the aliases everybody has.
ALWAYS_KNOWN = frozenset(("postmaster", "root"))
# What find() says a known recipient is.
USER, ALIAS, ROLE = "user", "alias", "role"
# How often the aliases file is stat()ed for changes.
REFRESH_SECONDS = 1.0


def system_user(name):
    """The password entry of user `name`, or None."""
    try:
        return pwd.getpwnam(name)
    except (KeyError, UnicodeEncodeError, ValueError):
        return None


class LocalRecipients:
    """Aliases and users of one configuration (config.local) and its addressing."""

    def __init__(self, local_config, addressing, log_name="elemta.smtpd"):
        self.addressing = addressing
        self.log = logging.getLogger(log_name)     # the asking process's name in the log
        path = local_config.aliases_file
        self.aliases = AliasTable(path) if path else None
        self._next_refresh = 0.0

    def _refresh(self):
        now = time.monotonic()
        if self.aliases is None or now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_SECONDS
        if self.aliases.refresh():
            for problem in self.aliases.problems:
                self.log.warning("%s (run newaliases to check the file)", problem)

    def find(self, local_part):
        """(ALIAS, USER or ROLE, name) for a local part (in a local domain) whose mail has
        somewhere to go, or None. A user is named before an alias of the same name."""
        self._refresh()
        local = normal_local_part(local_part).lower()
        user, extension = self.addressing.user_and_extension(local)
        names = [local, user] if extension is not None else [local]
        for name in names:
            if system_user(name) is not None:
                return USER, name
            if self.aliases is not None and name in self.aliases:
                return ALIAS, name
            if name in ALWAYS_KNOWN:
                return ROLE, name
        return None

    def is_known(self, local_part):
        """True if mail to local_part (in a local domain) has somewhere to go."""
        return self.find(local_part) is not None

    def find_address(self, address):
        """find() for the local part of a whole address (its domain is not looked at)."""
        return self.find(split_address(address)[0])
