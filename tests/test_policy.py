"""The relay policy's decisions, without a server: which recipients are local, which
clients are trusted (mynetworks, IPv4-mapped IPv6), and what AUTH changes."""

from elemta.config.schema import Config, RelaySettings, SMTPDSettings
from elemta.smtpd.policy import RelayPolicy


def policy(**relay):
    return RelayPolicy(Config(relay=RelaySettings(**relay),
                              smtpd=SMTPDSettings(hostname="mx.example.test")))


def test_local_domains_in_any_spelling():
    p = policy(local_domains=("例子.test", "Example.TEST"))
    for address in ("u@例子.test", "u@XN--FSQU00A.test", "u@example.test.", "postmaster",
                    "root@MX.example.test"):
        assert p.is_local(address), address
    for address in ("u@example.test.evil", "u@[127.0.0.1]", "u@sub.example.test"):
        assert not p.is_local(address), address


def test_mynetworks_and_auth():
    p = policy(mynetworks=("192.0.2.0/24", "2001:db8::/32"))
    assert p.client_trusted("192.0.2.7") and p.client_trusted("::ffff:192.0.2.7")
    assert p.client_trusted("2001:db8::1")
    assert not p.client_trusted("198.51.100.1") and not p.client_trusted("not an ip")
    assert not p.may_send("198.51.100.1", None, "x@elsewhere.test")
    assert p.may_send("198.51.100.1", "alice", "x@elsewhere.test")
    assert p.may_send("198.51.100.1", None, "x@mx.example.test")
    assert p.may_send("192.0.2.9", None, "x@elsewhere.test")
