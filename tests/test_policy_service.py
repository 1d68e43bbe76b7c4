"""Policy delegation (issue #15 item 3): Elemta as the client of Postfix's policy protocol.

Covers elemta.restrictions.policy_service, policy_client and policy_action. The server
runs as a subprocess (tests/conftest.py elemta_server) and is asked by smtplib over a
socket; the policy servers are Debian's postfwd and policyd-spf (tests/peers/policy.py),
and a scripted one for what no real server sends (malformed answers, silence) and to
see the requests themselves. mynetworks leaves 127.0.0.1 out, so the client is a
stranger, as on an MX.
"""

import os
import smtplib
import ssl
import tempfile
import threading
import time

import pytest

from elemta.restrictions.policy_action import parse_action
from tests.peers.nsd import NSDInstance, nsd_available
from tests.peers.policy import (POLICYD_SPF, POSTFWD, SOCAT, PolicydSPFServer,
                                PostfwdServer, ScriptedPolicyServer, missing)
from tests.harness import free_port, wait_for

NOT_US = ["192.0.2.0/24"]      # mynetworks without 127.0.0.1

# Postfix's attributes (SMTPD_POLICY_README, up to 3.8), every one sent.
POSTFIX_ATTRIBUTES = [
    "request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender",
    "recipient", "recipient_count", "client_address", "client_name",
    "reverse_client_name", "instance", "sasl_method", "sasl_username", "sasl_sender",
    "size", "ccert_subject", "ccert_issuer", "ccert_fingerprint",
    "ccert_pubkey_fingerprint", "encryption_protocol", "encryption_cipher",
    "encryption_keysize", "etrn_domain", "stress", "client_port", "policy_context",
    "server_address", "server_port", "compatibility_level", "mail_version"]


def message(sender, subject="policy"):
    return (b"From: <%s>\r\nTo: <rcpt@example.test>\r\nSubject: %s\r\n"
            b"Message-ID: <%d@client.test>\r\n\r\nA short body.\r\n"
            % (sender.encode(), subject.encode(), int(time.time() * 1e6)))


def send(server, sender, recipients):
    """([(RCPT code, text)], DATA reply or None)."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail(sender)[0] == 250
        replies = [smtp.rcpt(r) for r in recipients]
        if not any(code == 250 for code, _ in replies):
            return replies, None
        return replies, smtp.data(message(sender))


def queue_id(data_reply):
    assert data_reply[0] == 250, data_reply
    return data_reply[1].decode().rsplit(" ", 1)[1]


def policy_server(elemta_server, *servers):
    return elemta_server(relay={"mynetworks": NOT_US},
                         plugins={"policy_service": {"enabled": True,
                                                     "servers": list(servers)}})


# ---- the access(5) actions --------------------------------------------------------------

@pytest.mark.parametrize("action, kind, code, status, text", [
    ("OK", "ok", None, None, ""),
    ("31337", "ok", None, None, ""),                  # all-numerical: OK, as Postfix
    ("dunno", "dunno", None, None, ""),
    ("REJECT", "refuse", 554, "5.7.1", "Access denied"),
    ("REJECT 5.7.2 go away", "refuse", 554, "5.7.2", "go away"),
    ("reject 4.1.1 wrong class", "refuse", 554, "5.1.1", "wrong class"),
    ("DEFER busy", "refuse", 450, "4.7.1", "busy"),
    ("DEFER_IF_PERMIT 4.7.24 dns", "defer_if_permit", 450, "4.7.24", "dns"),
    ("defer_if_reject", "defer_if_reject", 450, "4.7.1",
     "Service unavailable, try again later"),
    ("554 5.7.1 no", "refuse", 554, "5.7.1", "no"),
    ("450 later", "refuse", 450, "4.7.1", "later"),
    ("421 4.7.0 bye", "refuse", 450, "4.7.0", "bye"),    # never hangs up on the client
    ("HOLD look at it", "hold", None, None, "look at it"),
    ("DISCARD", "discard", None, None, ""),
    ("FILTER smtp:[10.0.0.1]", "dunno", None, None, ""),
])
def test_actions_read_as_postfix_reads_them(action, kind, code, status, text):
    decision = parse_action(action)
    assert (decision.kind, decision.code, decision.status, decision.text) == \
        (kind, code, status, text), decision


@pytest.mark.parametrize("action", [
    "", "250 2.0.0 fine", "354 go ahead", "450-first line", "4xx oops", "650 nope",
    "REJECT a\rb", "REJECT a\x00b", "PREPEND no colon here", "PREPEND Bad Name: x",
    "PREPEND X-Empty:", "sure, why not"])
def test_malformed_actions_are_refused_with_a_reason(action):
    decision = parse_action(action)
    assert decision.kind is None and decision.problem, decision


def test_prepend_keeps_the_header_field():
    assert parse_action("PREPEND X-Policy: tagged  by us").header == \
        ("X-Policy", "tagged  by us")


# ---- postfwd ---------------------------------------------------------------------------

POSTFWD_RULES = """\
id=R-REJECT; protocol_state==RCPT; recipient==blocked@example.test; action=REJECT no mail for blocked
id=R-DEFER; protocol_state==RCPT; recipient==later@example.test; action=DEFER busy right now
id=R-CODE; protocol_state==RCPT; recipient==coded@example.test; action=554 5.7.9 coded refusal
id=R-PREPEND; protocol_state==RCPT; recipient==tagged@example.test; action=PREPEND X-Policy: tagged by postfwd
id=R-HOLD; protocol_state==RCPT; recipient==held@example.test; action=HOLD looks odd
id=R-DISCARD; protocol_state==RCPT; recipient==void@example.test; action=DISCARD into the void
id=R-DATA; protocol_state==DATA; sender==early@sender.test; action=REJECT not this time
id=R-EOM; protocol_state==END-OF-MESSAGE; sender==late@sender.test; action=REJECT not after all
"""


@pytest.fixture(scope="module")
def postfwd():
    reason = missing(POSTFWD)
    if reason:
        pytest.skip(reason)
    server = PostfwdServer(tempfile.mkdtemp(prefix="elemta-postfwd-"), POSTFWD_RULES)
    with server:
        yield server


@pytest.fixture
def with_postfwd(elemta_server, postfwd):
    return policy_server(elemta_server, {
        "address": "inet:127.0.0.1:%d" % postfwd.port,
        "protocol_states": ["RCPT", "DATA", "END-OF-MESSAGE"]})


def test_postfwd_reject_and_defer_refuse_the_recipient(with_postfwd, postfwd):
    server = with_postfwd
    replies, data = send(server, "a@sender.test", ["blocked@example.test",
                                                    "later@example.test",
                                                    "coded@example.test",
                                                    "fine@example.test"])
    assert replies[0] == (554, b"5.7.1 <blocked@example.test>: Recipient address "
                               b"rejected: no mail for blocked")
    assert replies[1] == (450, b"4.7.1 <later@example.test>: Recipient address rejected: "
                               b"busy right now")
    assert replies[2] == (554, b"5.7.9 <coded@example.test>: Recipient address rejected: "
                               b"coded refusal")
    assert replies[3][0] == 250
    envelope, _ = server.message(queue_id(data))
    assert [r.address for r in envelope.recipients] == ["fine@example.test"]
    log = server.log()
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 "
            "<blocked@example.test>: Recipient address rejected: no mail for blocked; "
            "from=<a@sender.test> to=<blocked@example.test> proto=ESMTP "
            "helo=<client.test> (plugin policy_service)") in log
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 450 4.7.1 "
            "<later@example.test>: Recipient address rejected: busy right now;") in log
    assert ("RCPT from unknown[127.0.0.1]: from=<a@sender.test> to=<blocked@example.test>: "
            "policy server inet:127.0.0.1:%d: action=REJECT no mail for blocked"
            % postfwd.port) in log


def test_postfwd_prepend_at_rcpt_reaches_the_message(with_postfwd):
    server = with_postfwd
    replies, data = send(server, "a@sender.test", ["tagged@example.test",
                                                    "fine@example.test"])
    assert [code for code, _ in replies] == [250, 250]
    _, content = server.message(queue_id(data))
    # Above our Received header, where Postfix writes a PREPEND; once.
    assert content.startswith(b"X-Policy: tagged by postfwd\r\nReceived: from client.test")
    assert content.count(b"X-Policy:") == 1


def test_postfwd_hold_queues_the_message_on_hold(with_postfwd):
    server = with_postfwd
    replies, data = send(server, "a@sender.test", ["held@example.test"])
    held = queue_id(data)
    with server.queue() as queue:
        assert queue.index.get(held).state == "hold"
    assert ("%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: looks odd (plugin "
            "policy_service at rcpt stage)" % held) in server.log()


def test_postfwd_discard_drops_the_whole_message(with_postfwd):
    server = with_postfwd
    replies, data = send(server, "a@sender.test", ["fine@example.test",
                                                    "void@example.test"])
    dropped = queue_id(data)
    assert dropped not in server.queued_ids()
    assert ("%s: discard: END-OF-MESSAGE from unknown[127.0.0.1]: into the void; "
            "from=<a@sender.test> nrcpt=2 (plugin policy_service at rcpt stage)"
            % dropped) in server.log()


def test_postfwd_at_end_of_message_refuses_the_content(with_postfwd):
    server = with_postfwd
    replies, data = send(server, "late@sender.test", ["fine@example.test"])
    assert replies[0][0] == 250
    assert data == (554, b"5.7.1 <END-OF-MESSAGE>: End-of-data rejected: not after all")
    assert "reject: END-OF-MESSAGE from unknown[127.0.0.1]: 554 5.7.1 <END-OF-MESSAGE>: " \
           "End-of-data rejected: not after all; from=<late@sender.test>" in server.log()
    assert server.queued_ids() == []


def test_postfwd_at_data_refuses_the_data_command_before_the_content(with_postfwd):
    """smtpd_data_restrictions: postfwd is asked when the client sends DATA; its REJECT
    is the reply to DATA, in place of the 354, so the client never sends the content."""
    server = with_postfwd
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("early@sender.test")[0] == 250
        assert smtp.rcpt("fine@example.test")[0] == 250
        smtp.putcmd("data")
        assert smtp.getreply() == (554, b"5.7.1 <DATA>: Data command rejected: "
                                        b"not this time")
        assert smtp.rset()[0] == 250              # the session goes on
    assert ("NOQUEUE: reject: DATA from unknown[127.0.0.1]: 554 5.7.1 <DATA>: Data "
            "command rejected: not this time; from=<early@sender.test> proto=ESMTP "
            "helo=<client.test> (plugin policy_service)") in server.log()
    assert server.queued_ids() == []


# The client's names: PTR confirmed, PTR not confirmed, no PTR.
NAME_ZONES = {
    "0.0.127.in-addr.arpa": "5 PTR good.test.\n6 PTR forged.test.\n",
    "good.test": "@ A 127.0.0.5\n",
    "forged.test": "@ A 127.0.0.99\n",
}
# postfwd echoes the names it was sent ($$attribute is the request's value).
NAME_RULES = ("id=NAMES; protocol_state==RCPT; action=REJECT client_name=$$client_name "
              "reverse_client_name=$$reverse_client_name\n")


def test_client_name_is_confirmed_and_reverse_client_name_is_the_ptr_name(
        elemta_server, tmp_path):
    """As Postfix sends them: client_name only when the PTR name's address is the
    client's, reverse_client_name the PTR name whatever its address; seen by postfwd."""
    reason = missing(POSTFWD) or nsd_available()
    if reason:
        pytest.skip(reason)
    with NSDInstance(str(tmp_path / "nsd"), NAME_ZONES) as dns, \
            PostfwdServer(tempfile.mkdtemp(prefix="elemta-postfwd-"), NAME_RULES) as postfwd:
        server = elemta_server(
            relay={"mynetworks": NOT_US},
            dns={"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": 2.0},
            plugins={"policy_service": {"enabled": True, "servers": [
                {"address": "inet:127.0.0.1:%d" % postfwd.port}]}})
        seen = {}
        for client in ("127.0.0.5", "127.0.0.6", "127.0.0.7"):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=60,
                              source_address=(client, 0)) as smtp:
                smtp.ehlo("client.test")
                smtp.mail("a@sender.test")
                code, text = smtp.rcpt("rcpt@example.test")
            assert code == 554, text
            seen[client] = text.decode().split("rejected: ", 1)[1]
    assert seen == {
        "127.0.0.5": "client_name=good.test reverse_client_name=good.test",
        "127.0.0.6": "client_name=unknown reverse_client_name=forged.test",
        "127.0.0.7": "client_name=unknown reverse_client_name=unknown"}


# ---- policyd-spf -----------------------------------------------------------------------

SPF_ZONES = {
    "sender.test": '@ TXT "v=spf1 ip4:127.0.0.1 -all"\n',
    "forged.test": '@ TXT "v=spf1 ip4:192.0.2.1 -all"\n',
    "client.test": '@ TXT "v=spf1 ip4:127.0.0.1 -all"\n',
}


@pytest.fixture(scope="module")
def policyd_spf():
    reason = missing(POLICYD_SPF, SOCAT) or nsd_available()
    if reason:
        pytest.skip(reason)
    dns = NSDInstance(tempfile.mkdtemp(prefix="elemta-policyd-nsd-"), SPF_ZONES)
    with dns:
        server = PolicydSPFServer(tempfile.mkdtemp(prefix="elemta-policyd-spf-"), dns.port)
        with server:
            yield server
        server.remove()
    dns.remove()


def test_policyd_spf_rejects_a_fail_and_prepends_received_spf_once(elemta_server,
                                                                   policyd_spf):
    server = policy_server(elemta_server,
                           {"address": "inet:127.0.0.1:%d" % policyd_spf.port})
    replies, data = send(server, "a@forged.test", ["rcpt@example.test"])
    assert data is None
    code, text = replies[0]
    assert code == 550 and text.startswith(b"5.7.23 <rcpt@example.test>: Recipient "
                                           b"address rejected: Message rejected due to: "
                                           b"SPF fail - not authorized."), replies
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.7.23 <rcpt@example.test>" \
        in server.log()
    # A pass, two recipients: policyd-spf prepends once per message, knowing the
    # message by its instance on one connection.
    replies, data = send(server, "a@sender.test", ["one@example.test", "two@example.test"])
    assert [code for code, _ in replies] == [250, 250]
    _, content = server.message(queue_id(data))
    assert content.startswith(b"Received-SPF: Pass (mailfrom) identity=mailfrom; "
                              b"client-ip=127.0.0.1; helo=client.test; "
                              b"envelope-from=a@sender.test;"), content[:300]
    assert content.count(b"Received-SPF:") == 1
    assert b"\r\nReceived: from client.test" in content


# ---- what Elemta sends, and what it does with trouble -----------------------------------

def answer_by_recipient(answers):
    """answer(request) from {recipient: bytes}, DUNNO for others."""
    def answer(request):
        return answers.get(request.get("recipient"), b"action=DUNNO\n\n")
    return answer


def test_requests_carry_postfix_attributes_and_one_instance_per_message(elemta_server):
    with ScriptedPolicyServer(lambda request: b"action=DUNNO\n\n") as policy:
        server = policy_server(elemta_server, {
            "address": policy.address, "policy_context": "mx-inbound",
            "protocol_states": ["RCPT", "DATA", "END-OF-MESSAGE"]})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("a@sender.test", ["SIZE=1234"])
            smtp.rcpt("one@example.test")
            smtp.rcpt("two@example.test")
            first = smtp.data(message("a@sender.test"))
            smtp.mail("b@sender.test")
            smtp.rcpt("three@example.test")
            second = smtp.data(message("b@sender.test"))
        requests = policy.requests
        # Both messages over one connection, kept open between requests.
        assert len(policy.connections) == 1
        assert [r["protocol_state"] for r in requests] == [
            "RCPT", "RCPT", "DATA", "END-OF-MESSAGE", "RCPT", "DATA", "END-OF-MESSAGE"]
        for request in requests:
            assert request["_order"] == POSTFIX_ATTRIBUTES
        rcpt = requests[0]
        assert {k: rcpt[k] for k in ("request", "protocol_name", "helo_name", "sender",
                                     "recipient", "recipient_count", "client_address",
                                     "client_name", "size", "policy_context",
                                     "server_address", "queue_id", "sasl_username")} == {
            "request": "smtpd_access_policy", "protocol_name": "ESMTP",
            "helo_name": "client.test", "sender": "a@sender.test",
            "recipient": "one@example.test", "recipient_count": "0",
            "client_address": "127.0.0.1", "client_name": "unknown", "size": "1234",
            "policy_context": "mx-inbound", "server_address": "127.0.0.1",
            "queue_id": "", "sasl_username": ""}
        assert rcpt["server_port"] == str(server.port) and int(rcpt["client_port"]) > 0
        eom = requests[3]
        assert eom["recipient"] == "" and eom["recipient_count"] == "2"
        assert eom["queue_id"] == queue_id(first)
        _, content = server.message(queue_id(first))
        assert 0 < int(eom["size"]) < len(content)     # the content before our Received
        assert requests[6]["recipient"] == "three@example.test"   # the only one
        assert requests[6]["queue_id"] == queue_id(second)
        # One instance for all requests about one message, another for the next.
        assert len({r["instance"] for r in requests[:4]}) == 1
        assert len({r["instance"] for r in requests[4:]}) == 1
        assert requests[0]["instance"] != requests[4]["instance"]


def test_tls_and_auth_attributes_and_a_prepend_belongs_to_its_message(elemta_server,
                                                                       tls_files,
                                                                       credentials):
    """STARTTLS and AUTH reach the encryption_* and sasl_* attributes; a PREPEND given
    at RCPT goes into that message only, not into the next one of the session."""
    cert, key = tls_files
    answers = answer_by_recipient({
        "tagged@example.test": b"action=PREPEND X-Tag: for this message only\n\n"})
    with ScriptedPolicyServer(answers) as policy:
        server = elemta_server(relay={"mynetworks": NOT_US},
                               tls={"cert_file": cert, "key_file": key},
                               auth={"credentials_file": credentials},
                               plugins={"policy_service": {
                                   "enabled": True, "servers": [{"address": policy.address}]}})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            smtp.ehlo("client.test")
            smtp.starttls(context=client_tls())
            smtp.ehlo("client.test")
            smtp.login("alice", "wonderland")
            smtp.mail("alice@sender.test")
            assert smtp.rcpt("tagged@example.test")[0] == 250
            tagged = queue_id(smtp.data(message("alice@sender.test")))
            smtp.mail("alice@sender.test")
            assert smtp.rcpt("plain@example.test")[0] == 250
            plain = queue_id(smtp.data(message("alice@sender.test")))
        request = policy.requests[0]
        assert request["encryption_protocol"].startswith("TLSv1.")
        assert request["encryption_cipher"] and int(request["encryption_keysize"]) >= 128
        assert (request["sasl_method"], request["sasl_username"]) == ("PLAIN", "alice")
        assert server.message(tagged)[1].startswith(
            b"X-Tag: for this message only\r\nReceived: from client.test")
        assert b"X-Tag:" not in server.message(plain)[1]


def client_tls():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_unix_socket_request_limit_and_a_server_that_hangs_up(elemta_server, tmp_path):
    """unix: addresses; request_limit opens a connection per request; a kept connection
    the server has closed meanwhile costs no failed attempt (try_limit 1 here)."""
    directory = tmp_path / "policy"
    directory.mkdir()
    directory.chmod(0o755)
    path = str(directory / "policy.sock")
    with ScriptedPolicyServer(answer_by_recipient({}), unix_path=path) as limited, \
            ScriptedPolicyServer(answer_by_recipient({}),
                                 answers_per_connection=1) as hangs_up:
        os.chmod(path, 0o777)
        server = policy_server(elemta_server,
                               {"address": limited.address, "request_limit": 1},
                               {"address": hangs_up.address, "try_limit": 1,
                                "retry_delay": 5.0})
        started = time.monotonic()
        replies, data = send(server, "a@sender.test", ["one@example.test",
                                                        "two@example.test",
                                                        "three@example.test"])
        assert [code for code, _ in replies] == [250, 250, 250] and data[0] == 250
        assert time.monotonic() - started < 5          # no retry_delay was waited
        assert [len(c) for c in limited.connections] == [1, 1, 1]
        assert [len(c) for c in hangs_up.connections] == [1, 1, 1]
        assert "unavailable" not in server.log()


def test_a_server_that_is_down_gives_the_default_action(elemta_server):
    port = free_port()
    server = policy_server(elemta_server, {"address": "inet:127.0.0.1:%d" % port,
                                           "retry_delay": 0.2})
    replies, data = send(server, "a@sender.test", ["rcpt@example.test"])
    assert replies[0] == (451, b"4.3.5 <rcpt@example.test>: Recipient address rejected: "
                               b"Server configuration problem")
    log = server.log()
    assert ("NOQUEUE: RCPT from unknown[127.0.0.1]: from=<a@sender.test> "
            "to=<rcpt@example.test>: policy server inet:127.0.0.1:%d unavailable: "
            "Connection refused after 2 attempts; default action 451 4.3.5 Server "
            "configuration problem" % port) in log
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 451 4.3.5" in log
    assert "Traceback" not in log


def test_a_silent_server_times_out_and_a_dunno_default_lets_mail_through(elemta_server):
    with ScriptedPolicyServer(lambda request: None) as policy:
        server = policy_server(elemta_server, {
            "address": policy.address, "timeout": 0.5, "try_limit": 1,
            "default_action": "DUNNO"})
        started = time.monotonic()
        replies, data = send(server, "a@sender.test", ["rcpt@example.test"])
        assert replies[0][0] == 250 and data[0] == 250
        assert time.monotonic() - started < 10
        assert ("policy server %s unavailable: timed out after 1 attempt; default action "
                "DUNNO" % policy.address) in server.log()


@pytest.mark.parametrize("answer, problem", [
    (b"action=250 2.0.0 you may pass\n\n", "an invalid action '250 2.0.0 you may pass'"),
    (b"action=450-4.7.1 first line\n\n", "an invalid action '450-4.7.1 first line'"),
    (b"action=REJECT evil\rinjected: yes\n\n", "an invalid action"),
    (b"action=OK\naction=REJECT\n\n", "malformed: more than one action in one answer"),
    (b"result=OK\n\n", "malformed: no action in the answer"),
    (b"just some words\n\n", "malformed: not a name=value line"),
    (b"action=" + b"x" * 9000 + b"\n\n", "malformed: answer longer than 8192 bytes"),
])
def test_a_malformed_answer_gives_the_default_action(elemta_server, answer, problem):
    with ScriptedPolicyServer(answer_by_recipient({"rcpt@example.test": answer})) as policy:
        server = policy_server(elemta_server, {"address": policy.address})
        replies, data = send(server, "a@sender.test", ["rcpt@example.test",
                                                        "other@example.test"])
        assert replies[0] == (451, b"4.3.5 <rcpt@example.test>: Recipient address "
                                   b"rejected: Server configuration problem")
        # The next recipient is asked afresh, and gets the server's DUNNO.
        assert replies[1][0] == 250 and data[0] == 250
        log = server.log()
        assert "policy server %s answered %s" % (policy.address, problem) in log
        assert "Traceback" not in log


def test_defer_if_permit_defers_unless_a_later_server_rejects(elemta_server):
    first = ScriptedPolicyServer(answer_by_recipient({
        "a@example.test": b"action=DEFER_IF_PERMIT 4.7.24 SPF temp error\n\n",
        "b@example.test": b"action=DEFER_IF_PERMIT maybe\n\n",
        "c@example.test": b"action=DEFER_IF_REJECT not sure\n\n"}))
    second = ScriptedPolicyServer(answer_by_recipient({
        "b@example.test": b"action=REJECT no\n\n",
        "c@example.test": b"action=REJECT no\n\n"}))
    with first, second:
        server = policy_server(elemta_server, {"address": first.address},
                               {"address": second.address})
        replies, _ = send(server, "s@sender.test", ["a@example.test", "b@example.test",
                                                     "c@example.test", "d@example.test"])
        assert replies[0] == (450, b"4.7.24 <a@example.test>: Recipient address rejected: "
                                   b"SPF temp error")
        assert replies[1] == (554, b"5.7.1 <b@example.test>: Recipient address rejected: no")
        assert replies[2] == (450, b"4.7.1 <c@example.test>: Recipient address rejected: "
                                   b"not sure")
        assert replies[3][0] == 250


def test_ok_skips_the_later_servers(elemta_server):
    first = ScriptedPolicyServer(answer_by_recipient({"vip@example.test": b"action=OK\n\n"}))
    second = ScriptedPolicyServer(lambda request: b"action=REJECT everyone\n\n")
    with first, second:
        server = policy_server(elemta_server, {"address": first.address},
                               {"address": second.address})
        replies, _ = send(server, "s@sender.test", ["vip@example.test", "x@example.test"])
        assert replies[0][0] == 250
        assert replies[1][0] == 554
        assert [r["recipient"] for r in second.requests] == ["x@example.test"]


@pytest.mark.parametrize("line, key, value, message_part", [
    (5, "address", "tcp:127.0.0.1:9998", "must be inet:host:port or unix:/path"),
    (6, "default_action", "250 fine", "not an access(5) action"),
    (6, "protocol_states[0]", "[MAIL]", "must be among RCPT, DATA, END-OF-MESSAGE"),
    (6, "try_limit", "0", "must be greater than 0"),
])
def test_bad_settings_name_the_file_line_and_key(tmp_path, line, key, value, message_part):
    from elemta.config import ConfigError, load_config
    path = tmp_path / "elemta.yaml"
    address = value if key == "address" else "inet:127.0.0.1:9998"
    extra = "" if key == "address" else "        %s: %s\n" % (key.split("[")[0], value)
    path.write_text("plugins:\n  policy_service:\n    enabled: true\n    servers:\n"
                    "      - address: %s\n%s" % (address, extra))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), check_files=False)
    problem = caught.value.problems[0]
    assert (problem.file, problem.line, problem.key) == (
        str(path), line, "plugins.policy_service.servers[0].%s" % key)
    assert message_part in str(caught.value)


def test_an_idle_connection_is_closed_after_max_idle(elemta_server):
    with ScriptedPolicyServer(answer_by_recipient({})) as policy:
        server = policy_server(elemta_server, {"address": policy.address, "max_idle": 1.0})
        replies, _ = send(server, "a@sender.test", ["rcpt@example.test"])
        assert replies[0][0] == 250
        assert policy.closed == []       # kept after the session, for the next one
        started = time.monotonic()
        wait_for(lambda: policy.closed == [0], timeout=10)
        assert time.monotonic() - started >= 0.3


def test_unsupported_actions_are_logged_and_taken_as_dunno(elemta_server):
    answers = answer_by_recipient({
        "filtered@example.test": b"action=FILTER smtp:[192.0.2.9]:10025\n\n",
        "redirected@example.test": b"action=REDIRECT abuse@example.test\n\n",
        "warned@example.test": b"action=WARN looks like a bulk sender\n\n"})
    with ScriptedPolicyServer(answers) as policy:
        server = policy_server(elemta_server, {"address": policy.address})
        replies, data = send(server, "a@sender.test", ["filtered@example.test",
                                                        "redirected@example.test",
                                                        "warned@example.test"])
        assert [code for code, _ in replies] == [250, 250, 250] and data[0] == 250
        envelope, _ = server.message(queue_id(data))
        assert [r.address for r in envelope.recipients] == [
            "filtered@example.test", "redirected@example.test", "warned@example.test"]
        log = server.log()
        assert ("to=<filtered@example.test>: policy server %s: FILTER is not supported, "
                "taken as DUNNO (action=FILTER smtp:[192.0.2.9]:10025)" % policy.address) in log
        assert "REDIRECT is not supported, taken as DUNNO" in log
        assert ("to=<warned@example.test>: policy server %s: WARN looks like a bulk sender"
                % policy.address) in log


def test_data_is_asked_at_the_data_command_before_any_content(elemta_server):
    """The DATA request goes out when the client sends DATA: it is on the policy
    server's record before the 354 reaches the client, which has sent no content yet;
    END-OF-MESSAGE comes after the content, with its size."""
    with ScriptedPolicyServer(lambda request: b"action=DUNNO\n\n") as policy:
        server = policy_server(elemta_server, {
            "address": policy.address,
            "protocol_states": ["RCPT", "DATA", "END-OF-MESSAGE"]})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("a@sender.test", ["SIZE=4321"])
            smtp.rcpt("rcpt@example.test")
            smtp.putcmd("data")
            assert smtp.getreply()[0] == 354
            states = [r["protocol_state"] for r in policy.requests]
            assert states == ["RCPT", "DATA"]
            content = message("a@sender.test")
            smtp.send(content + b".\r\n")
            reply = smtp.getreply()
        data, eom = policy.requests[1:]
        assert eom["protocol_state"] == "END-OF-MESSAGE"
        # At DATA: the accepted recipients, the size the client declared, no queue id.
        assert (data["recipient"], data["recipient_count"], data["size"],
                data["queue_id"]) == ("rcpt@example.test", "1", "4321", "")
        assert (eom["queue_id"], eom["size"]) == (queue_id(reply), str(len(content)))


def test_a_refusal_at_data_replaces_the_354_for_data_and_bdat(elemta_server):
    """REJECT or DEFER at DATA is the reply to the DATA command sent in a pipelined
    group (the client waits for it and sends no content); to a first BDAT, whose chunk
    is read and thrown away. Nothing is queued, END-OF-MESSAGE is never asked, and the
    session goes on."""
    def answer(request):
        if request["protocol_state"] != "DATA":
            return b"action=DUNNO\n\n"
        return {"a@sender.test": b"action=REJECT not from you\n\n",
                "b@sender.test": b"action=DEFER_IF_PERMIT 4.7.9 come back later\n\n"}[
                    request["sender"]]
    with ScriptedPolicyServer(answer) as policy:
        server = policy_server(elemta_server, {
            "address": policy.address,
            "protocol_states": ["RCPT", "DATA", "END-OF-MESSAGE"]})
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            assert smtp.ehlo("client.test")[0] == 250
            assert smtp.has_extn("pipelining") and smtp.has_extn("chunking")
            smtp.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<rcpt@example.test>\r\n"
                      b"DATA\r\n")
            assert [smtp.getreply() for _ in range(3)] == [
                (250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"),
                (554, b"5.7.1 <DATA>: Data command rejected: not from you")]
            assert smtp.rset()[0] == 250
            smtp.send(b"MAIL FROM:<b@sender.test>\r\nRCPT TO:<rcpt@example.test>\r\n"
                      b"BDAT 7 LAST\r\nSubject")
            assert [smtp.getreply() for _ in range(3)][2] == (
                450, b"4.7.9 <DATA>: Data command rejected: come back later")
            assert smtp.noop()[0] == 250
        assert [r["protocol_state"] for r in policy.requests] == [
            "RCPT", "DATA", "RCPT", "DATA"]
        log = server.log()
        assert ("NOQUEUE: reject: DATA from unknown[127.0.0.1]: 554 5.7.1 <DATA>: Data "
                "command rejected: not from you; from=<a@sender.test> proto=ESMTP "
                "helo=<client.test> (plugin policy_service)") in log
        assert ("NOQUEUE: reject: BDAT from unknown[127.0.0.1]: 450 4.7.9 <DATA>: Data "
                "command rejected: come back later; from=<b@sender.test>") in log
        assert server.queued_ids() == []


def test_prepend_at_data_goes_above_received_and_ok_at_the_end_skips_no_plugin(
        elemta_server):
    """A PREPEND at DATA is written above our Received header, as Postfix writes it; one
    at END-OF-MESSAGE edits the content (below Received); an OK there does not stop the
    later data-stage plugins (here the Authentication-Results writer)."""
    def tagger(request):
        return {"DATA": b"action=PREPEND X-Data: seen at the DATA command\n\n",
                "END-OF-MESSAGE": b"action=PREPEND X-End: seen after the content\n\n"
                }.get(request["protocol_state"], b"action=DUNNO\n\n")
    with ScriptedPolicyServer(tagger) as first, \
            ScriptedPolicyServer(lambda request: b"action=OK\n\n") as second:
        server = elemta_server(relay={"mynetworks": NOT_US}, plugins={
            "authres": {"enabled": True},
            "policy_service": {"enabled": True, "servers": [
                {"address": first.address, "protocol_states": ["DATA", "END-OF-MESSAGE"]},
                {"address": second.address, "protocol_states": ["END-OF-MESSAGE"]}]}})
        replies, data = send(server, "a@sender.test", ["rcpt@example.test"])
        _, content = server.message(queue_id(data))
        assert content.startswith(b"X-Data: seen at the DATA command\r\n"
                                  b"Received: from client.test")
        assert b"\r\nX-End: seen after the content\r\n" in content
        assert content.index(b"X-End:") > content.index(b"Received:")
        assert b"\r\nAuthentication-Results: mx.test" in content
        assert [r["protocol_state"] for r in second.requests] == ["END-OF-MESSAGE"]


def test_the_content_is_kept_only_when_a_server_is_asked_after_it():
    """The data stage (which makes the smtpd keep each message in memory) is served
    only when some server is asked at END-OF-MESSAGE; the DATA command's stage only
    when some server is asked at DATA."""
    from elemta.plugins.manager import PluginManager

    def served(*servers):
        manager = PluginManager.from_mapping({"policy_service": {"servers": list(
            servers)}}).start(strict=True)
        try:
            return tuple(manager.wants(stage) for stage in ("rcpt", "data_command", "data"))
        finally:
            manager.close()
    rcpt = {"address": "inet:127.0.0.1:10040"}
    assert served(rcpt) == (True, False, False)
    assert served(rcpt, {"address": "unix:/run/policy", "protocol_states": ["DATA"]}) == \
        (True, True, False)
    assert served(rcpt, {"address": "unix:/run/policy",
                         "protocol_states": ["END-OF-MESSAGE"]}) == (True, False, True)


def held_answers():
    """(answer, release): answer() waits until release is set, then says DUNNO."""
    release = threading.Event()

    def answer(request):
        release.wait(60)
        return b"action=DUNNO\n\n"
    return answer, release


def rcpt_in_thread(server, recipient, replies):
    def run():
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("a@sender.test")
            replies[recipient] = smtp.rcpt(recipient)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_max_connections_caps_a_worker_and_the_rest_wait_their_turn(elemta_server):
    """Three sessions at once, max_connections 2: the server sees two connections, the
    third request waits for one of them and goes over it."""
    answer, release = held_answers()
    with ScriptedPolicyServer(answer) as policy:
        server = elemta_server(smtpd={"workers": 1}, relay={"mynetworks": NOT_US},
                               plugins={"policy_service": {"enabled": True, "servers": [
                                   {"address": policy.address, "max_connections": 2,
                                    "timeout": 30}]}})
        replies = {}
        threads = [rcpt_in_thread(server, "r%d@example.test" % i, replies)
                   for i in range(3)]
        wait_for(lambda: len(policy.requests) == 2, timeout=30)
        time.sleep(1.0)                    # the third would have connected by now
        assert len(policy.connections) == 2 and len(policy.requests) == 2
        release.set()
        for thread in threads:
            thread.join(60)
        assert [replies["r%d@example.test" % i][0] for i in range(3)] == [250] * 3
        assert len(policy.connections) == 2 and len(policy.requests) == 3


def test_a_request_waiting_longer_than_timeout_takes_the_default_action(elemta_server):
    answer, release = held_answers()
    with ScriptedPolicyServer(answer) as policy:
        server = elemta_server(smtpd={"workers": 1}, relay={"mynetworks": NOT_US},
                               plugins={"policy_service": {"enabled": True, "servers": [
                                   {"address": policy.address, "max_connections": 1,
                                    "timeout": 2, "retry_delay": 4,
                                    "default_action": "DEFER policy busy"}]}})
        replies = {}
        # The first request holds the one connection: 2 s unanswered, then (between
        # its two attempts) 4 s of retry_delay.
        first = rcpt_in_thread(server, "first@example.test", replies)
        wait_for(lambda: len(policy.requests) == 1, timeout=30)
        second = rcpt_in_thread(server, "second@example.test", replies)
        second.join(60)
        assert replies["second@example.test"] == (
            450, b"4.7.1 <second@example.test>: Recipient address rejected: policy busy")
        assert len(policy.connections) == 1
        release.set()                      # the first one's second attempt is answered
        first.join(60)
        assert replies["first@example.test"][0] == 250
        assert ("to=<second@example.test>: policy server %s unavailable: all 1 "
                "connections busy for 2s; default action DEFER policy busy"
                % policy.address) in server.log()
