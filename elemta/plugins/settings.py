"""The built-in plugins' settings: one typed table per plugin, declared once.

Owned by the built-in plugins (each names its table as its Settings) and embedded as is in
the config schema (elemta.config.schema.PluginSettings), so the same dataclass carries a
setting's type, default, check and man page doc (elemta.config.options.opt) from the config
file to the plugin: the loader builds it, the manager hands it to plugin.init() unchanged.
Light on purpose: loading the config must not import dkimpy, pyspf or lmdb, so the plugin
modules import this one, never the other way round.

A table's checks that span its fields are its validate(path) method, as for third-party
plugins (elemta.plugins.api): it raises PluginConfigError naming path.KEY, and the loader
reports that against the file's line.

Also here: the rule that turns the Authentication-Results writer on (authres_runs), and
ConfiguredPlugin, what the manager is given for each plugin to run.
See also: elemta.config.schema (PluginSettings), elemta.plugins.manager, man/elemta.conf.5.
"""

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

from elemta.config.options import between, domains, networks, not_negative, one_of, opt
from elemta.config.options import positive
from elemta.plugins.api import PluginConfigError
from elemta.restrictions.dnssites import parse_site

# Enabling any of these turns on the Authentication-Results writer unless its table says
# `enabled: false`: their results are meant to be seen.
AUTH_METHODS = ("spf", "dkim", "dmarc", "arc")

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
# Bounds on the work one message may cause DKIM verification. Signatures after the first
# MAX_SIGNATURES are not verified (each costs a DNS lookup and a public-key operation;
# OpenDKIM's MaximumSignaturesToVerify is 3); a body longer than MAX_BODY_BYTES is not
# hashed (as large as limits.message_size's default: every message a default
# configuration accepts is checked); more header fields than MAX_HEADERS, in the message
# or in one signature's h=, are not matched (dkimpy matches h= names against the header
# fields one by one). What is not checked is reported as neutral, "not checked: why".
MAX_SIGNATURES = 5
MAX_BODY_BYTES = 31457280
MAX_HEADERS = 1000

# RFC 8601 authserv-id: a token (in practice a host name).
_TOKEN = re.compile(r'^[!#$%&\'*+\-.0-9A-Z^_`a-z{|}~]+$')


def _plugin_timeout(value):
    if value < 0:
        return "must be 0 (the plugin's own default) or more seconds, not %r" % (value,)
    return None


def _authserv_ids(values):
    for value in values:
        if value and not _TOKEN.match(value):
            return "%r is not a valid authserv-id (a host name)" % (value,)
    return None


def _reject_text(value):
    try:
        value % {"domain": "example.com"}
    except (KeyError, ValueError, TypeError) as error:
        return "only %%(domain)s may be used (%s)" % (error,)
    return None


@dataclass(frozen=True)
class PluginCommon:
    """Settings every plugin has."""
    enabled: bool = opt(False, "Run this plugin. Postfix: naming the restriction, policy "
                               "service or milter that does the same in its "
                               "smtpd_*_restrictions or smtpd_milters.")
    timeout: float = opt(0.0, "Seconds one call may take before the plugin counts as "
                              "failed; 0 means the plugin's own default. Postfix: the "
                              "milter's or policy service's own timeouts "
                              "(milter_command_timeout, "
                              "smtpd_policy_service_timeout).", _plugin_timeout)
    fail_open: bool = opt(False, "When the plugin fails or times out, carry on as if it had "
                                 "no opinion instead of answering 451 4.3.0. Postfix: "
                                 "milter_default_action = accept for a milter, "
                                 "smtpd_policy_service_default_action = DUNNO for a policy "
                                 "service.")
    order: int = opt(0, "Place among the plugins of each stage it serves, lower first; 0 "
                        "keeps the plugin's own (elemtactl restrictions shows them). As "
                        "the order of a Postfix smtpd_*_restrictions list, but the "
                        "smtpd's core checks of a stage (the relay guard among them) "
                        "always come first.", not_negative)


@dataclass(frozen=True)
class SPFSettings(PluginCommon):
    """SPF (RFC 7208) on MAIL FROM and HELO; adds Received-SPF."""
    enforce: bool = opt(False, "Refuse an SPF fail with 550 5.7.23 and a temperror with 451 "
                               "4.7.24 (otherwise only record the result). Postfix has no "
                               "SPF of its own; policyd-spf (check_policy_service) does it: "
                               "Mail_From_reject, TempError_Defer.")
    check_helo: bool = opt(True, "Also check the HELO identity (RFC 7208 2.3). Postfix has "
                                 "no equivalent; policyd-spf: HELO_reject (No_Check: off).")
    received_spf: bool = opt(True, "Add a Received-SPF header to accepted mail. Postfix has "
                                   "no equivalent; policyd-spf: Header_Type = SPF.")


@dataclass(frozen=True)
class DKIMKey:
    """One DKIM signing key."""
    domain: str = opt("", "Signing domain (d=); mail from this domain is signed with the "
                          "key. Postfix has no equivalent; OpenDKIM: a KeyTable entry's "
                          "domain.")
    selector: str = opt("", "Selector (s=): the key is published at "
                            "SELECTOR._domainkey.DOMAIN. Postfix has no equivalent; "
                            "OpenDKIM: a KeyTable entry's selector.")
    key_file: str = opt("", "PEM private key (elemtactl dkim keygen writes one). Postfix "
                            "has no equivalent; OpenDKIM: a KeyTable entry's key file.")
    algorithm: str = opt("rsa-sha256", "rsa-sha256 or ed25519-sha256. Postfix has no "
                                       "equivalent; OpenDKIM has one SignatureAlgorithm for "
                                       "all keys.", one_of(ALGORITHMS))


@dataclass(frozen=True)
class DKIMSettings(PluginCommon):
    """DKIM (RFC 6376): verify inbound signatures, sign outbound mail."""
    verify: bool = opt(True, "Verify the DKIM signatures of inbound mail. Postfix has no "
                             "equivalent; Postfix sites verify with OpenDKIM (Mode v).")
    sign: bool = opt(False, "Sign mail from authenticated, local and trusted clients. "
                            "Postfix has no equivalent; OpenDKIM: Mode s, for InternalHosts "
                            "and authenticated clients.")
    domain: str = opt("", "Signing domain of the one key written inline (or use keys). "
                          "Postfix has no equivalent; OpenDKIM: Domain.")
    selector: str = opt("", "Selector of the inline key. Postfix has no equivalent; "
                            "OpenDKIM: Selector.")
    key_file: str = opt("", "PEM private key file of the inline key. Postfix has no "
                            "equivalent; OpenDKIM: KeyFile.")
    algorithm: str = opt("rsa-sha256", "Algorithm of the inline key: rsa-sha256 or "
                                       "ed25519-sha256. Postfix has no equivalent; "
                                       "OpenDKIM: SignatureAlgorithm.", one_of(ALGORITHMS))
    keys: Tuple[DKIMKey, ...] = opt((), "More signing keys, for several domains or "
                                        "selectors. Postfix has no equivalent; OpenDKIM: "
                                        "KeyTable and SigningTable.")
    sign_headers: Tuple[str, ...] = opt((), "Header fields to sign (empty: the RFC 6376 "
                                            "5.4.1 list). Postfix has no equivalent; "
                                            "OpenDKIM: SignHeaders.")
    max_signatures: int = opt(MAX_SIGNATURES,
                              "Signatures verified per message at most, top first; the "
                              "others are reported dkim=neutral (not checked) and logged. "
                              "Postfix has no equivalent; OpenDKIM: "
                              "MaximumSignaturesToVerify (default 3).", positive)
    max_body_bytes: int = opt(MAX_BODY_BYTES,
                              "Longest body hashed, in bytes; the signatures of a longer "
                              "one are reported dkim=neutral (not checked) and logged. The "
                              "default is limits.message_size's, so every message accepted "
                              "by default is checked. Neither Postfix nor OpenDKIM has such "
                              "a limit (OpenDKIM's MaximumSignedBytes is for "
                              "signing).", positive)
    max_headers: int = opt(MAX_HEADERS,
                           "Most header fields a message, or the h= list of one signature, "
                           "may have to be checked; beyond it the signatures are reported "
                           "dkim=neutral (not checked) and logged. Postfix has no "
                           "equivalent; OpenDKIM: MaximumHeaders (65536 bytes of header).",
                           positive)

    def signing_keys(self):
        """[(key path prefix, DKIMKey)]: the inline key, if any, then keys[]."""
        keys = []
        if self.domain or self.selector or self.key_file:
            keys.append(("", DKIMKey(self.domain, self.selector, self.key_file,
                                     self.algorithm)))
        keys += [("keys[%d]." % i, k) for i, k in enumerate(self.keys)]
        return keys

    def validate(self, path):
        for prefix, key in self.signing_keys():
            for name in ("domain", "selector", "key_file"):
                if not getattr(key, name):
                    raise PluginConfigError("%s.%s%s: required for a signing key"
                                            % (path, prefix, name))
        if self.sign and not self.signing_keys():
            raise PluginConfigError("%s.key_file: sign is true but no key is configured "
                                    "(domain, selector, key_file, or keys)" % path)


@dataclass(frozen=True)
class DMARCSettings(PluginCommon):
    """DMARC (RFC 7489) from the SPF and DKIM results."""
    enforce: bool = opt(False, "Apply the sender domain's policy: p=reject gives 550 5.7.1, "
                               "p=quarantine puts the message on hold. Postfix has no "
                               "equivalent; OpenDMARC: RejectFailures.")
    reject_text: str = opt("Message rejected by the DMARC policy of %(domain)s",
                           "Text of the 550 reply; %(domain)s is the From domain. Postfix "
                           "has no equivalent.",
                           _reject_text)


@dataclass(frozen=True)
class ARCSettings(PluginCommon):
    """ARC (RFC 8617): verify inbound chains, seal mail Elemta forwards."""
    verify: bool = opt(True, "Verify ARC chains of inbound mail (arc=none/pass/fail). "
                             "Postfix has no equivalent; Postfix sites run OpenARC as a "
                             "milter.")
    seal: bool = opt(False, "Seal messages Elemta forwards. Postfix has no equivalent; "
                            "Postfix sites run OpenARC as a milter.")
    domain: str = opt("", "Sealing domain (needed when seal is true). Postfix has no "
                          "equivalent; OpenARC: Domain.")
    selector: str = opt("", "Sealing selector (needed when seal is true). Postfix has no "
                            "equivalent; OpenARC: Selector.")
    key_file: str = opt("", "PEM private key used to seal (needed when seal is true). "
                            "Postfix has no equivalent; OpenARC: KeyFile.")
    authserv_id: str = opt("", "The authserv-id sealed into ARC-Authentication-Results "
                               "(default: the host name); keep it the authres plugin's. "
                               "Postfix has no equivalent; OpenARC: AuthservID.")

    def validate(self, path):
        if self.seal:
            for name in ("domain", "selector", "key_file"):
                if not getattr(self, name):
                    raise PluginConfigError("%s.%s: required when seal is true" % (path, name))


@dataclass(frozen=True)
class AuthResSettings(PluginCommon):
    """The Authentication-Results header (RFC 8601)."""
    enabled: Optional[bool] = opt(None, "Write Authentication-Results; unset means: when "
                                        "spf, dkim, dmarc or arc is enabled. Postfix writes "
                                        "none itself; its milters (OpenDKIM, OpenDMARC) "
                                        "write their own.")
    authserv_id: str = opt("", "The authserv-id written (default: the host name). Postfix "
                               "has no equivalent; OpenDKIM: AuthservID.",
                           lambda value: _authserv_ids((value,)))
    remove_forged: bool = opt(True, "Remove inbound Authentication-Results that claim our "
                                    "authserv-id. Postfix has no equivalent; OpenDKIM: "
                                    "RemoveARFrom (default: this host's name).")
    also_remove: Tuple[str, ...] = opt((), "Other authserv-ids to remove (former names of "
                                           "this server). Postfix has no equivalent; "
                                           "OpenDKIM: RemoveARFrom.", _authserv_ids)


def authres_runs(authres, running):
    # type: (AuthResSettings, Sequence[str]) -> bool
    """Whether the Authentication-Results writer runs, given its table and the names of
    the other plugins that run: as its `enabled` says, or, unset, with any of
    AUTH_METHODS."""
    if authres.enabled is None:
        return any(name in running for name in AUTH_METHODS)
    return authres.enabled


@dataclass(frozen=True)
class GreylistSettings(PluginCommon):
    """Greylisting: 451 4.7.1 to a first attempt from an unknown triplet."""
    database: str = opt("/var/lib/elemta/greylist", "LMDB directory of the triplets. "
                                                    "Postfix has no equivalent (postgrey's "
                                                    "--dbdir).")
    delay: int = opt(300, "Seconds before a retry is accepted. Postfix has no equivalent "
                          "(postgrey's --delay, same default).", not_negative)
    retry_window: int = opt(172800, "Seconds a first attempt is remembered; not less than "
                                    "delay. Postfix has no equivalent (postgrey's "
                                    "--retry-window, same default).", not_negative)
    expiry: int = opt(3024000, "Seconds a triplet that passed is kept. Postfix has no "
                               "equivalent (postgrey's --max-age, same default: 35 "
                               "days).", not_negative)
    allow_networks: Tuple[str, ...] = opt((), "Client networks never greylisted. Postfix "
                                              "has no equivalent (postgrey's "
                                              "--whitelist-clients file).", networks)
    allow_domains: Tuple[str, ...] = opt((), "Sender domains never greylisted. Postfix has "
                                             "no equivalent (a check_sender_access OK "
                                             "before postgrey's "
                                             "check_policy_service).", domains)
    ipv4_prefix: int = opt(24, "IPv4 clients in one network of this prefix length (8 to 32) "
                               "count as one. Postfix has no equivalent (postgrey's "
                               "--ipv4cidr, same default).", between(8, 32))
    ipv6_prefix: int = opt(64, "IPv6 clients in one network of this prefix length (16 to "
                               "128) count as one. Postfix has no equivalent (postgrey's "
                               "--ipv6cidr, same default).", between(16, 128))
    map_size_mb: int = opt(64, "Largest size of the LMDB database, in megabytes. Postfix "
                               "has no equivalent.",
                           positive)

    def validate(self, path):
        if self.retry_window < self.delay:
            raise PluginConfigError("%s.retry_window: shorter than delay (%d s): nobody "
                                    "could ever pass" % (path, self.delay))


@dataclass(frozen=True)
class ConfiguredPlugin:
    """One plugin the config runs, as elemta.plugins.manager takes it: its name, its
    PluginCommon settings and its own Settings instance (None for a plugin that has
    none). A built-in's table is both: its Settings extend PluginCommon."""
    name: str
    common: PluginCommon
    settings: Any


@dataclass(frozen=True)
class RateLimitSettings(PluginCommon):
    """Client rate limits (Postfix's anvil): connections, messages and recipients per
    time unit, per client address, authenticated user and envelope sender."""
    time_unit: int = opt(60, "Seconds over which every rate below is counted: a window "
                             "starts at a client's first event. Postfix's "
                             "anvil_rate_time_unit.", positive)
    connection_rate_limit: int = opt(
        0, "Connections one client address (an IPv6 client: its /64) may make per time "
           "unit; more get 421 4.7.0 \"Error: too many connections from ADDRESS\" and "
           "are closed. 0: no limit. Postfix's smtpd_client_connection_rate_limit.",
        not_negative)
    message_rate_limit: int = opt(
        0, "MAIL FROM commands one client address may give per time unit, counted "
           "whether or not the message is then accepted; more get 450 4.7.1 \"Error: "
           "too much mail from ADDRESS\". 0: no limit. Postfix's "
           "smtpd_client_message_rate_limit.", not_negative)
    recipient_rate_limit: int = opt(
        0, "RCPT TO commands one client address may give per time unit, counted whether "
           "or not the recipient is then accepted; more get 450 4.7.1 \"Error: too many "
           "recipients from ADDRESS\". 0: no limit. Postfix's "
           "smtpd_client_recipient_rate_limit.", not_negative)
    user_message_rate_limit: int = opt(
        0, "MAIL FROM commands one AUTH login may give per time unit, from any address; "
           "more get 450 4.7.1 \"Error: too much mail from user LOGIN\". 0: no limit. "
           "Postfix has no parameter for it (a policy service such as postfwd does it).",
        not_negative)
    user_recipient_rate_limit: int = opt(
        0, "RCPT TO commands one AUTH login may give per time unit; more get 450 4.7.1 "
           "\"Error: too many recipients from user LOGIN\". 0: no limit. Postfix has no "
           "parameter for it.", not_negative)
    sender_message_rate_limit: int = opt(
        0, "MAIL FROM commands naming one envelope sender per time unit, from any "
           "client (the null sender of bounces is not counted); more get 450 4.7.1 "
           "\"Error: too much mail from sender ADDRESS\". 0: no limit. Postfix has no "
           "parameter for it.", not_negative)
    sender_recipient_rate_limit: int = opt(
        0, "RCPT TO commands for one envelope sender per time unit; more get 450 4.7.1 "
           "\"Error: too many recipients from sender ADDRESS\". 0: no limit. Postfix has "
           "no parameter for it.", not_negative)
    exempt_mynetworks: bool = opt(
        True, "Clients in relay.mynetworks are never limited nor counted. Postfix's "
              "smtpd_client_event_limit_exceptions defaults to $mynetworks.")
    exceptions: Tuple[str, ...] = opt(
        (), "More client networks never limited nor counted. Postfix's "
            "smtpd_client_event_limit_exceptions.", networks)
    database: str = opt("/var/lib/elemta/ratelimit", "LMDB directory of the counters, "
                                                     "shared by every smtpd worker. Postfix "
                                                     "has no equivalent (anvil(8) counts in "
                                                     "memory).")
    map_size_mb: int = opt(16, "Largest size of the LMDB database, in megabytes (1 MB "
                               "holds about 6,000 counts). Past 60% full, the ended "
                               "windows and then the least recently used counts are "
                               "forgotten, down to half: a flood of new addresses never "
                               "fills it into refusing everyone. Postfix's anvil keeps "
                               "its counts in memory, without a bound.", positive)
# ---- restrictions (issue #15): elemta.restrictions, each a built-in plugin ----------------

def _listener_names(values):
    for value in values:
        if not value or " " in value:
            return ("%r is not a listener: name it by its mode (smtp, submission, smtps) or "
                    "its address:port (127.0.0.1:25, [::1]:25)" % (value,))
# ---- content scanners (elemta.plugins.clamav, elemta.plugins.rspamd) ----------------------

_INET_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+))"
                           r":(?P<port>\d{1,5})$")
CLAMAV_ACTIONS = ("reject", "quarantine")
# clamav-milter's MaxFileSize default: larger messages pass unscanned.
CLAMAV_MAX_SIZE = 26214400
# Rspamd's own max_message default (50 MB): it refuses larger messages anyway.
RSPAMD_MAX_SIZE = 52428800


def parse_scanner_address(text):
    """Where a scanner daemon listens: a unix socket path ("/path" or "unix:/path") or a
    (host, port) pair from "host:port" or "[v6]:port". Raises ValueError saying what is
    wrong. (Here rather than in elemta.plugins.scanner so the config check needs no
    gevent.)"""
    if text.startswith("unix:"):
        text = text[len("unix:"):]
    if text.startswith("/"):
        return text
    match = _INET_ADDRESS.match(text)
    if match is None:
        raise ValueError("%r is neither a unix socket path (/path) nor host:port" % (text,))
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise ValueError("port %d of %r is not between 1 and 65535" % (port, text))
    return (match.group("v6") or match.group("host"), port)


def _scanner_address(text):
    try:
        parse_scanner_address(text)
    except ValueError as error:
        return str(error)
    return None


def _virus_text(value):
    try:
        value % {"virus": "Eicar-Test-Signature"}
    except (KeyError, ValueError, TypeError) as error:
        return "only %%(virus)s may be used (%s)" % (error,)
    if any(not " " <= c <= "~" for c in value):
        return "must be printable ASCII (it is an SMTP reply)"
    return None


def _reply_text(value):
    if any(not " " <= c <= "~" for c in value) or "%" in value:
        return "must be printable ASCII without %% (it is an SMTP reply)"
    return None


def _header_name(value):
    if value and not re.match(r"^[\x21-\x39\x3b-\x7e]+$", value):
        return "%r is not a header field name" % (value,)
    return None


def _settings_id(value):
    if any(not "!" <= c <= "~" for c in value):
        return "must be printable ASCII without spaces"
    return None


@dataclass(frozen=True)
class RestrictionSettings(PluginCommon):
    """Settings every restriction has (elemta.restrictions.scope)."""
    listeners: Tuple[str, ...] = opt(
        (), "Listeners the check applies to, each named by its mode (smtp, submission, "
            "smtps) or by its address:port as in listeners (127.0.0.1:25, [::1]:25); "
            "empty: every listener. Clients in relay.mynetworks and those that did AUTH "
            "are never checked. Postfix: a restriction list overridden with -o for one "
            "master.cf service.", _listener_names)


def _dnsxl_sites(values):
    for value in values:
        try:
            parse_site(value)
        except ValueError as error:
            return str(error)
    return None


_SITE_SYNTAX = ("Each entry is domain[=filter][*weight], as in Postfix's "
                "postscreen_dnsbl_sites: the filter limits which answers count "
                "(127.0.0.2, 127.0.0.[2..11], 127.0.[2..15].[0;1]) and the weight (default 1, "
                "negative for an allow list) is added to the score when the list answers.")


@dataclass(frozen=True)
class DNSBLSettings(RestrictionSettings):
    """DNS block and allow lists of client addresses (IPv4, and IPv6 as reversed nibbles),
    all asked in parallel at connect and weighed into one score, as postscreen does."""
    sites: Tuple[str, ...] = opt(
        (), "The lists, e.g. zen.example=127.0.0.[2..11]*3 or list.dnswl.example*-5. "
            + _SITE_SYNTAX + " Postfix: postscreen_dnsbl_sites.", _dnsxl_sites)
    threshold: int = opt(
        1, "A client whose score is this or more is refused at connect: 554 5.7.1 "
           "Service unavailable; client [ADDRESS] blocked using LIST (the listing "
           "list of greatest weight). Postfix: postscreen_dnsbl_threshold.", positive)
    allowlist_threshold: int = opt(
        0, "When negative, a client whose score is this or less is allowed at once: the "
           "later connection-stage checks are skipped. 0: never. Postfix: "
           "postscreen_dnsbl_allowlist_threshold (formerly ..._whitelist_threshold).",
        lambda value: None if value <= 0 else "must be 0 or negative, not %r" % (value,))
    lookup_timeout: float = opt(
        10.0, "Seconds to wait for all the lists together; a list that has not answered "
              "by then counts as not listing the client (and is logged), as does one "
              "that fails. Postfix: postscreen_dnsbl_timeout.", positive)
    min_ttl: int = opt(60, "Fewest seconds an answer is cached, whatever its DNS TTL. "
                           "Postfix: postscreen_dnsbl_min_ttl.", not_negative)
    max_ttl: int = opt(3600, "Most seconds an answer is cached, whatever its DNS TTL. "
                             "Postfix: postscreen_dnsbl_max_ttl.", not_negative)

    def validate(self, path):
        if self.max_ttl < self.min_ttl:
            raise PluginConfigError("%s.max_ttl: less than min_ttl (%d)"
                                    % (path, self.min_ttl))


@dataclass(frozen=True)
class RHSBLSettings(RestrictionSettings):
    """DNS block lists of domains (RHSBL): the sender's domain at MAIL FROM and the HELO
    name at HELO."""
    sender_sites: Tuple[str, ...] = opt(
        (), "Lists of sender domains, e.g. dbl.example=127.0.1.[2..99]. " + _SITE_SYNTAX
            + " A sender whose score reaches threshold is refused: 554 5.7.1 Service "
              "unavailable; Sender address [ADDRESS] blocked using LIST. Postfix: "
              "reject_rhsbl_sender.", _dnsxl_sites)
    helo_sites: Tuple[str, ...] = opt(
        (), "Lists of HELO names, same syntax; refused: 554 5.7.1 Service unavailable; "
            "Helo command [NAME] blocked using LIST. Postfix: reject_rhsbl_helo.",
        _dnsxl_sites)
    threshold: int = opt(1, "Score at which a domain is refused (a list's weight is 1 "
                            "unless it says *N, so by default any listing refuses, as "
                            "in Postfix).", positive)
    lookup_timeout: float = opt(10.0, "Seconds to wait for the lists; one that fails or "
                                      "does not answer in time counts as not listing. "
                                      "Postfix has no equivalent (smtpd's reject_rhsbl_* "
                                      "lookups wait as long as the resolver does).",
                                positive)
    min_ttl: int = opt(60, "Fewest seconds an answer is cached. Postfix has no equivalent "
                           "(postscreen_dnsbl_min_ttl is for client lists only).", not_negative)
    max_ttl: int = opt(3600, "Most seconds an answer is cached. Postfix has no equivalent "
                             "(postscreen_dnsbl_max_ttl is for client lists "
                             "only).", not_negative)

    def validate(self, path):
        if self.max_ttl < self.min_ttl:
            raise PluginConfigError("%s.max_ttl: less than min_ttl (%d)"
                                    % (path, self.min_ttl))


def _reply_code(first_digits):
    def check(value):
        if not 400 <= value <= 599 or str(value)[0] not in first_digits:
            return "must be a %s reply code, not %r" % (
                " or ".join(d + "xx" for d in first_digits), value)
        return None
    return check


@dataclass(frozen=True)
class HeloHostnameSettings(RestrictionSettings):
    """Checks of the HELO/EHLO name, answered at HELO."""
    reject_invalid: bool = opt(
        True, "Refuse a HELO name that is neither a valid host name nor an address "
              "literal: 501 5.5.2 <NAME>: Helo command rejected: Invalid name. Postfix: "
              "reject_invalid_helo_hostname.")
    reject_non_fqdn: bool = opt(
        True, "Refuse a HELO name that is not a fully qualified domain name (no dot, "
              "or an IP address without brackets): 504 5.5.2 <NAME>: Helo command "
              "rejected: need fully-qualified hostname. Postfix: "
              "reject_non_fqdn_helo_hostname.")


@dataclass(frozen=True)
class ClientHostnameSettings(RestrictionSettings):
    """Checks of the client's name found at connect (smtpd.peername_lookup), answered at
    RCPT, as Postfix's smtpd_delay_reject does."""
    reject_unknown_reverse: bool = opt(
        False, "Refuse a client address without a PTR name: 450 4.7.1 Client host "
               "rejected: cannot find your reverse hostname, [ADDRESS]. Postfix: "
               "reject_unknown_reverse_client_hostname.")
    reject_unknown: bool = opt(
        True, "Refuse a client whose PTR name does not resolve back to its address "
              "(forward-confirmed reverse DNS), or that has none: 450 4.7.25 Client host "
              "rejected: cannot find your hostname, [ADDRESS]. Postfix: "
              "reject_unknown_client_hostname.")
    reject_code: int = opt(
        450, "Reply code when the name is known not to exist or not to match; a DNS "
             "failure always gives 450. Postfix: unknown_client_reject_code.",
        _reply_code("45"))


@dataclass(frozen=True)
class NonFQDNSettings(RestrictionSettings):
    """Refusal of envelope addresses whose domain is not fully qualified."""
    reject_non_fqdn_sender: bool = opt(
        True, "At MAIL FROM: 504 5.5.2 <ADDRESS>: Sender address rejected: need "
              "fully-qualified address. The null sender passes. Postfix: "
              "reject_non_fqdn_sender.")
    reject_non_fqdn_recipient: bool = opt(
        True, "At RCPT TO: 504 5.5.2 <ADDRESS>: Recipient address rejected: need "
              "fully-qualified address. Postfix: reject_non_fqdn_recipient.")


@dataclass(frozen=True)
class SenderDomainSettings(RestrictionSettings):
    """Refusal, at MAIL FROM, of a sender domain that has no MX and no address record
    (Postfix: reject_unknown_sender_domain)."""
    reject_code: int = opt(
        450, "Reply code when the domain does not exist or has neither MX nor A/AAAA "
             "records: CODE 4.1.8 (5.1.8 with a 5xx code) <ADDRESS>: Sender address "
             "rejected: Domain not found. 450 lets a sender whose DNS is broken for a "
             "moment retry; 550 refuses at once. A DNS failure always gives 450 4.1.8; "
             "a null MX (RFC 7505) gives 550 5.7.27. Postfix: unknown_address_reject_code "
             "(default 450).", _reply_code("45"))


@dataclass(frozen=True)
class ClamAVSettings(PluginCommon):
    """ClamAV: each message is streamed to clamd (its INSTREAM command) once, at the
    data stage, whatever its number of recipients; an infected one is rejected with
    554 5.7.1 naming the signature, or held. A clamd that cannot be reached, times out
    or refuses the stream gives 451 4.3.0 (with fail_open: the message passes); the log
    says why. timeout 0 means 60 seconds (clamav-milter's ReadTimeout is 120). One log line per message: "QUEUEID: clamav: clean", "QUEUEID: clamav:
    infected NAME, rejected" or "QUEUEID: clamav: not scanned: ...". Metrics:
    elemta_scanner_verdicts_total{scanner="clamav",result,action},
    elemta_scanner_scan_seconds{scanner="clamav"},
    elemta_scanner_failures_total{scanner="clamav",kind}. Postfix runs clamav-milter
    (smtpd_milters) for this."""
    address: str = opt("/var/run/clamav/clamd.ctl",
                       "clamd's socket: a unix socket path (clamd.conf LocalSocket; "
                       "Debian's is the default) or host:port (TCPAddr, TCPSocket). Postfix "
                       "has no equivalent; clamav-milter: ClamdSocket.", _scanner_address)
    max_size: int = opt(CLAMAV_MAX_SIZE,
                        "Messages larger than this many bytes are not scanned and pass, "
                        "logged (Postfix has no equivalent; clamav-milter: MaxFileSize, 25 "
                        "MB). Keep it within clamd's StreamMaxLength: clamd refuses a "
                        "longer stream, which counts as a scanner failure.", positive)
    action: str = opt("reject", "What an infected message gets: reject (554 5.7.1) or "
                                "quarantine (accepted and put on hold, for elemtactl queue "
                                "release or delete). Postfix has no equivalent; "
                                "clamav-milter: OnInfected.",
                      one_of(CLAMAV_ACTIONS))
    reject_text: str = opt("Message rejected: virus found: %(virus)s",
                           "Text of the 554 reply; %(virus)s is the signature's name. "
                           "Postfix has no equivalent; clamav-milter: RejectMsg.", _virus_text)


@dataclass(frozen=True)
class RspamdSettings(PluginCommon):
    """Rspamd: each message is posted once, at the data stage, to Rspamd's normal
    worker (HTTP, /checkv2, as Exim and Haraka do) with its envelope, client address,
    HELO, client host name, authenticated user and queue id. Rspamd's action decides:
    reject gives 554 5.7.1 (Rspamd's SMTP message when it sends one), soft reject
    451 4.7.1, greylist 451 4.7.1 greylisted, rewrite subject the Subject Rspamd
    gives, add header the spam_header set to Yes, no action nothing. An Rspamd that
    cannot be reached, times out or answers nonsense gives 451 4.3.0 (with fail_open:
    the message passes); timeout 0 means 30 seconds (Rspamd's own task_timeout is 8). One log line per message: "QUEUEID: rspamd: action=reject
    score=15.00/15.00 ...". Metrics: elemta_scanner_verdicts_total{scanner="rspamd",
    result,action}, elemta_scanner_scan_seconds{scanner="rspamd"},
    elemta_scanner_failures_total{scanner="rspamd",kind}, elemta_rspamd_score. Postfix
    runs Rspamd's proxy worker as a milter for this."""
    address: str = opt("127.0.0.1:11333",
                       "Rspamd's normal worker: host:port or a unix socket path (Rspamd's "
                       "worker-normal.inc bind_socket; Exim: spamd_address ... "
                       "variant=rspamd). Postfix talks to Rspamd's proxy worker instead, as "
                       "a milter in smtpd_milters (port 11332).", _scanner_address)
    password: str = opt("", "Sent as the Password header when not empty (Rspamd asks for "
                            "one only on its controller; keep it empty for the normal "
                            "worker). Postfix has no equivalent.")
    outbound_settings_id: str = opt("", "Settings-ID sent with outbound mail (some "
                                        "recipient is not in a local domain), naming a "
                                        "block of Rspamd's settings module; empty: none. "
                                        "Postfix has no equivalent.",
                                    _settings_id)
    max_size: int = opt(RSPAMD_MAX_SIZE,
                        "Messages larger than this many bytes are not scanned and pass, "
                        "logged (Rspamd's max_message, 50 MB, refuses larger ones). Postfix "
                        "has no equivalent.",
                        positive)
    result_header: bool = opt(True, "Add X-Spamd-Result: Rspamd's score, its reject "
                                    "threshold and every symbol, as Rspamd's milter_headers "
                                    "x-spamd-result writes it. Inbound copies are removed. "
                                    "Postfix has no equivalent: through the milter, Rspamd "
                                    "adds it itself.")
    status_header: bool = opt(False, "Add X-Spam-Status: Yes or No, the score and the "
                                     "threshold (Rspamd's x-spam-status, SpamAssassin's "
                                     "layout). Inbound copies are removed. Postfix has no "
                                     "equivalent: through the milter, Rspamd adds it "
                                     "itself.")
    spam_header: str = opt("X-Spam", "Header field set to Yes on Rspamd's add header action "
                                     "(Rspamd's milter_headers: x-spam); empty: none. "
                                     "Postfix has no equivalent: through the milter, Rspamd "
                                     "adds it itself.", _header_name)
    milter_headers: bool = opt(True, "Apply the header edits Rspamd's milter_headers module "
                                     "puts in its answer (add and remove). Postfix applies "
                                     "them as the milter's header edits.")
    reject_text: str = opt("Spam message rejected",
                           "Text of the 554 reply when Rspamd gives no SMTP message of its "
                           "own. Postfix has no equivalent.", _reply_text)


# ---- policy_service (issue #15, elemta.restrictions.policy_service) ----------------------

# Where Postfix lets check_policy_service appear, by the protocol_state it sends: the
# recipient restrictions (RCPT), smtpd_data_restrictions (DATA) and
# smtpd_end_of_data_restrictions (END-OF-MESSAGE).
POLICY_STATES = ("RCPT", "DATA", "END-OF-MESSAGE")


def _policy_address(value):
    """inet:host:port, inet:[v6 address]:port or unix:/absolute/path."""
    kind, _, rest = value.partition(":")
    if kind == "unix":
        if not rest.startswith("/"):
            return "a unix socket needs an absolute path (unix:/run/policy), not %r" % (value,)
        return None
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and 0 < int(port) < 65536:
            return None
    return "must be inet:host:port or unix:/path, not %r" % (value,)


def _policy_states(values):
    if not values:
        return "must name at least one of %s" % ", ".join(POLICY_STATES)
    for value in values:
        if value not in POLICY_STATES:
            return "must be among %s, not %r" % (", ".join(POLICY_STATES), value)
    return None


def _policy_default_action(value):
    # Imported here: the parser is light, but it belongs to the restriction.
    from elemta.restrictions.policy_action import parse_action
    if parse_action(value).problem:
        return "not an access(5) action a policy server could answer: %r (%s)" % (
            value, parse_action(value).problem)
    return None


@dataclass(frozen=True)
class PolicyServerSettings:
    """One policy server (Postfix's check_policy_service with its per-server settings)."""
    address: str = opt("", "Where the server listens: inet:host:port or unix:/path "
                           "(Postfix: the check_policy_service endpoint).", _policy_address)
    protocol_states: Tuple[str, ...] = opt(
        ("RCPT",), "When it is asked: RCPT (each recipient, after the relay check), DATA "
                   "(the DATA command, before the 354 and any content: a refusal replaces "
                   "the 354) and END-OF-MESSAGE (once the content is in, its size known). "
                   "Postfix: check_policy_service in "
                   "smtpd_recipient_restrictions, smtpd_data_restrictions, "
                   "smtpd_end_of_data_restrictions.", _policy_states)
    timeout: float = opt(100.0, "Seconds to connect, send or receive (Postfix's "
                                "smtpd_policy_service_timeout).", positive)
    max_idle: float = opt(300.0, "Seconds an unused connection is kept open (Postfix's "
                                 "smtpd_policy_service_max_idle).", positive)
    max_ttl: float = opt(1000.0, "Seconds a connection is used at most, then reopened "
                                 "(Postfix's smtpd_policy_service_max_ttl).", positive)
    request_limit: int = opt(0, "Requests per connection, then it is reopened; 0: no limit "
                                "(Postfix's smtpd_policy_service_request_limit).",
                             not_negative)
    max_connections: int = opt(
        20, "Connections to this server one smtpd worker has open at most, in use and "
            "idle; a request finding them all busy waits for one, at most `timeout` "
            "seconds, then the default action is taken. Postfix has no parameter: each "
            "smtpd process keeps one connection, so its process limit (master.cf "
            "maxproc, default_process_limit) caps them.", positive)
    try_limit: int = opt(2, "Attempts to send one request before the default action "
                            "(Postfix's smtpd_policy_service_try_limit).", positive)
    retry_delay: float = opt(1.0, "Seconds between attempts (Postfix's "
                                  "smtpd_policy_service_retry_delay).", not_negative)
    default_action: str = opt("451 4.3.5 Server configuration problem",
                              "The action taken when the server cannot be asked or answers "
                              "nonsense, e.g. DUNNO to carry on without it (Postfix's "
                              "smtpd_policy_service_default_action).",
                              _policy_default_action)
    policy_context: str = opt("", "Sent as the policy_context attribute (Postfix's "
                                  "smtpd_policy_service_policy_context).")


@dataclass(frozen=True)
class PolicyServiceSettings(PluginCommon):
    """Policy delegation (check_policy_service): ask policy servers, act on their answer."""
    servers: Tuple[PolicyServerSettings, ...] = opt(
        (), "The policy servers, asked in this order; an OK from one skips the later ones. "
            "Postfix: each check_policy_service in its restriction lists, with the "
            "smtpd_policy_service_* settings.")

    def validate(self, path):
        if self.enabled and not self.servers:
            raise PluginConfigError("%s.servers: enabled but no policy server is listed"
                                    % path)
        for index, server in enumerate(self.servers):
            if not server.address:
                raise PluginConfigError("%s.servers[%d].address: required" % (path, index))
