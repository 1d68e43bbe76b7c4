"""Header injection through the envelope (issue 10 requirement 2): CR, LF and other
control characters spelled in xtext ("+0D+0A") in ORCPT and ENVID, or in SMTPUTF8
addresses, never reach a header, a mailbox or a command's environment.

Two lines of defence, each tested on its own:
- the door: a real Elemta refuses the probes over SMTP with 501 and the reason;
- the writers: a queue file that already carries such values (written by an older
  version) is delivered by the real delivery worker and local agent, and the mbox, the
  bounce and the command's environment come out with the values made harmless.
See also: tests/security/test_maildrop_files.py (the same values in a maildrop file).
"""

import os
import re
import shutil
import smtplib
import tempfile
import time

import pytest

from elemta.queue import wakeup
from elemta.queue.ids import new_queue_id
from elemta.queue.model import Envelope, Recipient
from tests.harness import wait_for

FORGED = ("From forger@bank.example Mon Jan  1 00:00:00 2024\n"
          "From: ceo@bank.example\nSubject: wire the money\n\nnow")


def ehlo(server):
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    client.ehlo("client.test")
    return client


# ---- the door: refused over SMTP -----------------------------------------------------

@pytest.mark.parametrize("orcpt, reason", [
    ("rfc822;root@example.test+0A+0AFrom+20forger@bank.example+0AFrom:+20ceo@bank.example",
     "ORCPT contains a control character"),
    ("rfc822;a@example.test+0D+0AX-Injected:+20yes", "ORCPT contains a control character"),
    ("rfc822;a@example.test+00", "ORCPT contains a control character"),
    ("rfc822;a@example.test+C2+85x", "ORCPT contains a control character"),   # U+0085 NEL
    ("utf-8;a\\x{D}\\x{A}b@example.test", "ORCPT contains a control character"),
    ("rfc822;a@example.test+FF", "ORCPT is not valid UTF-8 once decoded"),
    ("rfc822;a@example.test+0", "ORCPT is not valid xtext"),
    ("rfc822", "ORCPT must be addr-type;address"),
])
def test_orcpt_with_control_characters_is_refused(elemta_server, orcpt, reason):
    server = elemta_server()
    with ehlo(server) as client:
        assert client.mail("a@client.test")[0] == 250
        code, text = client.rcpt("b@example.test", ["ORCPT=" + orcpt])
        assert (code, text.decode()) == (501, "5.5.4 Error: " + reason)
        # The transaction goes on; a clean ORCPT is still taken.
        assert client.rcpt("b@example.test", ["ORCPT=rfc822;b@example.test"])[0] == 250


@pytest.mark.parametrize("envid, reason", [
    ("id+0D+0AX-Injected:+20yes", "ENVID contains a control character"),
    ("id+0A--fake-boundary", "ENVID contains a control character"),
    ("id+09tab", "ENVID contains a control character"),
    ("id+C3+A9", "ENVID contains a non-ASCII character"),
    ("x" * 101, "ENVID longer than 100 characters"),
])
def test_envid_with_control_characters_is_refused(elemta_server, envid, reason):
    server = elemta_server()
    with ehlo(server) as client:
        code, text = client.mail("a@client.test", ["ENVID=" + envid])
        assert (code, text.decode()) == (501, "5.5.4 Error: " + reason)
        assert client.mail("a@client.test", ["ENVID=id+2B42"])[0] == 250


def test_smtputf8_address_with_a_c1_control_is_refused(elemta_server):
    server = elemta_server()
    with ehlo(server) as client:
        assert client.mail("a@client.test", ["SMTPUTF8"])[0] == 250
        client.command_encoding = "utf-8"
        client.putcmd("RCPT", "TO:<j\u0085ose@example.test>")
        code, text = client.getreply()
        assert (code, text.decode()) == (501, "5.1.3 Bad recipient address syntax: bad "
                                              "local part")
        client.putcmd("RCPT", "TO:<j\u00f6se@example.test>")
        assert client.getreply()[0] == 250


def test_nothing_of_a_refused_probe_is_queued(elemta_server):
    server = elemta_server()
    with ehlo(server) as client:
        assert client.mail("a@client.test", ["ENVID=ok"])[0] == 250
        assert client.rcpt("b@example.test", ["ORCPT=rfc822;x+0D+0AY:+20z"])[0] == 501
        assert client.rcpt("c@example.test", ["ORCPT=rfc822;c@example.test"])[0] == 250
        assert client.data(b"Subject: t\r\n\r\nbody\r\n")[0] == 250
    [queue_id] = server.queued_ids()
    envelope, _ = server.message(queue_id)
    assert [(r.address, r.orcpt) for r in envelope.recipients] == [
        ("c@example.test", "rfc822;c@example.test")]


# ---- the writers: an old queue file that carries such values ------------------------

ENV_SCRIPT = "#!/bin/sh\nenv -0 > \"$1/env0\"\ncat > /dev/null\n"


@pytest.fixture
def place():
    """A directory root and nobody can reach: the mail spool, a script, a drop box."""
    top = tempfile.mkdtemp(prefix="elemta-inject-")
    os.chmod(top, 0o755)
    for name, mode in (("mail", 0o755), ("drop", 0o1777)):
        os.mkdir(os.path.join(top, name))
        os.chmod(os.path.join(top, name), mode)
    script = os.path.join(top, "env.sh")
    with open(script, "w") as f:
        f.write(ENV_SCRIPT)
    os.chmod(script, 0o755)
    yield top
    shutil.rmtree(top)


@pytest.mark.skipif(os.geteuid() != 0, reason="local delivery to users needs root")
def test_old_queue_file_values_never_splice_mbox_bounce_or_environment(elemta_server,
                                                                        place):
    aliases = os.path.join(place, "aliases")
    drop = os.path.join(place, "drop")
    with open(aliases, "w") as f:
        f.write("postmaster: root\ncmd: \"|%s/env.sh %s\"\nbroken: \"|exit 67\"\n"
                % (place, drop))
    server = elemta_server(
        delivery={"workers": 1, "min_backoff": 0.5, "max_backoff": 1.0},
        local={"aliases_file": aliases, "mail_spool_directory": os.path.join(place, "mail"),
               "reject_unknown_users": True, "command_timeout": 10.0},
        api={"enabled": False})
    wait_for(lambda: "local delivery agent started" in server.log()
             and "delivery worker started" in server.log())
    envelope = Envelope(
        queue_id=new_queue_id(), sender="root@example.test", arrival=time.time(),
        recipients=[
            Recipient("root@example.test", None, "rfc822;root@example.test\n\n" + FORGED),
            Recipient("cmd@example.test", None, "rfc822;cmd@example.test\r\nEVIL=1\x00"),
            Recipient("broken@example.test", ("FAILURE",),
                      "rfc822;x@example.test\r\nX-Injected: yes\r\n\r\n--fake-boundary")],
        envid="id\r\nX-Injected-Envid: yes\r\n", client_address="192.0.2.1",
        client_helo="old.client.test")
    with server.queue() as queue:
        queue.add(envelope, [b"From: a@example.test\r\nSubject: hello\r\n\r\nbody\r\n"])
    wakeup.notify(server.spool)

    # The mbox: the message and the bounce about "broken", and nothing else.
    mbox = os.path.join(place, "mail", "root")
    data = wait_for(lambda: _mbox_with(mbox, 2), timeout=30)
    separators = re.findall(rb"^From (\S+) ", data, re.M)
    assert separators == [b"root@example.test", b"MAILER-DAEMON"], data
    assert b"X-Original-To: root@example.test??From forger@bank.example" in data
    assert not re.search(rb"^(From:|Subject:) .*(ceo|wire the money)", data, re.M)
    # The bounce: every value on its own line, no header or boundary of the attacker's.
    assert b"Original-Envelope-Id: id??X-Injected-Envid: yes??\n" in data
    assert b"Original-Recipient: rfc822;x@example.test??X-Injected: yes????--fake-" \
           b"boundary\n" in data
    assert not re.search(rb"^(X-Injected|--fake-boundary)", data, re.M), data

    # The command's environment: one line each, no NUL (exec would have refused it).
    env0 = wait_for(lambda: _read(os.path.join(drop, "env0")), timeout=30)
    variables = dict(item.split(b"=", 1) for item in env0.split(b"\0") if item)
    assert variables[b"ORIGINAL_RECIPIENT"] == b"cmd@example.test??EVIL=1?"
    assert not any(b"\n" in v or b"\r" in v for v in variables.values())


def _mbox_with(path, count):
    data = _read(path)
    if data and len(re.findall(rb"(?:^|\n\n)From ", data)) >= count:
        return data
    return None


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
