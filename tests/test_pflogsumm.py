"""pflogsumm (Debian package pflogsumm, Postfix's log summariser) reads Elemta's default
text log (issue 17 req 4): after known traffic (tests/traffic.py) its totals, senders,
recipients, deferral, bounce and reject details are what the test sent. Elemta's lines
use Postfix's layout and program names (smtpd, queue as qmgr, delivery, cleanup), so the
admin runs `pflogsumm --syslog-name=elemta` where they ran pflogsumm.
"""

import re
import shutil
import subprocess

import pytest

from tests import traffic as T

pytestmark = pytest.mark.skipif(not shutil.which("pflogsumm"),
                                reason="pflogsumm is not installed (Debian package pflogsumm)")


def pflogsumm(path, *options):
    done = subprocess.run(["pflogsumm", "--syslog-name=elemta"] + list(options) + [path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def total(report, what):
    """A number of the Grand Totals ("      6   received")."""
    match = re.search(r"^\s+(\d+)\s+%s\b" % re.escape(what), report, re.MULTILINE)
    assert match, "no %r in:\n%s" % (what, report)
    return int(match.group(1))


def section(report, title):
    """The lines of one titled section, up to the next blank line after its rule."""
    start = report.index(title + "\n")
    body = report[start:].split("\n", 2)[2]
    return body.split("\n\n")[0]


def test_pflogsumm_totals_match_the_traffic_sent(elemta_server):
    sent = T.run_traffic(elemta_server, "text")
    log = sent.server.log()
    report = pflogsumm(sent.server.log_path, "--smtpd-stats")

    recipients = [r for _, rcpts in sent.sent for r in rcpts]
    assert total(report, "received") == len(sent.sent)
    # Each recipient but the bounced one, and the bounce to its sender.
    assert total(report, "delivered") == len(recipients) - 1 + 1
    assert re.search(r"^\s+1\s+deferred\s+\(1\s+deferrals\)", report, re.MULTILINE), report
    assert total(report, "bounced") == 1
    assert total(report, "rejected") == sent.rejected
    assert total(report, "senders") == 2
    # Bytes received: the sizes the queue lines give, for the messages received.
    sizes = [int(size) for size in re.findall(
        r"elemta/queue\[\d+\]: \w+: from=<[^>]+>, size=(\d+)", log)]
    assert len(sizes) == len(sent.sent)
    assert total(report, "bytes received") == sum(sizes)
    # Every connection counted, the refused one and the harness's greeting probe too.
    assert total(report, "connections") == len(sent.sent) + 2

    senders = section(report, "Senders by message count")
    assert re.search(r"^\s+4\s+%s$" % T.SENDER, senders, re.MULTILINE), senders
    assert re.search(r"^\s+2\s+%s$" % T.OTHER_SENDER, senders, re.MULTILINE), senders
    by_recipient = section(report, "Recipients by message count")
    assert re.search(r"^\s+2\s+x@remote\.test$", by_recipient, re.MULTILINE), by_recipient
    assert T.ODD in by_recipient and T.BOUNCED not in by_recipient

    assert "mailbox busy" in section(report, "message deferral detail")
    assert "no such user" in section(report, "message bounce detail (by relay)")
    rejects = section(report, "message reject detail")
    assert "RCPT" in rejects and "Relay access denied (total: 1)" in rejects, rejects
