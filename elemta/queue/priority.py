"""Priority rules: the priority a message gets as it enters the queue (queue.priority_rules).

Applied by the Queue facade (elemta.queue.queue.Queue.start_message), the one code path
that creates a queued message, so the smtpd, pickup (sendmail) and the messages Elemta
makes itself (bounces, forwarded copies) all follow the same rules. The first rule whose
keys all match sets the priority; with none, the message keeps the one it has (0).
Domains are compared in elemta.addressing's normal form, as every domain-keyed table is
("example.org" that domain, ".example.org" every subdomain); sender addresses without
case, as Postfix's access tables look them up.
See also: elemta.config.schema.PriorityRule, elemta.queue.model (the priority range).
"""

from typing import Optional, Sequence

from elemta.addressing.normal import canonical, normal_domain, split_address
from elemta.addressing.resolve import domain_entry
from elemta.config.schema import SENDMAIL_LISTENER, parse_listener_name

NULL_SENDER = "<>"


def listener_name(listener) -> str:
    """The name a priority rule gives a listener (elemta.config.schema.Listener):
    "address:port", "[address]:port" for IPv6."""
    address = listener.address
    return ("[%s]:%d" if ":" in address else "%s:%d") % (address, listener.port)


def _domain(address: str) -> str:
    return normal_domain(split_address(address)[1])


def _sender_key(address: str) -> str:
    return canonical(address).lower()


class _PriorityRule:
    """One rule, its keys in the form they are compared in (None: not a condition)."""

    def __init__(self, rule):
        self.priority = rule.priority
        self.sender = None if rule.sender is None else (
            "" if rule.sender == NULL_SENDER else _sender_key(rule.sender))
        self.sender_domain = (None if rule.sender_domain is None
                              else {normal_domain(rule.sender_domain): True})
        self.recipient_domain = (None if rule.recipient_domain is None
                                 else {normal_domain(rule.recipient_domain): True})
        self.sasl_username = rule.sasl_username
        self.listener = None if rule.listener is None else (
            rule.listener if rule.listener == SENDMAIL_LISTENER
            else parse_listener_name(rule.listener))

    def matches(self, envelope, listener) -> bool:
        if self.sender is not None and _sender_key(envelope.sender) != self.sender:
            return False
        if self.sender_domain is not None and not (
                envelope.sender and domain_entry(self.sender_domain,
                                                 _domain(envelope.sender))):
            return False
        if self.recipient_domain is not None and not any(
                domain_entry(self.recipient_domain, _domain(r.address))
                for r in envelope.recipients):
            return False
        if self.sasl_username is not None and envelope.auth_user != self.sasl_username:
            return False
        return self.listener is None or self.listener == listener


class PriorityRules:
    """The configured rules, ready to match envelopes."""

    def __init__(self, rules: Sequence = ()):
        self._rules = [_PriorityRule(rule) for rule in rules]

    def priority_for(self, envelope, listener=None) -> Optional[int]:
        """The priority of the first rule matching envelope, or None. listener: the
        config Listener the message came in on, SENDMAIL_LISTENER for the sendmail
        command, None for messages Elemta makes itself."""
        if not self._rules:
            return None
        if listener is not None and listener != SENDMAIL_LISTENER:
            listener = parse_listener_name(listener_name(listener))
        for rule in self._rules:
            if rule.matches(envelope, listener):
                return rule.priority
        return None
