"""DKIM (RFC 6376, RFC 8463): verify every signature inbound, sign our users' mail, make keys.

Owned by the processes that take mail in - the smtpd worker and pickup - as the `dkim`
built-in (verification at the data stage, signing at the storage stage, on the content as
it will be spooled: elemta.plugins.content), and by `elemtactl dkim keygen`
(generate_key). dkimpy does the cryptography and canonicalization, except the relaxed
body canonicalization, quadratic in dkimpy, which is ours (elemta.plugins.dkimcanon:
linear, the same bytes) for verifying and signing; this module fetches the keys itself through the plugin resolver (elemta.plugins.resolver: gevent sockets, so
no blocking) and so can tell a DNS failure (temperror) from a bad or missing key
(permerror) from a signature that does not match (fail), which dkimpy's verify() folds
into one False.

    verify_message(raw, resolver)  -> [DKIMResult(result="pass", domain=..., ...), ...]
    Signer([SigningKey("example.com", "sel", "/etc/elemta/dkim/sel.key")]).sign(raw, "example.com")
        -> [("DKIM-Signature", "v=1; a=rsa-sha256; ...")]
    generate_key("example.com", "sel", "/etc/elemta/dkim/sel.key", "ed25519-sha256")
        -> GeneratedKey(key_file=..., dns_name="sel._domainkey.example.com", txt="v=DKIM1; ...")

The work is bounded and kept out of the event loop: at most max_signatures signatures are
verified, a body longer than max_body_bytes or more than max_headers header fields are not
hashed (such signatures are reported dkim=neutral, "not checked: why", and logged), the
body is hashed once per canonicalization however many signatures share it
(BodyHashCache), and verifying and signing run in a helper process (elemta.util.offload),
where the plugin timeout can stop them.

Signing happens for authenticated, mynetworks and locally submitted mail (sendmail,
through pickup), with every key configured for the From domain (or its nearest configured
parent): an RSA and an Ed25519 key for one domain give two signatures (RFC 8463 section 4
dual signing).

See also: elemta.plugins.dmarc (uses the d= of passing signatures), elemta.plugins.arc,
tests/test_dkim.py (OpenDKIM signs and verifies against us; RFC 6376 and 8463 examples).
"""

import base64
import email.utils
import errno
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import dkim as dkimpy
from dkim.canonicalization import (CanonicalizationPolicy, InvalidCanonicalizationPolicyError,
                                   Relaxed)
from dkim.crypto import HASH_ALGORITHMS, UnparsableKeyError, parse_pem_private_key

from elemta import metrics
from elemta.plugins.api import MethodResult, Plugin, PluginConfigError, Result
from elemta.plugins.dkimcanon import relaxed_body, relaxed_wsp
from elemta.plugins.resolver import TemporaryDNSError
from elemta.plugins.settings import (ALGORITHMS, MAX_BODY_BYTES, MAX_HEADERS,
                                     MAX_SIGNATURES, DKIMSettings)
from elemta.util import daemonfiles, offload

log = logging.getLogger("elemta.plugins.dkim")
# dkimpy logs its own view of each failure; ours (one line, with the verdict) is enough.
_quiet = logging.getLogger("elemta.plugins.dkim.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False

# RFC 8301 3.2: verifiers must not accept RSA keys shorter than 1024 bits.
MIN_RSA_BITS = 1024
# Bounds on the work one message may cause (MAX_*): plugins.dkim settings, whose
# defaults elemta.plugins.settings gives and explains.
# header.b: enough of b= to tell signatures apart (RFC 6008 says at least 8 characters).
HEADER_B_LENGTH = 12
OPENSSL = "openssl"


@dataclass(frozen=True)
class DKIMResult:
    result: str               # pass, fail, neutral, policy, temperror, permerror
    domain: str = ""          # d=
    selector: str = ""        # s=
    identity: str = ""        # i=
    algorithm: str = ""       # a=
    signature: str = ""       # the start of b=, for header.b
    reason: str = ""

    def method_result(self):
        props = []
        for name, value in (("header.d", self.domain), ("header.i", self.identity),
                            ("header.s", self.selector), ("header.a", self.algorithm),
                            ("header.b", self.signature)):
            if value:
                props.append((name, value))
        reason = self.reason if self.result != "pass" else ""
        return MethodResult("dkim", self.result, reason, tuple(props))


def verify_message(raw, resolver, minkey=MIN_RSA_BITS, max_signatures=MAX_SIGNATURES,
                   max_body_bytes=MAX_BODY_BYTES, max_headers=MAX_HEADERS):
    # type: (bytes, object, int, int, int, int) -> List[DKIMResult]
    """One DKIMResult per DKIM-Signature, top first; [] when there is none.

    CPU-bound (the body is canonicalized and hashed): the plugin runs it through
    elemta.util.offload, out of the event loop."""
    try:
        verifier = _Verifier(raw, logger=_quiet, minkey=minkey)
    except dkimpy.DKIMException as error:
        return [DKIMResult("permerror", reason="message does not parse: %s" % error)]
    signatures = [value for name, value in verifier.headers
                  if name.lower() == b"dkim-signature"]
    whole = None            # why no signature can be checked, if none can
    if len(verifier.headers) > max_headers:
        whole = "%d header fields, more than max_headers (%d)" % (len(verifier.headers),
                                                                   max_headers)
    elif len(verifier.body) > max_body_bytes:
        whole = "body of %d bytes, more than max_body_bytes (%d)" % (len(verifier.body),
                                                                     max_body_bytes)
    results = []
    for index, header_value in enumerate(signatures):
        if whole is not None:
            results.append(_not_checked(header_value, whole))
        elif index >= max_signatures:
            results.append(_not_checked(header_value, "more than max_signatures (%d) "
                                                      "signatures" % max_signatures))
        else:
            results.append(_verify_one(verifier, index, header_value, resolver,
                                       max_headers))
    return results


NOT_CHECKED = "not checked: "


def _not_checked(header_value, why):
    return DKIMResult("neutral", reason=NOT_CHECKED + why, **_known(header_value))


def _known(header_value):
    """What the signature says of itself, for the report, however broken it is."""
    tags = _loose_tags(header_value)
    return dict(domain=tags.get("d", ""), selector=tags.get("s", ""),
                identity=tags.get("i", ""), algorithm=tags.get("a", ""),
                signature=re.sub(r"\s+", "", tags.get("b", ""))[:HEADER_B_LENGTH])


def _verify_one(verifier, index, header_value, resolver, max_headers=MAX_HEADERS):
    known = _known(header_value)
    try:
        prepared = verifier.verify_headerprep(index)
    except dkimpy.DKIMException as error:
        return DKIMResult("permerror", reason="malformed signature: %s" % _text(error),
                          **known)
    if not prepared:
        return DKIMResult("permerror", reason="signature not found", **known)
    sig, include_headers, sig_headers = prepared
    if len(include_headers) > max_headers:
        return _not_checked(header_value, "h= names %d header fields, more than "
                                          "max_headers (%d)" % (len(include_headers),
                                                                max_headers))
    name = "%s._domainkey.%s" % (_text(sig[b"s"]), _text(sig[b"d"]))
    try:
        records = resolver.txt(name)
    except TemporaryDNSError as error:
        return DKIMResult("temperror", reason="key lookup failed: %s" % error.reason, **known)
    if not records:
        return DKIMResult("permerror", reason="no key published at %s" % name, **known)
    record = records[0]
    if re.search(rb"(^|;)\s*p\s*=\s*(;|$)", record):
        return DKIMResult("permerror", reason="key at %s is revoked" % name, **known)
    try:
        _, keysize, ktag, _ = dkimpy.evaluate_pk(name, record)
    except (dkimpy.DKIMException, ValueError, TypeError, IndexError) as error:
        return DKIMResult("permerror", reason="unusable key at %s: %s" % (name, _text(error)),
                          **known)
    if ktag is None:
        return DKIMResult("permerror", reason="key at %s is not for email" % name, **known)
    if ktag == b"rsa" and keysize < MIN_RSA_BITS:
        return DKIMResult("policy", reason="RSA key of %d bits is too short" % keysize,
                          **known)
    try:
        good = verifier.verify_sig(sig, include_headers, sig_headers[index],
                                   lambda _name, timeout=5: record)
    except dkimpy.ValidationError as error:
        return DKIMResult("fail", reason=_text(error), **known)
    except dkimpy.DKIMException as error:
        return DKIMResult("permerror", reason=_text(error), **known)
    if good and sig.get(b"a") == b"rsa-sha1":
        return DKIMResult("policy", reason="rsa-sha1 signatures are not accepted (RFC 8301)",
                          **known)
    if good:
        return DKIMResult("pass", **known)
    return DKIMResult("fail", reason="signature did not verify", **known)


class BodyHashCache:
    """Mixin for dkimpy's verifiers (DKIM, ARC): the body is canonicalized once per
    canonicalization and hashed once per (canonicalization, algorithm, l=), not once per
    signature as dkimpy does - ten signatures over 29 MB were ten passes of regular
    expressions over 29 MB. dkimpy then checks the header hash and b= as usual."""

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        if b"bh" in sig:
            self._check_body_hash(sig)
            sig = dict(sig)
            del sig[b"bh"]          # checked here: dkimpy skips its own pass over the body
        return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def _check_body_hash(self, sig):
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as error:
            raise dkimpy.MessageFormatError("invalid c= value: %s" % error.args[0])
        bodies = self.__dict__.setdefault("_canonical_bodies", {})
        hashes = self.__dict__.setdefault("_body_hashes", {})
        canonicalization = policy.body_algorithm
        key = (canonicalization, sig[b"a"], sig.get(b"l"))
        if key not in hashes:
            if canonicalization not in bodies:
                bodies[canonicalization] = canonical_body(canonicalization, self.body)
            body = bodies[canonicalization]
            if b"l" in sig:
                body = body[:int(sig[b"l"])]
            hashes[key] = HASH_ALGORITHMS[sig[b"a"]](body).digest()
        try:
            expected = base64.b64decode(re.sub(br"\s+", b"", sig[b"bh"]))
        except (TypeError, ValueError) as error:
            raise dkimpy.MessageFormatError(str(error))
        if hashes[key] != expected:
            raise dkimpy.ValidationError("body hash mismatch (got %s, expected %s)" % (
                base64.b64encode(hashes[key]).decode("ascii"), _text(sig[b"bh"])))


def canonical_body(canonicalization, body):
    """dkimpy's canonicalization of the body; relaxed in linear time (dkimcanon)."""
    if canonicalization is Relaxed:
        return relaxed_body(body)
    return canonicalization.canonicalize_body(body)     # simple: linear already


def precanonicalized(domain_signer):
    """A dkimpy DKIM or ARC about to sign with relaxed body canonicalization, its body's
    WSP already canonical (dkimcanon.relaxed_wsp, linear): dkimpy's own pass then
    changes nothing but the end, and over single SPs its regular expression is linear."""
    domain_signer.body = relaxed_wsp(domain_signer.body)
    return domain_signer


class _Verifier(BodyHashCache, dkimpy.DKIM):
    pass


def _loose_tags(value):
    """tag=value pairs of a signature, tolerant of junk (for reporting only)."""
    tags = {}
    for part in _text(value).split(";"):
        key, sep, val = part.partition("=")
        if sep:
            tags.setdefault(key.strip(), re.sub(r"\s+", "", val) if key.strip() == "b"
                            else val.strip())
    return tags


def _text(value):
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


# ---- signing -------------------------------------------------------------------------

@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    key_file: str
    algorithm: str = "rsa-sha256"


class KeyFileError(ValueError):
    """A private key file cannot be used; str() says why."""


def load_private_key(path, algorithm):
    # type: (str, str) -> bytes
    """The key in the form dkimpy signs with: PEM for RSA, the base64 seed for Ed25519."""
    try:
        with open(path, "rb") as key_file:
            data = key_file.read(1 << 16)
    except OSError as error:
        raise KeyFileError("cannot read %s: %s" % (path, error.strerror or error))
    if algorithm == "rsa-sha256":
        try:
            key = parse_pem_private_key(data)
        except (UnparsableKeyError, ValueError, TypeError, IndexError) as error:
            raise KeyFileError("%s is not an RSA private key in PEM form (%s)"
                               % (path, str(error).splitlines()[0] if str(error) else "?"))
        bits = key["modulus"].bit_length()
        if bits < MIN_RSA_BITS:
            raise KeyFileError("%s: RSA key of %d bits is too short (RFC 8301: 1024 at "
                               "least, 2048 recommended)" % (path, bits))
        return data
    if algorithm == "ed25519-sha256":
        return _ed25519_seed(path, data)
    raise KeyFileError("unknown algorithm %r (use %s)" % (algorithm, " or ".join(ALGORITHMS)))


# PKCS#8 wrapping of an Ed25519 private key (RFC 8410): this prefix, then the 32-byte seed.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")


def _ed25519_seed(path, data):
    text = data.strip()
    if b"-----BEGIN PRIVATE KEY-----" in text:
        body = b"".join(line for line in text.splitlines() if not line.startswith(b"-----"))
        try:
            der = base64.b64decode(body, validate=True)
        except ValueError:
            der = b""
        if len(der) != 48 or not der.startswith(_ED25519_PKCS8_PREFIX):
            raise KeyFileError("%s is not an Ed25519 private key" % path)
        return base64.b64encode(der[16:])
    try:
        seed = base64.b64decode(text, validate=True)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise KeyFileError("%s is not an Ed25519 private key (expected the base64 seed "
                           "that `elemtactl dkim keygen` writes, or PKCS#8 PEM)" % path)
    return base64.b64encode(seed)


class Signer:
    """Signs messages with the configured keys; keys are read once, at construction."""

    def __init__(self, keys, sign_headers=()):
        # type: (Sequence[SigningKey], Sequence[str]) -> None
        self.keys = []  # type: List[Tuple[SigningKey, bytes]]
        for spec in keys:
            self.keys.append((spec, load_private_key(spec.key_file, spec.algorithm)))
        self.sign_headers = tuple(h.lower().encode("ascii") for h in sign_headers)

    def keys_for(self, domain):
        """The keys of `domain`, or of its nearest parent that has keys."""
        domain = domain.lower().rstrip(".")
        while domain:
            found = [k for k in self.keys if k[0].domain.lower().rstrip(".") == domain]
            if found:
                return found
            domain = domain.partition(".")[2]
        return []

    def sign(self, raw, domain):
        # type: (bytes, str) -> List[Tuple[str, str]]
        """(name, value) DKIM-Signature fields for the message, one per matching key."""
        fields = []
        for spec, key in self.keys_for(domain):
            signer = precanonicalized(dkimpy.DKIM(
                raw, logger=_quiet, signature_algorithm=spec.algorithm.encode("ascii")))
            include = list(self.sign_headers) or None
            if include is not None and b"from" not in include:
                include.insert(0, b"from")
            header = signer.sign(spec.selector.encode("ascii"), spec.domain.encode("ascii"),
                                 key, canonicalize=(b"relaxed", b"relaxed"),
                                 include_headers=include)
            name, _, value = header.decode("ascii").partition(":")
            fields.append((name, value.rstrip("\r\n")))
        return fields


def from_domain(message):
    """The domain of the one RFC5322.From address, or "" when there is not exactly one."""
    values = message.get_all("From")
    if len(values) != 1:
        return ""
    addresses = [a for _, a in email.utils.getaddresses([values[0]]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return ""
    return addresses[0].rpartition("@")[2].strip().rstrip(">").lower()


# ---- key generation --------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratedKey:
    key_file: str
    dns_name: str          # selector._domainkey.domain
    txt: str               # the record's text, e.g. "v=DKIM1; k=rsa; p=MIIB..."

    @property
    def zone_line(self):
        """The record as a zone-file line, split into strings of at most 255 octets."""
        chunks = [self.txt[i:i + 255] for i in range(0, len(self.txt), 255)]
        return '%s. IN TXT ( %s )' % (self.dns_name, " ".join('"%s"' % c for c in chunks))


def generate_key(domain, selector, key_file, algorithm="rsa-sha256", bits=2048, reader=None):
    # type: (str, str, str, str, int, Optional[Tuple[int, int]]) -> GeneratedKey
    """Write a new private key to key_file (never over an existing file) and return the
    TXT record to publish at selector._domainkey.domain. The key is 0600, or, when
    reader (the workers' uid, gid) could not read that, root:reader's group 0640
    (elemta.util.daemonfiles); PermissionError if it cannot be made readable by them."""
    if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                    r"[A-Za-z0-9])?)*$", selector):
        raise ValueError("selector %r is not a valid DNS name" % selector)
    if algorithm not in ALGORITHMS:
        raise ValueError("algorithm must be one of %s" % ", ".join(ALGORITHMS))
    if algorithm == "rsa-sha256" and not 1024 <= bits <= 8192:
        raise ValueError("RSA key size must be between 1024 and 8192 bits")
    directory = os.path.dirname(os.path.abspath(key_file))
    fd, temporary = tempfile.mkstemp(prefix=".keygen-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        if not daemonfiles.let_read(fd, reader):
            raise PermissionError(errno.EACCES, "the workers (%s) could not read it: run "
                                  "as root" % daemonfiles.describe(reader))
        if algorithm == "rsa-sha256":
            os.close(fd)
            fd = None
            _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:%d" % bits,
                     "-out", temporary)
            public = base64.b64encode(_openssl("pkey", "-in", temporary, "-pubout",
                                               "-outform", "DER")).decode("ascii")
            txt = "v=DKIM1; k=rsa; p=%s" % public
        else:
            import nacl.encoding
            import nacl.signing
            key = nacl.signing.SigningKey.generate()
            os.write(fd, key.encode(nacl.encoding.Base64Encoder) + b"\n")
            os.close(fd)
            fd = None
            public = key.verify_key.encode(nacl.encoding.Base64Encoder).decode("ascii")
            txt = "v=DKIM1; k=ed25519; p=%s" % public
        os.link(temporary, key_file)   # fails if key_file exists: never replace a key
    finally:
        if fd is not None:
            os.close(fd)
        os.unlink(temporary)
    return GeneratedKey(os.path.abspath(key_file),
                        "%s._domainkey.%s" % (selector, domain.lower().rstrip(".")), txt)


def _openssl(*args):
    done = subprocess.run((OPENSSL,) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise OSError("openssl %s failed: %s" % (args[0], done.stderr.decode(
            "utf-8", "replace").strip()))
    return done.stdout


# ---- the plugin ------------------------------------------------------------------------

class DKIMPlugin(Plugin):
    name = "dkim"
    Settings = DKIMSettings
    order = 20

    def init(self, settings):
        self.settings = settings = settings or DKIMSettings()
        self.signer = None
        if settings.sign:
            specs = []
            for prefix, key in settings.signing_keys():
                try:
                    load_private_key(key.key_file, key.algorithm)
                except KeyFileError as error:
                    raise PluginConfigError("plugins.%s.%skey_file: %s"
                                            % (self.name, prefix, error)) from None
                specs.append(SigningKey(key.domain, key.selector, key.key_file, key.algorithm))
            self.signer = Signer(specs, settings.sign_headers)

    def on_data(self, ctx):
        """Verify every signature of inbound mail (our users' mail is signed instead; a
        node's hand-over was verified where it arrived)."""
        message = ctx.message
        if message is None or ctx.checked_elsewhere:
            return None
        if not self.settings.verify or ctx.resolver is None:
            return None
        settings = self.settings
        # In a helper process: hashing a large body must not stall the other sessions.
        results = offload.call(verify_message, message.raw, ctx.resolver, MIN_RSA_BITS,
                               settings.max_signatures, settings.max_body_bytes,
                               settings.max_headers)
        ctx.state["dkim"] = results
        if not results:
            ctx.auth_results.append(MethodResult("dkim", "none"))
            metrics.count_email_authentication("dkim", "none")
        unchecked = {}
        for checked in results:
            ctx.auth_results.append(checked.method_result())
            metrics.count_email_authentication("dkim", checked.result)
            if checked.result in ("temperror", "permerror", "policy"):
                log.info("%s: DKIM %s for d=%s s=%s from [%s]: %s", ctx.queue_id or "NOQUEUE",
                         checked.result, checked.domain or "?", checked.selector or "?",
                         ctx.client_address, checked.reason)
            elif checked.reason.startswith(NOT_CHECKED):
                why = checked.reason[len(NOT_CHECKED):]
                unchecked[why] = unchecked.get(why, 0) + 1
        for why, count in unchecked.items():    # one line per cause, however many
            log.warning("%s: DKIM: %d of %d signatures from [%s] not checked: %s "
                        "(plugins.dkim limits)", ctx.queue_id or "NOQUEUE", count,
                        len(results), ctx.client_address or "local", why)
        return None

    def close(self):
        offload.shutdown()

    def on_storage(self, ctx):
        """Sign our users' mail: the content is final here (after the data stage's edits).
        Not a node's hand-over (authenticated_or_local is false for it): the origin
        node signed what it had to."""
        if self.signer is None or ctx.message is None or not ctx.authenticated_or_local:
            return None
        return self._sign(ctx, ctx.message)

    def _sign(self, ctx, message):
        domain = from_domain(message) or (ctx.sender or "").rpartition("@")[2]
        if not domain:
            return None
        try:
            fields = offload.call(self.signer.sign, message.raw, domain)
        except dkimpy.DKIMException as error:
            log.warning("%s: not DKIM-signed for %s: %s", ctx.queue_id or "NOQUEUE", domain,
                        _text(error))
            return None
        return Result.proceed(headers=fields)
