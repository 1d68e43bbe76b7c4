"""One ordered list of restrictions per stage, each refusal named (issue #15, part 8).

What an admin sees: `elemtactl restrictions` prints, per stage, the core checks a config
turns on and then its plugins in calling order (plugins.NAME.order moves one); a refusal's
log line names the restriction or plugin that made it, and the api's /metrics counts it
under elemta_smtpd_restriction_refusals_total{restriction, stage}. A real Elemta, real
SMTP, a real scrape.
"""

import os
import smtplib
import subprocess
import sys

from ruamel.yaml import YAML

from elemta.plugins.manager import PluginManager
from tests.harness import REPO
from tests.test_metrics import scrape, start_server, value


def test_each_refusal_is_logged_and_counted_by_its_restriction(elemta_server, tmp_path,
                                                               monkeypatch):
    server, api_port = start_server(
        elemta_server, tmp_path, monkeypatch, limits={"message_size": 2000},
        plugins={"greylist": {"enabled": True, "database": str(tmp_path / "greylist")}})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        assert client.rcpt("victim@elsewhere.test")[0] == 554        # relay guard
        code, text = client.rcpt("b@example.test")                   # greylisted
        assert (code, text[:5]) == (451, b"4.7.1")
        client.rset()
        # SIZE= over the limit: refused by the protocol core, counted all the same.
        assert client.docmd("MAIL FROM:<a@sender.test> SIZE=5000")[0] == 552
    log = server.log()
    assert ("to=<victim@elsewhere.test> proto=ESMTP helo=<client.test> "
            "(restriction reject_unauth_destination)") in log
    assert "to=<b@example.test> proto=ESMTP helo=<client.test> (plugin greylist)" in log
    samples, _ = scrape(api_port)
    name = "elemta_smtpd_restriction_refusals_total"
    assert value(samples, name, restriction="reject_unauth_destination", stage="rcpt") == 1
    assert value(samples, name, restriction="greylist", stage="rcpt") == 1
    assert value(samples, name, restriction="message_size_limit", stage="mail") == 1
    # Refusals that are no restriction's (syntax, sequence) are not counted as one.
    assert sum(v for (sample, _), v in samples.items() if sample == name) == 3


def write_config(path, **sections):
    with open(path, "w") as f:
        YAML().dump(sections, f)
    return str(path)


def elemtactl(*args):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args),
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))


def stage_lines(output, stage):
    """The numbered lines under `stage:` in elemtactl restrictions' output."""
    lines = output.splitlines()
    start = lines.index("%s:" % stage) + 1
    found = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        found.append(line.strip())
    return found


def test_elemtactl_restrictions_lists_core_checks_then_plugins_in_order(tmp_path):
    greylist = str(tmp_path / "greylist")
    config = write_config(
        tmp_path / "elemta.yaml",
        smtpd={"sender_login_maps": "inline:{a@example.test=alice}"},
        plugins={"greylist": {"enabled": True, "database": greylist},
                 "dkim": {"enabled": True}, "dmarc": {"enabled": True}})
    shown = elemtactl("--config", config, "restrictions")
    assert shown.returncode == 0, shown.stderr
    rcpt = stage_lines(shown.stdout, "rcpt")
    assert [line.split(" ")[1] for line in rcpt] == [
        "recipient_limit", "reject_unauth_destination", "reject_unlisted_recipient",
        "greylist"]
    assert "[Postfix: reject_unauth_destination]" in rcpt[1]
    mail = [line.split(" ")[1] for line in stage_lines(shown.stdout, "mail")]
    assert mail[:3] == ["message_size_limit", "queue_minfree",
                        "reject_sender_login_mismatch"]
    end = [line.split(" ")[1] for line in stage_lines(shown.stdout, "end_of_data")]
    assert end.index("dkim") < end.index("dmarc")
    assert stage_lines(shown.stdout, "helo") == ["(nothing)"]

    # plugins.dkim.order puts DKIM after DMARC, in the listing and in the calls.
    config = write_config(
        tmp_path / "moved.yaml",
        plugins={"dkim": {"enabled": True, "order": 99}, "dmarc": {"enabled": True}})
    shown = elemtactl("--config", config, "restrictions")
    end = [line.split(" ")[1] for line in stage_lines(shown.stdout, "end_of_data")]
    assert end.index("dmarc") < end.index("dkim")
    assert "dkim (plugin): order 99" in shown.stdout
    manager = PluginManager.from_mapping({"dkim": {"order": 99}, "dmarc": {}})
    assert manager.names.index("dmarc") < manager.names.index("dkim")


def test_elemtactl_restrictions_names_a_bad_config(tmp_path):
    config = write_config(tmp_path / "elemta.yaml", plugins={"dkim": {"order": -1}})
    shown = elemtactl("--config", config, "restrictions")
    assert shown.returncode == 78
    assert "plugins.dkim.order" in shown.stderr
