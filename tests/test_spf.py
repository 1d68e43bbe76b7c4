"""SPF: the RFC 7208 test suite through Elemta's checker, records served by a real NSD.

Covers elemta.plugins.spf. tests/data/spf/rfc7208-tests.yml is the openspf.org suite
(release 2014.04) as pyspf 2.0.14 ships it; its licence is beside it. Each scenario's zone
data becomes zone files for a private NSD; the suite's TIMEOUT entries are served by a
nameserver that never answers, so those lookups really time out. Then the plugin: enforce
refuses fail with 550 5.7.23 and temperror with 451 4.7.24, Received-SPF is added, our own
users are not checked, and a dead DNS never raises.
"""

import os
import re
import socket
import tempfile
import time

import pytest
from ruamel.yaml import YAML

from elemta.plugins.api import Context, Message
from elemta.plugins.manager import PluginManager
from elemta.plugins.resolver import Answer, Resolver
from elemta.plugins.spf import check_spf
from tests.peers.nsd import NSDInstance, nsd_available

SUITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spf",
                     "rfc7208-tests.yml")

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))


def load_suite():
    with open(SUITE, "rb") as f:
        return list(YAML(typ="safe").load_all(f))


SCENARIOS = load_suite()
CASES = [(index, name) for index, scenario in enumerate(SCENARIOS)
         for name in sorted(scenario["tests"])]


def owner(name):
    """A zone-file owner name: anything unusual (spaces, ':') as \\DDD escapes."""
    return "".join(ch if re.match(r"[A-Za-z0-9*_.-]", ch) else "\\%03d" % ord(ch)
                   for ch in name.rstrip(".")) + "."


def character_strings(value):
    """TXT rdata: the suite's text as UTF-8 bytes, in strings of at most 255 octets."""
    pieces = [value] if isinstance(value, str) else list(value)
    out = []
    for piece in pieces:
        data = piece.encode("utf-8")
        for start in range(0, max(len(data), 1), 255):
            chunk = data[start:start + 255]
            out.append('"%s"' % "".join(
                chr(b) if 0x20 <= b < 0x7f and chr(b) not in '"\\' else "\\%03d" % b
                for b in chunk))
    return " ".join(out)


def scenario_zones(scenario):
    """({zone: records}, {names whose lookups time out: types that still answer})."""
    zones, timeouts = {}, {}
    names = set(scenario["zonedata"])
    for test in scenario["tests"].values():
        names.add(str(test.get("helo", "")))
        names.add(str(test.get("mailfrom", "")).rpartition("@")[2])
    for name in names:
        tld = name.rstrip(".").rpartition(".")[2].lower()
        if re.match(r"^[a-z0-9-]+$", tld):
            zones.setdefault(tld, [])
    for tld in ("com", "net", "org", "arpa"):
        zones.setdefault(tld, [])
    for name, entries in scenario["zonedata"].items():
        tld = name.rstrip(".").rpartition(".")[2].lower()
        records = zones.setdefault(tld, [])
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        answering = set()
        for entry in entries:
            if entry == "TIMEOUT":
                timeouts[name.lower().rstrip(".")] = answering
                continue
            for rtype, value in entry.items():
                if rtype == "SPF":
                    if has_txt:
                        continue            # explicit TXT records win (as the suite says)
                    rtype = "TXT"
                if value == "NONE":
                    continue                # no record, and no answer either
                answering.add(rtype)
                if rtype == "TXT":
                    if not value and not isinstance(value, str):
                        continue            # "null text (no strings)": no zone syntax
                    rdata = character_strings(value)
                elif rtype == "MX":
                    rdata = "%d %s" % (value[0], owner(value[1]) if value[1] else ".")
                elif rtype in ("PTR", "CNAME"):
                    rdata = owner(value)
                else:
                    rdata = value
                records.append("%s 60 IN %s %s" % (owner(name), rtype, rdata))
    return {tld: "\n".join(records) + "\n" for tld, records in zones.items()}, timeouts


class SuiteResolver(Resolver):
    """Our resolver, except that names the suite marks TIMEOUT go to a silent server."""

    def __init__(self, nsd, dead_port, timeouts):
        super().__init__(nameservers=["127.0.0.1"], port=nsd.port, timeout=2.0)
        self.dead = Resolver(nameservers=["127.0.0.1"], port=dead_port, timeout=0.05,
                             attempts=1)
        self.timeouts = timeouts
        self.tlds = set(nsd.zones)

    def query(self, name, rdtype):
        key = name.lower().rstrip(".")
        if key in self.timeouts and rdtype not in self.timeouts[key]:
            return self.dead.query(name, rdtype)
        if key.rpartition(".")[2] not in self.tlds:
            # What the root zone would say of a top-level domain we do not serve.
            return Answer(nxdomain=True)
        return super().query(name, rdtype)


@pytest.fixture(scope="module")
def silent_port():
    """A UDP port where queries arrive and are never answered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module")
def suite_servers(silent_port):
    """scenario index -> SuiteResolver, its NSD started on first use."""
    servers, resolvers = [], {}

    def get(index):
        if index not in resolvers:
            zones, timeouts = scenario_zones(SCENARIOS[index])
            server = NSDInstance(tempfile.mkdtemp(prefix="elemta-nsd-spf-"), zones)
            server.start()
            servers.append(server)
            resolvers[index] = SuiteResolver(server, silent_port, timeouts)
        return resolvers[index]

    yield get
    for server in servers:
        server.stop()
        server.remove()


@pytest.mark.parametrize("index, name", CASES, ids=["%s" % n for _, n in CASES])
def test_rfc7208_suite(suite_servers, index, name):
    test = SCENARIOS[index]["tests"][name]
    resolver = suite_servers(index)
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    got = check_spf(resolver, str(test["host"]), str(test["mailfrom"]), str(test["helo"]))
    assert got.result in expected, "%s: %s (%s)" % (test.get("description", name),
                                                     got.result, got.explanation)
    explanation = test.get("explanation")
    if explanation and explanation != "DEFAULT" and got.result == "fail":
        assert got.explanation == explanation


# ---- the plugin -------------------------------------------------------------------------

ZONE = """
@            TXT "v=spf1 ip4:192.0.2.1 -all"
mail         A   192.0.2.1
mail         TXT "v=spf1 a -all"
soft         TXT "v=spf1 ~all"
broken       TXT "v=spf1 ip4:192.0.2.1 include:dead.spf.test -all"
"""


@pytest.fixture(scope="module")
def nsd():
    with NSDInstance(tempfile.mkdtemp(prefix="elemta-nsd-spf-"), {"spf.test": ZONE}) as server:
        yield server
    server.remove()


@pytest.fixture
def resolver(nsd, silent_port):
    class WithDeadInclude(Resolver):
        def query(self, name, rdtype):
            if name.startswith("dead."):
                return Resolver(["127.0.0.1"], port=silent_port, timeout=0.05,
                                attempts=1).query(name, rdtype)
            return super().query(name, rdtype)
    return WithDeadInclude(nameservers=["127.0.0.1"], port=nsd.port, timeout=2.0)


def mail_from(manager, resolver, client, sender, helo="mail.spf.test", **kw):
    ctx = Context(client_address=client, helo=helo, resolver=resolver,
                  hostname="mx.elemta.test", **kw)
    ctx.new_transaction()
    ctx.sender = sender
    return ctx, manager.run("mail", ctx)


def test_enforce_refuses_fail_and_temperror(resolver):
    manager = PluginManager.from_mapping({"spf": {"enforce": True}}).start()
    ctx, outcome = mail_from(manager, resolver, "192.0.2.66", "bob@spf.test",
                             helo="client.spf.test")
    assert outcome.reply == (550, "5.7.23", "SPF: 192.0.2.66 is not allowed to send mail "
                                            "from spf.test: SPF fail - not authorized")
    # The HELO name's own policy is checked too (RFC 7208 2.3).
    ctx, outcome = mail_from(manager, resolver, "192.0.2.66", "bob@soft.spf.test")
    assert "from mail.spf.test" in outcome.reply[2]
    ctx, outcome = mail_from(manager, resolver, "192.0.2.1", "bob@spf.test")
    assert outcome.reply is None
    assert [(r.result, r.properties) for r in ctx.auth_results] == [
        ("pass", (("smtp.helo", "mail.spf.test"),)),
        ("pass", (("smtp.mailfrom", "bob@spf.test"),))]
    ctx, outcome = mail_from(manager, resolver, "192.0.2.66", "bob@soft.spf.test",
                             helo="client.spf.test")
    assert outcome.reply is None and ctx.auth_results[-1].result == "softfail"
    started = time.monotonic()
    ctx, outcome = mail_from(manager, resolver, "192.0.2.66", "bob@broken.spf.test",
                             helo="client.spf.test")
    assert outcome.reply[:2] == (451, "4.7.24")
    assert time.monotonic() - started < 2
    manager.close()


def test_without_enforce_nothing_is_refused(resolver):
    manager = PluginManager.from_mapping({"spf": {}}).start()
    ctx, outcome = mail_from(manager, resolver, "192.0.2.66", "bob@spf.test")
    assert outcome.reply is None
    assert ctx.auth_results[-1].result == "fail"
    manager.close()


def test_received_spf_header_at_data(resolver):
    manager = PluginManager.from_mapping({"spf": {}}).start()
    ctx, _ = mail_from(manager, resolver, "192.0.2.1", "bob@spf.test")
    ctx.message = Message(b"From: bob@spf.test\r\n\r\nhi\r\n")
    outcome = manager.run("data", ctx)
    (name, value), authres = outcome.headers[0], outcome.headers[1]
    assert name == "Received-SPF"
    assert value.startswith("Pass (mx.elemta.test: domain of spf.test designates 192.0.2.1 "
                            "as permitted sender) client-ip=192.0.2.1; "
                            'envelope-from="bob@spf.test"; helo=mail.spf.test;')
    assert authres[0] == "Authentication-Results"
    assert authres[1] == (" mx.elemta.test;\r\n\tspf=pass smtp.helo=mail.spf.test;\r\n"
                          "\tspf=pass smtp.mailfrom=bob@spf.test")
    manager.close()


def test_null_sender_checks_postmaster_at_helo(resolver):
    manager = PluginManager.from_mapping({"spf": {"enforce": True}}).start()
    ctx, outcome = mail_from(manager, resolver, "192.0.2.66", "")
    # HELO mail.spf.test allows only its A record: the bounce is refused.
    assert outcome.reply[:2] == (550, "5.7.23")
    ctx, outcome = mail_from(manager, resolver, "192.0.2.1", "")
    assert outcome.reply is None
    assert [(r.result, r.properties) for r in ctx.auth_results] == [
        ("pass", (("smtp.helo", "mail.spf.test"),)),
        ("pass", (("smtp.mailfrom", "postmaster@mail.spf.test"),))]
    manager.close()


def test_our_users_are_not_checked(resolver):
    manager = PluginManager.from_mapping({"spf": {"enforce": True}}).start()
    for kw in ({"auth_user": "bob"}, {"trusted": True}, {"local": True}):
        ctx, outcome = mail_from(manager, resolver, "192.0.2.66", "bob@spf.test", **kw)
        assert outcome.reply is None and ctx.auth_results == []
    manager.close()


def test_no_dns_at_all_is_temperror_not_a_crash(silent_port, caplog):
    dead = Resolver(nameservers=["127.0.0.1"], port=silent_port, timeout=0.05, attempts=1)
    manager = PluginManager.from_mapping({"spf": {"enforce": True}}).start()
    caplog.set_level("INFO", logger="elemta")
    ctx, outcome = mail_from(manager, dead, "192.0.2.66", "bob@spf.test",
                             helo="client.spf.test")
    assert outcome.reply[:2] == (451, "4.7.24")
    assert any("SPF temperror for mailfrom=bob@spf.test from [192.0.2.66]" in r.getMessage()
               for r in caplog.records)
    assert "Traceback" not in caplog.text
    manager.close()
