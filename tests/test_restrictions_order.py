"""One ordered list of restrictions per stage, each refusal named (issue #15, part 8).

What an admin sees: `elemtactl restrictions` prints, per stage, the core checks a config
turns on and then its plugins in calling order (plugins.NAME.order moves one); a refusal's
log line names the restriction or plugin that made it, and the api's /metrics counts it
under elemta_smtpd_restriction_refusals_total{restriction, stage}. A real Elemta, real
SMTP, a real scrape.
"""

import os
import re
import smtplib
import subprocess
import sys

from ruamel.yaml import YAML

from elemta.plugins.manager import PluginManager
from tests.harness import REPO
from tests.test_metrics import settled, start_server, value


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
    # The protocol core's own refusal is logged with its restriction too.
    assert re.search(r"NOQUEUE: reject: MAIL from \S+: 552 5\.3\.4 .*; proto=ESMTP "
                     r"helo=<client\.test> \(restriction message_size_limit\)", log), log
    name = "elemta_smtpd_restriction_refusals_total"

    def counted(samples):
        assert value(samples, name, restriction="reject_unauth_destination",
                     stage="rcpt") == 1
        assert value(samples, name, restriction="greylist", stage="rcpt") == 1
        assert value(samples, name, restriction="message_size_limit", stage="mail") == 1
        # Refusals that are no restriction's (syntax, sequence) are not counted as one.
        assert sum(v for (sample, _), v in samples.items() if sample == name) == 3
    settled(api_port, counted)


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


def test_a_rate_limit_counts_what_the_core_checks_refuse(elemta_server, tmp_path):
    """The ratelimit plugin runs before the stage's core checks (before_core_checks), as
    anvil counts before Postfix's restrictions: relay probes and unknown users count
    against a client's recipient rate, so a dictionary attack is throttled too."""
    server = elemta_server(relay={"mynetworks": ["127.0.0.1/32"]}, plugins={"ratelimit": {
        "enabled": True, "database": str(tmp_path / "ratelimit"),
        "recipient_rate_limit": 3, "exempt_mynetworks": False}})
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10,
                      source_address=("127.0.0.2", 0)) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        for victim in ("x@elsewhere.test", "y@elsewhere.test", "z@elsewhere.test"):
            assert client.rcpt(victim)[0] == 554           # relay guard
        code, text = client.rcpt("b@example.test")         # the 4th recipient
        assert code == 450 and b"too many recipients" in text
    assert "to=<b@example.test> proto=ESMTP helo=<client.test> (plugin ratelimit)" \
        in server.log()
    shown = elemtactl("--config", server.config_path, "restrictions")
    rcpt = [line.split(" ")[1] for line in stage_lines(shown.stdout, "rcpt")]
    assert rcpt.index("ratelimit") < rcpt.index("reject_unauth_destination")


def test_elemtactl_restrictions_shows_a_plugin_only_where_its_settings_make_it_check(
        tmp_path):
    config = write_config(
        tmp_path / "elemta.yaml",
        protocol_tests={"pipelining_enable": True},
        plugins={"rhsbl": {"enabled": True, "sender_sites": ["dbl.example"]},
                 "policy_service": {"enabled": True, "servers": [
                     {"address": "inet:127.0.0.1:10040"}]}})
    shown = elemtactl("--config", config, "restrictions")
    assert shown.returncode == 0, shown.stderr
    names = {stage: [line.split(" ")[1] for line in stage_lines(shown.stdout, stage)
                     if line != "(nothing)"]
             for stage in ("connect", "helo", "mail", "rcpt", "end_of_data")}
    assert "rhsbl" in names["mail"] and "rhsbl" not in names["helo"]
    assert "policy_service" in names["rcpt"]
    assert "policy_service" not in names["end_of_data"]
    # The pipelining test: checked from the connection on, enforced at RCPT and at the
    # end of data, after a drain and the connection limits.
    assert names["connect"][:4] == ["draining", "worker_connection_limit",
                                    "client_connection_limit", "pipelining"]
    assert names["rcpt"][0] == "pipelining"
    assert "pipelining" in names["end_of_data"]


def test_a_policy_server_asked_at_data_is_listed_and_counted_at_the_data_stage(
        elemta_server, tmp_path, monkeypatch):
    """check_policy_service in smtpd_data_restrictions: listed at the data stage, before
    the queue file is made, and its refusal of DATA counted there."""
    from tests.peers.policy import ScriptedPolicyServer
    with ScriptedPolicyServer(lambda request: b"action=REJECT not now\n\n"
                              if request["protocol_state"] == "DATA"
                              else b"action=DUNNO\n\n") as policy:
        server, api_port = start_server(
            elemta_server, tmp_path, monkeypatch, plugins={"policy_service": {
                "enabled": True, "servers": [{"address": policy.address,
                                              "protocol_states": ["RCPT", "DATA"]}]}})
        shown = elemtactl("--config", server.config_path, "restrictions")
        assert shown.returncode == 0, shown.stderr
        data = [line.split(" ")[1] for line in stage_lines(shown.stdout, "data")]
        assert data == ["policy_service", "queue_storage"]
        assert "plugin stage data_command" in shown.stdout
        assert "policy_service" not in stage_lines(shown.stdout, "end_of_data")
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("a@sender.test")
            assert client.rcpt("b@example.test")[0] == 250
            client.putcmd("data")
            assert client.getreply()[0] == 554

        def counted(samples):
            assert value(samples, "elemta_smtpd_restriction_refusals_total",
                         restriction="policy_service", stage="data") == 1
        settled(api_port, counted)
