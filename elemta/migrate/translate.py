"""Postfix's settings in Elemta's terms: each main.cf parameter and master.cf service that
has an Elemta equivalent becomes a config value; every other one is named, with why.

Used by elemtactl import-postfix (elemta.cli.pfconfig); reads a PostfixSettings
(elemta.migrate.postfix_settings), writes nothing. Values are Postfix's effective ones
(defaults included where Elemta's differ: message_size_limit, mynetworks, myhostname...),
so the Elemta config behaves as Postfix did. Only what is equivalent is written: a
lookup table of a type Elemta cannot read, or a list mixing names and tables, is
reported rather than half translated (a missing alias or network is a wrong answer to
mail, not a smaller right one). Relay control never widens: a network Elemta cannot
read is left out of mynetworks and reported.

Table specs: hash/btree/lmdb/cdb/dbm/texthash become lmdb: on the same source file (to
compile with elemtactl map compile), regexp stays, pcre becomes regexp when every
pattern compiles, sqlite/pgsql .cf files stay (Elemta reads Postfix's format), proxy:
is dropped (Postfix's access path, not a table); mysql, ldap and the rest are reported.
See also: elemta.config.schema (the target), postconf(5), man/elemtactl.8.
"""

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from elemta.migrate.postfix_settings import MasterService, PostfixSettings

KeyPath = Tuple[Any, ...]

COMPILED_TYPES = ("hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash")
ELEMTA_FILE_TYPES = ("regexp", "sqlite", "pgsql")
UNREAD_TYPES_REASON = "Elemta reads lmdb (hash), regexp, pcre-compatible, sqlite, pgsql " \
                      "and inline tables"

# Parameters that tell Postfix where its own programs and files are, or that Elemta
# does the same way without being told (default_transport and relay_transport at
# their smtp values; other values are translated or refused): nothing to translate.
NOT_NEEDED = {
    "queue_directory", "data_directory", "meta_directory", "command_directory",
    "daemon_directory", "shlib_directory", "sample_directory", "readme_directory",
    "html_directory", "manpage_directory", "sendmail_path", "newaliases_path",
    "mailq_path", "mail_owner", "setgid_group", "compatibility_level", "maillog_file",
    "maillog_file_prefixes", "biff", "append_dot_mydomain", "alias_database",
    "mydomain", "inet_protocols", "smtpd_sasl_auth_enable", "smtpd_sasl_path",
    "smtpd_tls_security_level", "smtpd_use_tls", "smtpd_tls_session_cache_database",
    "smtp_tls_session_cache_database", "default_transport",
    "parent_domain_matches_subdomains",
    "relay_transport", "smtp_sasl_auth_enable", "readme_directory",
    "smtpd_tls_auth_only", "smtpd_sasl_local_domain", "broken_sasl_auth_clients",
    "smtpd_sasl_security_options", "smtp_tls_CApath", "smtp_tls_CAfile",
}
NOT_NEEDED_WHY = ("Postfix's own programs and files, or done by Elemta without a setting "
                  "($mydomain and the others were expanded where used)")

# Restriction steps Elemta's relay guard and address classes do without being told.
COVERED_STEPS = {"permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination",
                 "defer_unauth_destination", "reject_unlisted_recipient",
                 "permit_auth_destination", "reject_unauth_pipelining"}
RESTRICTIONS = ("smtpd_relay_restrictions", "smtpd_recipient_restrictions",
                "smtpd_client_restrictions", "smtpd_helo_restrictions",
                "smtpd_sender_restrictions", "smtpd_data_restrictions",
                "smtpd_end_of_data_restrictions", "smtpd_etrn_restrictions")
RESTRICTION_WHY = ("Elemta's relay guard and address classes cover permit_mynetworks, "
                   "permit_sasl_authenticated, reject_unauth_destination and "
                   "reject_unlisted_recipient (its plugins do SPF, DKIM, DMARC and "
                   "greylisting)")

# Postfix's sender login restrictions, and what each says of smtpd.sender_login_maps:
# whom it binds (smtpd.reject_sender_login_mismatch; "unauthenticated" has no Elemta
# value of its own).
LOGIN_MISMATCH_STEPS = {"reject_authenticated_sender_login_mismatch": "authenticated",
                        "reject_sender_login_mismatch": "all",
                        "reject_unauthenticated_sender_login_mismatch": "unauthenticated"}
# Which addresses Postfix's canonical maps rewrite by default, as Elemta's always do.
CANONICAL_CLASSES = {
    "canonical_classes": {"envelope_sender", "envelope_recipient", "header_sender",
                          "header_recipient"},
    "sender_canonical_classes": {"envelope_sender", "header_sender"},
    "recipient_canonical_classes": {"envelope_recipient", "header_recipient"}}

# master.cf -o overrides a submission or smtps listener's mode already stands for.
MODE_OVERRIDES = {"syslog_name", "smtpd_tls_wrappermode", "smtpd_sasl_auth_enable",
                  "smtpd_tls_security_level", "smtpd_tls_auth_only", "milter_macro_daemon_name",
                  "smtpd_reject_unlisted_recipient", "smtpd_client_restrictions",
                  "smtpd_recipient_restrictions", "smtpd_relay_restrictions",
                  "smtpd_sasl_type", "smtpd_sasl_path"}
# Postfix's own daemons and Debian's stock pipe services: Elemta's processes do their jobs.
STOCK_SERVICES = {"pickup", "cleanup", "qmgr", "tlsmgr", "rewrite", "bounce", "defer",
                  "trace", "verify", "flush", "proxymap", "proxywrite", "smtp", "relay",
                  "showq", "error", "retry", "discard", "local", "virtual", "lmtp",
                  "anvil", "scache", "postlog", "maildrop", "uucp", "ifmail", "bsmtp",
                  "scalemail-backend", "mailman", "postscreen", "smtpd", "dnsblog",
                  "tlsproxy", "qmqpd"}
SUBMISSION_NAMES = {"submission"}
WELL_KNOWN_PORTS = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465}
SMTPS_NAMES = {"smtps", "submissions"}


# The system MTA's user and spool, as etc/elemta.yaml.example (the packages') sets them.
PACKAGED = ((("queue", "spool_dir"), "/var/spool/elemta"), (("master", "user"), "elemta"),
            (("master", "group"), "elemta"))


@dataclass(frozen=True)
class Translated:
    """One Elemta value and the Postfix setting it came from."""
    path: KeyPath
    value: Any
    source: str


@dataclass(frozen=True)
class Untranslated:
    """A Postfix setting with no Elemta value written for it, and why."""
    name: str
    value: str
    reason: str


@dataclass
class Translation:
    settings: List[Translated] = field(default_factory=list)
    untranslated: List[Untranslated] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)          # translated, but check this
    to_compile: List[str] = field(default_factory=list)     # source files of lmdb tables
    not_needed: List[str] = field(default_factory=list)

    def set(self, path: KeyPath, value: Any, source: str) -> None:
        self.settings.append(Translated(path, value, source))

    def refuse(self, name: str, value: str, reason: str) -> None:
        self.untranslated.append(Untranslated(name, value, reason))


def format_path(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)


def split_list(value: str) -> List[str]:
    """Postfix's list syntax: items separated by commas and/or whitespace, where braces
    hold an item together (inline:{ a=b, c=d } is one table)."""
    items, current, depth = [], "", 0
    for char in value:
        if char in " \t\r\n," and depth == 0:
            if current:
                items.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current += char
    if current:
        items.append(current)
    return items


class _Translator:
    def __init__(self, postfix: PostfixSettings) -> None:
        self.pf = postfix
        self.out = Translation()
        self.done = set()           # parameters translated, or reported on their own
        self.queue_directory = postfix.value("queue_directory") or "/var/spool/postfix"

    # -- helpers

    def source(self, name: str) -> str:
        value = self.pf.value(name)
        origin = "" if self.pf.is_set(name) else " (Postfix's default)"
        return "%s = %s%s" % (name, value, origin)

    def refuse(self, name: str, reason: str, value: Optional[str] = None) -> None:
        self.done.add(name)
        self.out.refuse(name, self.pf.value(name) if value is None else value, reason)

    def in_queue_directory(self, path: str) -> str:
        """Postfix names its sockets relative to queue_directory (private/auth)."""
        return path if path.startswith("/") else os.path.join(self.queue_directory, path)

    def table(self, name: str, spec: str) -> Optional[str]:
        """The Elemta spec for one Postfix table, or None (reported)."""
        kind, colon, rest = spec.partition(":")
        if kind == "proxy" and colon:
            return self.table(name, rest)
        if not colon:
            self.refuse(name, "%r is not a lookup table (type:name)" % spec)
            return None
        if kind in COMPILED_TYPES:
            if not rest.startswith("/"):
                self.refuse(name, "%s: Elemta needs an absolute file name" % spec)
                return None
            if rest not in self.out.to_compile:
                self.out.to_compile.append(rest)
            return "lmdb:" + rest
        if kind == "inline":
            return spec
        if kind in ELEMTA_FILE_TYPES + ("pcre",) and not rest.startswith("/"):
            self.refuse(name, "%s: Elemta needs an absolute file name" % spec)
            return None
        if kind in ELEMTA_FILE_TYPES:
            return spec
        if kind == "pcre":
            from elemta.maps import TableError, open_table
            try:
                open_table("regexp:" + rest).close()
            except TableError as error:
                self.refuse(name, "a pcre table Elemta's regexp tables cannot read: %s"
                            % error)
                return None
            return "regexp:" + rest
        self.refuse(name, "%s tables are not read by Elemta (%s)" % (kind, UNREAD_TYPES_REASON))
        return None

    def one_table(self, name: str) -> Optional[str]:
        """The single table a _maps parameter names, or None (unset or reported)."""
        tables = split_list(self.pf.value(name))
        if not tables:
            self.done.add(name)
            return None
        if len(tables) > 1:
            self.refuse(name, "Elemta takes one table here: merge them into one")
            return None
        spec = self.table(name, tables[0])
        if spec is not None:
            self.done.add(name)
        return spec

    def domain_list(self, name: str, path: KeyPath, leave_out=()) -> None:
        from elemta.config.options import domains as domain_problem
        items = [item for item in split_list(self.pf.value(name))
                 if item.lower() not in leave_out]
        self.done.add(name)
        if not items:
            return
        tables = [item for item in items if ":" in item or item.startswith("/")]
        if tables and (len(items) > 1):
            self.refuse(name, "Elemta takes a list of domains or one table, not both")
            return
        # Postfix's "example.org" there also means its subdomains; Elemta's does not.
        subdomains = name in split_list(self.pf.value("parent_domain_matches_subdomains"))
        if tables:
            spec = self.table(name, tables[0])
            if spec is not None:
                self.out.set(path, spec, self.source(name))
                if subdomains:
                    self.out.notes.append(
                        "%s: Postfix also took subdomains of the domains in %s (its "
                        "parent_domain_matches_subdomains); Elemta does so only for keys "
                        "written .example.org: add those keys where subdomains are meant"
                        % (format_path(path), tables[0]))
            return
        for item in items:
            problem = domain_problem([item[1:] if item.startswith(".") else item])
            if problem:
                self.refuse(name, "%s: %s" % (item, problem))
                return
        source = self.source(name)
        if subdomains:
            dotted = ["." + item for item in items if not item.startswith(".")]
            items = items + [item for item in dotted if item not in items]
            source += "; with their subdomains, as Postfix's " \
                      "parent_domain_matches_subdomains has it"
        self.out.set(path, items, source)

    def nexthop(self, name: str, value: str, domain: str = "") -> Optional[str]:
        """Elemta's next hop for a Postfix transport:nexthop, or None (reported). An
        empty next hop of a transport map entry is its domain (its MX hosts)."""
        from elemta.config.schema import parse_transport
        transport, colon, hop = value.partition(":")
        if not colon:
            transport, hop = value, ""
        if not hop and domain and not domain.startswith("."):
            hop = domain
        if transport in ("", "smtp", "relay"):
            result = "smtp:" + hop if hop else None
        elif transport == "lmtp":
            if hop.startswith("unix:"):
                result = "lmtp:unix:" + self.in_queue_directory(hop[5:])
            elif hop.startswith("inet:"):
                host, _, port = hop[5:].rpartition(":")
                result = "lmtp:[%s]:%s" % (host.strip("[]"), port) if host else None
            else:
                result = "lmtp:" + hop if hop else None
        elif transport == "local":
            result = "local"
        else:
            self.refuse(name, "%s: Elemta has no %s transport (it delivers by smtp, lmtp "
                        "and local)" % (value, transport), value)
            return None
        if result is None:
            self.refuse(name, "%s: no next hop to translate" % value, value)
            return None
        try:
            parse_transport(result)
        except ValueError as error:
            self.refuse(name, str(error), value)
            return None
        return result

    # -- the parameters

    def identity(self) -> None:
        hostname = self.pf.value("myhostname")
        self.out.set(("smtpd", "hostname"), hostname, self.source("myhostname"))
        self.done.add("myhostname")
        raw_origin = self.pf.explicit.get("myorigin", "")
        origin = self.pf.value("myorigin")
        if origin.startswith("/"):
            self.out.set(("smtpd", "mailname_file"), origin, self.source("myorigin"))
        elif origin:
            self.out.set(("smtpd", "origin"), origin,
                         "myorigin = %s" % (raw_origin or origin + " (Postfix's default)"))
        self.done.add("myorigin")
        banner = self.pf.value("smtpd_banner")
        if self.pf.is_set("smtpd_banner"):
            if "$mail_name" in self.pf.explicit["smtpd_banner"] or \
                    not banner.startswith(hostname + " "):
                self.refuse("smtpd_banner", "Elemta's greeting is the host name and "
                            "smtpd.banner; Postfix's names Postfix (or does not start "
                            "with the host name): kept Elemta's")
            else:
                self.out.set(("smtpd", "banner"), banner[len(hostname) + 1:],
                             self.source("smtpd_banner"))
                self.done.add("smtpd_banner")

        if self.pf.is_set("smtpd_peername_lookup"):
            self.out.set(("smtpd", "peername_lookup"),
                         self.pf.value("smtpd_peername_lookup") == "yes",
                         self.source("smtpd_peername_lookup"))
            self.done.add("smtpd_peername_lookup")

    def destinations(self) -> None:
        hostname = self.pf.value("myhostname").lower()
        local = [item for item in split_list(self.pf.value("mydestination"))]
        self.done.add("mydestination")
        odd = [item for item in local if ":" in item or item.startswith("/")]
        if odd:
            self.refuse("mydestination", "Elemta's local_domains is a list of names: "
                        "%s not translated" % ", ".join(odd))
        names = [item for item in local if item not in odd and item.lower() != hostname]
        self.out.set(("relay", "local_domains"), names,
                     self.source("mydestination") + "; the host name is always local")
        if not local:
            self.out.notes.append("mydestination is empty: Elemta still takes mail for "
                                  "its host name (%s) as local" % hostname)
        local_names = {item.lower() for item in local} | {hostname}
        self.domain_list("relay_domains", ("relay", "relay_domains"), local_names)
        if self.pf.is_set("relay_recipient_maps") or self.pf.value("relay_domains"):
            spec = self.one_table("relay_recipient_maps")
            if spec:
                self.out.set(("relay", "relay_recipient_maps"), spec,
                             self.source("relay_recipient_maps"))
        relay_transport = self.pf.value("relay_transport")
        if relay_transport.partition(":")[0] == "error" and not self.pf.value("relay_domains"):
            pass    # Debian's "Local only" sets it with no relay domain: nothing goes there
        elif relay_transport not in ("relay", "smtp", ""):
            hop = self.nexthop("relay_transport", relay_transport)
            if hop:
                self.out.set(("relay", "relay_transport"), hop, self.source("relay_transport"))

    def default_transport(self) -> None:
        """default_transport = error[:text] (Debian's "Local only"): remote mail bounces
        at once; dropping it would send that mail out by MX instead."""
        from elemta.config.schema import parse_default_transport
        value = self.pf.value("default_transport")
        transport, _, hop = value.partition(":")
        if transport == "error":
            ours = "error:" + hop.strip() if hop.strip() else "error"
            try:
                parse_default_transport(ours)
            except ValueError as error:
                self.refuse("default_transport", str(error))
                return
            self.out.set(("delivery", "default_transport"), ours,
                         self.source("default_transport"))
            self.done.add("default_transport")
        elif transport in ("smtp", "") and hop:
            self.refuse("default_transport", "a next hop here is a relay host: write it "
                        "as relayhost (delivery.relayhost)")
        elif transport not in ("smtp", ""):
            self.refuse("default_transport", "Elemta's delivery.default_transport is smtp "
                        "or error[:text] (it has no %s transport)" % transport)

    def networks(self) -> None:
        self.done.add("mynetworks")
        self.done.add("mynetworks_style")
        kept, left, excluded = [], [], []
        for item in split_list(self.pf.value("mynetworks")):
            network = _network(item.lstrip("!"))
            if network is None:
                left.append(item)
            elif item.startswith("!"):
                excluded.append(network)
            else:
                kept.append(network)
        # Elemta has no "!network": a network holding an excluded one is left out, so
        # nobody Postfix kept out may relay (trust shrinks, never grows).
        wider = [n for n in kept if any(n.version == x.version and x.subnet_of(n)
                                        for x in excluded)]
        networks = [str(n) for n in kept if n not in wider]
        self.out.set(("relay", "mynetworks"), networks, self.source("mynetworks"))
        if left:
            self.out.refuse("mynetworks", " ".join(left),
                            "Elemta's mynetworks holds IP networks only (no host names, "
                            "files or tables): these were left out, so they may not relay")
        if wider:
            self.out.refuse("mynetworks", " ".join(str(n) for n in wider),
                            "Elemta's mynetworks has no !exclusions (%s): these networks "
                            "were left out, so they may not relay" % " ".join(
                                "!" + str(x) for x in excluded))

    def virtual(self) -> None:
        pf = self.pf
        self.domain_list("virtual_alias_domains", ("virtual", "alias_domains"))
        spec = self.one_table("virtual_alias_maps")
        if spec:
            self.out.set(("virtual", "alias_maps"), spec, self.source("virtual_alias_maps"))
        self.domain_list("virtual_mailbox_domains", ("virtual", "mailbox_domains"))
        hosted = bool(pf.value("virtual_mailbox_domains"))
        if pf.is_set("virtual_mailbox_maps") or hosted:
            if pf.value("virtual_mailbox_maps").startswith("static:"):
                self.done.add("virtual_mailbox_maps")    # every recipient: Elemta's unset
            else:
                spec = self.one_table("virtual_mailbox_maps")
                if spec:
                    self.out.set(("virtual", "mailbox_maps"), spec,
                                 self.source("virtual_mailbox_maps"))
        if hosted or pf.is_set("virtual_transport"):
            hop = self.nexthop("virtual_transport", pf.value("virtual_transport"))
            if hop:
                self.out.set(("virtual", "transport"), hop, self.source("virtual_transport"))
                self.done.add("virtual_transport")
                self.queue_socket_note("virtual.transport", hop)
        for name in ("virtual_mailbox_base", "virtual_uid_maps", "virtual_gid_maps",
                     "virtual_minimum_uid"):
            if pf.is_set(name) and pf.value("virtual_transport") != "virtual":
                self.done.add(name)     # only Postfix's virtual(8) agent reads them
            elif pf.is_set(name):
                self.refuse(name, "read by Postfix's virtual(8) delivery agent, which "
                            "Elemta has not: deliver through Dovecot (LMTP)")

    def queue_socket_note(self, key: str, value: str) -> None:
        if self.queue_directory + "/" in value:
            self.out.notes.append(
                "%s: %s is inside Postfix's queue directory, which Elemta's user cannot "
                "enter once Postfix is gone: have Dovecot put that socket elsewhere "
                "(/run/dovecot/...) and change %s" % (key, value, key))

    def transports(self) -> None:
        name = "transport_maps"
        tables = split_list(self.pf.value(name))
        if not tables:
            return
        if len(tables) > 1:
            self.refuse(name, "Elemta's delivery.transport is one list of entries: merge "
                        "the tables into one")
            return
        kind, _, path = tables[0].partition(":")
        if kind == "proxy":
            kind, _, path = path.partition(":")
        if kind != "inline" and kind not in COMPILED_TYPES:
            self.refuse(name, "Elemta's delivery.transport is a list of entries, read "
                        "here from a table's source file; a %s table cannot be listed"
                        % kind)
            return
        from elemta.config.options import domains as domain_problem
        from elemta.maps import TableError
        from elemta.maps.inline import parse_braces
        from elemta.maps.source import parse_entries
        try:
            if kind == "inline":
                entries = parse_braces(path)
            else:
                with open(path, encoding="utf-8") as stream:
                    duplicates: List[str] = []
                    entries = parse_entries(stream, path, duplicates)
                self.out.notes.extend("%s (as postmap does)" % warning
                                      for warning in duplicates)
        except (OSError, ValueError, TableError) as error:
            self.refuse(name, "its entries cannot be read: %s" % error)
            return
        self.done.add(name)
        entries_out = []
        for key, value in entries:
            entry_name = "%s entry %s" % (name, key)
            if "@" in key or key == "*":
                self.out.refuse(entry_name, value, "Elemta's transport map is keyed by "
                                "domain (%s not translated)" % key)
                continue
            problem = domain_problem([key[1:] if key.startswith(".") else key])
            if problem:
                self.out.refuse(entry_name, value, problem)
                continue
            hop = self.nexthop(entry_name, value, key)
            if hop:
                entries_out.append({"domain": key, "nexthop": hop})
                self.queue_socket_note("delivery.transport", hop)
        if entries_out:
            self.out.set(("delivery", "transport"), entries_out,
                         "transport_maps = %s (its source file, entry by entry)" % tables[0])

    def tls(self) -> None:
        pf = self.pf
        cert = pf.value("smtpd_tls_cert_file")
        key = pf.value("smtpd_tls_key_file") or cert
        self.done.update(("smtpd_tls_cert_file", "smtpd_tls_key_file"))
        wanted = pf.value("smtpd_tls_security_level") in ("may", "encrypt") or \
            pf.value("smtpd_use_tls") == "yes" or any(
                s.overrides.get("smtpd_tls_security_level") in ("may", "encrypt")
                or s.overrides.get("smtpd_tls_wrappermode") == "yes"
                for s in self.smtpd_services())
        if cert and wanted:
            self.out.set(("tls", "cert_file"), cert, self.source("smtpd_tls_cert_file"))
            self.out.set(("tls", "key_file"), key, self.source("smtpd_tls_key_file"))
            if pf.value("smtpd_tls_security_level") not in ("may", "encrypt") and \
                    pf.value("smtpd_use_tls") != "yes":
                self.out.notes.append("Postfix offered TLS only on the services whose -o "
                                      "asked for it; Elemta offers STARTTLS on every "
                                      "listener once it has a certificate")
        elif cert:
            self.out.notes.append("smtpd_tls_cert_file is set but Postfix offers no TLS "
                                  "(smtpd_tls_security_level): not translated, since "
                                  "Elemta offers STARTTLS whenever it has a certificate")
        if pf.value("smtpd_tls_security_level") == "encrypt":
            self.refuse("smtpd_tls_security_level", "Elemta offers STARTTLS on every "
                        "listener but requires it only before AUTH")
        if pf.is_set("smtpd_tls_chain_files"):
            self.refuse("smtpd_tls_chain_files", "write the certificate chain into one "
                        "PEM file for tls.cert_file and its key for tls.key_file")
        level = pf.value("smtp_tls_security_level")
        if pf.is_set("smtp_tls_security_level"):
            if level in ("none", "may", "encrypt", "verify", "secure"):
                self.out.set(("delivery", "tls_level"), level,
                             self.source("smtp_tls_security_level"))
                self.done.add("smtp_tls_security_level")
            else:
                self.refuse("smtp_tls_security_level", "Elemta's delivery.tls_level is "
                            "none, may, encrypt, verify or secure (no DANE)")

    def auth(self) -> None:
        pf = self.pf
        enabling = [s for s in self.smtpd_services()
                    if s.overrides.get("smtpd_sasl_auth_enable") == "yes"]
        enabled = pf.value("smtpd_sasl_auth_enable") == "yes" or enabling
        # The SASL type and path may be given on the submission service alone.
        given = next((s for s in enabling if "smtpd_sasl_type" in s.overrides), None)
        if given is not None and pf.value("smtpd_sasl_auth_enable") != "yes":
            sasl_type = given.overrides["smtpd_sasl_type"]
            path = given.overrides.get("smtpd_sasl_path", pf.value("smtpd_sasl_path"))
            where = "master.cf %s -o " % given.label
        else:
            sasl_type, path, where = pf.value("smtpd_sasl_type"), pf.value(
                "smtpd_sasl_path"), ""
        if not enabled:
            self.done.update(("smtpd_sasl_type", "smtpd_sasl_path"))
            return
        if sasl_type == "dovecot":
            socket_path = path if path.startswith("inet:") else self.in_queue_directory(path)
            self.out.set(("auth", "backend"), "dovecot",
                         "%ssmtpd_sasl_type = dovecot" % where)
            self.out.set(("auth", "dovecot_socket"), socket_path,
                         "%ssmtpd_sasl_path = %s, relative to queue_directory"
                         % (where, path))
            self.done.update(("smtpd_sasl_type", "smtpd_sasl_path"))
            self.queue_socket_note("auth.dovecot_socket", socket_path)
        else:
            self.refuse("smtpd_sasl_type", "Elemta checks passwords with Dovecot or its "
                        "own credentials file (elemtactl user add); Cyrus SASL is not "
                        "read", sasl_type)

    def limits_and_delivery(self) -> None:
        pf = self.pf
        size = pf.value("message_size_limit")
        self.done.add("message_size_limit")
        if size.isdigit() and int(size) > 0:
            self.out.set(("limits", "message_size"), int(size), self.source("message_size_limit"))
        elif size == "0":
            self.refuse("message_size_limit", "0 means no limit in Postfix; Elemta "
                        "always has one (limits.message_size)")
        else:
            self.refuse("message_size_limit", "not a number of bytes")
        for name, path in (("smtpd_recipient_limit", ("limits", "recipients")),
                           ("default_destination_concurrency_limit",
                            ("delivery", "destination_concurrency"))):
            if pf.is_set(name) and pf.value(name).isdigit() and int(pf.value(name)) > 0:
                self.out.set(path, int(pf.value(name)), self.source(name))
                self.done.add(name)
        for name, path in (("maximal_queue_lifetime", ("delivery", "queue_lifetime")),
                           ("minimal_backoff_time", ("delivery", "min_backoff")),
                           ("maximal_backoff_time", ("delivery", "max_backoff")),
                           ("delay_warning_time", ("delivery", "delay_warning_time")),
                           ("smtp_connect_timeout", ("delivery", "connect_timeout"))):
            if pf.is_set(name):
                seconds = duration(pf.value(name), "h" if name == "delay_warning_time"
                                   else "d" if name == "maximal_queue_lifetime" else "s")
                if seconds is None:
                    self.refuse(name, "not a time Elemta understands")
                else:
                    self.out.set(path, float(seconds), self.source(name))
                    self.done.add(name)
        relayhost = pf.value("relayhost")
        self.done.add("relayhost")
        if relayhost:
            from elemta.config.schema import parse_nexthop
            try:
                parse_nexthop(relayhost)
                self.out.set(("delivery", "relayhost"), relayhost, self.source("relayhost"))
            except ValueError as error:
                self.refuse("relayhost", str(error))
        self.default_transport()
        if pf.is_set("smtp_sasl_password_maps"):
            tables = split_list(pf.value("smtp_sasl_password_maps"))
            kind, _, path = tables[0].partition(":") if len(tables) == 1 else ("", "", "")
            if kind in COMPILED_TYPES:
                self.out.set(("delivery", "sasl_password_file"), path,
                             self.source("smtp_sasl_password_maps") + " (its source file)")
                self.done.add("smtp_sasl_password_maps")
            else:
                self.refuse("smtp_sasl_password_maps", "Elemta reads one source file "
                            "of \"host user:password\" lines (a hash: table's)")

    def local(self) -> None:
        pf = self.pf
        maps = split_list(pf.value("alias_maps"))
        if not pf.is_set("alias_maps"):     # Postfix's default names NIS, seldom there
            maps = [spec for spec in maps if not spec.startswith("nis:")]
        self.done.add("alias_maps")
        if not maps:
            self.out.set(("local", "aliases_file"), None, self.source("alias_maps"))
        elif len(maps) == 1 and maps[0].partition(":")[0] in COMPILED_TYPES:
            self.out.set(("local", "aliases_file"), maps[0].partition(":")[2],
                         self.source("alias_maps") + " (its source file: no newaliases "
                         "needed)")
        else:
            self.refuse("alias_maps", "Elemta reads one aliases(5) file (a hash: table's "
                        "source)")
        for name, path in (("recipient_delimiter", ("local", "recipient_delimiter")),
                           ("home_mailbox", ("local", "home_mailbox")),
                           ("mail_spool_directory", ("local", "mail_spool_directory"))):
            if pf.is_set(name):
                self.out.set(path, pf.value(name), self.source(name))
                self.done.add(name)
        if pf.is_set("mailbox_size_limit") and pf.value("mailbox_size_limit") != "0":
            self.refuse("mailbox_size_limit", "Elemta's local delivery sets no size "
                        "limit on mailboxes (use the file system's quotas)")
        else:
            self.done.add("mailbox_size_limit")
        transport = pf.value("local_transport")
        if pf.is_set("local_transport") and not transport.startswith("local"):
            self.refuse("local_transport", "Elemta delivers local mail itself; to have "
                        "no local mail, list no local domains")

    def restrictions(self) -> None:
        for name in RESTRICTIONS:
            if not self.pf.is_set(name):
                continue
            steps = split_list(self.pf.value(name))
            # The sender login steps are smtpd.reject_sender_login_mismatch's (sender_login).
            other = [step for step in steps if step not in COVERED_STEPS
                     and step not in LOGIN_MISMATCH_STEPS]
            self.done.add(name)
            if other:
                self.out.refuse(name, self.pf.value(name), "%s; %s not translated"
                                % (RESTRICTION_WHY, " ".join(other)))

    def login_mismatch_steps(self) -> List[Tuple[str, str]]:
        """(where, step) of every sender login restriction: where is the main.cf
        parameter, or "master.cf SERVICE -o PARAMETER" for a service's own list."""
        found = [(name, step) for name in RESTRICTIONS
                 for step in split_list(self.pf.value(name)) if step in LOGIN_MISMATCH_STEPS]
        for service in self.smtpd_services():
            for name, value in sorted(service.overrides.items()):
                if name in RESTRICTIONS:
                    found += [("master.cf %s -o %s" % (service.label, name), step)
                              for step in split_list(value) if step in LOGIN_MISMATCH_STEPS]
        return found

    def content_checks(self) -> None:
        """header_checks, mime_header_checks, nested_header_checks, body_checks (one
        table each), body_checks_size_limit and hopcount_limit, into content.*. A
        mime_header_checks or nested_header_checks set empty turns those checks off in
        Postfix; Elemta's unset means $header_checks, so that is reported."""
        pf = self.pf
        for name in ("header_checks", "mime_header_checks", "nested_header_checks",
                     "body_checks"):
            if not pf.is_set(name):
                continue
            if not pf.value(name) and name in ("mime_header_checks",
                                                "nested_header_checks") \
                    and pf.value("header_checks"):
                self.refuse(name, "set empty it turns these checks off; Elemta's unset "
                            "means header_checks: give it an empty table instead")
                continue
            spec = self.one_table(name)
            if spec:
                self.out.set(("content", name), spec, self.source(name))
        for name in ("body_checks_size_limit", "hopcount_limit"):
            if pf.is_set(name):
                try:
                    value = int(pf.value(name))
                except ValueError:
                    self.refuse(name, "not a number")
                    continue
                self.out.set(("content", name), value, self.source(name))
                self.done.add(name)

    def sender_login(self) -> None:
        """smtpd_sender_login_maps, and whom the restrictions that name it bind
        (smtpd.reject_sender_login_mismatch). Postfix enforces the table only where a
        restriction says so; Elemta's default enforces it for AUTH clients, so the rule
        is always written: none when no restriction names the table."""
        name = "smtpd_sender_login_maps"
        steps = self.login_mismatch_steps()
        if not self.pf.value(name):
            # Postfix ignores the restrictions without the table ("no definition of
            # smtpd_sender_login_maps"), and so does Elemta.
            self.done.add(name)
            return
        spec = self.one_table(name)
        if not spec:
            return
        self.out.set(("smtpd", "sender_login_maps"), spec, self.source(name))
        in_main = {LOGIN_MISMATCH_STEPS[step] for where, step in steps
                   if not where.startswith("master.cf")}
        in_services = [(where, step) for where, step in steps if where.startswith("master.cf")]
        if "all" in in_main or {"authenticated", "unauthenticated"} <= in_main:
            rule = "all"
        elif "authenticated" in in_main:
            rule = "authenticated"
        elif any(LOGIN_MISMATCH_STEPS[step] != "unauthenticated" for _, step in in_services):
            # On a submission service every client has logged in before MAIL, as on
            # Elemta's submission listeners: "authenticated" says all there was to say.
            rule = "authenticated"
            self.out.notes.append(
                "smtpd.reject_sender_login_mismatch: Postfix checked the senders of "
                "logged-in clients on %s only; Elemta checks them on every listener"
                % ", ".join(sorted({where.split(" -o ")[0][len("master.cf "):]
                                    for where, _ in in_services})))
        else:
            rule = "none"
        for where, step in steps:
            if LOGIN_MISMATCH_STEPS[step] == "unauthenticated" and rule != "all":
                self.out.refuse(where + " entry " + step, step,
                                "Elemta binds the senders of clients that did not log in "
                                "only together with those of clients that did "
                                "(smtpd.reject_sender_login_mismatch: all)")
        source = ", ".join(sorted({"%s: %s" % (where, step) for where, step in steps})) or \
            "smtpd_*_restrictions without reject_sender_login_mismatch (Postfix enforced " \
            "nothing)"
        self.out.set(("smtpd", "reject_sender_login_mismatch"), rule, source)

    def sasl_header(self) -> None:
        """smtpd_sasl_authenticated_header: always written, since Postfix's default (no)
        is not Elemta's (true)."""
        name = "smtpd_sasl_authenticated_header"
        self.out.set(("smtpd", "sasl_authenticated_header"), self.pf.value(name) == "yes",
                     self.source(name))
        self.done.add(name)

    def rewrite(self) -> None:
        """Canonical maps and masquerading (Postfix's cleanup; Elemta's rewrite section)."""
        from elemta.config.options import domains as domain_problem
        from elemta.config.schema import MASQUERADE_CLASSES
        pf = self.pf
        for name in ("canonical_maps", "sender_canonical_maps", "recipient_canonical_maps"):
            spec = self.one_table(name)
            if spec:
                self.out.set(("rewrite", name), spec, self.source(name))
        for name, default in CANONICAL_CLASSES.items():
            if set(split_list(pf.value(name))) == default:
                self.done.add(name)
            elif pf.value(name.replace("_classes", "_maps")):
                self.refuse(name, "Elemta's canonical maps rewrite the envelope and the "
                            "headers alike (%s)" % ", ".join(sorted(default)))
            else:
                self.done.add(name)     # no table for them to limit
        domains = split_list(pf.value("masquerade_domains"))
        self.done.add("masquerade_domains")
        if domains:
            problem = domain_problem([item.lstrip("!") for item in domains])
            if problem:
                self.refuse("masquerade_domains", problem)
            else:
                self.out.set(("rewrite", "masquerade_domains"), domains,
                             self.source("masquerade_domains"))
        exceptions = split_list(pf.value("masquerade_exceptions"))
        self.done.add("masquerade_exceptions")
        if any(":" in item or item.startswith("/") for item in exceptions):
            self.refuse("masquerade_exceptions", "Elemta's masquerade_exceptions is a list "
                        "of user names (no files or tables)")
        elif exceptions:
            self.out.set(("rewrite", "masquerade_exceptions"), exceptions,
                         self.source("masquerade_exceptions"))
        classes = split_list(pf.value("masquerade_classes"))
        self.done.add("masquerade_classes")
        unknown = [item for item in classes if item not in MASQUERADE_CLASSES]
        if unknown:
            self.refuse("masquerade_classes", "%s: Elemta's classes are %s"
                        % (" ".join(unknown), ", ".join(MASQUERADE_CLASSES)))
        elif pf.is_set("masquerade_classes"):
            self.out.set(("rewrite", "masquerade_classes"), classes,
                         self.source("masquerade_classes"))

    # -- master.cf

    def smtpd_services(self) -> List[MasterService]:
        """The inet services that speak SMTP to clients: smtpd, and postscreen (which
        hands the connection to smtpd after its checks)."""
        return [s for s in self.pf.services
                if s.type == "inet" and s.command in ("smtpd", "postscreen")]

    def addresses(self) -> List[str]:
        interfaces = split_list(self.pf.value("inet_interfaces"))
        protocols = self.pf.value("inet_protocols")
        ipv6 = ("all" in protocols or "ipv6" in protocols) and _have_ipv6()
        ipv4 = "all" in protocols or "ipv4" in protocols
        found = []
        for item in interfaces:
            if item == "all":
                found += (["0.0.0.0"] if ipv4 else []) + (["::"] if ipv6 else [])
            elif item in ("loopback-only", "localhost"):
                found += (["127.0.0.1"] if ipv4 else []) + (["::1"] if ipv6 else [])
            else:
                try:
                    found.append(str(ipaddress.ip_address(item.strip("[]"))))
                except ValueError:
                    self.out.refuse("inet_interfaces", item, "Elemta listens on IP "
                                    "addresses, not host names")
        self.done.add("inet_interfaces")
        return found

    def listeners(self) -> None:
        addresses = self.addresses()
        listeners = []
        sources = []
        for service in self.smtpd_services():
            host, colon, port_name = service.name.rpartition(":")
            port = _port(port_name)
            if port is None:
                self.out.refuse("master.cf %s" % service.label, service.command,
                                "no TCP port named %s" % port_name)
                continue
            mode = self.mode(service, port)
            if mode is None:
                continue
            if service.command == "postscreen":
                self.out.refuse("master.cf %s" % service.label, service.command,
                                "listened on as smtp; postscreen's checks before smtpd "
                                "(DNSBLs, pregreet) are not translated")
            where = [host.strip("[]")] if colon and host else addresses
            for address in where:
                listeners.append({"address": address, "port": port, "mode": mode})
            sources.append("%s (%s)" % (service.label, mode))
            for name, value in sorted(service.overrides.items()):
                if not _covered_by_mode(name, value, mode):
                    self.out.refuse("master.cf %s -o %s" % (service.label, name), value,
                                    "Elemta's listeners have no settings of their own "
                                    "beyond the mode")
        for service in self.pf.services:
            if service.name not in STOCK_SERVICES and service not in self.smtpd_services():
                self.out.refuse("master.cf %s" % service.label, service.command,
                                "Elemta has no such service (its processes do Postfix's "
                                "own daemons' jobs)")
        if listeners:
            self.out.set(("listeners",), listeners, "master.cf smtpd services %s on "
                         "inet_interfaces = %s" % (", ".join(sources),
                                                   self.pf.value("inet_interfaces")))
        else:
            self.out.refuse("master.cf", "", "no smtpd inet service to listen with: "
                            "Elemta's default listener (127.0.0.1:2525) was left")

    def mode(self, service: MasterService, port: int) -> Optional[str]:
        options = service.overrides
        if options.get("smtpd_tls_wrappermode") == "yes" or service.name in SMTPS_NAMES \
                or port == 465:
            mode = "smtps"
        elif service.name in SUBMISSION_NAMES or port == 587 or (
                options.get("smtpd_sasl_auth_enable") == "yes" and any(
                    split_list(options.get(name, ""))[-1:] == ["reject"] for name in
                    ("smtpd_client_restrictions", "smtpd_recipient_restrictions",
                     "smtpd_relay_restrictions"))):
            mode = "submission"
        else:
            return "smtp"
        has_auth = any(s.path == ("auth", "backend") for s in self.out.settings)
        has_tls = any(s.path == ("tls", "cert_file") for s in self.out.settings)
        if not has_auth:
            self.out.refuse("master.cf %s" % service.label, service.command,
                            "a %s listener needs AUTH, and Postfix's SASL was not "
                            "translated: add users (elemtactl user add), set "
                            "auth.credentials_file and add the listener" % mode)
            return None
        if mode == "smtps" and not has_tls:
            self.out.refuse("master.cf %s" % service.label, service.command,
                            "implicit TLS needs a certificate (smtpd_tls_cert_file)")
            return None
        return mode

    def packaged(self) -> None:
        """What the packages' configuration gives a system MTA (etc/elemta.yaml.example):
        the output replaces it, and Postfix has no say in these."""
        for path, value in PACKAGED:
            self.out.set(path, value, "Elemta's packaged configuration, not Postfix's")

    def run(self) -> Translation:
        self.identity()
        self.destinations()
        self.networks()
        self.virtual()
        self.transports()
        self.tls()
        self.auth()
        self.listeners()
        self.limits_and_delivery()
        self.local()
        self.restrictions()
        self.content_checks()
        self.sender_login()
        self.sasl_header()
        self.rewrite()
        self.packaged()
        for name in sorted(self.pf.explicit):
            if name in self.done:
                continue
            if name in NOT_NEEDED:
                self.out.not_needed.append(name)
            else:
                self.out.refuse(name, self.pf.explicit[name], "no Elemta equivalent")
        return self.out


def _covered_by_mode(name: str, value: str, mode: str) -> bool:
    """Whether a master.cf -o override says what the listener's mode says anyway."""
    if name in ("syslog_name", "milter_macro_daemon_name"):
        return True
    # The login steps are translated (_Translator.sender_login); a final reject is what
    # a submission listener does to a client that has not logged in.
    if name in RESTRICTIONS and all(
            step in COVERED_STEPS or step in LOGIN_MISMATCH_STEPS or
            (step == "reject" and mode != "smtp") for step in split_list(value)):
        return True
    if mode == "smtp":      # STARTTLS offered when there is a certificate, as may
        return name == "smtpd_tls_security_level" and value == "may"
    return name in MODE_OVERRIDES


def translate(postfix: PostfixSettings) -> Translation:
    """Every Elemta value Postfix's settings stand for, and what could not be said."""
    return _Translator(postfix).run()


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(value: str, default_unit: str) -> Optional[int]:
    """Seconds of a Postfix time value ("5d", "300s", "3600" in default_unit)."""
    match = re.match(r"^(\d+)([smhdw]?)$", value.strip())
    if not match:
        return None
    return int(match.group(1)) * _UNITS[match.group(2) or default_unit]


def _network(text: str) -> Optional[Any]:
    """The IP network of a mynetworks entry ([::1]/128 as Postfix writes IPv6), or None."""
    try:
        return ipaddress.ip_network(re.sub(r"^\[([^\]]+)\]", r"\1", text), strict=False)
    except ValueError:
        return None


def _port(name: str) -> Optional[int]:
    if name.isdigit():
        return int(name) if 0 < int(name) < 65536 else None
    try:
        return socket.getservbyname(name, "tcp")
    except OSError:
        return WELL_KNOWN_PORTS.get(name)


def _have_ipv6() -> bool:
    """An IPv6 address to bind (a host without IPv6 cannot bind ::)."""
    try:
        with open("/proc/net/if_inet6") as stream:
            return bool(stream.read().strip())
    except OSError:
        return False
