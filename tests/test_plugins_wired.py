"""Plugins wired into the real server: SPF, DKIM, DMARC, Authentication-Results and
greylisting as a client sees them, and the spool file they leave.

Runs `elemta` as a subprocess (tests/conftest.py elemta_server) with DNS from a private
NSD (tests/peers/nsd.py). The client connects from 127.0.0.1, so mynetworks is set to a
network that does not hold it: otherwise the client would count as one of our own and
SPF, DMARC and greylisting would let it pass unchecked.
See also: elemta/smtpd/session.py, elemta/plugins/, tests/test_spf.py, tests/test_dkim.py.
"""

import os
import shutil
import smtplib
import tempfile
import textwrap
import time

import pytest

from elemta.plugins.dkim import Signer, SigningKey, generate_key
from elemta.plugins.manager import apply_header_edits
from tests.harness import free_port, wait_for
from tests.peers.nsd import NSDInstance, nsd_available
from tests.test_metrics import healthy, labelled, settled

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

NOT_US = ["192.0.2.0/24"]      # mynetworks without 127.0.0.1


@pytest.fixture(scope="module")
def dkim_key():
    workdir = tempfile.mkdtemp(prefix="elemta-wired-dkim-")
    yield generate_key("signed.test", "s1", os.path.join(workdir, "s1.key"))
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def dns(dkim_key):
    zones = {
        "client.test": '@ TXT "v=spf1 ip4:127.0.0.1 -all"\n',     # our HELO name
        "sender.test": '@ TXT "v=spf1 ip4:127.0.0.1 -all"\n',
        "forged.test": '@ TXT "v=spf1 ip4:192.0.2.1 -all"\n',
        "signed.test": dkim_key.zone_line + '\n@ TXT "v=spf1 ip4:127.0.0.1 -all"\n',
        "dmarc.test": ('@ TXT "v=spf1 ip4:192.0.2.1 ~all"\n'
                       '_dmarc TXT "v=DMARC1; p=reject"\n'),
        "held.test": ('@ TXT "v=spf1 ip4:192.0.2.1 -all"\n'
                      '_dmarc TXT "v=DMARC1; p=quarantine"\n'),
    }
    workdir = tempfile.mkdtemp(prefix="elemta-wired-nsd-")
    server = NSDInstance(workdir, zones, address="127.0.0.1")
    server.start()
    yield {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 2.0}
    server.stop()
    server.remove()


def message(sender, subject="hello", extra=b""):
    return (b"From: <%s>\r\nTo: <rcpt@example.test>\r\nSubject: %s\r\n"
            b"Message-ID: <%d@client.test>\r\n%s\r\nA short body.\r\n"
            % (sender.encode(), subject.encode(), int(time.time() * 1e6), extra))


def client(server):
    smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=30)
    smtp.ehlo("client.test")
    return smtp


def send(server, sender, raw, rcpt="rcpt@example.test"):
    """(MAIL reply, RCPT reply, DATA reply or None) as (code, text) pairs."""
    with client(server) as smtp:
        mail = smtp.mail(sender)
        if mail[0] != 250:
            return mail, None, None
        rcpt_reply = smtp.rcpt(rcpt)
        if rcpt_reply[0] != 250:
            return mail, rcpt_reply, None
        return mail, rcpt_reply, smtp.data(raw)


def queued_id(replies):
    assert replies[2] is not None and replies[2][0] == 250, replies
    data_reply = replies[2]
    return data_reply[1].decode().rsplit(" ", 1)[1]


def spooled(server, replies):
    """The spool file's content of the message that send() got accepted."""
    return server.message(queued_id(replies))[1]


def test_without_plugins_the_spool_file_is_received_plus_content(elemta_server):
    server = elemta_server(relay={"mynetworks": NOT_US})
    raw = message("a@forged.test")
    content = spooled(server, send(server, "a@forged.test", raw))
    received, rest = content[:-len(raw)], content[-len(raw):]
    assert rest == raw
    lines = received.split(b"\r\n")
    assert lines[0].startswith(b"Received: from client.test (unknown [127.0.0.1])")
    assert lines[-1] == b"" and all(line.startswith(b"\t") for line in lines[1:-1])


def test_spf_enforce_refuses_a_fail_and_marks_a_pass(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"spf": {"enabled": True, "enforce": True}})
    mail, _, _ = send(server, "a@forged.test", message("a@forged.test"))
    assert mail[0] == 550 and mail[1].startswith(b"5.7.23 "), mail
    raw = message("a@sender.test")
    content = spooled(server, send(server, "a@sender.test", raw))
    assert content.startswith(b"Received: from client.test")
    assert b"\r\nreceived-spf: pass (mx.test: domain of sender.test" in content.lower()
    assert b"\r\n\tspf=pass smtp.mailfrom=a@sender.test\r\n" in content
    assert content.endswith(raw)
    assert "reject: MAIL from unknown[127.0.0.1]: 550 5.7.23" in server.log()


def test_dkim_signed_mail_gets_dkim_pass_and_forged_results_go(elemta_server, dns,
                                                               dkim_key):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"dkim": {"enabled": True}})
    forged = b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\n"
    kept = b"Authentication-Results: other.test; spf=fail\r\n"
    body = message("a@signed.test", extra=forged + kept)
    signer = Signer([SigningKey("signed.test", "s1", dkim_key.key_file)])
    raw = apply_header_edits(body, signer.sign(body, "signed.test"))
    content = spooled(server, send(server, "a@signed.test", raw))
    assert forged not in content
    assert kept in content
    ours = [line for line in content.split(b"\r\n") if line.startswith(b"Authentication-")]
    assert len(ours) == 2 and ours[0].startswith(b"Authentication-Results: mx.test;"), ours
    unfolded = content.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    assert b"dkim=pass header.d=signed.test" in unfolded
    assert b"header.s=s1" in unfolded


def test_dmarc_enforce_rejects_at_end_of_data(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"spf": {"enabled": True},
                                    "dmarc": {"enabled": True, "enforce": True}})
    mail, rcpt, data = send(server, "a@dmarc.test", message("a@dmarc.test"))
    assert mail[0] == 250 and rcpt[0] == 250
    assert data[0] == 550 and data[1].startswith(b"5.7.1 "), data
    assert server.queued_ids() == []


def test_dmarc_quarantine_accepts_and_puts_the_message_on_hold(elemta_server, dns):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"spf": {"enabled": True},
                                    "dmarc": {"enabled": True, "enforce": True}})
    replies = send(server, "a@held.test", message("a@held.test"))
    queue_id = queued_id(replies)
    with server.queue() as queue:
        assert queue.get(queue_id).state == "hold"
    assert b"dmarc=fail" in server.message(queue_id)[1]


def test_a_bad_plugin_setting_is_refused_with_file_line_and_key(tmp_path):
    from elemta.config.errors import ConfigError
    from elemta.config.loader import load_config
    path = tmp_path / "elemta.yaml"
    path.write_text("plugins:\n  spf:\n    enabled: true\n    enforce: yes please\n"
                    "  greylist:\n    enabled: true\n    delay: 600\n"
                    "    retry_window: 60\n  nosuch: {enabled: true}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    lines = str(caught.value).splitlines()
    assert lines[:2] == [
        "%s:4: plugins.spf.enforce: expected a boolean (true or false), not a string "
        "('yes please')" % path,
        "%s:8: plugins.greylist.retry_window: shorter than delay (600 s): nobody could "
        "ever pass" % path]
    # (Installed third-party plugins join the list of those available.)
    assert lines[2].startswith("%s:9: plugins.nosuch: no such plugin (available: arc, "
                               "authres, " % path)
    assert all(", %s, " % name in lines[2] for name in ("dkim", "dmarc", "greylist"))
    assert len(lines) == 3


def test_greylisting_defers_then_accepts(elemta_server, dns, tmp_path):
    server = elemta_server(relay={"mynetworks": NOT_US}, dns=dns,
                           plugins={"greylist": {"enabled": True, "delay": 1,
                                                 "retry_window": 60,
                                                 "database": str(tmp_path / "grey")}})
    _, rcpt, _ = send(server, "a@sender.test", message("a@sender.test"))
    assert rcpt[0] == 451 and rcpt[1].startswith(b"4.7.1 "), rcpt
    _, rcpt, _ = send(server, "a@sender.test", message("a@sender.test"))
    assert rcpt[0] == 451, "retried before the delay"
    time.sleep(1.2)
    _, rcpt, data = send(server, "a@sender.test", message("a@sender.test"))
    assert rcpt[0] == 250 and data[0] == 250, (rcpt, data)


BROKEN_PLUGIN = '''
    """A plugin that fails on one recipient (for tests/test_plugins_wired.py)."""
    from elemta.plugins.api import Plugin


    class Broken(Plugin):
        def on_rcpt(self, ctx):
            if ctx.recipient.startswith("boom@"):
                raise RuntimeError("kaboom")
            return None
'''


def install_broken_plugin(directory):
    """The plugin module and a dist-info with its entry point, where `python -m` looks
    first: the server's working directory."""
    os.makedirs(os.path.join(directory, "broken_plugin-1.0.dist-info"))
    with open(os.path.join(directory, "broken_plugin.py"), "w") as f:
        f.write(textwrap.dedent(BROKEN_PLUGIN))
    info = os.path.join(directory, "broken_plugin-1.0.dist-info")
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write("[elemta.plugins]\nbroken = broken_plugin:Broken\n")


def test_a_plugin_that_raises_gives_451_and_the_session_goes_on(elemta_server, tmp_path):
    install_broken_plugin(str(tmp_path / "server0"))
    server = elemta_server(relay={"mynetworks": NOT_US},
                           plugins={"broken": {"enabled": True}})
    with client(server) as smtp:
        assert smtp.mail("a@sender.test")[0] == 250
        code, text = smtp.rcpt("boom@example.test")
        assert (code, text[:6]) == (451, b"4.3.0 ")
        assert smtp.rcpt("rcpt@example.test")[0] == 250
        assert smtp.data(message("a@sender.test"))[0] == 250
    assert "plugin broken failed at rcpt stage" in server.log()
    assert "RuntimeError: kaboom" in server.log()


def test_check_results_and_greylisting_are_counted_in_metrics(elemta_server, dns, dkim_key,
                                                              tmp_path, monkeypatch):
    """elemta_email_authentication_results_total{check, result} and
    elemta_greylist_checks_total{outcome}, read from the api's /metrics."""
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    server = elemta_server(
        relay={"mynetworks": NOT_US}, dns=dns, api={"enabled": True, "port": api_port},
        plugins={"spf": {"enabled": True}, "dkim": {"enabled": True},
                 "dmarc": {"enabled": True}, "arc": {"enabled": True},
                 "greylist": {"enabled": True, "delay": 0,
                              "allow_domains": ["signed.test", "dmarc.test"],
                              "database": str(tmp_path / "grey")}})
    wait_for(lambda: healthy(api_port))
    # sender.test: SPF pass, unsigned, no DMARC policy; greylisted, then let in.
    _, rcpt, _ = send(server, "a@sender.test", message("a@sender.test"))
    assert rcpt[0] == 451, rcpt
    queued_id(send(server, "a@sender.test", message("a@sender.test")))
    # signed.test: SPF and DKIM pass; an allowed domain, not greylisted.
    body = message("a@signed.test")
    signer = Signer([SigningKey("signed.test", "s1", dkim_key.key_file)])
    queued_id(send(server, "a@signed.test",
                   apply_header_edits(body, signer.sign(body, "signed.test"))))
    # dmarc.test: SPF softfail, so DMARC fails (p=reject, not enforced here).
    queued_id(send(server, "a@dmarc.test", message("a@dmarc.test")))

    # SPF is checked at MAIL: the greylisted transaction counts too; the rest at DATA.
    def counted(samples):
        assert labelled(samples, "elemta_email_authentication_results_total") == {
            ("spf", "pass"): 3, ("spf", "softfail"): 1,             # (check, result)
            ("dkim", "none"): 2, ("dkim", "pass"): 1,
            ("dmarc", "none"): 2, ("dmarc", "fail"): 1, ("arc", "none"): 3}
        assert labelled(samples, "elemta_greylist_checks_total") == {
            ("defer",): 1, ("pass",): 1, ("exempt",): 2}
        # Greylisting's 451 is a refusal by the restriction "greylist" too.
        assert samples.get(("elemta_smtpd_restriction_refusals_total",
                            (("restriction", "greylist"), ("stage", "rcpt")))) == 1
    settled(api_port, counted)
