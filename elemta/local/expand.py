"""Alias and .forward expansion: one local recipient -> the places its mail goes.

Used by the local agent's per-recipient process (elemta.local.deliver). Postfix's
local(8) order, for each local address met along the way:

    1. a Delivered-To: header naming the address already: a mail loop (5.4.6)
    2. the aliases: user+ext, then user; members are expanded in turn (an alias met
       again on the same path falls through to the user of that name: "root: root, x"
       delivers to root's mailbox)
    3. postmaster with no alias and no such user goes to root
    4. the user's ~/.forward+ext (with the delimiter the address used: ~/.forward-ext
       for user-ext when local.recipient_delimiter is "+-") or ~/.forward (read as the
       user; one that is group- or world-writable is ignored, as Postfix does); \\user
       in it means that user's mailbox, not their .forward again
    5. the user's mailbox; no such user: 550 5.1.1 unknown user. A user by the whole
       local part comes before the user it names without its extension (as the RCPT
       check finds users): www-data stays www-data's when "-" is a delimiter

An :include: file that is not a regular file or that others can write (group or world)
bounces the recipient with 550 5.3.5 and a warning naming the file, as Postfix's local
does. Addresses outside the local domains are collected to be forwarded in one new message.
/file and |command members are allowed by source (local.allow_mail_to_files and
allow_mail_to_commands: alias, forward, include; :include: counts as a file) and run
with the rights of: the aliases file's owner (default_privileges when root owns it),
the .forward's user, or an :include: file's owner (when not root). Never as root:
default_privileges stands in. Each destination is delivered once per recipient.
See also: elemta.addressing.aliases (the grammar), elemta.local.deliver.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

from elemta.addressing.aliases import ADDRESS, COMMAND, FILE, INCLUDE, parse_destinations
from elemta.addressing.normal import normal_address, split_address
from elemta.queue.model import BOUNCED, RCPT_DEFERRED, SENT

# What a recipient finally becomes.
MAILBOX = "mailbox"
FORWARD = "forward"          # an address outside the local domains
FAILED = "failed"            # nowhere to go: bounce or defer with `reply`
# Where a member came from, in the words of local.allow_mail_to_*.
FROM_ALIAS, FROM_FORWARD, FROM_INCLUDE = "alias", "forward", "include"
# Nested aliases, .forward and :include: files deeper than this are a loop.
MAX_DEPTH = 20


class TemporaryLookupError(Exception):
    """A .forward or :include: file that could not be read for now (defer)."""


class InsecureFile(Exception):
    """An :include: file that must not be used: not a regular file, or writable by
    others. The recipient bounces with 5.3.5, as Postfix's local does."""


@dataclass
class Target:
    """One place the mail goes, and who it is for at that point (for the command's
    environment): recipient address, bare user name, extension."""
    kind: str                    # MAILBOX, FILE, COMMAND, FORWARD or FAILED
    value: str                   # user name, path, command, address, or the reply
    rights: Optional[str]        # user whose rights deliver it (None for FORWARD, FAILED)
    recipient: str
    user: str
    extension: Optional[str]
    status: Optional[str] = None     # FAILED: BOUNCED or RCPT_DEFERRED


@dataclass(frozen=True)
class Level:
    """Where a member was found: its source, whose rights, and the address there."""
    source: str
    rights: str                  # a user name
    recipient: str
    user: str
    extension: Optional[str]
    delimiter: Optional[str] = None     # the one the extension follows (+ or - ...)


class Lookups:
    """The outside world of an expansion (elemta.local.deliver gives the real one)."""

    def user(self, name):
        """The pwd entry of user name, or None."""
        raise NotImplementedError

    def user_by_uid(self, uid):
        raise NotImplementedError

    def read_forward(self, user, extension, delimiter="+"):
        """(text, path) of the user's .forward (.forward+ext first, with the delimiter the
        address used), or None; raises TemporaryLookupError."""
        raise NotImplementedError

    def read_include(self, path, rights):
        """(text, owner uid) of an :include: file read with rights (a pwd entry); raises
        TemporaryLookupError, or InsecureFile for one others can write."""
        raise NotImplementedError


class Expander:
    """Expands recipients under one configuration and one message's Delivered-To set."""

    def __init__(self, local_config, addressing, aliases, lookups, delivered_to=(),
                 warn=None):
        self.config = local_config
        self.addressing = addressing
        self.aliases = aliases               # an AliasTable (refreshed) or None
        self.lookups = lookups
        self.delivered_to = {normal_address(a).lower() for a in delivered_to}
        self.warn = warn or (lambda message: None)
        self.targets = []                    # type: List[Target]
        self._seen = set()
        self._aliases_on_path = []           # type: List[str]
        self._forwards_read = set()
        self._includes_on_path = []          # type: List[str]

    def expand(self, address):
        # type: (str) -> List[Target]
        """Every Target of one recipient address."""
        self.targets, self._seen = [], set()
        self._recipient(address, 0)
        return self.targets

    # ---- addresses ----------------------------------------------------------------------

    def _recipient(self, address, depth):
        address = normal_address(address)          # "root"@example.org is root@...
        if not self.addressing.delivered_here(address):
            return self._add(Target(FORWARD, address, None, address, "", None))
        local, _ = split_address(address)
        address = self.addressing.qualify(address)
        user_name, delimiter, extension = self.addressing.split_local(local.lower())
        here = Level("", "", address, user_name, extension, delimiter)
        if depth > MAX_DEPTH:
            return self._fail(here, BOUNCED, "550 5.4.6 mail forwarding loop for <%s> "
                              "(aliases and .forward files nested too deeply)" % address)
        if address.lower() in self.delivered_to:
            return self._fail(here, BOUNCED, "550 5.4.6 mail forwarding loop for <%s>"
                              % address)
        keys = [local.lower(), user_name] if extension is not None else [user_name]
        looped = False
        for key in keys:
            if key in self._aliases_on_path:
                looped = True
                continue
            members = self.aliases.lookup(key) if self.aliases is not None else None
            if members is None:
                continue
            level = Level(FROM_ALIAS, self._alias_rights(), address, user_name, extension,
                          delimiter)
            self._aliases_on_path.append(key)
            try:
                for member in members:
                    self._member(member, level, depth + 1)
            finally:
                self._aliases_on_path.pop()
            return None
        user = None
        if extension is not None:
            # A user by the whole name first, as the RCPT check finds one
            # (elemta.addressing.recipients): www-data is www-data's mailbox even when
            # "-" is a delimiter, not user www's with the extension "data" (Postfix's
            # local would bounce what its smtpd took).
            user = self.lookups.user(local.lower())
            if user is not None:
                user_name, extension = local.lower(), None
                here = Level("", "", address, user_name, None)
        if user is None:
            user = self.lookups.user(user_name)
        if user is None and user_name == "postmaster" and not looped:
            return self._recipient(self.addressing.qualify("root"), depth + 1)
        if user is None:
            if looped:
                return self._fail(here, BOUNCED, "550 5.4.6 mail forwarding loop for <%s> "
                                  "(the aliases lead back to it)" % address)
            return self._fail(here, BOUNCED, "550 5.1.1 <%s>: unknown user: \"%s\""
                              % (address, user_name))
        if self.config.forward and user.pw_name not in self._forwards_read:
            self._forwards_read.add(user.pw_name)
            if self._forward(user, here, depth):
                return None
        return self._add(Target(MAILBOX, user.pw_name, user.pw_name, address, user_name,
                                extension))

    def _forward(self, user, here, depth):
        """Expand the user's .forward; False when there is none (or it is ignored)."""
        try:
            found = self.lookups.read_forward(user, here.extension, here.delimiter)
        except TemporaryLookupError as error:
            self._fail(here, RCPT_DEFERRED, "451 4.3.0 %s" % error)
            return True
        if found is None:
            return False
        text, path = found
        members, problems = parse_destinations(text, path)
        for problem in problems:
            self.warn("%s (ignored)" % problem)
        if not members:
            return False
        level = Level(FROM_FORWARD, user.pw_name, here.recipient, here.user,
                      here.extension, here.delimiter)
        for member in members:
            self._member(member, level, depth + 1)
        return True

    # ---- members ------------------------------------------------------------------------

    def _member(self, member, level, depth):
        if member.kind == ADDRESS:
            if member.value.startswith("\\"):
                return self._own_mailbox(member.value[1:], level, depth)
            return self._recipient(member.value, depth)
        if member.kind == INCLUDE:
            return self._include(member.value, level, depth)
        allowed = (self.config.allow_mail_to_files if member.kind == FILE
                   else self.config.allow_mail_to_commands)
        if level.source not in allowed:
            return self._fail(level, BOUNCED, "550 5.7.1 mail to %s is restricted"
                              % ("file" if member.kind == FILE else "command"))
        rights = self._never_root(level.rights)
        if rights is None:
            return self._fail(level, RCPT_DEFERRED, "451 4.3.5 default_privileges: no "
                              "such user %s" % self.config.default_privileges)
        return self._add(Target(member.kind, member.value, rights, level.recipient,
                                level.user, level.extension))

    def _own_mailbox(self, name, level, depth):
        """\\user: straight to that user's mailbox, no alias or .forward on the way."""
        name = normal_address(name)
        if not self.addressing.delivered_here(name):
            return self._recipient(name, depth)
        whole = split_address(name)[0].lower()
        user_name, _ = self.addressing.user_and_extension(whole)
        user = self.lookups.user(whole) if user_name != whole else None
        if user is None:
            user = self.lookups.user(user_name)
        if user is None:
            return self._fail(level, BOUNCED, "550 5.1.1 <%s>: unknown user: \"%s\""
                              % (self.addressing.qualify(name), user_name))
        return self._add(Target(MAILBOX, user.pw_name, user.pw_name, level.recipient,
                                level.user, level.extension))

    def _include(self, path, level, depth):
        if level.source not in self.config.allow_mail_to_files:
            return self._fail(level, BOUNCED, "550 5.7.1 mail to file is restricted "
                              "(:include:%s)" % path)
        if path in self._includes_on_path or depth > MAX_DEPTH:
            return self._fail(level, BOUNCED, "550 5.4.6 mail forwarding loop: "
                              ":include:%s includes itself" % path)
        reader = self._never_root(level.rights)
        if reader is None:
            return self._fail(level, RCPT_DEFERRED, "451 4.3.5 default_privileges: no "
                              "such user %s" % self.config.default_privileges)
        try:
            text, owner = self.lookups.read_include(path, self.lookups.user(reader))
        except TemporaryLookupError as error:
            return self._fail(level, RCPT_DEFERRED, "451 4.3.0 %s" % error)
        except InsecureFile as error:
            # Postfix's words: the details are for the log, not for the sender's bounce.
            self.warn(str(error))
            return self._fail(level, BOUNCED, "550 5.3.5 mail system configuration error")
        rights = level.rights
        if owner != 0:
            owner_entry = self.lookups.user_by_uid(owner)
            if owner_entry is not None:
                rights = owner_entry.pw_name
        members, problems = parse_destinations(text, path)
        for problem in problems:
            self.warn("%s (ignored)" % problem)
        inner = Level(FROM_INCLUDE, rights, level.recipient, level.user, level.extension,
                      level.delimiter)
        self._includes_on_path.append(path)
        try:
            for member in members:
                self._member(member, inner, depth + 1)
        finally:
            self._includes_on_path.pop()
        return None

    # ---- helpers ------------------------------------------------------------------------

    def _alias_rights(self):
        """Commands and files of aliases run as the aliases file's owner, unless root."""
        owner = self.aliases.owner if self.aliases is not None else 0
        entry = self.lookups.user_by_uid(owner) if owner != 0 else None
        return entry.pw_name if entry is not None else self.config.default_privileges

    def _never_root(self, name):
        """name, or default_privileges in root's place; None if that user is missing."""
        entry = self.lookups.user(name)
        if entry is not None and entry.pw_uid != 0:
            return entry.pw_name
        fallback = self.lookups.user(self.config.default_privileges)
        return fallback.pw_name if fallback is not None else None

    def _fail(self, level, status, reply):
        self.targets.append(Target(FAILED, reply, None, level.recipient, level.user,
                                   level.extension, status))

    def _add(self, target):
        key = (target.kind, target.value.lower() if target.kind == FORWARD else target.value,
               target.rights)
        if key not in self._seen:
            self._seen.add(key)
            self.targets.append(target)


def summarize(results):
    # type: (List[Tuple[str, str]]) -> Tuple[str, str]
    """One (status, reply) for a recipient from those of its destinations: deferred if
    any deferred (it is tried again whole), else bounced if any bounced, else sent with
    what happened to each."""
    for wanted in (RCPT_DEFERRED, BOUNCED):
        for status, reply in results:
            if status == wanted:
                return status, reply
    done = []
    for _, reply in results:
        text = reply[10:] if reply.startswith("250 2.0.0 ") else reply
        if text not in done:
            done.append(text)
    return SENT, "250 2.0.0 " + (", ".join(done) or "discarded: no destinations left")
