"""The rspamd plugin against a real Rspamd, as an SMTP client, the admin and Prometheus
see it.

A private Rspamd (tests/peers/rspamd.py) serves the module, its DNS pointed at a private
NSD so nothing leaves the machine. Its local.d sets the action thresholds high enough
that a plain message gets no action, and settings blocks that force one action each:
by Subject (to see every action Elemta maps) and by Settings-ID "outbound" (what the
plugin sends with outbound mail). Its milter_headers module adds X-Spamd-Bar, so the
answer carries header edits. Elemta runs as a subprocess (tests/conftest.py).
See also: elemta/plugins/rspamd.py, tests/test_clamav.py.
"""

import re
import shutil
import smtplib
import tempfile
import time

import pytest

from tests.harness import free_port, wait_for
from tests.peers.nsd import NSDInstance, nsd_available
from tests.peers.rspamd import RspamdError, RspamdInstance, rspamd_available
from tests.scanning import queue_id_of, send

pytestmark = [
    pytest.mark.skipif(rspamd_available() is not None, reason=str(rspamd_available())),
    pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))]

# A client address with a forward-confirmed PTR in the fixture's NSD (127.0.0.0/8 is all
# loopback), so Elemta knows the client's name and tells Rspamd.
NAMED_CLIENT, VERIFIED_NAME = "127.0.0.9", "named.rspamd.test"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def forced(name, action, how):
    """A settings block forcing `action` on the messages `how` selects."""
    return ('%s { priority = high; %s apply { actions { "%s" = -1000; } } }\n'
            % (name, how, action))


LOCAL_FILES = {
    # No action for ordinary mail, whatever the failed DNS lookups add up to.
    "actions.conf": "reject = 15; add_header = 50; rewrite_subject = 60; greylist = 40;\n",
    "settings.conf": (
        forced("grey", "greylist", 'header = { "Subject" = "/^greylist test/"; }')
        + forced("rewrite", "rewrite subject",
                 'header = { "Subject" = "/^rewrite test/"; }')
        + forced("spammy", "add header", 'header = { "Subject" = "/^add header test/"; }')
        + '"outbound" { id = "outbound"; apply { actions { "add header" = -1000; } } }\n'),
    # (Our client is 127.0.0.1, which milter_headers skips by default.)
    "milter_headers.conf": 'use = ["x-spamd-bar"]; skip_local = false;\n',
    # Soft reject has no score threshold: only force_actions gives it, on a symbol.
    "soft.map": "/^soft reject test/\n",
    "multimap.conf": 'SOFT_TEST { type = "header"; header = "Subject"; regexp = true; '
                     'map = "${LOCAL_CONFDIR}/local.d/soft.map"; score = 0.0; }\n'
                     # Rules on what only the Helo and Hostname request headers tell it.
                     # (A "helo" rule would not do: Rspamd falls back to the HELO in our
                     # Received header when the request has none.)
                     'HELO_PROBE { type = "selector"; selector = "request_header(\'Helo\')"; '
                     'score = 0.0; map = "${LOCAL_CONFDIR}/local.d/helo.map"; }\n'
                     'HOSTNAME_PROBE { type = "hostname"; score = 0.0; '
                     'map = "${LOCAL_CONFDIR}/local.d/hostname.map"; }\n',
    "helo.map": "probe.helo.test\n",
    "hostname.map": "%s\n" % VERIFIED_NAME,
    "force_actions.conf": 'rules { SOFT_TEST { action = "soft reject"; '
                          'expression = "SOFT_TEST"; message = "Come back later"; } }\n',
}


@pytest.fixture(scope="module")
def rspamd():
    dns = NSDInstance(tempfile.mkdtemp(prefix="elemta-rspamd-nsd-"),
                      {"example.test": "@ A 127.0.0.1\n",
                       "0.0.127.in-addr.arpa": "9 PTR %s.\n" % VERIFIED_NAME,
                       VERIFIED_NAME: "@ A %s\n" % NAMED_CLIENT}, address="127.0.0.1")
    dns.start()
    instance = RspamdInstance(tempfile.mkdtemp(prefix="elemta-rspamd-"), free_port(),
                              "127.0.0.1:%d" % dns.port, LOCAL_FILES)
    try:
        instance.start()
    except RspamdError as error:
        dns.stop()
        pytest.fail(str(error))
    instance.dns_port = dns.port        # for an Elemta that is to know client names
    yield instance
    instance.stop()
    shutil.rmtree(instance.workdir, ignore_errors=True)
    dns.stop()
    dns.remove()


def message(subject, body=b"Shall we meet at noon?", extra=b""):
    return (b"From: <a@sender.test>\r\nTo: <b@example.test>\r\nSubject: %s\r\n"
            b"Message-ID: <%d@sender.test>\r\n%s\r\n%s\r\n"
            % (subject.encode(), time.time_ns(), extra, body))


def header_section(content):
    return content.split(b"\r\n\r\n", 1)[0].decode()


def server_with(elemta_server, rspamd, **settings):
    settings.setdefault("enabled", True)
    settings.setdefault("address", rspamd.address)
    return elemta_server(plugins={"rspamd": settings})


def test_gtube_is_rejected_and_clean_mail_gets_the_result_header(elemta_server, rspamd):
    server = server_with(elemta_server, rspamd)
    assert send(server, message("hello", GTUBE)) == (554, "5.7.1 Gtube pattern")
    assert server.queued_ids() == []
    assert re.search(r": rspamd: action=reject score=15\.00/\d+\.00 symbols=GTUBE, "
                     r"rejected \(\d+\.\d{3}s\)\n", server.log())

    forged = b"X-Spamd-Result: default: False [-100.00 / 15.00]\r\nX-Spam: No\r\n"
    raw = message("lunch", extra=forged)
    queue_id = queue_id_of(send(server, raw))
    head = header_section(server.message(queue_id)[1])
    assert re.search(r"\nX-Spamd-Result: default: False \[-?\d+\.\d\d / \d+\.00\];\r\n\t",
                     "\n" + head), head
    assert "RCPT_COUNT_ONE(" in head
    assert "-100.00" not in head and "X-Spam: No" not in head     # inbound copies gone
    assert "\nX-Spamd-Bar: " in head                             # milter_headers' edit
    assert "\nX-Spam: " not in head
    assert re.search(r"%s: rspamd: action=no_action score=-?\d+\.\d\d/\d+\.00 symbols=\S+ "
                     r"\(\d+\.\d{3}s\)\n" % queue_id, server.log())
    # What Rspamd was told, as its own log line shows it.
    assert wait_for(lambda: re.search(
        r"qid: <%s>, ip: 127\.0\.0\.1, from: <a@sender\.test>.*rcpts: <b@example\.test>"
        % queue_id, open(rspamd.log_path).read()))


def test_helo_and_client_name_reach_rspamd(elemta_server, rspamd):
    """Rules keyed on the Helo request header and on the client's host name (a multimap
    selector and hostname rule) fire only when Elemta sent Rspamd those, and only for
    the matching values: so both arrive, as what they are."""
    server = elemta_server(plugins={"rspamd": {"enabled": True, "address": rspamd.address}},
                           dns={"nameservers": ["127.0.0.1"], "port": rspamd.dns_port,
                                "timeout": 2.0})

    def symbols(helo, source):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60,
                          source_address=(source, 0)) as smtp:
            smtp.ehlo(helo)
            smtp.mail("a@sender.test")
            smtp.rcpt("b@example.test")
            code, text = smtp.data(message("probe"))
        queue_id = queue_id_of((code, text.decode()))
        line = re.search(r"%s: rspamd: action=\S+ score=\S+ symbols=(\S+)" % queue_id,
                         server.log())
        assert line, server.log()
        return set(line.group(1).split(","))

    both = symbols("probe.helo.test", NAMED_CLIENT)
    assert {"HELO_PROBE", "HOSTNAME_PROBE"} <= both, both
    assert "named.rspamd.test[%s]" % NAMED_CLIENT in server.log()
    neither = symbols("client.test", "127.0.0.1")          # no PTR: Elemta sends none
    assert not {"HELO_PROBE", "HOSTNAME_PROBE"} & neither, neither


def test_a_unix_socket_address_works_alike(elemta_server, rspamd):
    server = server_with(elemta_server, rspamd, address=rspamd.socket_path)
    assert send(server, message("hello", GTUBE)) == (554, "5.7.1 Gtube pattern")
    queue_id = queue_id_of(send(server, message("lunch")))
    assert "\nX-Spamd-Result: default: False" in header_section(server.message(queue_id)[1])


@pytest.mark.parametrize("subject, reply", [
    ("soft reject test", (451, "4.7.1 Come back later")),
    ("greylist test", (451, "4.7.1 Greylisted, please try again later")),
])
def test_soft_reject_and_greylist_are_451(elemta_server, rspamd, subject, reply):
    server = server_with(elemta_server, rspamd)
    assert send(server, message(subject)) == reply
    assert server.queued_ids() == []
    assert re.search(r": rspamd: action=%s score=.*, deferred" % (
        "soft_reject" if subject.startswith("soft") else "greylist"), server.log())


def test_rewrite_subject_and_add_header(elemta_server, rspamd):
    server = server_with(elemta_server, rspamd, status_header=True)
    rewritten = header_section(server.message(queue_id_of(
        send(server, message("rewrite test of mine"))))[1])
    subjects = re.findall(r"\nSubject: ([^\r]*)", "\n" + rewritten)
    assert subjects == ["*** SPAM *** rewrite test of mine"], rewritten
    assert "\nX-Spam-Status: Yes, score=" in rewritten

    flagged = header_section(server.message(queue_id_of(
        send(server, message("add header test"))))[1])
    assert "\nX-Spam: Yes\r\n" in flagged
    assert "\nX-Spam-Status: Yes, score=" in flagged
    assert re.findall(r"\nSubject: ([^\r]*)", "\n" + flagged) == ["add header test"]


def test_outbound_mail_of_a_user_carries_the_settings_id_and_the_user(elemta_server,
                                                                      rspamd, credentials):
    server = elemta_server(
        listeners=[{"mode": "smtp"}, {"mode": "submission"}],
        auth={"credentials_file": credentials, "allow_plaintext": True},
        plugins={"rspamd": {"enabled": True, "address": rspamd.address,
                            "outbound_settings_id": "outbound"}})
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=60) as smtp:
        smtp.ehlo("client.test")
        smtp.login("alice", "wonderland")
        smtp.sendmail("a@sender.test", ["c@remote.test"], message("report"))
    [queue_id] = server.queued_ids()
    assert "\nX-Spam: Yes\r\n" in header_section(server.message(queue_id)[1])
    assert wait_for(lambda: re.search(r"qid: <%s>, ip: 127\.0\.0\.1, user: alice, "
                                      r"from: <a@sender\.test>.*\(default: T \(add header\)"
                                      % queue_id, open(rspamd.log_path).read()))
    # The same message to a local recipient is not outbound: no Settings-ID, no action.
    inbound = queue_id_of(send(server, message("report")))
    assert "\nX-Spam: " not in header_section(server.message(inbound)[1])


def test_a_message_over_max_size_passes_unscanned_and_logged(elemta_server, rspamd):
    server = server_with(elemta_server, rspamd, max_size=300)
    raw = message("big", GTUBE + b"\r\n" + b"x" * 300)
    queue_id = queue_id_of(send(server, raw))
    assert "%s: rspamd: not scanned: %d bytes is more than max_size 300" % (
        queue_id, len(raw)) in server.log()
    assert "X-Spamd-Result" not in header_section(server.message(queue_id)[1])


def test_rspamd_down_is_451_and_fail_open_passes_logged(elemta_server, rspamd):
    port = free_port()
    server = server_with(elemta_server, rspamd, address="127.0.0.1:%d" % port)
    code, text = send(server, message("hello", GTUBE))
    assert (code, text[:6]) == (451, "4.3.0 "), text
    assert server.queued_ids() == []
    assert ("plugin rspamd failed at data stage for client [127.0.0.1]: ScannerError: "
            "cannot connect to rspamd at 127.0.0.1:%d: Connection refused" % port
            in server.log())
    relaxed = server_with(elemta_server, rspamd, address="127.0.0.1:%d" % port,
                          fail_open=True)
    queue_id = queue_id_of(send(relaxed, message("hello", GTUBE)))
    assert re.search(r"%s: plugin rspamd failed at data stage .*Connection refused.*; "
                     r"continuing \(fail_open\)" % queue_id, relaxed.log())


def test_not_rspamd_is_a_scanner_failure(elemta_server, rspamd):
    # A web server that is not Rspamd: the SMTP port of another Elemta answers "220 ...".
    other = elemta_server()
    server = server_with(elemta_server, rspamd, address="127.0.0.1:%d" % other.port)
    code, text = send(server, message("hello"))
    assert (code, text[:6]) == (451, "4.3.0 "), text
    assert "plugin rspamd failed at data stage for client [127.0.0.1]: ScannerError: " \
           "rspamd at 127.0.0.1:%d gave no HTTP answer" % other.port in server.log()


def test_bad_settings_name_file_line_and_key(tmp_path):
    from elemta.config.errors import ConfigError
    from elemta.config.loader import load_config
    path = tmp_path / "elemta.toml"
    path.write_text('[plugins.rspamd]\nenabled = true\naddress = "localhost"\n'
                    'spam_header = "X Spam"\noutbound_settings_id = "two words"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value).splitlines() == [
        "%s:3: plugins.rspamd.address: 'localhost' is neither a unix socket path (/path) "
        "nor host:port" % path,
        "%s:4: plugins.rspamd.spam_header: 'X Spam' is not a header field name" % path,
        "%s:5: plugins.rspamd.outbound_settings_id: must be printable ASCII without "
        "spaces" % path]


def test_verdicts_scan_times_scores_and_failures_reach_prometheus(
        elemta_server, rspamd, tmp_path, monkeypatch):
    from tests.peers.clamd import EICAR, ClamdInstance
    from tests.test_metrics import settled, start_server, value
    clamd = ClamdInstance(tempfile.mkdtemp(prefix="elemta-clamd-"), free_port())
    clamd.start()
    try:
        server, api_port = start_server(
            elemta_server, tmp_path, monkeypatch,
            plugins={"clamav": {"enabled": True, "address": clamd.address},
                     "rspamd": {"enabled": True, "address": rspamd.address}})
        assert send(server, message("clean"))[0] == 250
        assert send(server, message("spam", GTUBE))[0] == 554
        assert send(server, message("virus", EICAR))[0] == 554   # clamav decides first
    finally:
        clamd.stop()
        clamd.remove()
    assert send(server, message("clean again"))[:1] == (451,)    # clamd is gone

    def counted(samples):
        def verdicts(scanner, result, action):
            return value(samples, "elemta_scanner_verdicts_total", scanner=scanner,
                         result=result, action=action)
        assert verdicts("clamav", "clean", "pass") == 2
        assert verdicts("clamav", "infected", "reject") == 1
        assert verdicts("rspamd", "no_action", "pass") == 1
        assert verdicts("rspamd", "reject", "reject") == 1
        assert value(samples, "elemta_scanner_scan_seconds_count", scanner="clamav") == 3
        assert value(samples, "elemta_scanner_scan_seconds_count", scanner="rspamd") == 2
        assert value(samples, "elemta_scanner_failures_total", scanner="clamav",
                     kind="error") == 1
        assert value(samples, "elemta_rspamd_score_count") == 2
        assert value(samples, "elemta_rspamd_score_bucket", le="10.0") == 1  # the clean one
        assert value(samples, "elemta_rspamd_score_bucket", le="15.0") == 2  # and GTUBE
    _, text = settled(api_port, counted)
    assert "# HELP elemta_scanner_verdicts_total Messages a content scanner judged" in text


def test_a_hung_rspamd_is_a_timeout_in_the_log_and_the_metrics(elemta_server, tmp_path,
                                                               monkeypatch):
    import socket
    from tests.test_metrics import settled, start_server, value
    with socket.socket() as silent:            # accepts, reads nothing, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        server, api_port = start_server(
            elemta_server, tmp_path, monkeypatch,
            plugins={"rspamd": {"enabled": True, "timeout": 1,
                                "address": "127.0.0.1:%d" % silent.getsockname()[1]}})
        code, text = send(server, message("hello"))
    assert (code, text[:6]) == (451, "4.3.0 "), text
    assert "plugin rspamd failed at data stage for client [127.0.0.1]: timed out after " \
           "1s; answering 451 4.3.0" in server.log()

    def counted(samples):
        assert value(samples, "elemta_scanner_failures_total", scanner="rspamd",
                     kind="timeout") == 1
        assert value(samples, "elemta_scanner_scan_seconds_count", scanner="rspamd") == 0
    settled(api_port, counted)
