"""The clamav plugin against a real clamd, as an SMTP client and the admin see it.

A private clamd (tests/peers/clamd.py: its own EICAR signature, LocalSocket and
TCPSocket on loopback) serves the whole module; Elemta runs as a subprocess
(tests/conftest.py elemta_server). What is checked is what a user sees: the reply to the
end of DATA, the queue (nothing queued, queued, on hold), the log lines with the queue id.
A silent peer (a loopback socket that accepts and never answers) stands in for a clamd
that hangs, to show that a stuck scan delays only its own session.
See also: elemta/plugins/clamav.py, elemta/plugins/scanner.py.
"""

import re
import smtplib
import socket
import time

import pytest

from tests.harness import free_port, wait_for
from tests.peers.clamd import EICAR, SIGNATURE, clamd_available, private_clamd
from tests.scanning import message, queue_id_of, send

pytestmark = pytest.mark.skipif(clamd_available() is not None,
                                reason=str(clamd_available()))

FOUND = SIGNATURE + ".UNOFFICIAL"       # clamd's name for a signature of our own


@pytest.fixture(scope="module")
def clamd():
    with private_clamd(stream_max_length="2M") as instance:
        yield instance


def server_with(elemta_server, **clamav):
    clamav.setdefault("enabled", True)
    return elemta_server(plugins={"clamav": clamav})


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_eicar_is_refused_naming_the_signature_and_clean_mail_passes(elemta_server, clamd,
                                                                     where):
    address = clamd.socket_path if where == "unix" else clamd.address
    server = server_with(elemta_server, address=address)
    code, text = send(server, message(EICAR))
    assert (code, text) == (554, "5.7.1 Message rejected: virus found: %s" % FOUND)
    assert server.queued_ids() == []
    log = server.log()
    assert ": clamav: infected %s, rejected" % FOUND in log
    assert "reject: END-OF-MESSAGE" in log and "(plugin clamav at data stage)" in log

    clean = message(b"Nothing to see here.")
    queue_id = queue_id_of(send(server, clean))
    assert server.queued_ids() == [queue_id]
    assert server.message(queue_id)[1].endswith(clean)
    assert wait_for(lambda: "%s: clamav: clean (%d bytes, " % (queue_id, len(clean))
                    in server.log())


def test_quarantine_accepts_and_holds_with_the_reason_in_the_log(elemta_server, clamd):
    server = server_with(elemta_server, address=clamd.address, action="quarantine")
    queue_id = queue_id_of(send(server, message(EICAR)))
    with server.queue() as queue:
        assert queue.get(queue_id).state == "hold"
    log = server.log()
    assert "%s: clamav: infected %s, held" % (queue_id, FOUND) in log
    assert ("%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: virus found: %s "
            "(plugin clamav at data stage)" % (queue_id, FOUND)) in log


def test_one_scan_per_message_whatever_the_recipients(elemta_server, clamd):
    server = server_with(elemta_server, address=clamd.address)
    recipients = ["r%d@example.test" % i for i in range(5)]
    queue_id = queue_id_of(send(server, message(b"hello all"), recipients))
    wait_for(lambda: "%s: clamav: clean" % queue_id in server.log())
    assert server.log().count(": clamav: ") == 1
    code, _ = send(server, message(EICAR), recipients)
    assert code == 554
    assert server.log().count(": clamav: infected") == 1


def test_a_message_over_max_size_passes_unscanned_and_logged(elemta_server, clamd):
    server = server_with(elemta_server, address=clamd.address, max_size=1000)
    raw = message(EICAR + b"\r\n" + b"x" * 2000)
    queue_id = queue_id_of(send(server, raw))
    assert "%s: clamav: not scanned: %d bytes is more than max_size 1000" % (
        queue_id, len(raw)) in server.log()
    # Under the limit the same virus is caught.
    assert send(server, message(EICAR))[0] == 554


def test_a_stream_clamd_refuses_as_too_long_is_a_scanner_failure(elemta_server, clamd):
    # clamd's StreamMaxLength is 2M here; max_size lets a 3 MB message through to it.
    server = server_with(elemta_server, address=clamd.address, max_size=10 << 20)
    code, text = send(server, message(b"y" * (3 << 20)))
    assert (code, text[:6]) == (451, "4.3.0 "), text
    assert server.queued_ids() == []
    assert "plugin clamav failed at data stage for client [127.0.0.1]: ScannerError: " \
           "clamd at %s answered 'INSTREAM size limit exceeded. ERROR'" % clamd.address \
           in server.log()


def test_clamd_down_is_451_and_fail_open_lets_mail_pass_logged(elemta_server, tmp_path):
    missing = str(tmp_path / "no-clamd.sock")
    server = server_with(elemta_server, address=missing)
    code, text = send(server, message(EICAR))
    assert (code, text[:6]) == (451, "4.3.0 "), text
    assert server.queued_ids() == []
    log = server.log()
    assert ("plugin clamav failed at data stage for client [127.0.0.1]: ScannerError: "
            "cannot connect to clamd at %s: No such file or directory" % missing) in log
    assert "answering 451 4.3.0" in log

    port = free_port()
    relaxed = server_with(elemta_server, address="127.0.0.1:%d" % port, fail_open=True)
    queue_id = queue_id_of(send(relaxed, message(EICAR)))
    assert relaxed.queued_ids() == [queue_id]
    assert re.search(r"%s: plugin clamav failed at data stage for client \[127.0.0.1\]: "
                     r"ScannerError: cannot connect to clamd at 127.0.0.1:%d: Connection "
                     r"refused( \(at [^)]*\))?; continuing \(fail_open\)\n"
                     % (queue_id, port), relaxed.log())


def test_a_hung_clamd_times_out_and_delays_only_its_own_session(elemta_server):
    with socket.socket() as silent:            # accepts, reads nothing, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        server = server_with(elemta_server, address=address, timeout=3)
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as slow:
            slow.ehlo("client.test")
            slow.mail("a@sender.test")
            slow.rcpt("b@example.test")
            slow.putcmd("data")
            assert slow.getreply()[0] == 354
            slow.send(message(b"z" * (4 << 20)).replace(b"\r\n.", b"\r\n..") + b".\r\n")
            # Meanwhile the same (single) worker serves another client at once.
            other = time.monotonic()
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as quick:
                assert quick.ehlo("other.test")[0] == 250
                assert quick.noop()[0] == 250
            assert time.monotonic() - other < 2
            code, text = slow.getreply()
        assert (code, text[:6]) == (451, b"4.3.0 "), text
        assert 3 <= time.monotonic() - started < 30
    assert "plugin clamav failed at data stage for client [127.0.0.1]: timed out after " \
           "3s; answering 451 4.3.0" in server.log()


def test_a_large_message_is_scanned_whole(elemta_server):
    with private_clamd(stream_max_length="40M") as big:
        server = server_with(elemta_server, address=big.socket_path, max_size=30 << 20)
        # 24 MB of lines with the virus at the very end: found only if all was sent.
        body = (b"x" * 998 + b"\r\n") * (24 << 10) + EICAR
        code, text = send(server, message(body))
        assert (code, text) == (554, "5.7.1 Message rejected: virus found: %s" % FOUND)
    big.remove()


def test_bad_settings_name_file_line_and_key(tmp_path):
    from elemta.config.errors import ConfigError
    from elemta.config.loader import load_config
    path = tmp_path / "elemta.yaml"
    path.write_text("plugins:\n  clamav:\n    enabled: true\n    address: clamd\n"
                    "    action: bounce\n    reject_text: 'virus %(name)s'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    lines = str(caught.value).splitlines()
    assert lines[0] == ("%s:4: plugins.clamav.address: 'clamd' is neither a unix socket "
                        "path (/path) nor host:port" % path)
    assert lines[1] == ("%s:5: plugins.clamav.action: must be one of reject, quarantine, "
                        "not 'bounce'" % path)
    assert lines[2].startswith("%s:6: plugins.clamav.reject_text: only %%(virus)s may be "
                               "used" % path)


def test_mail_from_sendmail_is_scanned_too_and_a_virus_is_held(elemta_server, clamd):
    from tests.test_sendmail import queued, sendmail
    server = server_with(elemta_server, address=clamd.address)
    status, _, err = sendmail(server, "root", stdin=b"Subject: cron\n\n" + EICAR + b"\n")
    assert status == 0, err                  # sendmail only drops it in the maildrop
    [(envelope, _)] = queued(server, 1)
    with server.queue() as queue:            # pickup has nobody to refuse: it holds
        assert queue.get(envelope.queue_id).state == "hold"
    assert wait_for(lambda: "%s: clamav: infected %s, held (local submission: nobody to "
                    "reject it to)" % (envelope.queue_id, FOUND) in server.log())
    assert "infected %s, rejected" % FOUND not in server.log()
