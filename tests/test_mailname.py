"""The mail name: /etc/mailname (smtpd.mailname_file) gives the origin (Postfix's myorigin,
as Debian sets it) when smtpd.origin is empty; the host name (myhostname) stays the
system's fully qualified name. A bad file stops every program with a reason naming it.

Real config files and a real server; only the system's host name, which a test cannot
choose, is stood in for where each fallback of Config.hostname is checked."""

import os
import smtplib
import socket
import subprocess
import sys

import pytest

from elemta.addressing.resolve import Addressing
from elemta.config import ConfigError, load_config
from elemta.config.schema import system_hostname
from elemta.delivery.bounce import build_dsn
from elemta.queue.model import Envelope, Recipient
from tests.harness import ELEMTA_DEFAULT, REPO, ElemtaServer, wait_for


def config_file(tmp_path, mailname_text=None, **smtpd):
    mailname = tmp_path / "mailname"
    if mailname_text is not None:
        mailname.write_bytes(mailname_text)
    smtpd.setdefault("mailname_file", str(mailname))
    lines = "".join("  %s: %s\n" % (key, "null" if value is None else '"%s"' % value)
                    for key, value in smtpd.items())
    path = tmp_path / "elemta.yaml"
    path.write_text("smtpd:\n" + lines)
    return str(path), str(mailname)


def test_the_mail_name_is_the_origin_and_a_local_domain(tmp_path):
    path, _ = config_file(tmp_path, b"Mail.Example.ORG.\nsecond line ignored\n",
                          hostname="mx1.example.org")
    config = load_config(path)
    assert (config.hostname, config.origin) == ("mx1.example.org", "mail.example.org")
    addressing = Addressing.from_config(config)
    assert addressing.qualify("root") == "root@mail.example.org"
    assert addressing.is_local("a@mail.example.org") and addressing.is_local("a@mx1.example.org")
    assert not addressing.is_local("a@example.org")
    # smtpd.origin wins; without a file (or with mailname_file null) the host name is it.
    assert load_config(config_file(tmp_path, b"mail.example.org\n", hostname="mx1.example.org",
                                   origin="example.net")[0]).origin == "example.net"
    os.unlink(str(tmp_path / "mailname"))
    assert load_config(config_file(tmp_path, hostname="mx1.example.org")[0]).origin == \
        "mx1.example.org"
    assert load_config(config_file(tmp_path, b"mail.example.org\n", hostname="mx1.example.org",
                                   mailname_file=None)[0]).origin == "mx1.example.org"


def test_a_mail_name_a_hosted_class_lists_stays_hosted(tmp_path):
    """The common Debian setup: /etc/mailname names the organisation's main domain and
    that domain's mailboxes are in Dovecot. The mail name must not make it local (found
    by the issue 14 review: every user got 550 "User unknown in local recipient table")."""
    path, _ = config_file(tmp_path, b"example.org\n", hostname="mx1.example.org")
    with open(path, "a") as f:
        f.write("virtual:\n  mailbox_domains: [example.org]\n"
                "  mailbox_maps: {alice@example.org: ok}\n")
    addressing = Addressing.from_config(load_config(path))
    assert addressing.classify("alice@example.org") == "virtual"
    assert not addressing.is_local("alice@example.org")
    assert addressing.qualify("root") == "root@example.org"      # still the origin
    assert addressing.is_local("root@mx1.example.org")


@pytest.mark.parametrize("content, reason", [
    (b"not a domain!\n", "'not a domain!' is not a domain name"),
    (b"\n", "the first line is empty"),
    (b"[192.0.2.1]\n", "an address literal"),
    (b"\xff\xfe\n", "not UTF-8 text")])
def test_a_bad_mail_name_is_refused_naming_the_file(tmp_path, content, reason):
    path, mailname = config_file(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.startswith(mailname + ":1: ")
    assert reason in text and "(smtpd.mailname_file in %s)" % path in text


def test_the_daemon_and_sendmail_refuse_a_bad_mail_name(tmp_path):
    path, mailname = config_file(tmp_path, b"bad name\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    check = subprocess.run([sys.executable, "-m", "elemta.cli.elemta", "--check-config",
                            "--config", path], capture_output=True, text=True, env=env,
                           timeout=60)
    assert check.returncode != 0 and "Traceback" not in check.stderr
    assert check.stderr.startswith(mailname + ":1: 'bad name' is not a domain name")
    sendmail = subprocess.run([sys.executable, "-m", "elemta.cli.sendmail", "-C", path,
                               "root"], input="x\n", capture_output=True, text=True,
                              env=env, timeout=60)
    assert sendmail.returncode == os.EX_CONFIG
    assert mailname + ":1: 'bad name' is not a domain name" in sendmail.stderr


def test_the_host_name_falls_back_to_the_mail_name(monkeypatch):
    """A fully qualified host name is the host name. Where it has no dot (a VM called
    "vm"), the mail name is a better greeting than vm.localdomain, which was Elemta's."""
    monkeypatch.setattr(socket, "gethostname", lambda: "mx.example.org")
    assert system_hostname("example.org") == "mx.example.org"
    monkeypatch.setattr(socket, "gethostname", lambda: "vm")
    assert system_hostname("example.org") == "example.org"
    assert system_hostname(None) == "vm.localdomain"


def test_bounces_come_from_mailer_daemon_at_the_origin():
    envelope = Envelope(queue_id="1K0SP12R89ET3D02FYPS", sender="a@example.net",
                        recipients=[Recipient("b@example.com")], arrival=0.0)
    dsn = build_dsn("mx1.example.org", envelope, envelope.recipients, b"Subject: x\r\n",
                    origin="example.org").decode()
    assert "\r\nFrom: Mail Delivery System <MAILER-DAEMON@example.org>\r\n" in "\r\n" + dsn
    assert "Reporting-MTA: dns; mx1.example.org" in dsn


def test_a_server_without_a_host_name_uses_the_mail_name(tmp_path):
    """The packaged setup: smtpd.hostname empty, /etc/mailname written by debconf.
    sendmail's bare names and the default sender get the mail name, and mail to it is
    local; the greeting names the system's host name (the mail name if it has no dot)."""
    mailname = tmp_path / "mailname"
    mailname.write_text("mail.example.org\n")
    server = ElemtaServer(tmp_path / "server", {"smtpd": {"hostname": ELEMTA_DEFAULT,
                                                          "mailname_file": str(mailname)}})
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            greeting_name = smtp.ehlo()[1].split(b"\n")[0].decode()
            assert greeting_name == system_hostname("mail.example.org")
            assert greeting_name != "mx.test"
            smtp.sendmail("a@client.example", ["postmaster@mail.example.org"], b"x\r\n")
        result = subprocess.run([sys.executable, "-m", "elemta.cli.sendmail", "-C",
                                 server.config_path, "root"], input=b"cron output\n",
                                capture_output=True, env=dict(os.environ, PYTHONPATH=REPO),
                                timeout=30)
        assert result.returncode == 0, result.stderr
        ids = wait_for(lambda: len(server.queued_ids()) == 2 and server.queued_ids())
        envelopes = [server.message(queue_id)[0] for queue_id in ids]
        assert [r.address for r in envelopes[0].recipients] == [
            "postmaster@mail.example.org"]
        assert [r.address for r in envelopes[1].recipients] == ["root@mail.example.org"]
        assert envelopes[1].sender.endswith("@mail.example.org")
    finally:
        assert server.stop() == []
    assert "Traceback" not in server.log()
