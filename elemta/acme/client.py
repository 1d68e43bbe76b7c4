"""One certificate order against an ACME server, with the certbot project's `acme`
library: account key, order, challenge answers, validation, finalization. The answers
are files in the state directory's challenges/: for HTTP-01 (acme.challenge http-01) the
key authorization, which the acme-http child serves; for TLS-ALPN-01 (RFC 8737) a
self-signed validation certificate per name, which the acme-tls child presents.

Owned by the acme child (elemta.acme.worker), which runs obtain() in a pool thread: the
library's HTTP client (requests) blocks. The `acme` library dropped its TLS-ALPN-01
classes (they needed pyOpenSSL), so the validation certificate is made here with
cryptography, and the challenge, which the library then parses as unrecognized, is
answered with the empty response RFC 8555 7.5.1 asks for.
See also: elemta.certs.store (where the results go), elemta.acme.http01,
elemta.acme.tlsalpn01, RFC 8555, RFC 8737.
"""

import datetime
import hashlib
import logging
import re

from elemta import __version__
from elemta.certs.store import read_file, write_file
from elemta.config.schema import ACME_HTTP01, ACME_TLSALPN01

log = logging.getLogger("elemta.acme")

ACCOUNT_KEY_BITS = 2048
CERTIFICATE_KEY_BITS = 2048    # RSA: every SMTP client of today can use it


class OrderFailed(Exception):
    """The certificate could not be obtained; the text says why (from the ACME server
    when it told us)."""


def obtain(settings, store, domains):
    """Order a certificate for domains (a list of names) from settings.directory_url;
    returns (key PEM, full chain PEM). Raises OrderFailed."""
    from acme import errors, messages
    try:
        return _obtain(settings, store, domains)
    except errors.ValidationError as exc:
        raise OrderFailed(_validation_failure(exc)) from None
    except errors.TimeoutError:
        raise OrderFailed("no answer from the ACME server within acme.timeout (%gs)"
                          % settings.timeout) from None
    except messages.Error as exc:
        raise OrderFailed("the ACME server refused: %s" % _problem(exc)) from None
    except errors.Error as exc:
        raise OrderFailed("ACME error: %s" % (exc,)) from None
    except OSError as exc:     # requests' ConnectionError, SSLError, Timeout are OSErrors
        raise OrderFailed("cannot reach the ACME server %s: %s"
                          % (settings.directory_url, exc)) from None


def _obtain(settings, store, domains):
    from acme import challenges, client, messages
    account_key = _account_key(store, settings.directory_url)
    net = client.ClientNetwork(account_key, user_agent="elemta/%s" % __version__,
                               verify_ssl=settings.ca_file or True,
                               timeout=int(min(settings.timeout, 45)))
    directory = client.ClientV2.get_directory(settings.directory_url, net)
    acme = client.ClientV2(directory, net)
    _register(acme, settings.email)

    key = _new_key()
    order = acme.new_order(_csr(key, domains))
    tokens, alpn_names = [], []
    try:
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue            # validated recently for this account
            name = authz.body.identifier.value
            offered = [c for c in authz.body.challenges
                       if _challenge_type(c.chall) == settings.challenge]
            if not offered:
                raise OrderFailed("%s: the ACME server offers no %s challenge (it offers "
                                  "%s; see acme.challenge)" % (
                                      name, settings.challenge, ", ".join(
                                          _challenge_type(c.chall)
                                          for c in authz.body.challenges)))
            challenge = offered[0]
            if settings.challenge == ACME_HTTP01:
                response, key_authorization = challenge.response_and_validation(
                    account_key)
                token = challenge.chall.encode("token")
                store.put_challenge(token, key_authorization)
                tokens.append(token)
                log.info("acme: answering HTTP-01 for %s (token %s)", name, token)
            else:
                key_authorization = _key_authorization(challenge.chall, account_key)
                store.put_alpn_certificate(name, validation_certificate(
                    name, key_authorization))
                alpn_names.append(name)
                # Posted as {}; a response without fields would be falsy, which
                # the library sends as a POST-as-GET that answers nothing.
                response = challenges.KeyAuthorizationChallengeResponse(
                    key_authorization=key_authorization)
                log.info("acme: answering TLS-ALPN-01 for %s", name)
            acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=settings.timeout)
        order = acme.poll_and_finalize(order, deadline)
    finally:
        for token in tokens:
            store.remove_challenge(token)
        for name in alpn_names:
            store.remove_alpn_certificate(name)
    if not order.fullchain_pem:
        raise OrderFailed("the ACME server finalized the order without a certificate")
    return _key_pem(key), order.fullchain_pem.encode("ascii")


# RFC 8737 3: the ALPN protocol of validation handshakes, and id-pe-acmeIdentifier, the
# critical extension whose value proves the key authorization.
ACME_TLS_ALPN = "acme-tls/1"
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


def _challenge_type(chall):
    """The challenge's type, also for one the library does not know (tls-alpn-01)."""
    jobj = getattr(chall, "jobj", None)
    return jobj.get("type", "") if isinstance(jobj, dict) else chall.typ


def _key_authorization(chall, account_key):
    """token.thumbprint (RFC 8555 8.1) of a challenge the library may not know."""
    import josepy
    from cryptography.hazmat.primitives import hashes
    jobj = getattr(chall, "jobj", None)
    token = jobj.get("token") if isinstance(jobj, dict) else chall.encode("token")
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise OrderFailed("the ACME server sent a malformed %s token: %r"
                          % (ACME_TLSALPN01, token))
    return token + "." + josepy.b64encode(
        account_key.thumbprint(hash_function=hashes.SHA256)).decode("ascii")


def validation_certificate(name, key_authorization):
    """The TLS-ALPN-01 validation certificate for name (RFC 8737 3): self-signed, name as
    its only subjectAltName, the SHA-256 of key_authorization in the critical
    acmeIdentifier extension; returned as PEM, certificate then key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]),
                           critical=False)
            # The extension's value is the DER OCTET STRING of the digest.
            .add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier(ACME_IDENTIFIER_OID), b"\x04\x20" + digest),
                critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM) + _key_pem(key)


def _register(acme, email):
    """Make sure the account of our key exists (RFC 8555 7.3: a key already registered
    gets its account back), and use it."""
    from acme import errors, messages
    registration = messages.NewRegistration.from_data(email=email,
                                                      terms_of_service_agreed=True)
    try:
        acme.new_account(registration)
    except errors.ConflictError as exc:
        acme.net.account = messages.RegistrationResource(uri=exc.location,
                                                         body=messages.Registration())


def _account_key(store, directory_url):
    """The account's key (a josepy JWK), made on first use."""
    import josepy
    from cryptography.hazmat.primitives import serialization
    path, _ = store.account_files(directory_url)
    data = read_file(path)
    if data is None:
        key = _new_key(ACCOUNT_KEY_BITS)
        write_file(path, _key_pem(key), 0o600)
        log.info("acme: new account key %s for %s", path, directory_url)
    else:
        key = serialization.load_pem_private_key(data, password=None)
    return josepy.JWKRSA(key=key)


def _new_key(bits=CERTIFICATE_KEY_BITS):
    from cryptography.hazmat.primitives.asymmetric import rsa
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _key_pem(key):
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _csr(key, domains):
    """A PEM certificate signing request for domains (the first also as the subject's
    common name, when it fits the 64 characters X.509 allows)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, domains[0])] \
        if len(domains[0]) <= 64 else []
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name(subject))
               .add_extension(x509.SubjectAlternativeName(
                   [x509.DNSName(name) for name in domains]), critical=False)
               .sign(key, hashes.SHA256()))
    return request.public_bytes(serialization.Encoding.PEM)


def _problem(error):
    """An RFC 7807 problem document as one line."""
    text = error.detail or error.description or str(error)
    return "%s (%s)" % (text, error.typ) if error.typ else text


def _validation_failure(exc):
    """Which names failed validation and what the ACME server said of each."""
    parts = []
    for authz in exc.failed_authzrs:
        errors = [_problem(c.error) for c in authz.body.challenges if c.error is not None]
        parts.append("%s: %s" % (authz.body.identifier.value,
                                 "; ".join(errors) or "validation failed"))
    return "challenge failed: " + "; ".join(parts)
