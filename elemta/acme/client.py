"""One certificate order against an ACME server, with the certbot project's `acme`
library: account key, order, HTTP-01 answers (files in the state directory's challenges/
for the acme-http child to serve), validation, finalization.

Owned by the acme child (elemta.acme.worker), which runs obtain() in a pool thread: the
library's HTTP client (requests) blocks. TLS-ALPN-01 is not implemented yet: the server
must be able to reach acme.http_port (80) of every name.
See also: elemta.certs.store (where the results go), RFC 8555.
"""

import datetime
import logging

from elemta import __version__
from elemta.certs.store import read_file, write_file

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
    tokens = []
    try:
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue            # validated recently for this account
            name = authz.body.identifier.value
            offered = [c for c in authz.body.challenges
                       if isinstance(c.chall, challenges.HTTP01)]
            if not offered:
                raise OrderFailed("%s: the ACME server offers no HTTP-01 challenge (it "
                                  "offers %s)" % (name, ", ".join(
                                      c.chall.typ for c in authz.body.challenges)))
            challenge = offered[0]
            response, key_authorization = challenge.response_and_validation(account_key)
            token = challenge.chall.encode("token")
            store.put_challenge(token, key_authorization)
            tokens.append(token)
            log.info("acme: answering HTTP-01 for %s (token %s)", name, token)
            acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=settings.timeout)
        order = acme.poll_and_finalize(order, deadline)
    finally:
        for token in tokens:
            store.remove_challenge(token)
    if not order.fullchain_pem:
        raise OrderFailed("the ACME server finalized the order without a certificate")
    return _key_pem(key), order.fullchain_pem.encode("ascii")


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
