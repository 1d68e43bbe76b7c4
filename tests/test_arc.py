"""ARC: a message forwarded through two Elemta hops, sealed by each, verified by the next.

Covers elemta.plugins.arc with keys served by a real NSD: cv=none on the first hop,
cv=pass after one and two seals, cv=fail after tampering or a forged seal, temperror when
DNS is dead (and then no seal), and the plugins (dkim + arc + authres at data, arc at
delivery) driven through the plugin manager as the smtpd and delivery workers will.
"""

import re
import socket
import tempfile

import pytest

from elemta.plugins.api import Context, Message, PluginConfigError
from elemta.plugins.arc import seal, verify_chain
from elemta.plugins.dkim import generate_key
from elemta.plugins.manager import PluginManager, apply_header_edits
from elemta.plugins.resolver import Resolver
from tests.peers.nsd import NSDInstance, nsd_available

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))
# dkimpy's ARC needs the authres package: install dkimpy[arc].
pytest.importorskip("authres", reason="authres is missing: ARC needs dkimpy[arc]")

ORIGINAL = (b"From: Alice <alice@origin.test>\r\n"
            b"To: list@lists.test\r\n"
            b"Subject: forwarded twice\r\n"
            b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
            b"Message-ID: <m1@origin.test>\r\n"
            b"\r\n"
            b"Hello through the list.\r\n")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("arc")
    return {"hop1": generate_key("hop1.test", "arc", str(d / "hop1.key")),
            "hop2": generate_key("hop2.test", "arc", str(d / "hop2.key"))}


@pytest.fixture(scope="module")
def nsd(keys):
    zones = {"hop1.test": keys["hop1"].zone_line + "\n",
             "hop2.test": keys["hop2"].zone_line + "\n"}
    with NSDInstance(tempfile.mkdtemp(prefix="elemta-nsd-arc-"), zones) as server:
        yield server
    server.remove()


@pytest.fixture
def resolver(nsd):
    return Resolver(nameservers=["127.0.0.1"], port=nsd.port, timeout=2.0)


class Hop:
    """One Elemta: receives (data stage) and forwards (delivery stage)."""

    def __init__(self, name, key):
        self.hostname = "mx.%s" % name
        self.manager = PluginManager.from_mapping({"arc": {"seal": True, "domain": name,
                                              "selector": "arc", "key_file": key.key_file},
                                      "authres": {}}).start()

    def receive(self, raw, resolver, client="192.0.2.10"):
        ctx = Context(client_address=client, hostname=self.hostname, resolver=resolver,
                      message=Message(raw))
        outcome = self.manager.run("data", ctx)
        return ctx, apply_header_edits(raw, outcome.headers, outcome.remove)

    def forward(self, raw, resolver):
        # Sealing is at the storage stage of mail that leaves (ctx.outbound).
        ctx = Context(hostname=self.hostname, resolver=resolver, message=Message(raw),
                      outbound=True)
        outcome = self.manager.run("storage", ctx)
        return apply_header_edits(raw, outcome.headers), outcome


def arc_result(ctx):
    return [(r.result, r.properties) for r in ctx.auth_results if r.method == "arc"]


def test_two_hops_seal_and_the_chain_passes(keys, resolver):
    hop1, hop2 = Hop("hop1.test", keys["hop1"]), Hop("hop2.test", keys["hop2"])
    ctx, received = hop1.receive(ORIGINAL, resolver)
    assert arc_result(ctx) == [("none", (("smtp.remote-ip", "192.0.2.10"),))]
    forwarded, _ = hop1.forward(received, resolver)
    assert [line.split(b":")[0] for line in forwarded.split(b"\r\n")[:1]] == [b"ARC-Seal"]
    seal1 = re.search(rb"ARC-Seal: ([^\r]*)", forwarded).group(1)
    assert b"i=1" in seal1 and b"cv=none" in seal1 and b"d=hop1.test" in seal1
    assert verify_chain(forwarded, resolver).cv == "pass"

    ctx, received2 = hop2.receive(forwarded, resolver, client="198.51.100.7")
    assert arc_result(ctx) == [("pass", (("smtp.remote-ip", "198.51.100.7"),))]
    forwarded2, _ = hop2.forward(received2, resolver)
    seals = re.findall(rb"ARC-Seal: ([^\r]*)", forwarded2)
    assert len(seals) == 2 and b"i=2" in seals[0] and b"cv=pass" in seals[0]
    checked = verify_chain(forwarded2, resolver)
    assert (checked.cv, checked.instances) == ("pass", 2)


def test_tampering_and_forgery_fail_the_chain(keys, resolver):
    hop1 = Hop("hop1.test", keys["hop1"])
    _, received = hop1.receive(ORIGINAL, resolver)
    forwarded, _ = hop1.forward(received, resolver)
    assert verify_chain(forwarded.replace(b"Hello", b"Jello"), resolver).cv == "fail"
    forged = forwarded.replace(b"d=hop1.test", b"d=hop2.test")
    assert verify_chain(forged, resolver).cv == "fail"
    garbage = b"ARC-Seal: i=1; a=rsa-sha256; cv=none; garbage\r\n" + ORIGINAL
    assert verify_chain(garbage, resolver).cv == "fail"
    assert verify_chain(ORIGINAL, resolver).cv == "none"


def test_dead_dns_is_temperror_and_nothing_is_sealed(keys, resolver, caplog):
    hop1 = Hop("hop1.test", keys["hop1"])
    _, received = hop1.receive(ORIGINAL, resolver)
    forwarded, _ = hop1.forward(received, resolver)
    caplog.set_level("INFO", logger="elemta")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.1", 0))
        slow = Resolver(["127.0.0.1"], port=dead.getsockname()[1], timeout=0.05, attempts=1)
        hop2 = Hop("hop2.test", keys["hop2"])
        ctx, received2 = hop2.receive(forwarded, slow)
        assert arc_result(ctx)[0][0] == "temperror"
        assert b"arc=temperror" in received2
        again, outcome = hop2.forward(received2, slow)
    assert outcome.headers == [] and again == received2
    assert "not ARC-sealed: the chain could not be checked on arrival" in caplog.text
    assert "Traceback" not in caplog.text


def test_mail_without_our_results_is_not_sealed(keys, resolver):
    fields = seal(ORIGINAL, "arc", "hop1.test", open(keys["hop1"].key_file, "rb").read(),
                  "mx.hop1.test")
    assert fields == []


def test_settings_are_checked(tmp_path):
    with pytest.raises(PluginConfigError) as error:
        PluginManager.from_mapping({"arc": {"seal": True, "domain": "a.test", "selector": "s"}})
    assert str(error.value) == "plugins.arc.key_file: required when seal is true"
    with pytest.raises(PluginConfigError) as error:
        PluginManager.from_mapping({"arc": {"seal": True, "domain": "a.test", "selector": "s",
                               "key_file": str(tmp_path / "none.key")}}).start(strict=True)
    assert str(error.value).startswith("plugins.arc.key_file: cannot read ")
