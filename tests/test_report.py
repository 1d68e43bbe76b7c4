"""elemtactl report (issue 17 req 5): the traffic of a real server (tests/traffic.py)
summarised from its text log and from its JSON log, both agreeing with what was sent and
with each other, --since leaving older lines out, and clear errors for what it cannot
read.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests import traffic as T
from tests.harness import REPO


def elemtactl(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args),
                          capture_output=True, text=True, input=stdin, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))


def report(*args):
    done = elemtactl("report", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def logs(elemta_module_server, tmp_path_factory):
    """{"text": traffic, "json": traffic}: the same mail through two servers, one logging
    text (the harness's log of its stderr), one JSON to a file."""
    json_log = str(tmp_path_factory.mktemp("jsonlog") / "mail.json")
    return {"text": T.run_traffic(elemta_module_server, "text"),
            "json": T.run_traffic(elemta_module_server, "json", log_target=json_log),
            "json_log": json_log}


def check_against_traffic(found, sent):
    recipients = [r for _, rcpts in sent.sent for r in rcpts]
    assert (found["received"], found["delivered"], found["deferred"], found["deferrals"],
            found["bounced"], found["rejected"], found["bounce_notices"]) == \
        (len(sent.sent), len(recipients), 1, 1, 1, sent.rejected, 1)
    assert found["rejects"] == [
        {"name": "reject_unauth_destination: 554 5.7.1 Relay access denied", "count": 1}]
    assert found["deferral_reasons"] == [{"name": "450 4.2.0 mailbox busy", "count": 1}]
    assert found["bounce_reasons"] == [{"name": "550 5.1.1 no such user", "count": 1}]
    assert found["top_senders"] == [{"name": T.SENDER, "count": 4},
                                    {"name": T.OTHER_SENDER, "count": 2}]
    assert found["top_sender_domains"][0] == {"name": "client.test", "count": 4}
    assert {"name": T.DELIVERED[0], "count": 2} == found["top_recipients"][0]
    assert {"name": T.ODD, "count": 1} in found["top_recipients"]
    assert T.BOUNCED not in [row["name"] for row in found["top_recipients"]]
    assert found["top_recipient_domains"][0] == {"name": "remote.test", "count": 5}
    delays = found["delays"]
    assert 0 <= delays["min"] <= delays["p50"] <= delays["p90"] <= delays["p99"] \
        <= delays["max"] < 30
    assert delays["min"] <= delays["avg"] <= delays["max"]
    # The deferred recipient waited for its retry (min_backoff 0.5 s): the slowest.
    assert delays["max"] >= 0.4


def test_report_of_the_text_log_matches_the_traffic(logs):
    found = report("--log", logs["text"].server.log_path)
    check_against_traffic(found, logs["text"])


def test_report_of_the_json_log_matches_the_traffic_and_the_text_report(logs):
    from_json = report("--log", logs["json_log"])
    check_against_traffic(from_json, logs["json"])
    from_text = report("--log", logs["text"].server.log_path)
    for key in ("received", "delivered", "deferred", "bounced", "rejected",
                "bytes_received", "bytes_delivered", "senders", "recipients",
                "top_senders", "top_recipients", "rejects"):
        assert from_json[key] == from_text[key], key


def test_report_agrees_with_pflogsumm_on_bytes(logs):
    """bytes received and delivered as pflogsumm counts them (sizes from the queue
    lines), which tests/test_pflogsumm.py checks against pflogsumm itself."""
    log = logs["text"].server.log()
    sizes = dict(re.findall(r"elemta/queue\[\d+\]: (\w+): from=<[^>]*>, size=(\d+)", log))
    received = re.findall(r"elemta/smtpd\[\d+\]: (\w+): client=", log)
    found = report("--log", logs["text"].server.log_path)
    assert found["bytes_received"] == sum(int(sizes[q]) for q in received)
    sent = re.findall(r"elemta/delivery\[\d+\]: (\w+): to=<.*status=sent", log)
    assert found["bytes_delivered"] == sum(int(sizes[q]) for q in sent)


def test_since_leaves_older_lines_out(logs, tmp_path):
    """A copy of each log with one more message received two days ago in front: counted
    in the whole log, left out with --since 24h."""
    old = time.time() - 2 * 86400
    text = tmp_path / "text.log"
    with open(logs["text"].server.log_path) as f:
        text.write_text(time.strftime("%b %d %H:%M:%S", time.localtime(old))
                        + " vm elemta/smtpd[1]: 1K0OLD: client=unknown[192.0.2.1]\n"
                        + f.read())
    data = tmp_path / "json.log"
    with open(logs["json_log"]) as f:
        data.write_text(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(old)),
            "level": "info", "process": "smtpd", "pid": 1, "program": "smtpd",
            "queue_id": "1K0OLD", "event": "received", "client": "unknown[192.0.2.1]",
            "message": "1K0OLD: client=unknown[192.0.2.1]"}) + "\n" + f.read())
    for path in (text, data):
        assert report("--log", str(path))["received"] == len(logs["text"].sent) + 1
        assert report("--log", str(path), "--since", "24h")["received"] == \
            len(logs["text"].sent)
        assert report("--log", str(path), "--since", "1d")["received"] == \
            len(logs["text"].sent)
        assert report("--log", str(path), "--since", "3d")["received"] == \
            len(logs["text"].sent) + 1


def test_the_configured_log_file_and_standard_input(logs):
    """Without --log, the file logging.target names; "-" reads standard input (as from
    journalctl); the human report has pflogsumm's sections."""
    server = logs["json"].server
    done = elemtactl("--config", server.config_path, "report")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+6  received$", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^\s+1  reject_unauth_destination: 554 5\.7\.1 Relay access denied$",
                     done.stdout, re.MULTILINE), done.stdout
    for title in ("Grand totals", "Delivery delays", "Top senders", "Top recipient domains"):
        assert title in done.stdout
    with open(logs["text"].server.log_path) as f:
        piped = elemtactl("report", "--json", "--log", "-", stdin=f.read())
    assert piped.returncode == 0 and json.loads(piped.stdout)["delivered"] == 7


def test_what_report_cannot_read_is_a_clear_error(logs, tmp_path):
    done = elemtactl("--config", logs["text"].server.config_path, "report")
    assert (done.returncode, done.stdout) == (66, "")
    assert done.stderr == ("elemtactl: logging.target is stderr, not a file: name the log "
                           "with --log FILE (under systemd: journalctl -u elemta -o short "
                           "| elemtactl report --log -)\n")
    done = elemtactl("report", "--log", str(tmp_path / "nothing"))
    assert (done.returncode, done.stderr) == (
        66, "elemtactl: %s: No such file or directory\n" % (tmp_path / "nothing"))
    done = elemtactl("report", "--log", logs["json_log"], "--since", "yesterday")
    assert (done.returncode, done.stderr) == (
        64, "elemtactl: --since yesterday: not a length of time (say 90s, 30m, 24h, 7d "
            "or 2w)\n")


def test_garbage_lines_are_skipped(tmp_path):
    """Lines that are not Elemta's, broken JSON, bytes that are not UTF-8: no event, no
    error."""
    path = tmp_path / "mixed.log"
    path.write_bytes(b'{"event": "received", "time": 5\n{not json\n\xff\xfe\n'
                     b'Dec  6 03:01:36 vm postfix/smtpd[1]: ABC: client=x[1.2.3.4]\n'
                     b'["a list"]\n{"event": "delivery", "status": "sent", "to": 5, '
                     b'"delay": "x"}\n')
    found = report("--log", str(path))
    assert (found["received"], found["delivered"]) == (0, 1)


@pytest.fixture(scope="module")
def libmilter(tmp_path_factory):
    from tests.test_milter_libmilter import libmilter as module_fixture
    yield from module_fixture.__wrapped__(tmp_path_factory)


def filtered_traffic(elemta_server, libmilter, **logging_section):
    """Through the libmilter peer (tests/peers/libmilter_milter.py): one message
    queued, one refused at RCPT and one at the end of data by the milter, one held and
    one discarded by it. Returns the server, stopped."""
    from tests.test_milter import send
    from tests.test_milter_libmilter import message
    server = elemta_server(milters=[{"socket": libmilter.address, "name": "libmilter"}],
                           **({"logging": logging_section} if logging_section else {}))
    replies = [send(server, message()),
               send(server, message(), recipients=("refused@example.test",)),
               send(server, message("reject")),
               send(server, message("quarantine")),
               send(server, message("discard"))]
    assert [r[-1][0] for r in replies] == [250, 550, 550, 250, 250], replies
    assert len(server.queued_ids()) == 2      # the one queued and the one held
    server.stop()
    return server


FILTERED_REJECTS = [
    {"name": "milter libmilter: 550 5.1.1 No such user here, says libmilter", "count": 1},
    {"name": "milter libmilter: 550 5.7.1 Rejected by libmilter", "count": 1}]


def test_milter_rejects_holds_and_discards_are_counted(elemta_server, libmilter,
                                                       tmp_path):
    """Every reject line counts whoever wrote it, a milter too, grouped by who and why;
    held and discarded messages are counted as pflogsumm counts them; the text and the
    JSON log agree."""
    text = filtered_traffic(elemta_server, libmilter)
    json_log = str(tmp_path / "mail.json")
    filtered_traffic(elemta_server, libmilter, format="json", target=json_log)
    for path in (text.log_path, json_log):
        found = report("--log", path)
        assert (found["rejected"], found["held"], found["discarded"]) == (2, 1, 1), path
        assert found["rejects"] == FILTERED_REJECTS, path
        assert found["holds"] == [{"name": "milter libmilter: held by libmilter",
                                   "count": 1}], path
        assert found["discards"] == [
            {"name": "milter libmilter: discarded by milter libmilter",
             "count": 1}], path
    done = elemtactl("report", "--log", text.log_path)
    assert re.search(r"^\s+1  held$", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^\s+1  discarded$", done.stdout, re.MULTILINE), done.stdout
    if shutil.which("pflogsumm"):
        from tests.test_pflogsumm import pflogsumm, total
        summary = pflogsumm(text.log_path)
        assert (total(summary, "rejected"), total(summary, "held"),
                total(summary, "discarded")) == (2, 1, 1), summary
        assert total(summary, "received") == report("--log", text.log_path)["received"]
