"""Open relay: the recipient forms an open-relay tester tries, over real SMTP sockets.

The attacker is an unauthenticated client at 127.0.0.1, outside relay.mynetworks (which
trusts only 127.0.0.2, the control). Mail to example.test (a local domain) is accepted from
anyone; every other destination must get 554 5.7.1 (elemta.smtpd.policy, Postfix's
reject_unauth_destination) or a 5xx syntax error. The forms that are accepted (percent hack,
bang paths, quoted local parts, source routes ending in a local domain, look-alike
spellings of the local domain) are proven local: delivery runs, every non-local message
would leave through a relay host that is a scripted server (tests/peers/sink.py), and all it
receives is the bounce to the attacker's own address - nothing for victim.example.
Elemta has no percent hack or bang-path rewriting (Postfix's allow_percent_hack and
swap_bangpath): such a local part is a local user name, usually an unknown one.
Every probe runs twice: against the local domain alone, and against a config with all
four address classes (relay, virtual alias and virtual mailbox domains with their
recipient tables, and an alias keyed by the victim's address): no new way through.
See also: elemta.smtpd.policy, elemta.delivery.routing, elemta.local.expand.
"""

import os
import re
import socket

import pytest

from tests.harness import wait_for
from tests.peers.sink import ScriptedServer

ATTACKER = "127.0.0.1"
TRUSTED = "127.0.0.2"


class Client:
    """A raw SMTP client: sends lines exactly as written (smtplib rewrites addresses)."""

    def __init__(self, port, source=ATTACKER):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220 ")

    def reply(self):
        """The last line of the next reply (the one that carries the code)."""
        while True:
            line = self.file.readline()
            assert line, "the server closed the connection"
            if line[3:4] != b"-":
                return line.rstrip(b"\r\n").decode("ascii")

    def cmd(self, line):
        self.sock.sendall(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def close(self):
        try:
            self.cmd("QUIT")
        finally:
            self.file.close()
            self.sock.close()


def rcpt_reply(server, path, utf8=False, sender="someone@client.test", source=ATTACKER):
    """The reply to RCPT TO:<path> in a fresh session from `source`."""
    client = Client(server.port, source)
    try:
        assert client.cmd("EHLO probe.client.test").startswith("250 ")
        assert client.cmd("MAIL FROM:<%s>%s" % (sender, " SMTPUTF8" if utf8 else "")) \
            == "250 2.1.0 Ok"
        return client.cmd("RCPT TO:<%s>" % path)
    finally:
        client.close()


def relay_denied(address):
    return "554 5.7.1 <%s>: Relay access denied" % address


def bad_syntax(reason):
    return "501 5.1.3 Bad recipient address syntax: %s" % reason


NEEDS_SMTPUTF8 = "553 5.6.7 Error: non-ASCII address requires SMTPUTF8"
USER_UNKNOWN = "550 5.1.1 <%s>: Recipient address rejected: User unknown in local recipient table"
OK = "250 2.1.5 Ok"
UNKNOWN_IN = "550 5.1.1 <%s>: Recipient address rejected: User unknown in %s"


# The second configuration the probes run against: all four address classes (issue 14),
# with a virtual alias keyed by the victim's own address (the relay guard reads the
# domain's class only, so it must stay refused) and one forwarding to the victim (which
# only the admin's table can make: the alias domain's own address).
HOSTED = {
    "relay": {"relay_domains": ["relay.test"],
              "relay_recipient_maps": {"known@relay.test": "ok"}},
    "virtual": {"alias_domains": ["alias.test"],
                "alias_maps": {"user@victim.example": "root@example.test",
                               "fwd@alias.test": "root@example.test"},
                "mailbox_domains": ["virt.test"],
                "mailbox_maps": {"alice@virt.test": "ok"}},
}
CONFIGS = {"local only": {}, "all four classes": HOSTED}


@pytest.fixture(scope="module", params=list(CONFIGS))
def relay_host(request):
    """Where every non-local message would leave: a scripted server that takes anything,
    one per configuration the probes run against (its name is relay_host.classes)."""
    with ScriptedServer() as sink:
        sink.classes = request.param
        yield sink


@pytest.fixture(scope="module")
def mx(elemta_module_server, relay_host, tmp_path_factory):
    """An MX for example.test that does not trust the attacker's address, delivering:
    local mail to its own mail spool, everything else to relay_host. Unknown local users
    are accepted at RCPT (local.reject_unknown_users off, as for a catch-all), so the
    tricky local parts reach delivery and we see where they end. Run with the local
    domain alone and with every address class configured (CONFIGS)."""
    aliases = tmp_path_factory.mktemp("aliases") / "aliases"
    aliases.write_text("postmaster: root\n")
    hosted = CONFIGS[relay_host.classes]
    server = elemta_module_server(
        relay=dict({"local_domains": ["example.test"], "mynetworks": [TRUSTED + "/32"]},
                   **hosted.get("relay", {})),
        virtual=dict(hosted.get("virtual", {})),
        delivery={"workers": 1, "relayhost": "[127.0.0.1]:%d" % relay_host.port,
                  "min_backoff": 0.5, "max_backoff": 1.0},
        local={"aliases_file": str(aliases), "reject_unknown_users": False})
    server.classes = relay_host.classes
    os.makedirs(os.path.join(server.workdir, "mail"), exist_ok=True)
    wait_for(lambda: "local delivery agent started" in server.log()
             and "delivery worker started" in server.log())
    return server


@pytest.fixture(scope="module")
def default_mx(elemta_module_server, tmp_path_factory):
    """The same MX with the shipped local.reject_unknown_users (on), no delivery."""
    aliases = tmp_path_factory.mktemp("aliases") / "aliases"
    aliases.write_text("postmaster: root\n")
    return elemta_module_server(
        relay={"local_domains": ["example.test"], "mynetworks": [TRUSTED + "/32"]},
        local={"aliases_file": str(aliases), "reject_unknown_users": True})


# (path as the client writes it, SMTPUTF8 in MAIL FROM, the exact reply)
REFUSED = [
    # Source routes (RFC 5321 C): ignored, so the last hop is the destination.
    ("@example.test:user@victim.example", False, relay_denied("user@victim.example")),
    ("@mx.test,@example.test:user@victim.example", False,
     relay_denied("user@victim.example")),
    ("@example.test", False, bad_syntax("bad source route")),
    # Bang paths: a bare one has no domain at all.
    ("victim.example!user", False, bad_syntax("address must be user@domain")),
    ("user@victim.example!example.test", False, bad_syntax("bad domain name")),
    # Percent hack in the domain, more than one @, escaped or unquoted @ in the local part.
    ("user@victim.example%example.test", False, bad_syntax("bad domain name")),
    ("user@victim.example@example.test", False, bad_syntax("bad local part")),
    ("user@victim.example@alias.test", False, bad_syntax("bad local part")),
    ("user%victim.example@relay.test@", False, bad_syntax("bad local part")),
    ("user@example.test@victim.example", False, bad_syntax("bad local part")),
    ("user\\@victim.example@example.test", False, bad_syntax("bad local part")),
    ("user@@example.test", False, bad_syntax("bad local part")),
    ('"user@victim.example"', False, bad_syntax("bad local part")),
    ("user@example.test,user@victim.example", False, bad_syntax("bad local part")),
    # Percent with trailing dots.
    ("user%victim.example.@example.test", False, bad_syntax("bad local part")),
    ("user%victim.example.@example.test.", False, bad_syntax("bad local part")),
    # Empty local parts.
    ("", False, bad_syntax("address must be user@domain")),
    ("@victim.example", False, bad_syntax("bad source route")),
    ('""', False, bad_syntax("address must be user@domain")),
    (".@example.test", False, bad_syntax("bad local part")),
    # Address literals, even of this very host (Postfix accepts [its own address]; we
    # list no literal among the local domains).
    ("user@[127.0.0.1]", False, relay_denied("user@[127.0.0.1]")),
    ("user@[IPv6:::1]", False, relay_denied("user@[IPv6:::1]")),
    ("user@[IPv6:::ffff:127.0.0.1]", False, relay_denied("user@[IPv6:::ffff:127.0.0.1]")),
    ("user@[192.0.2.1]", False, relay_denied("user@[192.0.2.1]")),
    ("user@[example.test]", False, bad_syntax("bad address literal")),
    ("user@[999.0.0.1]", False, bad_syntax("bad address literal")),
    # Trailing dots, the local domain as a prefix or a label, other separators.
    ("user@victim.example.", False, relay_denied("user@victim.example.")),
    ("user@EXAMPLE.TEST.victim.example", False, relay_denied("user@EXAMPLE.TEST.victim.example")),
    ("user@example.test.victim.example", False, relay_denied("user@example.test.victim.example")),
    ("user@victim-example.test", False, relay_denied("user@victim-example.test")),
    # The hosted domains as a prefix or a parent: only the names listed are ours (a
    # subdomain only by a ".domain" entry).
    ("user@relay.test.victim.example", False, relay_denied("user@relay.test.victim.example")),
    ("user@sub.relay.test", False, relay_denied("user@sub.relay.test")),
    ("user@alias.test.victim.example", False, relay_denied("user@alias.test.victim.example")),
    ("user@virt.test.victim.example", False, relay_denied("user@virt.test.victim.example")),
    ("user@victim.example.virt.test", False, relay_denied("user@victim.example.virt.test")),
    ("user@[127.0.0.1].alias.test", False, bad_syntax("bad address literal")),
    ("user@notexample.test", False, relay_denied("user@notexample.test")),
    ("user@example.test:victim.example", False, bad_syntax("bad domain name")),
    ("user@example.test victim.example", False, bad_syntax("bad domain name")),
    ("user@victim.example (example.test)", False, bad_syntax("bad domain name")),
    ("user@ victim.example", False, bad_syntax("bad domain name")),
    ("user@victim.example>", False, "501 5.5.4 Syntax error: garbage after address"),
    # Case tricks.
    ("USER@VICTIM.EXAMPLE", False, relay_denied("USER@VICTIM.EXAMPLE")),
    ("user@Victim.Example", False, relay_denied("user@Victim.Example")),
    ("postmaster@victim.example", False, relay_denied("postmaster@victim.example")),
    ("POSTMASTER@VICTIM.EXAMPLE", False, relay_denied("POSTMASTER@VICTIM.EXAMPLE")),
    # Unicode look-alikes of example.test: without SMTPUTF8 not even parsed; with it,
    # Cyrillic letters make other domains (the reply shows non-ASCII as "?"), and the
    # A-label of a look-alike is just a name.
    ("user@\u0435xample.test", False, NEEDS_SMTPUTF8),
    ("user@\u0435xample.test", True, relay_denied("user@?xample.test")),
    ("user@example.t\u0435st", True, relay_denied("user@example.t?st")),
    ("user@xn--xample-2of.test", False, relay_denied("user@xn--xample-2of.test")),
    ("user@victim.example\u3002example.test", False, NEEDS_SMTPUTF8),
]


@pytest.mark.parametrize("path,utf8,reply", REFUSED, ids=[repr(p[0]) + ("/utf8" if p[1] else "")
                                                      for p in REFUSED])
def test_relay_probe_is_refused(mx, path, utf8, reply):
    assert rcpt_reply(mx, path, utf8) == reply


def test_a_doubled_trailing_dot_never_reaches_victim(mx):
    # An empty label is a syntax error before any relay check (issue 10 item 6).
    assert rcpt_reply(mx, "user@victim.example..") == bad_syntax(
        "bad domain name 'victim.example..': it has an empty label (two dots in a row)")


def test_the_guard_is_the_client_address_not_a_broken_server(mx):
    # Control: the same probes from a trusted network are relayed, so the refusals above
    # come from the relay check (no message is sent: RCPT alone).
    assert rcpt_reply(mx, "user@victim.example", source=TRUSTED) == OK
    assert rcpt_reply(mx, "@example.test:user@victim.example", source=TRUSTED) == OK
    assert rcpt_reply(mx, "user@victim.example", source=ATTACKER) == relay_denied(
        "user@victim.example")


# Accepted because the domain is example.test however spelled; each must stay local.
# (path, SMTPUTF8, how the delivery log names it, the final status there)
LOCAL_FORMS = [
    ("user%victim.example@example.test", False, "user%victim.example@example.test",
     "bounced"),
    ("user%victim.example@example.test.", False, "user%victim.example@example.test.",
     "bounced"),
    ("user%victim.example%example.test@example.test", False,
     "user%victim.example%example.test@example.test", "bounced"),
    ("victim.example!user@example.test", False, "victim.example!user@example.test",
     "bounced"),
    ('"user@victim.example"@example.test', False, '"user@victim.example"@example.test',
     "bounced"),
    ('"user%victim.example"@example.test', False, '"user%victim.example"@example.test',
     "bounced"),
    ('"user\\@victim.example"@example.test', False, '"user\\@victim.example"@example.test',
     "bounced"),
    ('"victim.example!user"@example.test', False, '"victim.example!user"@example.test',
     "bounced"),
    ('""@example.test', False, '""@example.test', "bounced"),
    ("@victim.example:user@example.test", False, "user@example.test", "bounced"),
    ("user@EXAMPLE.TEST", False, "user@EXAMPLE.TEST", "bounced"),
    # Full-width letters and the ideographic full stop are example.test after IDNA
    # mapping, in the relay check and the router alike.
    ("user@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.test", True,
     "user@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.test", "bounced"),
    ("user@example\u3002test", True, "user@example\u3002test", "bounced"),
    # A trailing ideographic full stop is a final dot (as "example.test." is).
    ("user@example.test\u3002", True, "user@example.test\u3002", "bounced"),
    # Real local mailboxes, however spelled: delivered to root's mailbox.
    ("@victim.example,@mx.test:root@example.test", False, "root@example.test", "sent"),
    ('"root"@EXAMPLE.TEST.', False, '"root"@EXAMPLE.TEST.', "sent"),
    ("postmaster", False, "postmaster", "sent"),
]


def test_local_domain_tricks_are_accepted_only_as_local_mail(mx, relay_host):
    client = Client(mx.port)
    assert client.cmd("EHLO probe.client.test").startswith("250 ")
    assert client.cmd("MAIL FROM:<attacker@client.test> SMTPUTF8") == "250 2.1.0 Ok"
    for path, _, _, _ in LOCAL_FORMS:
        assert (path, client.cmd("RCPT TO:<%s>" % path)) == (path, OK)
    assert client.cmd("DATA").startswith("354 ")
    reply = client.cmd("Subject: relay probe\r\n\r\nrelay me\r\n.")
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    client.close()
    queue_id = reply.rsplit(" ", 1)[1]

    def final_statuses():
        found = re.findall(r"%s: to=<(.*?)>, relay=(\S+), delay=\S+, dsn=\S+, status=(\w+)" % queue_id,
                           mx.log())
        return found if len(found) == len(LOCAL_FORMS) else None
    statuses = wait_for(final_statuses, timeout=20)
    assert sorted(statuses) == sorted((logged, "local", status)
                                      for _, _, logged, status in LOCAL_FORMS)
    # The one message that left is the bounce to the attacker's own address, which shows
    # the way out works: nothing went to victim.example.
    bounce = wait_for(lambda: relay_host.messages)
    assert [(m.mail.split(" ")[1], m.rcpts) for m in bounce] == [
        ("FROM:<>", ["RCPT TO:<attacker@client.test>"])]
    assert b"relay me" not in bounce[0].content
    assert not any("victim" in line for s in relay_host.sessions for line in s.commands
                   if line.upper().startswith(("MAIL", "RCPT")))
    with open(os.path.join(mx.workdir, "mail", "root"), "rb") as f:
        mailbox = f.read()
    assert mailbox.count(b"\nSubject: relay probe\n") >= 1 and b"relay me" in mailbox


def test_hosted_classes_take_only_their_known_recipients(mx):
    """With every class configured, what strangers may send to is exactly what the
    tables list (nothing new is accepted in the local-only configuration)."""
    hosted = mx.classes != "local only"
    expect = {"alice@virt.test": OK, "known@relay.test": OK, "fwd@alias.test": OK,
              "bob@virt.test": UNKNOWN_IN % ("bob@virt.test", "virtual mailbox table"),
              "other@relay.test": UNKNOWN_IN % ("other@relay.test", "relay recipient table"),
              "x@alias.test": UNKNOWN_IN % ("x@alias.test", "virtual alias table")}
    for address, reply in expect.items():
        assert rcpt_reply(mx, address) == (reply if hosted else relay_denied(address))


@pytest.mark.parametrize("sender", ["postmaster@example.test", "root@EXAMPLE.TEST",
                                    "user@mx.test", "", "victim@victim.example"])
def test_a_local_sender_does_not_make_the_client_trusted(mx, sender):
    assert rcpt_reply(mx, "user@victim.example", sender=sender) == relay_denied(
        "user@victim.example")


def test_relaying_stays_refused_whatever_the_session_did_before(mx):
    client = Client(mx.port)
    denied = relay_denied("user@victim.example")
    try:
        assert client.cmd("EHLO example.test").startswith("250 ")
        assert client.cmd("MAIL FROM:<postmaster@example.test>") == "250 2.1.0 Ok"
        assert client.cmd("RCPT TO:<user@example.test>") == OK      # a local one first
        assert client.cmd("RCPT TO:<user@victim.example>") == denied
        assert client.cmd("RSET") == "250 2.0.0 Ok"
        assert client.cmd("MAIL FROM:<postmaster@example.test>") == "250 2.1.0 Ok"
        assert client.cmd("RCPT TO:<user@victim.example>") == denied
        # A second EHLO, then HELO, naming this host or a trusted-looking one.
        assert client.cmd("EHLO mx.test").startswith("250 ")
        assert client.cmd("MAIL FROM:<root@mx.test>") == "250 2.1.0 Ok"
        assert client.cmd("RCPT TO:<user@victim.example>") == denied
        assert client.cmd("HELO [127.0.0.2]").startswith("250 ")
        assert client.cmd("MAIL FROM:<root@example.test>") == "250 2.1.0 Ok"
        assert client.cmd("RCPT TO:<user@victim.example>") == denied
        # Ways other servers let a client claim trust do not exist here.
        assert client.cmd("RSET") == "250 2.0.0 Ok"
        assert client.cmd("AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=") == (
            "503 5.5.1 Error: authentication not enabled")
        assert client.cmd("XCLIENT ADDR=127.0.0.2") == "500 5.5.1 Error: command not recognized"
        assert client.cmd("XFORWARD ADDR=127.0.0.2") == "500 5.5.1 Error: command not recognized"
        assert client.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"
        assert client.cmd("MAIL FROM:<>") == "250 2.1.0 Ok"
        assert client.cmd("RCPT TO:<user@victim.example>") == denied
        assert client.cmd("DATA") == "554 5.5.1 Error: no valid recipients"
    finally:
        client.close()
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 " \
           "<user@victim.example>: Relay access denied;" in mx.log()


# With the shipped default (local.reject_unknown_users on) the tricky local parts do not
# even reach the queue: they name no user, as in Postfix's local_recipient_maps.
UNKNOWN_LOCAL = ["root%victim.example@example.test", "victim.example!root@example.test",
                 '"root@victim.example"@example.test', '"root%victim.example"@example.test',
                 "root%victim.example@EXAMPLE.TEST.", '""@example.test']


@pytest.mark.parametrize("path", UNKNOWN_LOCAL)
def test_with_default_settings_the_tricks_name_no_user(default_mx, path):
    assert rcpt_reply(default_mx, path) == USER_UNKNOWN % path


def test_with_default_settings_real_users_still_get_mail(default_mx):
    for path in ('"root"@example.test', "ROOT@Example.Test.", "postmaster",
                 "@victim.example:root@example.test"):
        assert rcpt_reply(default_mx, path) == OK


@pytest.fixture(scope="module")
def gateway_mx(elemta_module_server):
    """A backup MX / gateway for gateway.test with no recipient table (every user is
    taken and passed on), the case where routing through it is most dangerous."""
    return elemta_module_server(
        relay={"local_domains": ["example.test"], "mynetworks": [TRUSTED + "/32"],
               "relay_domains": ["gateway.test"]})


@pytest.mark.parametrize("path", [
    "user%victim.example@gateway.test", '"user@victim.example"@gateway.test',
    "victim.example!user@gateway.test", '"user%victim.example"@gateway.test',
    "user%victim.example@GATEWAY.TEST."])
def test_a_stranger_cannot_route_through_a_relay_domain(gateway_mx, path):
    """Postfix's allow_untrusted_routing = no: the relay domain's next hop (a primary
    that trusts its backup MX) may honour the percent hack or bang paths and send the
    mail on to victim.example. Found by the issue 14 review: all three forms got 250."""
    assert rcpt_reply(gateway_mx, path) == relay_denied(path)


def test_a_relay_domain_still_takes_plain_and_routed_mail_from_trusted_clients(gateway_mx):
    assert rcpt_reply(gateway_mx, "user@gateway.test") == OK
    assert rcpt_reply(gateway_mx, "user%victim.example@gateway.test", source=TRUSTED) == OK
