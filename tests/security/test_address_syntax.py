"""Attack class: malformed envelope addresses that must be refused at MAIL and RCPT.

A domain with an empty label (`a@b..`, `a@b..c`) or a leading dot (`a@.b`) was taken
for `a@b` once its trailing dots were stripped; it is now refused with 501 and the
reason. One trailing dot (the DNS root, `a@b.`) is still accepted, as Postfix accepts
it. The local part follows RFC 5321's dot-string the same way.
"""

import smtplib

import pytest

MALFORMED = {
    "a@b..": "bad domain name 'b..': it has an empty label (two dots in a row)",
    "a@b...": "bad domain name 'b...': it has an empty label (two dots in a row)",
    "a@b..c": "bad domain name 'b..c': it has an empty label (two dots in a row)",
    "a@.b": "bad domain name '.b': it starts with a dot",
    "a@.": "bad domain name '.': it starts with a dot",
    "a@..": "bad domain name '..': it starts with a dot",
    "a@": "missing domain",
    "a..b@example.test": "bad local part",
    ".a@example.test": "bad local part",
    "a.@example.test": "bad local part",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.harness import ElemtaServer
    server = ElemtaServer(tmp_path_factory.mktemp("address_syntax"), {}).start()
    yield server
    assert not server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("address", sorted(MALFORMED))
def test_malformed_address_is_refused_at_mail_and_rcpt_with_the_reason(server, address):
    reason = MALFORMED[address]
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        assert smtp.docmd("MAIL FROM:<%s>" % address) == (
            501, ("5.1.7 Bad sender address syntax: %s" % reason).encode())
        assert smtp.docmd("MAIL FROM:<a@c.test>")[0] == 250
        assert smtp.docmd("RCPT TO:<%s>" % address) == (
            501, ("5.1.3 Bad recipient address syntax: %s" % reason).encode())


def test_one_trailing_dot_is_the_root_and_accepted(server):
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.sendmail("a@c.test.", ["b@example.test."], b"Subject: x\r\n\r\nhi\r\n")
