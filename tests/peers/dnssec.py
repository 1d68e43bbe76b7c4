"""Signing test zones for DNSSEC with ldns (ldnsutils): one key per zone, its DS the trust anchor.

Owned by the test suite: tests/peers/nsd.py signs the zones it is told to with sign_zone(),
and tests/peers/unbound.py, the validating resolver, trusts the DS records it returns. A zone
is signed with one ECDSA P-256 key (ldns-keygen -k: a KSK signing everything, RFC 6781's
combined signing key); its signatures start a day back (no clock skew makes them "not yet
valid") and run for 30 days. `bogus` names owners whose signatures are then spoiled, so a
validating resolver answers SERVFAIL for them while the rest of the zone stays secure.
See also: tests/test_dane.py.
"""

import datetime
import os
import re
import subprocess

LDNS_KEYGEN = "/usr/bin/ldns-keygen"
LDNS_SIGNZONE = "/usr/bin/ldns-signzone"


class SigningError(RuntimeError):
    """ldns could not make a key or sign a zone."""


def ldns_available():
    """Why zones cannot be signed here, or None when they can."""
    for tool in (LDNS_KEYGEN, LDNS_SIGNZONE):
        if not os.path.exists(tool):
            return "%s is not installed (apt-get install ldnsutils)" % tool
    return None


def sign_zone(workdir, zone, path, bogus=()):
    """Sign the zone file at path (written for zone) into path + ".signed"; return the
    zone's DS record (a line a trust-anchor-file takes). bogus: owner names, relative to
    the zone, whose RRSIGs are spoiled after signing."""
    zone = zone.rstrip(".")
    key = _run([LDNS_KEYGEN, "-a", "ECDSAP256SHA256", "-k", zone], workdir).strip()
    now = datetime.datetime.now(datetime.timezone.utc)
    inception = (now - datetime.timedelta(days=1)).strftime("%Y%m%d%H%M%S")
    expiration = (now + datetime.timedelta(days=30)).strftime("%Y%m%d%H%M%S")
    _run([LDNS_SIGNZONE, "-i", inception, "-e", expiration, "-o", zone, path,
          os.path.join(workdir, key)], workdir)
    signed = path + ".signed"
    if bogus:
        _spoil(signed, ["%s.%s." % (name, zone) for name in bogus])
    with open(os.path.join(workdir, key + ".ds")) as ds:
        return ds.read().strip()


def _spoil(signed, owners):
    """Change one character of each RRSIG of owners: the record stays well-formed, the
    signature no longer verifies."""
    owners = {owner.lower() for owner in owners}
    lines = []
    with open(signed) as zonefile:
        for line in zonefile:
            fields = line.split()
            if len(fields) > 4 and fields[0].lower() in owners and fields[3] == "RRSIG":
                signature = fields[-1]
                flipped = "B" if signature[0] != "B" else "C"
                line = re.sub(re.escape(signature) + r"\s*$", flipped + signature[1:] + "\n",
                              line)
            lines.append(line)
    with open(signed, "w") as zonefile:
        zonefile.writelines(lines)


def _run(command, workdir):
    done = subprocess.run(command, cwd=workdir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    if done.returncode != 0:
        raise SigningError("%s failed: %s" % (" ".join(command), done.stdout.strip()))
    return done.stdout
