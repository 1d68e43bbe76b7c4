"""delivery.default_transport = error (Postfix's error(8), Debian's "Local only" type):
remote mail is accepted and bounced at once, with the configured text; local mail,
relay-domain mail and a domain with a delivery.transport entry are delivered as before.

A real server; its peers are scripted servers on loopback (tests/peers/sink.py): the
relay host (which must see only the relay domain's mail: the error transport wins over
relayhost for remote mail, and connects nowhere) and partner.test's next hop by the
transport map, where the sender's bounce arrives. The nameservers are a dead port: no
MX lookup may be needed. The default, smtp, is covered by tests/test_delivery.py.
See also: elemta.delivery.error_transport, elemta.delivery.routing.
"""

import email
import email.policy
import mailbox
import os
import re
import smtplib

import pytest

from elemta.config import ConfigError, load_config
from elemta.config.schema import REMOTE_DISABLED
from tests.harness import free_port, wait_for
from tests.peers.sink import ScriptedServer

SENDER = "owner@partner.test"


@pytest.fixture
def peers():
    with ScriptedServer(address="127.0.0.1") as relay, \
            ScriptedServer(address="127.0.0.1") as partner:
        yield relay, partner


def start(elemta_server, relay, partner, default_transport):
    server = elemta_server(
        api={"enabled": False},
        relay={"local_domains": ["example.test"], "relay_domains": ["relayed.test"]},
        delivery={"workers": 1, "default_transport": default_transport,
                  "relayhost": "[127.0.0.1]:%d" % relay.port,
                  "transport": [{"domain": "partner.test",
                                 "nexthop": "smtp:[127.0.0.1]:%d" % partner.port}],
                  "nameservers": ["127.0.0.1"], "dns_port": free_port(),
                  "dns_timeout": 0.5, "min_backoff": 0.5, "max_backoff": 1.0})
    os.mkdir(os.path.join(server.workdir, "mail"))       # the test's /var/mail
    wait_for(lambda: "delivery worker started" in server.log())
    return server


def send(server, recipients):
    body = ("From: %s\r\nTo: someone\r\nSubject: local only\r\n\r\nhello\r\n"
            % SENDER).encode()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        refused = client.sendmail(SENDER, recipients, body)
    assert refused == {}        # accepted at RCPT, as Postfix does: error(8) bounces later
    return wait_for(lambda: re.search(r"(\w+): from=<%s>" % re.escape(SENDER),
                                      server.log())).group(1)


def line_for(server, queue_id, address, status):
    pattern = r"%s: to=<%s>, relay=(\S+), delay=\S+, dsn=\S+, status=%s \((.*)\)" % (
        queue_id, re.escape(address), status)
    return wait_for(lambda: re.search(pattern, server.log()))


def test_error_bounces_remote_mail_and_delivers_the_rest(elemta_server, peers):
    relay, partner = peers
    server = start(elemta_server, relay, partner, "error")
    queue_id = send(server, ["friend@gmail.test", "root@example.test",
                             "user@relayed.test", "colleague@partner.test"])
    bounced = line_for(server, queue_id, "friend@gmail.test", "bounced")
    assert bounced.group(1) == "none" and bounced.group(2) == REMOTE_DISABLED
    assert line_for(server, queue_id, "root@example.test", "sent").group(1) == "local"
    line_for(server, queue_id, "user@relayed.test", "sent")
    line_for(server, queue_id, "colleague@partner.test", "sent")
    # The relay host saw the relay domain's recipient only; nothing went out for gmail.
    wait_for(lambda: len(partner.messages) == 2)
    assert [m.rcpts for m in relay.messages] == [["RCPT TO:<user@relayed.test>"]]
    [delivered] = mailbox.mbox(os.path.join(server.workdir, "mail", "root"))
    assert delivered["Subject"] == "local only"
    # The sender's bounce went by the transport map, like any mail to partner.test.
    [dsn, original] = sorted(partner.messages, key=lambda m: m.mail)   # "<>" first
    assert original.mail.startswith("MAIL FROM:<%s>" % SENDER)
    assert dsn.mail.startswith("MAIL FROM:<>")
    assert dsn.rcpts == ["RCPT TO:<%s>" % SENDER]
    report = email.message_from_bytes(dsn.wire, policy=email.policy.default)
    status = [part for part in report.walk()
              if part.get_content_type() == "message/delivery-status"][0]
    per_recipient = status.get_payload()[1]
    assert per_recipient["Final-Recipient"] == "rfc822; friend@gmail.test"
    assert per_recipient["Status"] == "5.1.2"
    assert "remote delivery is disabled on this host" in per_recipient["Diagnostic-Code"]


def test_error_text_is_the_bounce_reason(elemta_server, peers):
    relay, partner = peers
    server = start(elemta_server, relay, partner, "error:5.7.1 this host sends no mail out")
    queue_id = send(server, ["friend@gmail.test"])
    bounced = line_for(server, queue_id, "friend@gmail.test", "bounced")
    assert bounced.group(2) == "550 5.7.1 this host sends no mail out"
    wait_for(lambda: len(partner.messages) == 1)        # the bounce
    assert relay.sessions == []


@pytest.mark.parametrize("value, why", [
    ("smtp:[relay.example]:25", "write one of smtp, error, error:TEXT"),
    ("error:4.0.0 later", "must be 5.X.Y"),
    ("error:", "needs a text"),
])
def test_a_bad_value_names_file_line_and_key(tmp_path, value, why):
    path = tmp_path / "elemta.yaml"
    path.write_text("delivery:\n  workers: 1\n  default_transport: %r\n" % value)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), check_files=False)
    message = str(caught.value)
    assert "%s:3" % path in message and "delivery.default_transport" in message, message
    assert why in message
