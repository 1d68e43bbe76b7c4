"""Does this recipient exist? One answer for every address class, as Postfix's smtpd
gives it at RCPT (smtpd_check.c check_rcpt_maps), so nothing accepted bounces later.

    1. an entry in virtual.alias_maps (any class): it exists, and expands to its targets
       (elemta.addressing.virtual). An alias that leads to one other address (a domain
       alias "@a.example @b.example" renaming user@a.example to user@b.example, or
       info@ to one person) exists only if that address does, by step 2: otherwise
       550 5.1.1 naming the table it is missing from. Postfix accepts such a recipient
       and bounces it later (backscatter to a sender who may be forged). An alias to
       several addresses is accepted as Postfix accepts it.
    2. then by class (elemta.addressing.resolve):
       LOCAL    a user, an /etc/aliases entry, postmaster or root
                (elemta.addressing.recipients; Postfix's local_recipient_maps)
       ALIAS    nothing more: no alias entry means no such user
       VIRTUAL  virtual.mailbox_maps (user+ext@domain, user@domain, @domain), when set
       RELAY    relay.relay_recipient_maps (the same keys), when set
       REMOTE   not ours to know

Asked by the smtpd at RCPT (elemta.smtpd.policy: 550 5.1.1 with the table's name in
Postfix's words, 451 4.3.0 when a table cannot answer, 451 4.6.0 for an alias loop) and
by sendmail -bv, so both say the same. Lookups raise TableUnavailable; the slow table
types already run off the event loop (elemta.maps.offthread, elemta.util.offload).
See also: elemta.addressing.resolve, elemta.addressing.virtual.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

from elemta.addressing.recipients import LocalRecipients
from elemta.addressing.resolve import ALIAS, LOCAL, RELAY, VIRTUAL
from elemta.addressing.virtual import VirtualAliases, same_address
from elemta.maps import lookup_address
from elemta.maps.spec import LazyTable

# The table an unknown recipient is missing from, as Postfix's reply names it.
TABLE_NAMES = {LOCAL: "local recipient table", ALIAS: "virtual alias table",
               VIRTUAL: "virtual mailbox table", RELAY: "relay recipient table"}


@dataclass(frozen=True)
class Resolution:
    """What is known of one recipient."""
    kind: str                            # its address class
    known: bool                          # False: no such user (550 5.1.1)
    # Its virtual alias expansion, if it has one (with known False: a rename to an
    # address of class kind that does not exist).
    targets: Optional[List[str]] = None
    found: Optional[Tuple[str, str]] = None    # LOCAL: (USER, ALIAS or ROLE, name)

    @property
    def table_name(self):
        return TABLE_NAMES.get(self.kind, "recipient table")


class HostedRecipients:
    """The recipient tables of one configuration (opened on first use by the asking
    process: after fork, as LMDB and database connections must be)."""

    def __init__(self, config, addressing, log_name="elemta.smtpd"):
        self.addressing = addressing
        self.local = LocalRecipients(config.local, addressing, log_name)
        self.aliases = VirtualAliases.from_config(config, addressing)
        self.mailboxes = _table(config.virtual.mailbox_maps)
        self.relay_recipients = _table(config.relay.relay_recipient_maps)

    def resolve(self, address: str, smtputf8: bool = True,
                local_users: bool = True) -> Resolution:
        """The Resolution of address; raises TableUnavailable or AliasExpansionError.
        smtputf8 False: the message has no SMTPUTF8, its alias targets must be ASCII.
        local_users False: a local address is taken as known without asking the password
        database and the aliases (the smtpd with local.reject_unknown_users off, as
        Postfix with an empty local_recipient_maps: a lookup that cannot refuse anything,
        and a user unknown to NSS costs it 0.1 ms of probing)."""
        kind = self.addressing.classify(address)
        if self.aliases is not None:
            targets = self.aliases.expand(address, smtputf8)
            if targets is not None:
                if len(targets) == 1 and not same_address(targets[0], address):
                    # A rename: the one address it names must exist (see above).
                    found = self._existing(targets[0], self.addressing.classify(targets[0]),
                                           local_users)
                    if not found.known:
                        # Its class and table, for the reply; refused unless it is a
                        # local one and local.reject_unknown_users is off.
                        return Resolution(found.kind, False, targets)
                return Resolution(kind, True, targets)
        return self._existing(address, kind, local_users)

    def _existing(self, address: str, kind: str, local_users: bool = True) -> Resolution:
        """Step 2 (see the module docstring): does address of class kind exist?"""
        if kind == LOCAL and not local_users:
            return Resolution(kind, True)
        if kind == LOCAL:
            found = self.local.find_address(address)
            return Resolution(kind, found is not None, found=found)
        if kind == ALIAS:
            return Resolution(kind, False)
        table = {VIRTUAL: self.mailboxes, RELAY: self.relay_recipients}.get(kind)
        if table is None:
            return Resolution(kind, True)
        match = lookup_address(table, address, self.addressing.delimiter, local_part=False)
        return Resolution(kind, match is not None)


def _table(spec):
    return LazyTable(spec) if spec is not None else None
