"""The result types of RFC 8460 (section 4.3) and the policy a TLS session was under.

Shared (elemta.tlsrpt): the SMTP client names a failed session's result type
(SessionError.tls_result), elemta.delivery.mtasts and elemta.delivery.dane name theirs,
elemta.delivery.smtp_transport counts them under a ReportedPolicy.
See also elemta.tlsrpt.store.
"""

import json
from dataclasses import dataclass
from typing import Tuple

# 4.3.1: negotiation failures.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
# 4.3.2.1: DANE.
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
# 4.3.2.2: MTA-STS.
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"
RESULT_TYPES = (STARTTLS_NOT_SUPPORTED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_EXPIRED,
                CERTIFICATE_NOT_TRUSTED, VALIDATION_FAILURE, TLSA_INVALID, DNSSEC_INVALID,
                DANE_REQUIRED, STS_POLICY_FETCH_ERROR, STS_POLICY_INVALID,
                STS_WEBPKI_INVALID)

# 4.4 policy-type.
STS = "sts"
TLSA = "tlsa"

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) by result.
_EXPIRED_CODES = {9, 10}                      # not yet valid, expired
_HOST_MISMATCH_CODES = {62}                   # hostname mismatch
# Self-signed, unknown issuer, chain incomplete: the rest are "not trusted" too.


def result_of_handshake(error):
    """The result type of a failed TLS handshake (an ssl exception)."""
    code = getattr(error, "verify_code", None)
    if code is None:
        return VALIDATION_FAILURE
    if code in _HOST_MISMATCH_CODES:
        return CERTIFICATE_HOST_MISMATCH
    if code in _EXPIRED_CODES:
        return CERTIFICATE_EXPIRED
    return CERTIFICATE_NOT_TRUSTED


@dataclass(frozen=True)
class ReportedPolicy:
    """What a session was held to (RFC 8460 4.4): an MTA-STS policy (kind sts, its
    domain the recipient domain, its lines, its mx patterns) or DANE (kind tlsa, its
    domain the MX host, its TLSA records as text)."""
    kind: str
    domain: str
    strings: Tuple[str, ...] = ()
    mx_hosts: Tuple[str, ...] = ()

    def as_json(self):
        """The report's "policy" object."""
        found = {"policy-type": self.kind, "policy-string": list(self.strings),
                 "policy-domain": self.domain}
        if self.mx_hosts:
            found["mx-host"] = list(self.mx_hosts)
        return found

    def key(self):
        return json.dumps(self.as_json(), sort_keys=True)

    @classmethod
    def from_json(cls, data):
        return cls(data["policy-type"], data["policy-domain"],
                   tuple(data.get("policy-string", ())), tuple(data.get("mx-host", ())))
