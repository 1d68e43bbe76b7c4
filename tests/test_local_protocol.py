"""The local agent's request line (elemta.addressing.local_protocol): what a delivery worker sends is
read back as sent, and a request whose fields have the wrong type is refused whole with
one line naming the field, never a traceback in the per-recipient process.

Two tests talk to a real local agent of a running Elemta over its unix socket (needs
root, as the agent runs as root to become users); the last two check how the agent reaps
its per-recipient processes (elemta.local.agent._reap: never through a gevent child
watcher, whose first SIGCHLD could be lost).
See also: elemta.local.agent (which logs the refusal and closes), tests/test_local_delivery.py.
"""

import json
import os
import re
import signal
import smtplib
import socket

import gevent.os
import pytest

from elemta.addressing import local_protocol as protocol
from elemta.local import agent
from elemta.queue.ids import new_queue_id
from elemta.queue.model import Recipient
from tests.harness import wait_for

# Fixed, not new_queue_id(): it appears in test ids, which must be the same each
# collection (pytest-xdist compares its workers' collections).
QUEUE_ID = "1K1ZKXJGBA7T55QX4MKM"


def request(**recipient):
    item = {"index": 0, "address": "user@example.test", "orcpt": None, "notify": None}
    item.update(recipient)
    return json.dumps({"queue_id": QUEUE_ID, "recipients": [item]}).encode() + b"\n"


def refusal(line):
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode_request(line)
    return str(caught.value)


def test_a_worker_request_reads_back_as_sent():
    line = protocol.encode_request(QUEUE_ID, [
        (0, Recipient("a@example.test")),
        (3, Recipient("b@example.test", ("SUCCESS", "FAILURE"), "rfc822;b@example.test"))])
    queue_id, recipients = protocol.decode_request(line)
    assert queue_id == QUEUE_ID
    assert recipients == [
        {"index": 0, "address": "a@example.test", "orcpt": None, "notify": None},
        {"index": 3, "address": "b@example.test", "orcpt": "rfc822;b@example.test",
         "notify": ["SUCCESS", "FAILURE"]}]


@pytest.mark.parametrize("fields, message", [
    ({"orcpt": 5}, "recipient 0: orcpt must be a string or null, not int 5"),
    ({"orcpt": ["rfc822;a@b"]}, "recipient 0: orcpt must be a string or null, not list"),
    ({"notify": "NEVER"}, "recipient 0: notify must be a list of strings or null, not str"),
    ({"notify": [1]}, "recipient 0: notify must be a list of strings or null, not list"),
    ({"address": 7}, "recipient 0: address must be a non-empty string, not int 7"),
    ({"address": ""}, "recipient 0: address must be a non-empty string"),
    ({"index": "0"}, "recipient 0: index must be a whole number, not str"),
    ({"index": True}, "recipient 0: index must be a whole number, not bool"),
    ({"index": -1}, "recipient 0: index must be a whole number, not int -1"),
])
def test_a_recipient_field_of_the_wrong_type_is_named(fields, message):
    assert refusal(request(**fields)).startswith("bad request: " + message)


@pytest.mark.parametrize("line, message", [
    (b"not json\n", "bad request: not a line of JSON"),
    (b"\xff\n", "bad request: not a line of JSON"),
    (b"[1, 2]\n", "bad request: not a JSON object"),
    (b'{"recipients": []}\n', "bad request: queue_id is not a queue id: NoneType null"),
    (b'{"queue_id": "../../etc/passwd", "recipients": []}\n',
     'bad request: queue_id is not a queue id: str "../../etc/passwd"'),
    (('{"queue_id": "%s", "recipients": {}}\n' % QUEUE_ID).encode(),
     "bad request: recipients must be a list, not dict {}"),
    (('{"queue_id": "%s", "recipients": ["a@b"]}\n' % QUEUE_ID).encode(),
     "bad request: recipient 0: not a JSON object"),
])
def test_a_request_that_is_not_one_is_refused(line, message):
    assert refusal(line).startswith(message)


@pytest.mark.skipif(os.getuid() != 0, reason="the local agent runs as root")
def test_the_agent_refuses_a_bad_request_with_one_line_and_no_traceback(elemta_server):
    """A real message in the spool and a request for it whose orcpt is a number: the
    agent closes without a reply and logs why (before, the per-recipient process died
    with a traceback). The fixture fails the test on any Traceback in the log."""
    server = elemta_server(
        delivery={"workers": 1, "min_backoff": 60.0, "max_backoff": 60.0,
                  # Nobody listens on port 1: the message waits, deferred, in the spool.
                  "transport": [{"domain": "remote.test", "nexthop": "smtp:[127.0.0.1]:1"}]},
        api={"enabled": False})
    wait_for(lambda: "local delivery agent started" in server.log())
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("someone@client.test")
        client.rcpt("friend@remote.test")
        code, text = client.data(b"Subject: waits\r\n\r\nbody\r\n")
    assert code == 250
    queue_id = re.search(r"queued as (\w+)", text.decode()).group(1)

    def ask(line):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(protocol.socket_path(server.spool))
            sock.sendall(line)
            answer = b""
            while not answer.endswith(b"\n"):      # one reply line, or the agent hangs up
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            return answer

    bad = {"queue_id": queue_id, "recipients": [
        {"index": 0, "address": "root@example.test", "orcpt": 5, "notify": None}]}
    assert ask(json.dumps(bad).encode() + b"\n") == b""
    wait_for(lambda: "bad request: recipient 0: orcpt must be a string or null, not int 5"
             in server.log())
    # The agent still serves: a well-formed request for a queue id with no file is
    # answered, deferred.
    answer = ask(protocol.encode_request(new_queue_id(), [(0, Recipient("root@example.test"))]))
    assert protocol.decode_reply(answer.rstrip(b"\n"))[1] == "deferred"
    assert "Traceback" not in server.log()


@pytest.mark.skipif(os.getuid() != 0, reason="the local agent runs as root")
def test_the_agent_answers_its_first_request_and_leaves_sigchld_alone(elemta_server):
    """The agent makes no gevent child watcher. gevent installs libev's SIGCHLD handler
    only when the first watcher is made, after fork() has returned: a first per-recipient
    process that exited before that had its SIGCHLD dropped, its watcher never fired, and
    the request waited on a zombie for good (about 1 run in 10 of the test above under
    load). The agent reaps by polling instead, so after a delivery its SIGCHLD is still
    not caught: the rule that keeps the race from coming back."""
    server = elemta_server(delivery={"workers": 1}, api={"enabled": False})
    wait_for(lambda: "local delivery agent started" in server.log())
    agent_pid = [pid for pid, title in server.titles().items() if title == "elemta: local"][0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(protocol.socket_path(server.spool))
        sock.sendall(protocol.encode_request(new_queue_id(),
                                             [(0, Recipient("root@example.test"))]))
        answer = sock.makefile("rb").readline()
    assert protocol.decode_reply(answer.rstrip(b"\n"))[1] == "deferred"
    with open("/proc/%d/status" % agent_pid) as f:
        caught = int([line.split()[1] for line in f if line.startswith("SigCgt:")][0], 16)
    assert not caught & (1 << (signal.SIGCHLD - 1)), "the agent catches SIGCHLD"


def test_a_child_reaped_elsewhere_is_an_unknown_ending_not_a_crash():
    """Should anything ever reap a per-recipient process first (a child watcher made
    after all), the request still ends: its answer is kept and the log says why."""
    pid = gevent.os.fork_gevent()
    if pid == 0:
        os._exit(3)
    os.waitpid(pid, 0)                         # reaped here, behind _reap's back
    assert agent._reap(pid) is None
    assert agent._ending(None) == "an exit status unknown (reaped elsewhere)"
    pid = gevent.os.fork_gevent()
    if pid == 0:
        os._exit(3)
    assert agent._ending(agent._reap(pid)) == "exit status 3"
