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
    enabled: bool = opt(False, "Run this plugin.")
    timeout: float = opt(0.0, "Seconds one call may take before the plugin counts as "
                              "failed; 0 means the plugin's own default.", _plugin_timeout)
    fail_open: bool = opt(False, "When the plugin fails or times out, carry on as if it had "
                                 "no opinion instead of answering 451 4.3.0.")


@dataclass(frozen=True)
class SPFSettings(PluginCommon):
    """SPF (RFC 7208) on MAIL FROM and HELO; adds Received-SPF."""
    enforce: bool = opt(False, "Refuse an SPF fail with 550 5.7.23 and a temperror with "
                               "451 4.7.24 (otherwise only record the result).")
    check_helo: bool = opt(True, "Also check the HELO identity (RFC 7208 2.3).")
    received_spf: bool = opt(True, "Add a Received-SPF header to accepted mail.")


@dataclass(frozen=True)
class DKIMKey:
    """One DKIM signing key."""
    domain: str = opt("", "Signing domain (d=); mail from this domain is signed with the "
                          "key.")
    selector: str = opt("", "Selector (s=): the key is published at "
                            "SELECTOR._domainkey.DOMAIN.")
    key_file: str = opt("", "PEM private key (elemtactl dkim keygen writes one).")
    algorithm: str = opt("rsa-sha256", "rsa-sha256 or ed25519-sha256.", one_of(ALGORITHMS))


@dataclass(frozen=True)
class DKIMSettings(PluginCommon):
    """DKIM (RFC 6376): verify inbound signatures, sign outbound mail."""
    verify: bool = opt(True, "Verify the DKIM signatures of inbound mail.")
    sign: bool = opt(False, "Sign mail from authenticated, local and trusted clients.")
    domain: str = opt("", "Signing domain of the one key written inline (or use keys).")
    selector: str = opt("", "Selector of the inline key.")
    key_file: str = opt("", "PEM private key file of the inline key.")
    algorithm: str = opt("rsa-sha256", "Algorithm of the inline key: rsa-sha256 or "
                                       "ed25519-sha256.", one_of(ALGORITHMS))
    keys: Tuple[DKIMKey, ...] = opt((), "More signing keys, for several domains or "
                                        "selectors.")
    sign_headers: Tuple[str, ...] = opt((), "Header fields to sign (empty: the RFC 6376 "
                                            "5.4.1 list).")
    max_signatures: int = opt(MAX_SIGNATURES,
                              "Signatures verified per message at most, top first; the "
                              "others are reported dkim=neutral (not checked) and logged. "
                              "OpenDKIM: MaximumSignaturesToVerify (default 3).", positive)
    max_body_bytes: int = opt(MAX_BODY_BYTES,
                              "Longest body hashed, in bytes; the signatures of a "
                              "longer one are reported dkim=neutral (not checked) "
                              "and logged. The default is limits.message_size's, "
                              "so every message accepted by default is checked. "
                              "OpenDKIM has no such limit (its MaximumSignedBytes "
                              "is for signing).", positive)
    max_headers: int = opt(MAX_HEADERS,
                           "Most header fields a message, or the h= list of one "
                           "signature, may have to be checked; beyond it the "
                           "signatures are reported dkim=neutral (not checked) and "
                           "logged. OpenDKIM: MaximumHeaders (65536 bytes of header).",
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
                               "p=quarantine puts the message on hold.")
    reject_text: str = opt("Message rejected by the DMARC policy of %(domain)s",
                           "Text of the 550 reply; %(domain)s is the From domain.",
                           _reject_text)


@dataclass(frozen=True)
class ARCSettings(PluginCommon):
    """ARC (RFC 8617): verify inbound chains, seal mail Elemta forwards."""
    verify: bool = opt(True, "Verify ARC chains of inbound mail (arc=none/pass/fail).")
    seal: bool = opt(False, "Seal messages Elemta forwards.")
    domain: str = opt("", "Sealing domain (needed when seal is true).")
    selector: str = opt("", "Sealing selector (needed when seal is true).")
    key_file: str = opt("", "PEM private key used to seal (needed when seal is true).")
    authserv_id: str = opt("", "The authserv-id sealed into ARC-Authentication-Results "
                               "(default: the host name); keep it the authres plugin's.")

    def validate(self, path):
        if self.seal:
            for name in ("domain", "selector", "key_file"):
                if not getattr(self, name):
                    raise PluginConfigError("%s.%s: required when seal is true" % (path, name))


@dataclass(frozen=True)
class AuthResSettings(PluginCommon):
    """The Authentication-Results header (RFC 8601)."""
    enabled: Optional[bool] = opt(None, "Write Authentication-Results; unset means: when "
                                        "spf, dkim, dmarc or arc is enabled.")
    authserv_id: str = opt("", "The authserv-id written (default: the host name).",
                           lambda value: _authserv_ids((value,)))
    remove_forged: bool = opt(True, "Remove inbound Authentication-Results that claim our "
                                    "authserv-id.")
    also_remove: Tuple[str, ...] = opt((), "Other authserv-ids to remove (former names of "
                                           "this server).", _authserv_ids)


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
    database: str = opt("/var/lib/elemta/greylist", "LMDB directory of the triplets.")
    delay: int = opt(300, "Seconds before a retry is accepted.", not_negative)
    retry_window: int = opt(172800, "Seconds a first attempt is remembered; not less "
                                    "than delay.", not_negative)
    expiry: int = opt(3024000, "Seconds a triplet that passed is kept.", not_negative)
    allow_networks: Tuple[str, ...] = opt((), "Client networks never greylisted.", networks)
    allow_domains: Tuple[str, ...] = opt((), "Sender domains never greylisted.", domains)
    ipv4_prefix: int = opt(24, "IPv4 clients in one network of this prefix length (8 to "
                               "32) count as one.", between(8, 32))
    ipv6_prefix: int = opt(64, "IPv6 clients in one network of this prefix length (16 to "
                               "128) count as one.", between(16, 128))
    map_size_mb: int = opt(64, "Largest size of the LMDB database, in megabytes.",
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
                   "and END-OF-MESSAGE (both once the content is in: Elemta has no check at "
                   "the DATA command). Postfix: check_policy_service in "
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
        (), "The policy servers, asked in this order; an OK from one skips the later ones.")

    def validate(self, path):
        if self.enabled and not self.servers:
            raise PluginConfigError("%s.servers: enabled but no policy server is listed"
                                    % path)
        for index, server in enumerate(self.servers):
            if not server.address:
                raise PluginConfigError("%s.servers[%d].address: required" % (path, index))
