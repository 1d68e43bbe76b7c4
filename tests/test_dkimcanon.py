"""Elemta's linear relaxed body canonicalization gives dkimpy's output, byte for byte.

Covers elemta.plugins.dkimcanon.relaxed_body against dkimpy's Relaxed.canonicalize_body
(the quadratic one it replaces) over generated bodies and the RFC 6376 examples, and the
signing paths that use it (elemta.plugins.dkim.Signer, elemta.plugins.arc.seal) against
dkimpy's own dkim.sign / dkim.arc_sign. That it is fast is shown by
tests/security/test_cpu_exhaustion.py (a 26 MB message of long WSP runs is checked within
the plugin timeout); tests/bench/bench_dkim_canon.py has the numbers.
"""

import os
import random
import re

import dkim as dkimpy
import pytest
from dkim.canonicalization import Relaxed

from elemta.plugins.arc import seal
from elemta.plugins.dkim import Signer, SigningKey, generate_key
from elemta.plugins.dkimcanon import relaxed_body, relaxed_wsp

# Every byte class the canonicalization treats differently, and the pairs that meet at
# line ends: WSP before CR, CR LF, bare CR, bare LF, CR CR LF.
PIECES = [b"a", b"\xff", b" ", b"\t", b"  ", b" \t ", b"\r", b"\n", b"\r\n", b"\r\r\n",
          b"\x0b", b"\x00"]

EDGES = [
    b"", b"\r\n", b"\r\n\r\n", b"\r\n\r\n\r\n", b" ", b"\t", b" \r\n", b"\t\r\n \r\n",
    b"a", b"a ", b"a \t", b"a\r", b"a\n", b"a \n", b"a \r", b"a\r\n\r\n  ", b"  \r\n a",
    b"\n", b"\n\n", b"\r", b"\r\r", b"a\r\n \r\n\t\r\n", b"a \r \r\n", b"a\t\t\r\n\r\n",
    b"a" + b" " * 900 + b"a\r\n", b"a" + b" " * 900, b" " * 900 + b"\r\n",
    # RFC 6376 3.4.5: relaxed makes " C\r\nD E\r\n" of this body.
    b" C \r\nD \t E\r\n\r\n\r\n",
]


def generated(count, seed):
    rand = random.Random(seed)
    for _ in range(count):
        yield b"".join(rand.choice(PIECES) for _ in range(rand.randrange(0, 24)))


@pytest.mark.parametrize("body", EDGES)
def test_edge_cases_match_dkimpy(body):
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


def test_rfc6376_section_3_4_5_example():
    assert relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"


def test_generated_bodies_match_dkimpy():
    mismatches = [body for body in generated(50000, 6376)
                  if relaxed_body(body) != Relaxed.canonicalize_body(body)]
    assert mismatches == []


def test_bodies_as_dkimpy_parses_them_match():
    """dkimpy turns bare LF into CRLF while parsing (rfc822_parse), before it
    canonicalizes; what it hands us must come out the same too."""
    for body in generated(5000, 8463):
        parsed = dkimpy.DKIM(b"From: a@b.test\r\n\r\n" + body).body
        assert relaxed_body(parsed) == Relaxed.canonicalize_body(parsed), body


def test_rfc_example_bodies_match():
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dkim")
    for name in ("rfc6376-a2.eml", "rfc8463-a3.eml"):
        with open(os.path.join(data, name), "rb") as f:
            body = dkimpy.DKIM(f.read()).body
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), name


def test_dkimpy_keeps_what_signers_hand_it():
    # The signers hand dkimpy the body with its WSP canonical (dkim.precanonicalized);
    # dkimpy must come to the same canonical body from that as from the original.
    for body in list(generated(20000, 1035)) + EDGES:
        assert Relaxed.canonicalize_body(relaxed_wsp(body)) == relaxed_body(body), body


# ---- the signing paths ------------------------------------------------------------------

SIGNED_BODIES = [
    b"Hello.\r\n",
    b"",
    b"\r\n\r\n",
    b"a" + b" " * 900 + b"a\r\n" * 3 + b"tail \t without CRLF \t",
    b"bare\nLF \t\nlines  \n\n",
    b"tabs\t\tand  spaces  \r\n \r\n\t\r\n",
]


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory):
    return generate_key("signed.test", "s1", str(tmp_path_factory.mktemp("canon") / "s1.key"))


def message(body, extra=b""):
    return (extra + b"From: <a@signed.test>\r\nTo: <b@example.test>\r\nSubject: canon\r\n"
            b"Message-ID: <1@signed.test>\r\n\r\n" + body)


def tag(field, name):
    unfolded = re.sub(r"\s+", "", field)
    return re.search(r"(?:^|;)%s=([^;]*)" % name, unfolded).group(1)


@pytest.mark.parametrize("body", SIGNED_BODIES)
def test_our_signature_has_dkimpys_body_hash(rsa_key, body):
    raw = message(body)
    ours = Signer([SigningKey("signed.test", "s1", rsa_key.key_file)]).sign(
        raw, "signed.test")
    with open(rsa_key.key_file, "rb") as f:
        theirs = dkimpy.sign(raw, b"s1", b"signed.test", f.read(),
                             canonicalize=(b"relaxed", b"relaxed"),
                             include_headers=[b"from"]).decode("ascii")
    assert tag(ours[0][1], "bh") == tag(theirs.partition(":")[2], "bh")


@pytest.mark.parametrize("body", SIGNED_BODIES)
def test_our_arc_seal_is_dkimpys(rsa_key, body):
    raw = message(body, b"Authentication-Results: mx.signed.test; arc=none\r\n")
    with open(rsa_key.key_file, "rb") as f:
        key = f.read()
    ours = seal(raw, "s1", "signed.test", key, "mx.signed.test", timestamp=1700000000)
    theirs = dkimpy.arc_sign(raw, b"s1", b"signed.test", key, b"mx.signed.test",
                             timestamp=1700000000)
    assert len(ours) == 3
    fields = dict((name.lower(), value) for name, value in ours)
    for field in theirs:
        name, _, value = field.decode("ascii").partition(":")
        assert fields[name.lower()] == value.rstrip("\r\n"), name
