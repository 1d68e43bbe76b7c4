"""The configuration schema: every option Elemta reads, its type, default and check.

Owned by no process: every process loads the same typed Config once at start.
The loader (elemta.config.loader) maps YAML or TOML onto these dataclasses; code
elsewhere only ever sees these frozen objects, never raw dicts.

The built-in plugins' tables are the plugins' own Settings classes, declared once in
elemta.plugins.settings (a light module: no plugin code is imported to load a config).

Each field's metadata (elemta.config.options.opt) carries:
  doc   - one-line description (the man page elemta.conf(5) documents every field)
  check - optional callable(value) -> error message or None, for values whose
          type is right but whose meaning is wrong (a port of 70000, say)
  restart - why a change needs a restart, for the few options the master uses once
          before it forks; every other option is applied by a reload (SIGHUP)
See also: man/elemta.conf.5, etc/elemta.yaml.example, etc/elemta.toml.example.
"""

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from elemta.config.options import between as _between
from elemta.config.options import domains as _domains
from elemta.config.options import networks as _networks
from elemta.config.options import not_negative as _not_negative
from elemta.config.options import one_of as _one_of
from elemta.config.options import opt
from elemta.config.options import positive as _positive
from elemta.content.tablespec import ActionTableSpec
from elemta.maps.domains import DomainList
from elemta.maps.spec import TableSpec
from elemta.plugins.settings import (ARCSettings, AuthResSettings, ClamAVSettings,
                                     ClientHostnameSettings, ConfiguredPlugin,
                                     DKIMSettings, DMARCSettings, DNSBLSettings,
                                     GreylistSettings, HeloHostnameSettings,
                                     NonFQDNSettings, PolicyServiceSettings,
                                     RateLimitSettings, RHSBLSettings, RspamdSettings,
                                     SenderDomainSettings, SPFSettings, authres_runs)

# The listener the cluster's nodes hand a drained node's mail over to.
HANDOVER = "handover"
LISTENER_MODES = ("smtp", "submission", "smtps", HANDOVER)
LINE_ENDING_POLICIES = ("reject", "normalize")
EIGHT_BIT_POLICIES = ("reject", "accept")
SYNC_METHODS = ("syncfs", "fsync")
LOG_LEVELS = ("debug", "info", "warning", "error")
SYSLOG_FACILITIES = ("mail", "daemon", "local0", "local1", "local2", "local3", "local4",
                     "local5", "local6", "local7")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
DELIVERY_TLS_LEVELS = ("none", "may", "encrypt", "verify", "secure")
# A tls_policy entry may also hand its domain to MTA-STS (RFC 8461) or DANE (RFC 7672).
TLS_POLICY_LEVELS = DELIVERY_TLS_LEVELS + ("mta-sts", "dane", "dane-only")
AUTH_BACKENDS = ("file", "dovecot")
SENDER_LOGIN_RULES = ("authenticated", "all", "none")
# What a failed protocol test does (Postfix's postscreen_*_action).
PROTOCOL_TEST_ACTIONS = ("ignore", "enforce", "drop")
# Postfix's masquerade_classes (elemta.addressing.rewrite).
ENVELOPE_SENDER, ENVELOPE_RECIPIENT = "envelope_sender", "envelope_recipient"
HEADER_SENDER, HEADER_RECIPIENT = "header_sender", "header_recipient"
MASQUERADE_CLASSES = (ENVELOPE_SENDER, ENVELOPE_RECIPIENT, HEADER_SENDER, HEADER_RECIPIENT)


def _port(value):
    if not 1 <= value <= 65535:
        return "must be a TCP port between 1 and 65535, not %d" % value
    return None


def _log_target(value):
    if value in ("stderr", "syslog", "journal") or value.startswith("/"):
        return None
    return "must be stderr, syslog, journal or an absolute file path, not %r" % (value,)


def _ip_address(value):
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IPv4 or IPv6 address, not %r" % value
    return None


def _hostname(value):
    return _domains([value])


# Postfix's next-hop syntax: "[host]:port" (no MX lookup), "host:port" (MX lookup of host).
_NEXTHOP = re.compile(r"^(\[(?P<literal>[^\]]+)\]|(?P<name>[^\[\]:]+))(:(?P<port>\d+))?$")


def parse_nexthop(value):
    """(host, port or None, mx_lookup) for "[host]:port", "[host]", "host:port" or "host";
    raises ValueError saying what is wrong."""
    match = _NEXTHOP.match(value.strip())
    if match is None:
        raise ValueError("%r is not a next hop: write [host]:port or host:port" % (value,))
    host = match.group("literal") or match.group("name")
    port = int(match.group("port")) if match.group("port") else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("%r: port must be between 1 and 65535" % (value,))
    try:
        ipaddress.ip_address(host[5:] if host.lower().startswith("ipv6:") else host)
    except ValueError:
        if _hostname(host):
            raise ValueError("%r: %r is neither an IP address nor a host name"
                             % (value, host))
    return host, port, match.group("literal") is None


TRANSPORT_KINDS = ("smtp", "lmtp", "local")
TRANSPORT_FORMS = ("smtp:[host]:port, smtp:host:port, lmtp:[host]:port, lmtp:unix:/path "
                   "or local")


def parse_transport(value):
    """(kind, host, port or None, mx_lookup) for a transport map next hop such as
    "smtp:[host]:port", "lmtp:unix:/run/dovecot/lmtp" (host is the socket path, port None)
    or "local" (host ""); raises ValueError."""
    kind, colon, rest = value.strip().partition(":")
    if kind not in TRANSPORT_KINDS or (kind == "local") == bool(colon):
        raise ValueError("%r: a next hop is %s" % (value, TRANSPORT_FORMS))
    if kind == "local":
        return kind, "", None, False
    if kind == "lmtp" and rest.startswith("unix:"):
        path = rest[5:]
        if not path.startswith("/"):
            raise ValueError("%r: an LMTP socket path must be absolute" % (value,))
        return kind, path, None, False
    if kind == "lmtp" and not rest.startswith("["):
        raise ValueError("%r: write lmtp:[host]:port (LMTP servers are not looked up "
                         "by MX)" % (value,))
    host, port, mx_lookup = parse_nexthop(rest)
    return kind, host, port, mx_lookup


DEFAULT_TRANSPORTS = ("smtp", "error", "error:TEXT")
# What error (Postfix's error(8)) answers when no TEXT is given.
REMOTE_DISABLED = ("550 5.1.2 remote delivery is disabled on this host "
                   "(delivery.default_transport = error)")
_ERROR_STATUS = re.compile(r"5\.[0-9]{1,3}\.[0-9]{1,3}$")


def parse_default_transport(value):
    """None for "smtp" (relay host or MX), else the reply that bounces remote mail:
    "error" gives REMOTE_DISABLED, "error:TEXT" gives "550 5.0.0 TEXT" (TEXT may begin
    with its own 5.X.Y status, as Postfix's error(8) next hop may); raises ValueError."""
    kind, colon, text = value.strip().partition(":")
    if kind == "smtp" and not colon:
        return None
    if kind != "error":
        raise ValueError("%r: write one of %s" % (value, ", ".join(DEFAULT_TRANSPORTS)))
    text = text.strip()
    if not colon:
        return REMOTE_DISABLED
    # The text goes into bounces (a header line) and log lines: printable ASCII only.
    if not text or any(not " " <= ch <= "~" for ch in text):
        raise ValueError("%r: error:TEXT needs a text of printable ASCII" % (value,))
    status, _, rest = text.partition(" ")
    if re.match(r"[0-9]\.", status) and not _ERROR_STATUS.match(status):
        raise ValueError("%r: the status code of error:TEXT must be 5.X.Y (it bounces)"
                         % (value,))
    if _ERROR_STATUS.match(status) and rest.strip():
        return "550 %s %s" % (status, rest.strip())
    return "550 5.0.0 %s" % text


def _default_transport(value):
    try:
        parse_default_transport(value)
    except ValueError as error:
        return str(error)
    return None


def _nexthop(value):
    try:
        parse_nexthop(value)
    except ValueError as error:
        return str(error)
    return None


def parse_dovecot_socket(value):
    """("unix", path, None) for an absolute socket path, ("inet", host, port) for
    inet:host:port or inet:[address]:port (Postfix's smtpd_sasl_path forms); raises
    ValueError saying what is wrong."""
    if value.startswith("/"):
        return "unix", value, None
    kind, colon, rest = value.partition(":")
    if kind != "inet" or not colon:
        raise ValueError("%r: write the absolute path of Dovecot's auth socket or "
                         "inet:host:port" % (value,))
    host, port, _ = parse_nexthop(rest)
    if port is None:
        raise ValueError("%r: inet: needs a port (inet:host:port)" % (value,))
    return "inet", host, port


def _dovecot_socket(value):
    try:
        parse_dovecot_socket(value)
    except ValueError as error:
        return str(error)
    return None


def _transport(value):
    try:
        parse_transport(value)
    except ValueError as error:
        return str(error)
    return None


def _transport_domain(value):
    return _hostname(value[1:] if value.startswith(".") else value)


def _ip_addresses(values):
    for value in values:
        problem = _ip_address(value)
        if problem:
            return problem
    return None


@dataclass(frozen=True)
class Listener:
    """One listening socket."""
    address: str = opt("127.0.0.1", "IP address to listen on (0.0.0.0 or :: for all). "
                                    "Postfix: inet_interfaces (default all), or the host "
                                    "part of a master.cf service such as 127.0.0.1:smtp.",
                       _ip_address)
    port: int = opt(2525, "TCP port: usually 25 for smtp, 587 for submission, 465 for "
                          "smtps. Postfix: the master.cf service name (smtp, submission, "
                          "submissions). The default, 2525, is for development: a system "
                          "MTA listens on 25.",
                    _port)
    mode: str = opt("smtp", "smtp (MX and relay), submission (AUTH required before MAIL), "
                            "smtps (implicit TLS, AUTH required before MAIL) or handover "
                            "(where the other nodes of a cluster hand over a drained "
                            "node's mail: it talks only to clients in "
                            "cluster.peer_networks and relays only for the one that logs "
                            "in with the cluster's hand-over credential, derived from the "
                            "api token, which the nodes use by themselves; so "
                            "relay.mynetworks need not hold the nodes. It offers that "
                            "login before STARTTLS only when tls has no certificate, and "
                            "the mail it takes is not checked, signed or stamped with "
                            "Authentication-Results again. Postfix: a second "
                            "smtpd in master.cf with -o smtpd_client_restrictions="
                            "permit_sasl_authenticated,reject and "
                            "smtpd_tls_auth_only=yes).",
                    _one_of(LISTENER_MODES))


@dataclass(frozen=True)
class SMTPDSettings:
    """How the SMTP server presents itself and treats what clients send."""
    hostname: str = opt("", "This host's name: in the greeting, the EHLO reply, Received "
                            "headers, the EHLO sent to other servers and bounces' "
                            "Reporting-MTA; always a local domain. Default: the system's "
                            "host name if it has a dot (a fully qualified name, as in "
                            "/etc/hostname), else the mail name of mailname_file, else the "
                            "host name with .localdomain added; no DNS lookup. Postfix's "
                            "myhostname (Debian's postinst writes hostname --fqdn there; "
                            "set this option to the same to name the host so).",
                        _hostname)
    origin: str = opt("", "The domain added to a bare user name (user becomes user@origin) "
                          "in sendmail's senders and recipients, and of bounces' From "
                          "(MAILER-DAEMON@origin); always a local domain. Default: the "
                          "mail name in mailname_file, else hostname. Postfix's myorigin "
                          "(Debian sets myorigin = /etc/mailname).", _hostname)
    mailname_file: Optional[str] = opt(
        "/etc/mailname", "File whose first line is this system's mail name, as Debian "
                         "keeps it for every mailer (the package's debconf question "
                         "writes it): origin's default. A missing file is passed over; "
                         "one whose first line is not a domain name stops Elemta, naming "
                         "the file. null or \"\": never read. Postfix has no parameter of its "
                         "own: Debian's main.cf says myorigin = /etc/mailname.")
    banner: str = opt("ESMTP Elemta", "Text after the host name in the 220 greeting. "
                                      "Postfix's smtpd_banner, which names the host itself "
                                      "($myhostname ESMTP $mail_name); here the host name "
                                      "always comes first.")
    workers: int = opt(0, "Number of smtpd worker processes sharing the listeners; 0 means "
                          "one per CPU. Postfix has no equivalent: each of its smtpd "
                          "processes serves one session, up to the smtp service's master.cf "
                          "maxproc (default_process_limit, 100); a worker here serves many "
                          "(limits.connections_per_worker).", _not_negative)
    max_use: int = opt(10000, "Sessions a worker serves before it retires and a fresh one "
                              "takes its place (Postfix's max_use); 0 means never.",
                       _not_negative)
    max_idle: float = opt(0.0, "Seconds a worker may go without a session before it retires "
                               "(Postfix's max_idle); 0 means never.", _not_negative)
    bare_line_endings: str = opt(
        "reject", "What to do with a bare CR or LF inside DATA: reject the message (550 "
                  "5.5.2) or normalize it to CRLF. DATA always ends only at CRLF.CRLF. "
                  "Postfix's smtpd_forbid_bare_newline, which looks at bare LF only (its "
                  "default: normalize since Postfix 3.9, no before).",
        _one_of(LINE_ENDING_POLICIES))
    undeclared_8bit: str = opt(
        "reject", "What to do with 8-bit message content when the client declared neither "
                  "BODY=8BITMIME nor SMTPUTF8: reject (554 5.6.1) or accept. Postfix has no "
                  "equivalent: it accepts such mail (its strict_8bitmime_body, default no, "
                  "looks at the MIME headers instead).",
        _one_of(EIGHT_BIT_POLICIES))
    junk_command_limit: int = opt(
        100, "HELO, EHLO, RSET, NOOP, VRFY and HELP commands a session may send before "
             "its next accepted message; the one after is answered 421 4.7.0 and the "
             "connection closed (Postfix's smtpd_junk_command_limit, which then counts "
             "errors instead).", _positive)
    sender_login_maps: Optional[TableSpec] = opt(
        None, "Which envelope senders each SMTP AUTH login name may use: a lookup table "
              "keyed by sender (user@domain, user in local domains, @domain for a whole "
              "domain) whose value is the owning login name(s), separated by commas or "
              "spaces. Enforced as reject_sender_login_mismatch says; the null sender <> "
              "is always accepted. Postfix's smtpd_sender_login_maps.")
    reject_sender_login_mismatch: str = opt(
        "authenticated", "Whom sender_login_maps binds, on every listener, at MAIL FROM: "
                         "authenticated (a client that did AUTH may use only a sender the "
                         "table gives its login name, an unlisted one included: 553 5.7.1 "
                         "not owned by user; Postfix's "
                         "reject_authenticated_sender_login_mismatch), all (that, and a "
                         "client that did not AUTH may not use a sender the table gives to "
                         "someone: 553 5.7.1 not logged in; Postfix's "
                         "reject_sender_login_mismatch: mind that it also binds MX traffic "
                         "and mynetworks clients) or none. Postfix enforces nothing unless "
                         "a restriction names it.", _one_of(SENDER_LOGIN_RULES))
    sasl_authenticated_header: bool = opt(
        True, "Write the AUTH login name into the Received header, as \"(Authenticated "
              "sender: LOGIN)\", so the recipient can trace who sent it; the log line "
              "always has sasl_username=. false keeps the login name private (it then "
              "appears only in the log). Postfix's smtpd_sasl_authenticated_header, "
              "which is off by default.")
    peername_lookup: bool = opt(
        True, "Look up each client's name at connect: its reverse DNS (PTR) name, kept only "
              "when a forward lookup of that name gives the client's address back. The "
              "verified name then appears in the log (name[ip] instead of unknown[ip]) and "
              "the Received header, and the client host restrictions use it. The lookup "
              "asks dns.nameservers. Postfix's smtpd_peername_lookup.")
    peername_timeout: float = opt(
        5.0, "Seconds the client name lookup may take at most, delaying the greeting by "
             "as much; a client whose name is not found in time is unknown[ip], as after a "
             "DNS failure. Postfix has none: its resolver's own timeouts bound the wait.",
        _positive)


@dataclass(frozen=True)
class RelaySettings:
    """Who may send mail where: the open-relay guard."""
    local_domains: Tuple[str, ...] = opt(
        ("localhost",), "Domains this server is the final destination for; mail to them is "
                        "accepted from anyone (the host name is always included). Postfix's "
                        "mydestination (default $myhostname, localhost.$mydomain, "
                        "localhost).", _domains)
    mynetworks: Tuple[str, ...] = opt(
        ("127.0.0.0/8", "::1/128"), "Client networks trusted to relay to any domain. "
                                    "Postfix's mynetworks, but IPv6 networks are written "
                                    "without its brackets (::1/128, not [::1]/128).",
        _networks)
    relay_domains: DomainList = opt(
        DomainList(), "Domains this server relays mail for from anyone (a backup MX, a "
                      "mail gateway): a list (\".example.org\" for every subdomain) or a "
                      "lookup table keyed by domain. Postfix's relay_domains.")
    relay_recipient_maps: Optional[TableSpec] = opt(
        None, "The recipients of relay_domains that exist, a lookup table keyed by "
              "user@domain or @domain (the value is not read); any other recipient there "
              "is refused at RCPT (550 5.1.1). Unset: every recipient is taken. Postfix's "
              "relay_recipient_maps.")
    relay_transport: Optional[str] = opt(
        None, "Where mail for relay_domains goes: a next hop as in delivery.transport "
              "(smtp:[host]:port, lmtp:unix:/path...). Unset: as any other remote mail "
              "(delivery.transport, relayhost, MX); a delivery.transport entry for the "
              "domain wins. Postfix's relay_transport.", _transport)


@dataclass(frozen=True)
class VirtualSettings:
    """Hosted domains whose users are not accounts of this host (Postfix's virtual alias
    and virtual mailbox address classes)."""
    alias_domains: DomainList = opt(
        DomainList(), "Domains whose every address is an alias in alias_maps (a list or "
                      "a lookup table); an address there without an entry is refused at "
                      "RCPT (550 5.1.1), and one queued anyway (by sendmail, or kept in "
                      "its own expansion) bounces at delivery, never sent on. Postfix's "
                      "virtual_alias_domains (which defaults to the domains of "
                      "virtual_alias_maps; here it must be given).")
    alias_maps: Optional[TableSpec] = opt(
        None, "Virtual aliases, for recipients of every domain, expanded when the message "
              "is queued: keys user@domain, user (local domains only), @domain (a "
              "catch-all, after user@domain); a value is one or more addresses (local, "
              "hosted or remote), each expanded again, up to 1000 levels and 1000 "
              "addresses, or @otherdomain, which renames the domain (user@domain becomes "
              "user@otherdomain, expanded again: a domain alias). Each address is queued "
              "in normal form (domain in lower case and A-labels, no final dot). An alias "
              "to one address exists only if that address does (else 550 5.1.1; Postfix "
              "accepts it and bounces later). An address that maps to itself is kept; a "
              "loop is refused with 451 4.6.0; a result longer than 64 octets (local "
              "part) or 254 (address) with 550 5.1.3; a UTF-8 result for a message "
              "without SMTPUTF8 with 553 5.6.7. Postfix's virtual_alias_maps.")
    mailbox_domains: DomainList = opt(
        DomainList(), "Domains whose users have mailboxes on another delivery agent "
                      "(transport), such as Dovecot (a list or a lookup table). Postfix's "
                      "virtual_mailbox_domains.")
    mailbox_maps: Optional[TableSpec] = opt(
        None, "The users of mailbox_domains, a lookup table keyed by user@domain or "
              "@domain (the value is not read); any other recipient there is refused at "
              "RCPT (550 5.1.1). Unset: every recipient is taken and the delivery agent "
              "decides (the config checks and the start-up log warn of it). Postfix's "
              "virtual_mailbox_maps.")
    transport: str = opt(
        "lmtp:unix:/run/dovecot/lmtp", "Where mail for mailbox_domains goes: "
                                       "lmtp:unix:/path, lmtp:[host]:port or "
                                       "smtp:[host]:port; a delivery.transport entry "
                                       "for the domain wins. Postfix's virtual_transport.",
        _transport)


def _masquerade_domains(values):
    return _domains([value[1:] if value.startswith("!") else value for value in values])


def _masquerade_classes(values):
    for value in values:
        if value not in MASQUERADE_CLASSES:
            return "%r is not one of %s" % (value, ", ".join(MASQUERADE_CLASSES))
    return None


@dataclass(frozen=True)
class RewriteSettings:
    """Address rewriting before the message is queued (Postfix's cleanup): canonical
    maps, then masquerading, then virtual aliases. The envelope of all mail; the
    address headers (From, Sender, Reply-To, To, Cc...) of sendmail's mail and of SMTP
    clients on this host (Postfix's local_header_rewrite_clients default)."""
    canonical_maps: Optional[TableSpec] = opt(
        None, "Replacement addresses for senders and recipients alike, a lookup table "
              "keyed by user@domain, user (local domains only) or @domain; the value is "
              "an address, or @domain to keep the local part. Applied after "
              "sender_canonical_maps and recipient_canonical_maps. A value that is not "
              "an address is 451 4.3.0 (the table is to be fixed); a result longer than "
              "64 octets (local part) or 254 (address) 550 5.1.3 (5.1.7 for a sender). "
              "Postfix's canonical_maps.")
    sender_canonical_maps: Optional[TableSpec] = opt(
        None, "As canonical_maps, for the envelope sender and sender headers only "
              "(applied first). Postfix's sender_canonical_maps.")
    recipient_canonical_maps: Optional[TableSpec] = opt(
        None, "As canonical_maps, for envelope recipients and recipient headers only "
              "(applied first). Postfix's recipient_canonical_maps.")
    masquerade_domains: Tuple[str, ...] = opt(
        (), "Domains whose subdomains' addresses lose their host part: with example.org, "
            "user@host.example.org becomes user@example.org. The first entry that "
            "applies wins; \"!host.example.org\" keeps that domain as it is. Postfix's "
            "masquerade_domains.", _masquerade_domains)
    masquerade_exceptions: Tuple[str, ...] = opt(
        (), "User names (local parts, any case) never masqueraded, such as root. "
            "Postfix's masquerade_exceptions.")
    masquerade_classes: Tuple[str, ...] = opt(
        (ENVELOPE_SENDER, HEADER_SENDER, HEADER_RECIPIENT),
        "Which addresses are masqueraded: envelope_sender, envelope_recipient, "
        "header_sender, header_recipient. Postfix's masquerade_classes (same default).",
        _masquerade_classes)


@dataclass(frozen=True)
class ContentSettings:
    """Content inspection before the message is queued (Postfix's cleanup): header and
    body checks, header_checks(5) tables applied as the message streams in, and the
    hop count. Each table is matched against one logical (unfolded) header "Name:
    value" or one body line (their first 4096 bytes); its result is an action: REJECT
    [text], HOLD [text], DISCARD [text], WARN [text], IGNORE, PREPEND text, REPLACE
    text, REDIRECT address, DUNNO or OK."""
    header_checks: Optional[ActionTableSpec] = opt(
        None, "Table (usually regexp:/etc/elemta/header_checks) for the message's own "
              "headers, except its MIME headers. Postfix's header_checks.")
    mime_header_checks: Optional[ActionTableSpec] = opt(
        None, "Table for MIME headers (MIME-Version, Content-*) at any level and every "
              "header of a multipart body part; unset: header_checks. Postfix's "
              "mime_header_checks (same default).")
    nested_header_checks: Optional[ActionTableSpec] = opt(
        None, "Table for the headers of attached messages (message/rfc822 parts), "
              "except their MIME headers; unset: header_checks. Postfix's "
              "nested_header_checks (same default).")
    body_checks: Optional[ActionTableSpec] = opt(
        None, "Table for body lines, each line without its line end, in every MIME "
              "part. Postfix's body_checks.")
    body_checks_size_limit: int = opt(
        51200, "Bytes of each body part (the body, or each MIME part) that body_checks "
               "look at; the rest passes unchecked. Postfix's body_checks_size_limit "
               "(same default).", _positive)
    hopcount_limit: int = opt(
        50, "Received: headers a message may arrive with; more get 554 5.4.6 Too many "
            "hops at the end of DATA (a mail loop). The Received: header this server "
            "adds is not counted. Postfix's hopcount_limit (same default).", _positive)


@dataclass(frozen=True)
class TLSSettings:
    """Certificates for STARTTLS and implicit TLS (smtps)."""
    cert_file: Optional[str] = opt(
        None, "PEM certificate chain; STARTTLS is offered only when this and key_file are "
              "set. A new file (certbot renew, an admin's copy, a symlink swapped) is "
              "served without a reload. Postfix's smtpd_tls_chain_files (or "
              "smtpd_tls_cert_file).")
    key_file: Optional[str] = opt(None, "PEM private key for cert_file. Postfix's "
                                        "smtpd_tls_key_file (or the key in "
                                        "smtpd_tls_chain_files).")
    min_version: str = opt("TLSv1.2", "Oldest TLS version accepted. Postfix's "
                                      "smtpd_tls_protocols (>=TLSv1.2).",
                           _one_of(TLS_VERSIONS))
    handshake_timeout: float = opt(30.0, "Seconds a client has to finish the TLS "
                                         "handshake. Postfix's smtpd_starttls_timeout.",
                                   _positive)
    acme: Optional[str] = opt(
        None, "Serve the certificate the built-in ACME client keeps under this name (an "
              "acme.certificates entry); wins over cert_file and key_file. Until it has "
              "been obtained, STARTTLS is not offered; the smtpd "
              "workers pick up each new one by themselves, without a reload. Postfix has no "
              "equivalent (certbot's --cert-name, with smtpd_tls_chain_files pointing into "
              "/etc/letsencrypt/live).")


def _absolute_path(value):
    return None if value.startswith("/") else "must be an absolute path, not %r" % (value,)


def _certificate_name(value):
    if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", value):
        return None
    return ("must be 1 to 64 letters, digits, dots, dashes or underscores, starting with "
            "a letter or digit, not %r" % (value,))


def _acme_url(value):
    return None if value.startswith("https://") else \
        "must be an https:// URL (an ACME directory), not %r" % (value,)


def _fraction(value):
    if not 0 < value < 1:
        return "must be between 0 and 1 (a fraction of the lifetime), not %r" % (value,)
    return None


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
# The ACME challenge types Elemta answers (RFC 8555 8.3, RFC 8737).
ACME_HTTP01, ACME_TLSALPN01 = "http-01", "tls-alpn-01"
ACME_CHALLENGES = (ACME_HTTP01, ACME_TLSALPN01)


@dataclass(frozen=True)
class ACMECertificate:
    """One certificate the ACME client obtains and renews."""
    name: str = opt("", "Its name: the directory under acme.state_directory/live that holds "
                        "it and what tls.acme refers to. certbot's --cert-name; Postfix "
                        "has no equivalent.",
                    _certificate_name)
    domains: Tuple[str, ...] = opt((), "The host names it is for (the first is its subject; "
                                       "all are subjectAltNames), each validated by the "
                                       "challenge of acme.challenge. certbot's -d; "
                                       "Postfix has no equivalent.",
                    _domains)


@dataclass(frozen=True)
class ACMESettings:
    """The built-in ACME client (RFC 8555): obtains and renews certificates, answering
    HTTP-01 (port 80) or TLS-ALPN-01 (RFC 8737, port 443) challenges itself (certbot's
    standalone mode)."""
    enabled: bool = opt(False, "Run the acme process (the client) and its challenge "
                               "responder: the acme-http process (HTTP-01 on "
                               "http_address:http_port) or the acme-tls process (TLS-ALPN-01 "
                               "on tls_address:tls_port), as acme.challenge says. "
                               "Postfix has no equivalent (certbot runs beside it).")
    challenge: str = opt(ACME_HTTP01, "How the ACME server validates each name: http-01 "
                                      "(it fetches a file over HTTP on port 80) or "
                                      "tls-alpn-01 (RFC 8737: a TLS handshake on port 443 "
                                      "with ALPN acme-tls/1; for hosts whose port 80 is "
                                      "closed or taken). certbot's --preferred-challenges; "
                                      "Postfix has no equivalent.",
                         _one_of(ACME_CHALLENGES),
                         restart="the master binds the responder's port before it forks")
    directory_url: str = opt(LETS_ENCRYPT, "The ACME server's directory. Let's Encrypt's "
                                           "staging server is https://acme-staging-v02.api."
                                           "letsencrypt.org/directory. certbot's --server; "
                                           "Postfix has no equivalent.",
                             _acme_url)
    email: Optional[str] = opt(None, "Contact address given to the ACME server for the "
                                     "account (expiry notices). certbot's --email; "
                                     "Postfix has no equivalent.")
    ca_file: Optional[str] = opt(None, "PEM file of the CA certificates that sign the ACME "
                                       "server's own HTTPS certificate; unset: the system's. "
                                       "certbot reads REQUESTS_CA_BUNDLE; Postfix has no "
                                       "equivalent.", _absolute_path)
    certificates: Tuple[ACMECertificate, ...] = opt(
        (), "The certificates to obtain and renew: a list of tables with name and domains. "
            "Postfix has no equivalent.")
    state_directory: str = opt(
        "/var/lib/elemta/acme", "Where the account key and the certificates live "
                                "(certbot's --config-dir, /etc/letsencrypt). The master makes "
                                "it owned by root, mode 0755, and its subdirectories by "
                                "master.user, mode 0700 (the private keys are readable by "
                                "master.user only). Postfix has no equivalent.",
        _absolute_path,
        restart="the master prepares the directory before it forks")
    http_address: str = opt("0.0.0.0", "Address of the HTTP-01 responder (acme.challenge "
                                       "http-01). certbot's "
                                       "--http-01-address; Postfix has no equivalent.",
                            _ip_address,
                            restart="the master binds it before it forks")
    http_port: int = opt(80, "Port of the HTTP-01 responder; ACME servers connect to 80. "
                             "certbot's --http-01-port; Postfix has no "
                             "equivalent.", _port,
                         restart="the master binds it before it forks")
    tls_address: str = opt("0.0.0.0", "Address of the TLS-ALPN-01 responder (acme.challenge "
                                      "tls-alpn-01). Postfix has no equivalent.",
                           _ip_address,
                           restart="the master binds it before it forks")
    tls_port: int = opt(443, "Port of the TLS-ALPN-01 responder; ACME servers connect to "
                             "443. It answers ALPN acme-tls/1 handshakes only, so no HTTPS "
                             "server may share the port. Neither certbot nor Postfix "
                             "has a counterpart.",
                        _port, restart="the master binds it before it forks")
    renew_at: float = opt(2.0 / 3, "Renew once this fraction of a certificate's lifetime has "
                                   "passed (two thirds: day 60 of 90). certbot's "
                                   "renew_before_expiry (30 days); Postfix has no "
                                   "equivalent.", _fraction)
    check_interval: float = opt(3600.0, "Seconds between two looks at whether a certificate "
                                        "is due (certbot's timer runs twice a day). "
                                        "Postfix has no equivalent.",
                                _positive)
    retry_delay: float = opt(300.0, "Seconds before the first retry after a failed "
                                    "attempt; it doubles with each failure in a row. "
                                    "Postfix has no equivalent.",
                             _positive)
    retry_delay_max: float = opt(86400.0, "Upper bound of that delay, in seconds. Postfix "
                                          "has no equivalent.",
                                 _positive)
    timeout: float = opt(120.0, "Seconds one attempt may take (requests, validation and "
                                "issuance) before it counts as failed. Postfix has "
                                "no equivalent.", _positive)


@dataclass(frozen=True)
class AuthSettings:
    """SMTP AUTH (PLAIN, LOGIN): passwords checked against a credentials file of salted
    scrypt hashes, or by Dovecot's auth service."""
    backend: str = opt("file", "Who checks AUTH passwords: file (auth.credentials_file) or "
                               "dovecot (Dovecot's auth service at auth.dovecot_socket, "
                               "whose passdb holds the users). Postfix's smtpd_sasl_type.",
                       _one_of(AUTH_BACKENDS))
    credentials_file: Optional[str] = opt(None, "File of user:hash lines written by "
                                                "elemtactl user add; with backend file, "
                                                "AUTH is offered only when set. Postfix has "
                                                "no equivalent: its smtpd hands passwords "
                                                "to Cyrus SASL (sasldb2) or Dovecot "
                                                "(backend dovecot here).")
    dovecot_socket: Optional[str] = opt(
        None, "With backend dovecot: Dovecot's auth-client socket, an absolute path (a "
              "unix_listener of Dovecot's service auth that master.user may write to) or "
              "inet:host:port (an inet_listener). Postfix's smtpd_sasl_path. AUTH offers "
              "those of PLAIN and LOGIN that Dovecot offers and records the login name "
              "Dovecot returns; while Dovecot cannot be reached, AUTH gets 454 4.7.0.",
        _dovecot_socket)
    allow_plaintext: bool = opt(False, "Offer AUTH on connections without TLS (only for "
                                       "tests and trusted networks). The opposite of "
                                       "Postfix's smtpd_tls_auth_only, whose default (no) "
                                       "offers AUTH in clear.")
    failure_delay: float = opt(2.0, "Seconds an AUTH waits, before it is checked, for each "
                                    "failed AUTH in the last 10 minutes from the same client "
                                    "(IPv4 address or IPv6 /64); the wait is the same for a "
                                    "right and a wrong password, so it cannot be cut short. "
                                    "Postfix has no equivalent (Dovecot's auth penalty is "
                                    "alike).", _positive)
    max_failure_delay: float = opt(30.0, "Upper bound of that wait, in seconds. Postfix has "
                                         "no equivalent.", _positive)


@dataclass(frozen=True)
class LimitSettings:
    """Bounds on what one client may ask of the server."""
    message_size: int = opt(31457280, "Largest message accepted, in bytes (SIZE); larger "
                                      "messages get 552 5.3.4. A milter's replacement body "
                                      "larger than this is not taken: 451 4.3.4, logged "
                                      "naming the milter. Postfix's message_size_limit "
                                      "(default 10240000).", _positive)
    recipients: int = opt(1000, "Recipients accepted per message; more get 452 4.5.3 "
                                "(Postfix's smtpd_recipient_limit). Local submissions "
                                "too: sendmail refuses more (exit 65) and pickup removes "
                                "a maildrop file that has more.", _positive)
    errors: int = opt(20, "Errors per session before the server says 421 and closes. "
                          "Postfix's smtpd_hard_error_limit (same default).",
                      _positive)
    connections_per_worker: int = opt(10000, "Concurrent sessions one smtpd worker serves; "
                                             "more get 421 4.7.0. Postfix has no equivalent "
                                             "(one session per smtpd process; master.cf "
                                             "maxproc bounds them).", _positive)
    connections_per_client: int = opt(50, "Concurrent sessions from one client, an IPv4 "
                                          "address or an IPv6 /64 (Postfix's "
                                          "smtpd_client_connection_count_limit, which "
                                          "counts IPv6 per /84 since 3.8); more get 421 "
                                          "4.7.0.", _positive)


@dataclass(frozen=True)
class TimeoutSettings:
    """Server timeouts (RFC 5321 section 4.5.3.2)."""
    command: float = opt(300.0, "Seconds to wait for the next command (RFC 5321 4.5.3.2.7: "
                                "at least 5 minutes). Postfix's smtpd_timeout (same "
                                "default).", _positive)
    data_block: float = opt(180.0, "Seconds to wait for each block of DATA or BDAT content "
                                   "(RFC 5321 4.5.3.2.5: 3 minutes). Postfix has no "
                                   "separate one: smtpd_timeout (300s) covers the content "
                                   "too.", _positive)


SENDMAIL_LISTENER = "sendmail"       # queue.priority_rules: mail from the sendmail command
PRIORITY_MATCHES = ("sender", "sender_domain", "recipient_domain", "sasl_username",
                    "listener")


def _sender(value):
    if value == "<>" or ("@" in value and not any(ord(c) < 33 or ord(c) == 127
                                                  for c in value)):
        return None
    return "must be an address (user@example.org) or <> for the null sender, not %r" % value


def parse_listener_name(value):
    """(ip address, port) for a priority rule's "address:port" or "[ipv6]:port";
    raises ValueError."""
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return ipaddress.ip_address(host), int(port)


def _listener_name(value):
    if value == SENDMAIL_LISTENER:
        return None
    try:
        parse_listener_name(value)
    except ValueError:
        return ("must be a listener's address:port as in listeners (127.0.0.1:587, "
                "[::1]:587) or sendmail, not %r" % value)
    return None


def _priority_rules(rules):
    for rule in rules:
        if all(getattr(rule, name) is None for name in PRIORITY_MATCHES):
            return "a rule matches on nothing: give it one or more of %s" % (
                ", ".join(PRIORITY_MATCHES))
    return None


@dataclass(frozen=True)
class PriorityRule:
    """One queue.priority_rules entry: mail matching every key it gives gets `priority`."""
    sender: Optional[str] = opt(None, "The envelope sender, any case (<> is the null "
                                      "sender). Postfix has no equivalent.", _sender)
    sender_domain: Optional[str] = opt(None, "The sender's domain (exact, or \".example.org\" "
                                             "for every subdomain). Postfix has no "
                                             "equivalent.",
                                       _transport_domain)
    recipient_domain: Optional[str] = opt(None, "A recipient's domain (exact, or "
                                                "\".example.org\" for every subdomain): "
                                                "matches when any recipient is there. "
                                                "Postfix has no equivalent.",
                                          _transport_domain)
    sasl_username: Optional[str] = opt(None, "The SMTP AUTH user name the client "
                                             "authenticated as. Postfix has no equivalent.")
    listener: Optional[str] = opt(None, "Where the message came in: a listener's "
                                        "address:port as written in listeners "
                                        "(127.0.0.1:587, [::1]:587), or sendmail for mail "
                                        "submitted with the sendmail command. Postfix has "
                                        "no equivalent.",
                                  _listener_name)
    priority: int = opt(0, "The priority matching mail gets: a whole number from -100 "
                           "(last) to 100 (first); other mail has 0. Postfix has no "
                           "equivalent.",
                        _between(-100, 100))


@dataclass(frozen=True)
class QueueSettings:
    """The durable queue: spool files (the truth) and the LMDB index."""
    spool_dir: str = opt("./spool", "Directory holding message files and index.lmdb. "
                                    "Postfix's queue_directory (/var/spool/postfix). The "
                                    "default is for development: packages set "
                                    "/var/spool/elemta.",
                         restart="the master locks the spool and prepares its maildrop "
                                 "and metrics directories at start")
    sync_method: str = opt(
        "syncfs", "How a batch of accepted messages is made durable before the 250 reply: "
                  "syncfs (one flush of the spool file system per batch) or fsync (one "
                  "fsync per file and directory). Postfix has no equivalent (it fsyncs each "
                  "queue file).", _one_of(SYNC_METHODS))
    index_map_size: int = opt(17179869184, "Largest size of the LMDB index, in bytes "
                                           "(address space only; the file grows as needed). "
                                           "New mail gets 452 4.3.1 at MAIL FROM once 90% "
                                           "of it is used (all but 1 MiB when that is more, "
                                           "half when smaller): the rest is kept for "
                                           "delivery, which empties the queue. Postfix has "
                                           "no equivalent (its queue is files only).",
                              _positive)
    min_free_space: Optional[int] = opt(
        None, "Bytes the spool's file system keeps free: with less, MAIL FROM gets 452 "
              "4.3.1 (Insufficient system storage), as does a SIZE= that does not fit in "
              "the free space less this, or in two thirds of the free space. The space "
              "kept lets delivery go on emptying the queue. Default (unset): 1.5 times "
              "limits.message_size, as Postfix does; 0 keeps nothing back (the disk may "
              "fill to the last byte; messages are then refused at the end of DATA). "
              "Postfix's queue_minfree (which is never below 1.5 times "
              "message_size_limit).", _not_negative)
    priority_rules: Tuple[PriorityRule, ...] = opt(
        (), "Which mail is delivered first: a list of {sender, sender_domain, "
            "recipient_domain, sasl_username, listener, priority} entries, tried in order "
            "as each message enters the queue (SMTP, sendmail, and the bounces and "
            "forwarded copies Elemta makes itself); the first whose keys all match sets "
            "its priority, and mail no rule matches has 0. Among messages due for "
            "delivery, the higher priority is taken first, and waits first for a "
            "connection to its destination: a busy queue delivers it before mail that "
            "came earlier. Strict: lower priorities wait as long as higher ones are due. "
            "elemtactl queue priority and the REST API change a queued message's "
            "priority. Postfix has no equivalent (its nearest: a separate transport with "
            "its own concurrency for urgent mail, and qmgr's fairness between "
            "destinations).", _priority_rules)


@dataclass(frozen=True)
class LoggingSettings:
    """Where log lines go."""
    level: str = opt("info", "Least severe level logged: debug, info, warning, error. "
                             "Postfix has no log level (it always logs what info logs "
                             "here); its nearest are debug_peer_list with "
                             "debug_peer_level and -v in master.cf, which add detail for "
                             "chosen peers or services, as debug adds detail (outbound "
                             "SMTP replies, AUTH, DANE) for all of them.",
                     _one_of(LOG_LEVELS))
    target: str = opt("stderr", "stderr, syslog (to /dev/log), journal (systemd-journald's "
                                "native protocol, to journal_socket: each line an entry "
                                "whose MESSAGE is the text line's message, with PRIORITY, "
                                "SYSLOG_IDENTIFIER (elemta/smtpd, ...), SYSLOG_FACILITY, "
                                "and the json format's keys as fields of their own, upper "
                                "case after ELEMTA_: ELEMTA_QUEUE_ID, ELEMTA_EVENT, "
                                "ELEMTA_CLIENT, ELEMTA_FROM, ELEMTA_TO, ELEMTA_RELAY, "
                                "ELEMTA_STATUS, ELEMTA_DSN, ELEMTA_DELAY, ELEMTA_SIZE, "
                                "ELEMTA_REASON, ELEMTA_PROCESS ...; so journalctl "
                                "ELEMTA_QUEUE_ID=ID shows one message's lines, and "
                                "journalctl -o short the Postfix-style lines elemtactl "
                                "report reads; format does not apply), or the absolute "
                                "path of a log file (reopened on SIGUSR1, for logrotate). "
                                "Postfix logs to syslog, or with maillog_file to a file; "
                                "it has no journal target.", _log_target)
    syslog_facility: str = opt("mail", "Syslog facility when target is syslog or journal "
                                       "(the journal's SYSLOG_FACILITY). Postfix's "
                                       "syslog_facility (default mail).",
                               _one_of(SYSLOG_FACILITIES))
    journal_socket: str = opt(
        "/run/systemd/journal/socket", "journald's native socket, when target is journal "
        "(a journald namespace's is /run/systemd/journal.NAMESPACE/socket). Postfix has "
        "no equivalent (it has no journal target; see maillog_file and syslog).",
        _absolute_path)
    format: str = opt(
        "text", "How each line is written: text, Postfix's syslog lines (\"Dec  6 03:01:36 "
                "host elemta/smtpd[5071]: QUEUEID: client=...\"; pflogsumm and Postfix "
                "log tools read them), or json, one JSON object per line with stable keys "
                "(time, level, process, pid, program, then as the event has them queue_id, "
                "event, client, helo, command, from, to, relay, status, dsn, delay, size, "
                "nrcpt, reason, restriction, proto, sasl_username, uid, notice_id, notice, "
                "and last message, the text line's message), for Loki or Elasticsearch. "
                "Under systemd, target stderr with json puts one JSON object per journal "
                "entry (journalctl -o cat -u elemta | jq). elemtactl report reads both. "
                "Postfix has no equivalent (its logs are text only).",
        _one_of(("text", "json")))


@dataclass(frozen=True)
class MasterSettings:
    """The master process: privileges, supervision, pid file."""
    user: Optional[str] = opt(None, "User the workers run as after the master has bound the "
                                    "listeners as root (default: do not change user). "
                                    "Postfix's mail_owner (default postfix); unset here "
                                    "keeps root, so set it (packages use elemta).",
                            restart="the master prepares the spool's directories for "
                                    "this user at start")
    group: Optional[str] = opt(None, "Group the workers run as (default: the user's group). "
                                     "Postfix has no parameter: its daemons run with "
                                     "mail_owner's group.",
                               restart="the master prepares the spool's directories for "
                                       "this group at start")
    pid_file: Optional[str] = opt(None, "File the master writes its pid to (with --daemon "
                                        "the default is /run/elemta.pid). Postfix writes "
                                        "$queue_directory/pid/master.pid "
                                        "(process_id_directory).",
                                  restart="the master writes it at start")
    heartbeat_timeout: float = opt(30.0, "Seconds a worker may go without a heartbeat "
                                         "before the master kills and replaces it. "
                                         "Postfix's nearest is daemon_timeout (18000s), "
                                         "each daemon's own watchdog over one "
                                         "request.", _positive)
    stop_grace: float = opt(10.0, "Seconds SIGTERM gives open sessions to finish before "
                                  "they are cut. Postfix has no equivalent (postfix stop "
                                  "lets processes finish at their earliest convenience, "
                                  "without a bound).", _not_negative)


_USER_NAME = re.compile(r"^[^\s:,]+$")


def _user_names(values):
    for value in values:
        if not _USER_NAME.match(value):
            return "%r is not a user name (nor anyone)" % (value,)
    return None


@dataclass(frozen=True)
class MailqSettings:
    """Who may list the queue with mailq (through the showq process)."""
    authorized_users: Tuple[str, ...] = opt(
        ("anyone",), "Users who may list the queue with mailq (or sendmail -bp): user "
                     "names or numeric uids, or anyone. root and master.user always may; "
                     "they read the spool directly. Everyone else asks the showq process "
                     "(spool/public/showq), which checks the caller's uid and refuses the "
                     "others. The listing never shows a message's content. Postfix's "
                     "authorized_mailq_users (default static:anyone).", _user_names)


@dataclass(frozen=True)
class APISettings:
    """The api process: the REST API and /metrics for Prometheus."""
    enabled: bool = opt(True, "Run the api process. Postfix has no REST API nor metrics "
                              "(postqueue, postsuper and log exporters stand in).")
    address: str = opt("127.0.0.1", "Address the api process listens on. Postfix has no "
                                    "equivalent.", _ip_address)
    port: int = opt(8025, "TCP port of the api process. Postfix has no equivalent.", _port)
    token: Optional[str] = opt(None, "Bearer token the REST API requires on every route but "
                                     "/api/v1/health and /metrics. Unset (and no "
                                     "token_file): those routes answer 401 to everyone. "
                                     "With cluster.store or a handover listener, at least "
                                     "16 bytes. Postfix has no equivalent.")
    token_file: Optional[str] = opt(None, "File holding the bearer token (first line), read "
                                          "at start and on reload; wins over token. With "
                                          "cluster.store or a handover listener, at least "
                                          "16 bytes. Postfix has no equivalent.")
    cert_file: Optional[str] = opt(
        None, "PEM certificate chain the api serves https with (with key_file): the "
              "other nodes of a cluster send it the api token, the root of the cluster's "
              "credentials, which must not cross a network in clear. Unset: plain http. "
              "Postfix has no equivalent.", _absolute_path)
    key_file: Optional[str] = opt(None, "PEM private key for api.cert_file. Postfix has "
                                        "no equivalent.", _absolute_path)
    read_timeout: float = opt(10.0, "Seconds a client has to send a whole request (request "
                                    "line, headers and body; also how long an idle "
                                    "keep-alive connection stays open); a slower one gets "
                                    "408 and is disconnected (nginx's client_header_timeout; "
                                    "Postfix's smtpd_timeout plays this part for SMTP).",
                              _positive)


@dataclass(frozen=True)
class TLSPolicyEntry:
    """A STARTTLS level for one destination, overriding delivery.tls_level."""
    domain: str = opt("", "Recipient domain or next-hop host (exact, or \".example.org\" for "
                          "every subdomain). As a key of Postfix's "
                          "smtp_tls_policy_maps.", _transport_domain)
    level: str = opt("may", "none, may, encrypt, verify or secure, as tls_level; or "
                            "mta-sts: the domain's MTA-STS policy decides, even with "
                            "delivery.mta_sts off (tls_level when it publishes none); "
                            "dane: DANE (as delivery.dane) for this destination, even "
                            "with delivery.dane off; dane-only: DANE or nothing, mail to "
                            "an MX host DANE cannot authenticate is deferred (Postfix's "
                            "levels dane and dane-only).",
                     _one_of(TLS_POLICY_LEVELS))


# The domain classes Elemta names itself (elemta.delivery.routing.DOMAIN_CLASSES).
BUILTIN_DOMAIN_CLASSES = ("local", "virtual", "relay", "relayhost", "remote", "unknown")
_CLASS_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _domain_class_name(value):
    if not _CLASS_NAME.match(value):
        return ("must be a short name of lower-case letters, digits and _ (a metric label "
                "value), not %r" % (value,))
    if value == "unknown":
        return "unknown is the class of a domain whose tables could not answer"
    return None


def _transport_domains(values):
    for value in values:
        problem = _transport_domain(value)
        if problem:
            return problem
    return None


def _domain_classes(entries):
    if len(entries) > 20:
        return ("at most 20 classes (each is a label value of the delivery metrics), "
                "not %d" % len(entries))
    seen = set()
    for entry in entries:
        if entry.name in seen:
            return "class %s is named twice: list all its domains in one entry" % entry.name
        seen.add(entry.name)
    return None


@dataclass(frozen=True)
class DomainClass:
    """One delivery.domain_classes entry: recipient domains counted under one name."""
    name: str = opt("other", "The class's name: the domain_class label of the delivery "
                             "metrics (gmail, microsoft, partners ...). Postfix has no "
                             "equivalent.", _domain_class_name)
    domains: Tuple[str, ...] = opt((), "Its recipient domains (exact, or \".example.org\" for "
                                       "every subdomain). Postfix has no "
                                       "equivalent.", _transport_domains)


@dataclass(frozen=True)
class TransportMapEntry:
    """One transport map entry: mail for `domain` goes to `nexthop`."""
    domain: str = opt("", "Recipient domain this entry applies to (exact match, or "
                          "\".example.org\" for every subdomain). A Postfix transport(5) key, "
                          "written the same way.", _transport_domain)
    nexthop: str = opt("", "Where its mail goes: smtp:[host]:port (that host, no MX "
                           "lookup), smtp:host:port (the MX hosts of host), "
                           "lmtp:[host]:port, lmtp:unix:/path (an LMTP server such as "
                           "Dovecot's) or local (local delivery, as for local_domains). "
                           "Postfix: the transport(5) value.", _transport)


@dataclass(frozen=True)
class DestinationLimit:
    """A concurrency limit for one destination, overriding destination_concurrency."""
    domain: str = opt("", "Recipient domain or next-hop host (exact, or \".example.org\" for "
                          "every subdomain). Postfix: the transport_maps key that routes it "
                          "to that transport.", _transport_domain)
    limit: int = opt(1, "Connections at once to it, across all delivery workers. Postfix: "
                        "transport_destination_concurrency_limit.",
                     _positive)


@dataclass(frozen=True)
class DeliverySettings:
    """The delivery workers: routing, retries and the SMTP client (Postfix's qmgr and smtp)."""
    workers: int = opt(2, "Number of delivery worker processes; 0 delivers nothing. "
                          "Postfix: the maxproc of master.cf's smtp unix service "
                          "(default_process_limit, 100; 0 there means no limit), one "
                          "delivery per process; a worker here runs many at once.",
                       _not_negative)
    max_use: int = opt(10000, "Messages a delivery worker takes on before it retires and a "
                              "fresh one takes its place (Postfix's max_use); 0 means never.",
                       _not_negative)
    relayhost: Optional[str] = opt(None, "Smart host for all mail not to a local domain or "
                                         "in the transport map, as Postfix writes it: "
                                         "[host]:port (no MX lookup) or host:port (MX "
                                         "lookup of host). Unset: MX lookup of each domain.",
                                   _nexthop)
    transport: Tuple[TransportMapEntry, ...] = opt(
        (), "Transport map: a list of {domain, nexthop} entries, which win over relayhost "
            "and MX. Postfix's transport_maps.")
    domain_classes: Tuple[DomainClass, ...] = opt(
        (), "Names for groups of recipient domains in the delivery metrics (the "
            "domain_class label of elemta_deliveries_total and "
            "elemta_delivery_deferrals_total): a list of {name, domains} entries, at most "
            "20 (an exact domain wins over a \".parent\" one; a domain in two entries "
            "counts under the first), e.g. {name: gmail, domains: "
            "[gmail.com, googlemail.com]}, {name: microsoft, domains: [outlook.com, "
            "hotmail.com, .onmicrosoft.com]}. A recipient no entry names is counted by "
            "where its domain belongs: local (relay.local_domains, the host name), "
            "virtual (virtual alias and mailbox domains), relay (relay.relay_domains), "
            "relayhost (other domains, sent to delivery.relayhost), remote (other "
            "domains, by MX or the transport map), unknown (a domain table could not "
            "answer). Addresses and domains themselves are never labels: the set stays "
            "bounded. Postfix has no equivalent (its logs name each domain; pflogsumm "
            "counts per domain).", _domain_classes)
    default_transport: str = opt(
        "smtp", "Where mail for remote domains goes (not local, virtual or relay_domains "
                "mail; a transport entry for the domain wins): smtp (relayhost, else MX), or "
                "error to bounce it at once, as Postfix's error(8) does (Debian's \"Local "
                "only\" type sets it): it is accepted (smtpd, sendmail) and its sender gets a "
                "bounce \"550 5.1.2 remote delivery is disabled on this host\"; "
                "error:TEXT bounces with TEXT instead (5.0.0, or a 5.X.Y status TEXT begins "
                "with). Postfix's default_transport.", _default_transport)
    mx_port: int = opt(25, "TCP port used for MX delivery and for next hops without a port. "
                           "Postfix's smtp_tcp_port (same default).",
                       _port)
    nameservers: Tuple[str, ...] = opt((), "DNS servers to ask for MX and address records "
                                           "(empty: those of /etc/resolv.conf). Postfix has "
                                           "no equivalent: it uses /etc/resolv.conf.",
                                       _ip_addresses)
    dns_port: int = opt(53, "UDP and TCP port of the nameservers. Postfix has no "
                            "equivalent.", _port)
    dns_timeout: float = opt(5.0, "Seconds one DNS query to one nameserver may take. "
                                  "Postfix has no equivalent (resolv.conf's options "
                                  "timeout:).",
                             _positive)
    connect_timeout: float = opt(30.0, "Seconds a TCP connection to a mail server may take "
                                       "(Postfix's smtp_connect_timeout).", _positive)
    command_timeout: float = opt(300.0, "Seconds to wait for the greeting and each reply to "
                                        "EHLO, MAIL, RCPT and DATA (RFC 5321 4.5.3.2). "
                                        "Postfix splits it: smtp_helo_timeout (the greeting "
                                        "too), smtp_mail_timeout, smtp_rcpt_timeout (300s "
                                        "each) and smtp_data_init_timeout (120s).",
                                 _positive)
    data_timeout: float = opt(600.0, "Seconds to wait for each block of content to go out "
                                     "and for the reply to the final dot (RFC 5321 "
                                     "4.5.3.2.6: 10 minutes). Postfix: "
                                     "smtp_data_xfer_timeout (180s) for each block, "
                                     "smtp_data_done_timeout (600s) for the final "
                                     "reply.", _positive)
    min_backoff: float = opt(300.0, "Seconds before the first retry of a deferred message; "
                                    "each later retry waits twice as long (Postfix's "
                                    "minimal_backoff_time).", _positive)
    max_backoff: float = opt(4000.0, "Longest wait between two attempts, in seconds "
                                     "(Postfix's maximal_backoff_time).", _positive)
    queue_lifetime: float = opt(432000.0, "Seconds a message may stay deferred before it "
                                          "bounces (5 days, Postfix's "
                                          "maximal_queue_lifetime).", _positive)
    destination_concurrency: int = opt(20, "Connections at once to one destination (a "
                                           "domain, the relay host or a transport next "
                                           "hop), across all delivery workers. Postfix's "
                                           "default_destination_concurrency_limit (same "
                                           "default).", _positive)
    destination_limits: Tuple[DestinationLimit, ...] = opt(
        (), "Per-destination exceptions to destination_concurrency: a list of {domain, "
            "limit} entries. Postfix: a master.cf transport with its own "
            "transport_destination_concurrency_limit, chosen by transport_maps.")
    tls_level: str = opt("may", "STARTTLS when delivering over SMTP: none, may (when "
                                "offered), encrypt (required), verify (required, chain "
                                "checked), secure (verify, and the certificate names the "
                                "host). LMTP uses at most may unless tls_policy names its "
                                "host. Postfix's smtp_tls_security_level.",
                         _one_of(DELIVERY_TLS_LEVELS))
    tls_policy: Tuple[TLSPolicyEntry, ...] = opt(
        (), "Per-destination STARTTLS levels, as Postfix's smtp_tls_policy_maps: a list of "
            "{domain, level} entries matched against the recipient domain (MX delivery) or "
            "the next-hop host (relay host, transport map, LMTP). An entry with a level "
            "other than mta-sts wins over the domain's MTA-STS policy.")
    tls_ca_file: Optional[str] = opt(
        None, "PEM CA certificates that outbound STARTTLS trusts at levels verify and "
              "secure, and for mail sent with REQUIRETLS (RFC 8689); unset: the "
              "system's store. Postfix's smtp_tls_CAfile (MTA-STS has its own, "
              "mta_sts_ca_file).", _absolute_path)
    mta_sts: bool = opt(
        True, "Honour the MTA-STS policies (RFC 8461) of the domains mail goes to by MX: "
              "a domain that publishes one in enforce mode gets its mail only from MX "
              "hosts its policy names, over TLS with a certificate valid for the MX host "
              "(else the mail is deferred); in testing mode such failures are only "
              "logged. On by default, as in maddy: it defers mail only where the domain's "
              "owner asked for that, and a policy that cannot be had means delivery as "
              "without MTA-STS. Postfix has it only through an add-on "
              "(postfix-mta-sts-resolver in smtp_tls_policy_maps).")
    mta_sts_ca_file: Optional[str] = opt(
        None, "PEM CA certificates that MTA-STS trusts, for the policy servers' HTTPS "
              "and the MX hosts' STARTTLS alike; unset: the system's store (the web's "
              "CAs, as RFC 8461 expects). Postfix's smtp_tls_CAfile, for these only.",
        _absolute_path)
    mta_sts_port: int = opt(443, "TCP port of the MTA-STS policy servers (RFC 8461: "
                                 "443; another only for tests). Postfix has no "
                                 "equivalent.", _port)
    mta_sts_timeout: float = opt(20.0, "Seconds an MTA-STS policy fetch may take in all "
                                       "(connect, TLS, request and answer). Postfix has no "
                                       "equivalent (postfix-mta-sts-resolver's own "
                                       "setting).", _positive)
    dane: bool = opt(
        False, "DANE (RFC 7672) for mail routed by MX: an MX host whose MX, address and "
               "TLSA records are DNSSEC-validated must do STARTTLS with a certificate a "
               "usable TLSA record (DANE-EE or DANE-TA) names, else it is not used and "
               "the mail deferred; a host with only unusable TLSA records must do TLS, "
               "unchecked (DANE-TA records count as unusable on Python 3.9, whose ssl "
               "does not show the server's chain); a failed TLSA lookup defers; hosts without validated records "
               "get tls_level (or MTA-STS, which DANE wins over). \"Validated\" is the "
               "AD bit of the nameservers (delivery.nameservers, else /etc/resolv.conf), "
               "which must be a validating resolver on this host (unbound, say): an AD "
               "bit from afar can be forged on the way. Off by default for that reason: "
               "turn it on once such a resolver answers. Postfix's "
               "smtp_tls_security_level = dane with smtp_dns_support_level = dnssec.")
    lease: float = opt(900.0, "Seconds a delivery worker owns a message it took. A "
                              "worker renews the lease of a delivery still under way. "
                              "When a worker dies, the other workers return its messages "
                              "to the queue within seconds (the lease names the process, "
                              "and a live one, even a stuck one, keeps it); only a worker "
                              "on another host, whose death cannot be seen, is waited for "
                              "until its lease lapses (Postfix's qmgr learns at once that "
                              "a delivery agent died).",
                       _positive)
    failed_retention: float = opt(86400.0, "Seconds a failed message (every recipient done, "
                                           "some bounced and told of) stays in the queue for "
                                           "the admin to inspect before it is removed; 0 "
                                           "removes it within seconds, as Postfix does.",
                                  _not_negative)
    delay_warning_time: float = opt(0.0, "Seconds a message may wait before its sender gets "
                                         "a warning that delivery is delayed (RFC 3464 "
                                         "delayed DSN, once per message); 0 sends none "
                                         "(Postfix's delay_warning_time).", _not_negative)
    sasl_password_file: Optional[str] = opt(
        None, "Credentials for next hops that want SMTP AUTH, as Postfix's "
              "smtp_sasl_password_maps source file (no postmap needed): lines of "
              "\"[host]:port user:password\" or \"host user:password\", # comments. Keep "
              "it readable by master.user alone (root:its group 0640, or its own 0600).")
    sasl_require_tls: bool = opt(True, "Authenticate to a next hop only inside TLS; without "
                                       "it the attempt defers (a password never crosses the "
                                       "network in clear). Postfix: "
                                       "smtp_sasl_security_options = noplaintext, "
                                       "noanonymous (its default) and "
                                       "smtp_sasl_tls_security_options = noanonymous (not "
                                       "its default, which refuses PLAIN and LOGIN inside "
                                       "TLS too).")


def _optional_mailbox(value):
    if not value:
        return None
    from elemta.smtp.address import AddressError, validate_mailbox
    try:
        validate_mailbox(value)
    except AddressError as error:
        return "must be an email address (%s), not %r" % (error, value)
    return None


@dataclass(frozen=True)
class TLSRPTSettings:
    """SMTP TLS Reporting (RFC 8460): the delivery workers count the outcome of each TLS
    session held to an MTA-STS policy or DANE, per policy domain and UTC day, under
    queue.spool_dir/tlsrpt, and once a day send each policy domain that publishes a
    _smtp._tls TXT record its report: as mail to each mailto: rua, POSTed to each https:
    rua (elemtactl tlsrpt show and send)."""
    enabled: bool = opt(False, "Count TLS session results and send the daily reports. Off "
                               "by default: the reports are mail to other domains. "
                               "Postfix's smtp_tlsrpt_enable (3.10, with tlsrpt-reportd).")
    send_hour: int = opt(1, "Hour (UTC, 0-23) after which the report of the day before is "
                            "sent; the delivery worker that claims the day first sends it. "
                            "Postfix: tlsrpt-reportd's schedule.", _between(0, 23))
    organization: str = opt("", "The report's organization-name; empty: the mail name "
                                "(smtpd.origin). Postfix: tlsrpt-reportd's organization_name.")
    contact: str = opt("", "The report's contact-info; empty: the sender. Postfix: "
                           "tlsrpt-reportd's contact_info.")
    sender: str = opt("", "Envelope sender and From address of the reports; empty: "
                          "postmaster at the mail name. Postfix: tlsrpt-reportd's "
                          "sender_address.", _optional_mailbox)
    keep_days: int = opt(14, "Days of counts kept under the spool (the older ones are "
                             "pruned once a day, sent or not). Postfix: tlsrpt-reportd's "
                             "keep_days.", _between(2, 366))
    https_ca_file: Optional[str] = opt(
        None, "PEM file of the CA certificates an https: rua's server certificate must "
              "chain to; unset: the system's. A report POST whose certificate does not "
              "validate fails (RFC 8460 5.4) and is tried again on the next runs. "
              "Postfix has no equivalent (tlsrpt-reportd uses the system's).",
        _absolute_path)
    https_timeout: float = opt(30.0, "Seconds one report POST to an https: rua may take "
                                     "(connection, TLS, upload and answer). Postfix "
                                     "has no equivalent.", _positive)
    https_allow_private: bool = opt(
        False, "Post reports to https: ruas on ports other than 443 and at addresses that "
               "are not global (loopback, RFC 1918, link-local, shared, multicast, "
               "reserved). Off: such a rua is refused and logged with the reason, since "
               "whoever runs a domain's DNS picks its rua and could otherwise make Elemta "
               "send requests into its own network. Postfix has no equivalent.")


LOCAL_RIGHTS = ("alias", "forward", "include")


def _local_rights(values):
    bad = [v for v in values if v not in LOCAL_RIGHTS]
    if bad:
        return "%s: each must be one of %s" % (", ".join(bad), ", ".join(LOCAL_RIGHTS))
    return None


@dataclass(frozen=True)
class LocalSettings:
    """Local delivery (Postfix's local): aliases, .forward files, mailboxes."""
    aliases_file: Optional[str] = opt(
        "/etc/aliases", "Aliases in /etc/aliases format (name: address, /file, |command, "
                        ":include:/path). Read again whenever it changes; newaliases checks "
                        "it. Unset: no aliases. Postfix's alias_maps and alias_database "
                        "(hash:/etc/aliases on Debian); there is no database to rebuild.")
    mail_spool_directory: str = opt(
        "/var/mail", "Directory of mbox mailboxes, one file per user (Postfix's "
                     "mail_spool_directory); used when home_mailbox is empty.")
    home_mailbox: str = opt(
        "", "Mailbox relative to the user's home directory: \"Maildir/\" (ends in /: Maildir) "
            "or \"Mailbox\" (mbox). Empty: mbox in mail_spool_directory. Postfix's "
            "home_mailbox (same default).")
    forward: bool = opt(True, "Honour ~/.forward files. Postfix: forward_path "
                              "($home/.forward; empty turns .forward files off).")
    allow_mail_to_commands: Tuple[str, ...] = opt(
        ("alias", "forward"), "Where |command destinations are allowed: alias, forward, "
                              "include. Postfix's allow_mail_to_commands (same "
                              "default).", _local_rights)
    allow_mail_to_files: Tuple[str, ...] = opt(
        ("alias", "forward"), "Where /file destinations are allowed: alias, forward, "
                              "include. Postfix's allow_mail_to_files (same "
                              "default).", _local_rights)
    default_privileges: str = opt(
        "nobody", "User that commands and files named in root-owned aliases run as "
                  "(Postfix's default_privileges).")
    command_timeout: float = opt(1000.0, "Seconds a |command delivery may run "
                                         "(Postfix's command_time_limit).", _positive)
    recipient_delimiter: str = opt(
        "", "Separators of address extensions, such as + in user+tag (empty: none); each "
            "character is one, so +- takes user+tag and user-tag alike (Postfix's "
            "recipient_delimiter).")
    reject_unknown_users: bool = opt(
        True, "Refuse, at RCPT, local recipients that are neither a user nor an alias "
              "(550 5.1.1), as Postfix's local_recipient_maps does.")


@dataclass(frozen=True)
class DNSSettings:
    """DNS for the plugins' checks (SPF, DKIM keys, DMARC policies, ARC), wherever the
    plugins run: smtpd, pickup and delivery. Delivery's own MX lookups use
    delivery.nameservers."""
    nameservers: Tuple[str, ...] = opt((), "DNS servers the plugins ask (empty: those of "
                                           "/etc/resolv.conf). Use a validating resolver "
                                           "you trust. Postfix has no equivalent: it, its "
                                           "policy servers and its milters use "
                                           "/etc/resolv.conf.", _ip_addresses)
    port: int = opt(53, "UDP and TCP port of the nameservers. Postfix has no "
                        "equivalent.", _port)
    timeout: float = opt(3.0, "Seconds one DNS query to one nameserver may take. Postfix "
                              "has no equivalent.", _positive)


STORE_FAILURE_POLICIES = ("local", "tempfail")


def _store_url(value):
    if value is None:
        return None
    from elemta.sharedstate.storeurl import (is_cluster, is_sentinel, parse_cluster,
                                             parse_sentinel)
    if is_sentinel(value) or is_cluster(value):
        try:
            (parse_sentinel if is_sentinel(value) else parse_cluster)(value)
        except ValueError as error:
            return str(error)
        return None
    scheme, _, rest = value.partition("://")
    if scheme not in ("redis", "rediss", "unix") or not rest:
        return ("must be a redis://host:port/db, rediss://host:port/db (TLS), "
                "unix:///path, redis+sentinel://host:port,host:port/service or "
                "redis+cluster://host:port,host:port URL, not "
                "%r" % (value,))
    return None


def _handover_address(value):
    if value is None:
        return None
    from elemta.delivery.handover import parse_target
    try:
        parse_target(value)
    except ValueError as error:
        return "must be host:port or [address]:port: %s" % error
    return None


# A node's name in the cluster view: what elemtactl --cluster prints and the store keys.
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _node_name(value):
    if value is None or _NODE_NAME.match(value):
        return None
    return ("must be 1 to 63 letters, digits, dots, hyphens or underscores, starting "
            "with a letter or digit, not %r" % (value,))


def _api_url(value):
    if value is None:
        return None
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(value)
        parts.port                      # a port that is not a number raises
    except ValueError as error:
        return "is not a URL (%s): %r" % (error, value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL naming a host, not %r" % (value,)
    if parts.path.strip("/") or parts.query or parts.fragment:
        return ("must name only the api's scheme, host and port (no path): %r"
                % (value,))
    return None


@dataclass(frozen=True)
class ClusterSettings:
    """State shared by several Elemta nodes that form one mail system: greylisting
    triplets, rate-limit counts, AUTH failure counts and the DNSBL answer cache. Without
    a store each node keeps them itself (LMDB and per-worker memory)."""
    store: Optional[str] = opt(
        None, "The Valkey or Redis server every node shares: redis://host:port/db, "
              "rediss://host:port/db (TLS) or unix:///path/to/socket; or, for a primary "
              "with replicas under Sentinel, redis+sentinel://host:port,host:port/"
              "service/db (the Sentinels, port 26379 unless given; the name they "
              "monitor the primary under; rediss+sentinel:// for TLS), which follows a "
              "failover by itself; or, for a Valkey Cluster, redis+cluster://host:port,"
              "host:port (some of its nodes; rediss+cluster:// for TLS). Unset: state "
              "stays on this node. Postfix has no equivalent (each host keeps its own anvil(8) "
              "and postscreen cache).", _store_url)
    password_file: Optional[str] = opt(
        None, "File whose first line is the store's password (Redis AUTH, or "
              "\"user password\" for an ACL user); keep it readable by master.user alone. Postfix "
              "has no equivalent (the nearest: the password in a proxymap or "
              "memcache_table(5) client's configuration).")
    ca_file: Optional[str] = opt(None, "PEM CA certificates that sign a rediss:// store's "
                                       "certificate (unset: the system's). Postfix has no "
                                       "equivalent (memcache_table(5) has no TLS).")
    key_prefix: str = opt("elemta:", "Prefix of every key Elemta writes, so one store can "
                                     "serve several clusters or programs. Postfix has no "
                                     "equivalent (memcache_table(5)'s key_format is the "
                                     "nearest).")
    timeout: float = opt(0.25, "Seconds one store operation (connecting included) may "
                               "take before the check falls back (cluster.store_failure). "
                               "Postfix has no equivalent (memcache_table(5)'s timeout "
                               "is the nearest).",
                         _positive)
    retry_interval: float = opt(5.0, "Seconds after a failed operation before the store "
                                     "is tried again; meanwhile checks fall back at once. "
                                     "Postfix has no equivalent (memcache_table(5)'s "
                                     "retry_pause is the nearest).",
                                _positive)
    store_failure: str = opt(
        "local", "What a check does while the store cannot be reached or is too slow: "
                 "local (use this node's own state, so mail keeps flowing with counts of "
                 "this node alone) or tempfail (refuse what the check guards with 451 "
                 "4.3.0: 421 at connect, 454 4.7.0 to AUTH). The DNSBL cache always falls back to the local "
                 "cache. Logged once per outage. Postfix has no equivalent (postscreen and "
                 "anvil(8) keep their state on each host).", _one_of(STORE_FAILURE_POLICIES))
    node_name: Optional[str] = opt(
        None, "This node's name in the cluster view (elemtactl --cluster, "
              "/api/v1/cluster/...). Unset: the host name. Two nodes must never share "
              "one. Postfix has no equivalent.", _node_name)
    api_url: Optional[str] = opt(
        None, "Where the other nodes reach this node's REST API, e.g. "
              "https://10.0.0.2:8025. Unset: http://api.address:api.port, https:// "
              "with api.cert_file (with the host name when api.address is a wildcard). The api must listen where the other "
              "nodes can reach it, and every node must have the same api token. Postfix "
              "has no equivalent.", _api_url)
    heartbeat_interval: float = opt(
        5.0, "Seconds between two registrations of this node in the store by its api "
             "process. Postfix has no equivalent.", _positive)
    node_ttl: float = opt(
        15.0, "Seconds a registration lasts: a node whose api stopped registering drops "
              "out of the cluster view this long after its last heartbeat; meanwhile it "
              "is named as not answering. Keep it a few heartbeat_intervals. Postfix has no "
              "equivalent.", _positive)
    api_timeout: float = opt(
        5.0, "Seconds the cluster view waits for each node's REST API to answer; a node "
             "slower than that is named as not answering. Postfix has no equivalent.",
        _positive)
    handover_address: Optional[str] = opt(
        None, "Where the other nodes hand this node mail over SMTP when they are drained "
              "(elemtactl drain), as host:port or [address]:port, registered in the store "
              "with the node. Unset: the first handover listener (listeners' mode "
              "handover), else the first smtp listener (with the host name when its "
              "address is a wildcard); none: the node takes no handed-over mail. Postfix "
              "has no equivalent.", _handover_address)
    peer_networks: Tuple[str, ...] = opt(
        (), "The networks the other nodes' REST APIs and SMTP hand-over addresses must be "
            "in. A registered node whose address (resolved when it is a name) is outside "
            "them gets neither the api token (the cluster view names it as not "
            "answering) nor drained mail, so whoever can write to the store cannot "
            "collect either by registering an address of his own (nor can he without "
            "the api token: registrations are signed with a key derived from it). A "
            "handover listener talks to no client outside them. Keep them to the "
            "nodes' own network (the pod network in Kubernetes). Empty: "
            "relay.mynetworks. Postfix has no equivalent.", _networks)
    handover_tls: str = opt(
        "required", "How a drain (elemtactl drain) protects the hand-over login it sends "
                    "a peer's handover listener: required (only inside TLS: a peer that "
                    "offers no STARTTLS, or whose certificate cluster.peer_ca_file does "
                    "not sign, is sent no password, and the mail stays queued) or may "
                    "(inside TLS when the peer offers STARTTLS, without a certificate "
                    "check; in clear to a peer that offers none: only for nodes on one "
                    "machine or a network no one else can overhear). The password opens "
                    "relaying on every node. Postfix's smtp_tls_security_level with "
                    "smtp_sasl_tls_security_options is the nearest.",
        _one_of(("required", "may")))
    peer_ca_file: Optional[str] = opt(
        None, "PEM CA certificates that sign the nodes' own certificates (a cluster CA): "
              "with it, a drain logs in only to a handover listener whose certificate "
              "it signs (the chain is checked, not the name: the peer is reached by its "
              "address), and the cluster view's https:// requests verify the other "
              "nodes' api certificates (and names) against it. Unset: the handover "
              "TLS is encrypted but not authenticated, and https:// is checked against "
              "the system's CAs. Postfix's smtp_tls_CAfile is the nearest.",
        _absolute_path)
    api_plain_http: str = opt(
        "loopback", "Where the cluster view may send the api token over plain http:// "
                    "(the token is the root of every cluster credential): loopback (to "
                    "a node whose api address is a loopback address only), never, or "
                    "always (a network no one else can overhear). A node refused is "
                    "named as not answering, logged and counted. Use https:// api_urls "
                    "(api.cert_file) elsewhere. Postfix has no equivalent.",
        _one_of(("loopback", "never", "always")))


@dataclass(frozen=True)
class ProtocolTestSettings:
    """Postscreen's protocol tests, done by the smtpd itself on smtp listeners (not on
    submission and smtps: they are for port 25, where the zombies call), for clients
    outside relay.mynetworks (postscreen's permit_mynetworks)
    (elemta.restrictions.protocoltests). A client that fails one is logged; then, by
    the test's action, ignore lets it go on, enforce refuses each of its recipients with
    550 5.5.1 Protocol error, and drop hangs up at once with 521 5.5.1 Protocol error."""
    greet_wait: float = opt(
        0.0, "Seconds every client waits for the last line of the greeting while the "
             "smtpd listens whether it talks before its turn (the pregreet test); such "
             "a client is logged \"PREGREET n after t from [address]:port: input\". The "
             "connection-stage checks (plugins.dnsbl) run during the wait, as postscreen's "
             "DNSBL lookups do. 0: no test and no wait. Postfix's postscreen_greet_wait "
             "(6s when postscreen runs; it then remembers clients that passed for a day, postscreen_greet_ttl, "
             "which Elemta does not: every connection waits).", _not_negative)
    greet_banner: bool = opt(
        True, "Send the first line of the greeting (220-host banner) before the wait, as "
              "bait, then the whole greeting after it; false: wait in silence. Postfix's "
              "postscreen_greet_banner (its text, or empty for none).")
    greet_action: str = opt(
        "ignore", "What befalls a client that talks before its turn: ignore (log only), "
                  "enforce or drop. Postfix's postscreen_greet_action.",
        _one_of(PROTOCOL_TEST_ACTIONS))
    pipelining_enable: bool = opt(
        False, "Test whether clients send commands ahead of the replies where they may "
               "not (RFC 2920): before the EHLO reply announced PIPELINING (before EHLO, "
               "after HELO, after STARTTLS) and after DATA; such a client is logged "
               "\"COMMAND PIPELINING from [address]:port after COMMAND: input\". Postfix's "
               "postscreen_pipelining_enable.")
    pipelining_action: str = opt(
        "enforce", "What befalls a client that pipelines where it may not: ignore, "
                   "enforce or drop. Postfix's postscreen_pipelining_action.",
        _one_of(PROTOCOL_TEST_ACTIONS))


# ---- milters (elemta.milter): Postfix's smtpd_milters, non_smtpd_milters, milter_*

MILTER_DEFAULT_ACTIONS = ("tempfail", "accept", "reject", "quarantine")
MILTER_PROTOCOLS = (2, 3, 4, 6)


def _milter_socket(value):
    from elemta.milter.protocol import parse_socket
    try:
        parse_socket(value)
    except ValueError as error:
        return str(error)
    return None


def _milter_action(value):
    return None if value is None else _one_of(MILTER_DEFAULT_ACTIONS)(value)


def _milter_timeout(value):
    return None if value is None else _positive(value)


def _milter_protocol(value):
    if value is not None and value not in MILTER_PROTOCOLS:
        return "must be one of 2, 3, 4 or 6, not %r" % (value,)
    return None


@dataclass(frozen=True)
class MilterDefaults:
    """What every milter gets unless its entry in milters says otherwise (Postfix's
    milter_* parameters, which its per-milter { socket, key=value } form overrides alike).

    Metrics: elemta_milter_verdicts_total{milter,stage,action} (every answer of every
    milter: stage connect, helo, mail, rcpt, data, header, eoh, body, eom or unknown
    (a command Elemta does not know, as Postfix shows it to milters); action
    continue, accept, reject, tempfail (a reply code counts as one of these two by its
    class), discard, quarantine (a message held at the end of message counts once, as
    this) or skip),
    elemta_milter_failures_total{milter,stage,kind} (the milter was given up for the
    session and its default_action applied; kind connect: refused or nothing listens,
    timeout: connecting, writing or waiting for an answer took longer than its timeout,
    io: the connection broke or the milter closed it, protocol: a packet the protocol
    does not allow) and elemta_milter_scan_seconds{milter} (a histogram: the time each
    milter took over a message's header fields, body and end of message). Each verdict that
    is not continue, and every end of message, is logged in one line: "QUEUEID: milter
    NAME: STAGE from CLIENT: ACTION[; modifications]" (NOQUEUE before DATA). A message a
    milter quarantined is held "by milter NAME" (elemtactl queue show, the REST API);
    elemtactl queue release --rescan tells the milters the stored message again, and a
    milter that fails then leaves it held whatever its default_action.

    ESMTP parameters a milter gives with an added recipient (smfi_addrcpt_par) or a new
    sender (smfi_chgfrom), such as NOTIFY, ORCPT or RET, are ignored, as Postfix's
    cleanup ignores them: the address is used, the parameters are not, and a warning
    says so ("QUEUEID: milter NAME: ignoring ESMTP parameters "NOTIFY=NEVER" of add rcpt
    <ADDRESS>"). A message's own MAIL and RCPT parameters stay as the client gave them."""
    default_action: str = opt(
        "tempfail", "What a milter that cannot be reached, times out or breaks the "
                    "protocol means for the mail: tempfail (451 4.3.0 to MAIL, RCPT, DATA "
                    "or the end of data; a failure at connect or HELO is answered at the "
                    "next MAIL, the client still gets its greeting), accept (go on as if "
                    "it were not configured), reject (550 5.7.1) or quarantine (queue the "
                    "message on hold). The failure is logged naming the milter. Postfix's "
                    "milter_default_action (same default).", _one_of(MILTER_DEFAULT_ACTIONS))
    connect_timeout: float = opt(
        30.0, "Seconds to connect to a milter and negotiate the protocol. Postfix's "
              "milter_connect_timeout (same default).", _positive)
    command_timeout: float = opt(
        30.0, "Seconds a milter may take to answer a command (connect, HELO, MAIL, RCPT, "
              "DATA, end of headers); a PROGRESS answer starts the wait again. Postfix's "
              "milter_command_timeout (same default).", _positive)
    content_timeout: float = opt(
        300.0, "Seconds a milter may take over each header, body chunk and the end of "
               "message. Postfix's milter_content_timeout (same default).", _positive)
    protocol: int = opt(
        6, "Milter protocol version offered: 2, 3, 4 or 6 (Sendmail 8.14 and later, "
           "libmilter milters, Rspamd). Postfix's milter_protocol (same default).",
        _milter_protocol)
    daemon_name: str = opt(
        "", "The {daemon_name} macro; \"\": the host name (smtpd.hostname). Postfix's "
            "milter_macro_daemon_name ($myhostname).")
    macro_v: str = opt(
        "", "The v macro; \"\": \"Elemta\" and its version. Postfix's milter_macro_v "
            "($mail_name $mail_version).")
    connect_macros: Tuple[str, ...] = opt(
        ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
        "Macros sent with the connect event. Also known: {client_addr}, {client_name}, "
        "{client_port}, {client_ptr}, {daemon_port}, {if_addr}, {if_name}. A milter may "
        "ask for others at negotiation; it gets those instead. Postfix's "
        "milter_connect_macros (same default).")
    helo_macros: Tuple[str, ...] = opt(
        ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
        "Macros sent with HELO/EHLO (the TLS ones only after STARTTLS; client "
        "certificates are not asked for, so {cert_*} are never sent). Postfix's "
        "milter_helo_macros (same default).")
    mail_macros: Tuple[str, ...] = opt(
        ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}",
         "{mail_mailer}"),
        "Macros sent with MAIL FROM (i, the queue id, is known from MAIL on; the AUTH "
        "ones only after AUTH; {auth_author} is never sent). Postfix's "
        "milter_mail_macros (same default).")
    rcpt_macros: Tuple[str, ...] = opt(
        ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
        "Macros sent with each RCPT TO ({rcpt_mailer}: local for a local domain, else "
        "smtp). Postfix's milter_rcpt_macros (same default).")
    data_macros: Tuple[str, ...] = opt(
        ("i",), "Macros sent with DATA. Postfix's milter_data_macros (same default).")
    end_of_header_macros: Tuple[str, ...] = opt(
        ("i",), "Macros sent at the end of the headers. Postfix's "
                "milter_end_of_header_macros (same default).")
    end_of_data_macros: Tuple[str, ...] = opt(
        ("i",), "Macros sent at the end of the message. Postfix's "
                "milter_end_of_data_macros (same default).")


@dataclass(frozen=True)
class MilterEntry:
    """One milter (Postfix's smtpd_milters and non_smtpd_milters list it by socket). It
    is asked at every stage, after that stage's smtpd restrictions and plugins, in the
    order of this list: connect, HELO, MAIL, each RCPT, DATA, then at the end of data
    (after the data-stage plugins, before the storage stage, so Elemta's own DKIM
    signing covers what the milters changed) each header, the end of headers, the body
    in chunks and the end of message, where it may accept, continue, reject, tempfail,
    reply with its own code, discard (250, then the message is dropped, logged),
    quarantine (the message is queued on hold), add, change, insert or delete header
    fields, replace the body, add or delete recipients and change the sender. A
    recipient it adds is queued as given, past the relay rules, as Postfix does (the
    milter is the admin's); a message left with no recipient is refused (550 5.7.1).
    RSET or a refused transaction sends ABORT; the end of the session QUIT. The milter
    sees the Received header Elemta adds as the first header field, as Postfix's milters
    see Postfix's."""
    socket: str = opt("", "Where the milter listens: inet:host:port or unix:/path, as in "
                          "Postfix's smtpd_milters.", _milter_socket)
    name: str = opt("", "Its name in the log and the metrics' milter label; \"\": the "
                        "socket. Postfix names a milter by its socket.")
    smtp: bool = opt(True, "Run it for mail from SMTP clients. Postfix's smtpd_milters.")
    non_smtp: bool = opt(
        False, "Run it for mail from sendmail (pickup), which it sees as a client "
               "\"localhost\" [127.0.0.1] saying HELO localhost. Postfix's "
               "non_smtpd_milters.")
    default_action: Optional[str] = opt(
        None, "milter.default_action for this milter alone (Postfix's { socket, "
              "default_action = ... } form).", _milter_action)
    connect_timeout: Optional[float] = opt(
        None, "milter.connect_timeout for this milter alone. Postfix: connect_timeout in "
              "the { socket, ... } form.", _milter_timeout)
    command_timeout: Optional[float] = opt(
        None, "milter.command_timeout for this milter alone. Postfix: command_timeout in "
              "the { socket, ... } form.", _milter_timeout)
    content_timeout: Optional[float] = opt(
        None, "milter.content_timeout for this milter alone. Postfix: content_timeout in "
              "the { socket, ... } form.", _milter_timeout)
    protocol: Optional[int] = opt(
        None, "milter.protocol for this milter alone. Postfix: protocol in the { socket, "
              "... } form.", _milter_protocol)


# ---- plugins: each built-in's table is the plugin's own Settings (elemta.plugins.settings)

BUILTIN_PLUGINS = ("spf", "dkim", "dmarc", "arc", "greylist",   # authres: by its rule
                   "ratelimit", "dnsbl", "rhsbl", "helo_hostname", "client_hostname",
                   "non_fqdn", "unknown_sender_domain", "policy_service", "clamav",
                   "rspamd")


@dataclass(frozen=True)
class PluginSettings:
    """Plugins: the built-ins below, and any installed in the elemta.plugins entry-point
    group, each configured in a table named after it (a third-party plugin's keys are
    checked against the plugin's Settings). Every plugin is disabled until its table says
    enabled: true."""
    spf: SPFSettings = opt(SPFSettings(), "SPF.")
    dkim: DKIMSettings = opt(DKIMSettings(), "DKIM.")
    dmarc: DMARCSettings = opt(DMARCSettings(), "DMARC.")
    arc: ARCSettings = opt(ARCSettings(), "ARC.")
    authres: AuthResSettings = opt(AuthResSettings(), "Authentication-Results.")
    greylist: GreylistSettings = opt(GreylistSettings(), "Greylisting.")
    ratelimit: RateLimitSettings = opt(RateLimitSettings(), "Client rate limits (anvil).")
    dnsbl: DNSBLSettings = opt(DNSBLSettings(), "Client DNS block and allow lists "
                                                "(postscreen_dnsbl_sites).")
    rhsbl: RHSBLSettings = opt(RHSBLSettings(), "Domain DNS block lists (reject_rhsbl_helo, "
                                                "reject_rhsbl_sender).")
    helo_hostname: HeloHostnameSettings = opt(
        HeloHostnameSettings(), "HELO name checks (reject_invalid_helo_hostname, "
                                "reject_non_fqdn_helo_hostname).")
    client_hostname: ClientHostnameSettings = opt(
        ClientHostnameSettings(), "Client name checks (reject_unknown_client_hostname, "
                                  "reject_unknown_reverse_client_hostname).")
    non_fqdn: NonFQDNSettings = opt(NonFQDNSettings(), "Envelope address checks "
                                    "(reject_non_fqdn_sender, reject_non_fqdn_recipient).")
    unknown_sender_domain: SenderDomainSettings = opt(
        SenderDomainSettings(), "Sender domain check (reject_unknown_sender_domain).")
    clamav: ClamAVSettings = opt(ClamAVSettings(), "ClamAV virus scanning.")
    rspamd: RspamdSettings = opt(RspamdSettings(), "Rspamd spam filtering.")
    policy_service: PolicyServiceSettings = opt(
        PolicyServiceSettings(), "Policy delegation to policy servers (Postfix's "
                                 "check_policy_service).")
    # Tables of installed third-party plugins, typed by the loader with the plugin's own
    # Settings class.
    other: Tuple[ConfiguredPlugin, ...] = field(default=(), metadata={"internal": True})

    # The loader builds keys it does not know as third-party plugin tables, kept here.
    other_keys_field = "other"

    def to_run(self):
        """The plugins to run, each a ConfiguredPlugin, for elemta.plugins.manager: the
        enabled built-ins, the Authentication-Results writer when authres_runs says so,
        and the enabled third-party plugins."""
        running = [ConfiguredPlugin(name, getattr(self, name), getattr(self, name))
                   for name in BUILTIN_PLUGINS if getattr(self, name).enabled]
        if authres_runs(self.authres, [plugin.name for plugin in running]):
            running.append(ConfiguredPlugin("authres", self.authres, self.authres))
        running += [plugin for plugin in self.other if plugin.common.enabled]
        return tuple(running)


@dataclass(frozen=True)
class Config:
    """The whole configuration. `source` is the file it came from (None: built-in)."""
    smtpd: SMTPDSettings = opt(SMTPDSettings(), "SMTP server identity and input policy.")
    listeners: Tuple[Listener, ...] = opt((Listener(),), "Listening sockets. Postfix: the "
                                                         "inet services of master.cf (smtp, "
                                                         "submission, submissions) and "
                                                         "inet_interfaces.")
    relay: RelaySettings = opt(RelaySettings(), "Relay control.")
    virtual: VirtualSettings = opt(VirtualSettings(), "Hosted domains.")
    rewrite: RewriteSettings = opt(RewriteSettings(), "Address rewriting.")
    content: ContentSettings = opt(ContentSettings(), "Header and body checks.")
    tls: TLSSettings = opt(TLSSettings(), "TLS certificates.")
    auth: AuthSettings = opt(AuthSettings(), "SMTP AUTH.")
    limits: LimitSettings = opt(LimitSettings(), "Per-client limits.")
    timeouts: TimeoutSettings = opt(TimeoutSettings(), "Timeouts.")
    queue: QueueSettings = opt(QueueSettings(), "The queue.")
    logging: LoggingSettings = opt(LoggingSettings(), "Logging.")
    master: MasterSettings = opt(MasterSettings(), "The master process.")
    api: APISettings = opt(APISettings(), "The api process.")
    acme: ACMESettings = opt(ACMESettings(), "The built-in ACME client.")
    mailq: MailqSettings = opt(MailqSettings(), "Queue listing for local users.")
    delivery: DeliverySettings = opt(DeliverySettings(), "Delivery of queued mail.")
    tlsrpt: TLSRPTSettings = opt(TLSRPTSettings(), "SMTP TLS Reporting (RFC 8460).")
    local: LocalSettings = opt(LocalSettings(), "Local delivery.")
    dns: DNSSettings = opt(DNSSettings(), "DNS for the plugins.")
    cluster: ClusterSettings = opt(ClusterSettings(), "State shared by the nodes of a "
                                                      "cluster.")
    plugins: PluginSettings = opt(PluginSettings(), "Plugins.")
    protocol_tests: ProtocolTestSettings = opt(
        ProtocolTestSettings(), "Early talkers and pipelining abuse (postscreen's "
                                "protocol tests).")
    milter: MilterDefaults = opt(MilterDefaults(), "Settings every milter shares.")
    milters: Tuple[MilterEntry, ...] = opt((), "Milters (Sendmail milter protocol filters), "
                                               "in the order they are asked. Postfix's "
                                               "smtpd_milters and non_smtpd_milters "
                                               "(milters[].smtp and non_smtp choose).")
    source: Optional[str] = field(default=None, compare=False, metadata={"internal": True})
    # The first line of smtpd.mailname_file, checked (elemta.config.mailname), or None.
    mailname: Optional[str] = field(default=None, compare=False,
                                    metadata={"internal": True})
    # What the file probably did not mean (elemta.config.advice): Problems, logged at
    # start and reload, printed by the config checks; never errors.
    warnings: Tuple[Any, ...] = field(default=(), compare=False, metadata={"internal": True})

    @property
    def hostname(self):
        """The effective host name (Postfix's myhostname): smtpd.hostname or the
        system's fully qualified name."""
        return self.smtpd.hostname or system_hostname(self.mailname)

    @property
    def tls_files(self):
        """(cert_file, key_file) the smtpd serves: tls.cert_file and tls.key_file, or the
        ACME certificate tls.acme names (which may not exist yet); (None, None) for none."""
        if self.tls.acme:
            from elemta.certs.store import live_files
            return live_files(self.acme.state_directory, self.tls.acme)
        return self.tls.cert_file, self.tls.key_file

    @property
    def origin(self):
        """The effective mail name (Postfix's myorigin): smtpd.origin, the mail name of
        smtpd.mailname_file, or the host name."""
        return self.smtpd.origin or self.mailname or self.hostname


def system_hostname(mailname=None):
    """The system's fully qualified name: its host name when that has a dot, else the
    mail name, else the name with .localdomain added (Postfix's myhostname: a bare name
    gets $mydomain, localdomain by default). No DNS lookup, as Postfix makes none: a
    process must not wait on a resolver to start."""
    name = socket.gethostname()
    if "." in name:
        return name
    return mailname or name + ".localdomain"
