"""Is this a known local recipient? The smtpd's answer at RCPT time, as Postfix's
local_recipient_maps gives it: an alias, a system user (the password database), or
postmaster and root, which always exist.

Owned by the smtpd worker (one table per process, made on first use by
elemta.smtpd.policy); the aliases file is looked at again at most once a second and
read again when it changed. See also: elemta.local.aliases, elemta.local.expand (the
delivery-time answer, which also bounces 5.1.1).
"""

import logging
import pwd
import time

from elemta.local.aliases import AliasTable

log = logging.getLogger("elemta.smtpd")

# Names that are never refused: RFC 5321 4.5.1 requires postmaster; root is the usual
# target of the aliases everybody has.
ALWAYS_KNOWN = frozenset(("postmaster", "root"))
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

    def __init__(self, local_config, addressing):
        self.addressing = addressing
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
                log.warning("%s (run newaliases to check the file)", problem)

    def is_known(self, local_part):
        """True if mail to local_part (in a local domain) has somewhere to go."""
        self._refresh()
        local = local_part.lower()
        user, extension = self.addressing.user_and_extension(local)
        names = [local, user] if extension is not None else [local]
        for name in names:
            if name in ALWAYS_KNOWN or (self.aliases is not None and name in self.aliases):
                return True
            if system_user(name) is not None:
                return True
        return False
