"""The REST API as a client sees it: the real server's api process over real HTTP.

Owned by the test suite. Mail goes in over real SMTP (smtplib) into the real server
(tests/conftest.py, delivery off unless a test turns it on); the API's answers are compared
with what `elemtactl queue ... --json` prints for the same queue, the same filters and the
same message. schemathesis then fuzzes every route of the served OpenAPI document against
a live server and must find no server error and nothing the document does not describe.
See also: elemta.api.app, elemta.api.openapi, tests/test_elemtactl_queue.py.
"""

import http.client
import json
import os
import smtplib
import subprocess
import sys
import threading
import urllib.parse

import pytest

from tests import api_fuzz
from tests.harness import REPO, wait_for
from tests.peers.sink import ScriptedServer

TOKEN = "s3cret-t0ken"
AUTH = {"Authorization": "Bearer " + TOKEN}
UNKNOWN_ID = "0D8J3K5RZQ1T4A7B9C2E"      # well formed, names no message


def message(subject):
    return ("From: someone@client.test\r\nTo: someone@dest.test\r\nSubject: %s\r\n\r\n"
            "body of %s\r\n" % (subject, subject)).encode()


def call(server, method, path, headers=None, query=None, body=None):
    """(status, headers, decoded JSON or raw bytes) of one request to the api process."""
    port = server_api_port(server)
    if query:
        path += "?" + urllib.parse.urlencode(query, doseq=True)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        body = json.loads(body)
    return response.status, response, body


def server_api_port(server):
    from ruamel.yaml import YAML
    with open(server.config_path) as f:
        return YAML(typ="safe").load(f)["api"]["port"]


def wait_for_api(server):
    wait_for(lambda: _health(server) == 200)


def _health(server):
    try:
        return call(server, "GET", "/api/v1/health")[0]
    except OSError:
        return None


def send(server, sender, recipients, subject):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail(sender, recipients, message(subject))


def elemtactl(server, *args):
    """stdout of `elemtactl --config ... queue ARGS`, as one JSON value per line."""
    done = subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "--config",
                           server.config_path, "queue"] + list(args),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def api_server(elemta_server):
    """A server with a token and four messages: (server, {name: queue id})."""
    server = elemta_server(api={"token": TOKEN})
    send(server, "alice@client.test", ["bob@dest.test"], "one")
    send(server, "carol@other.test", ["dave@dest.test", "erin@dest.test"], "two")
    send(server, "", ["postmaster@dest.test"], "three")
    send(server, "alice@client.test", ["frank@far.test"], "four")
    ids = server.queued_ids()
    assert len(ids) == 4
    wait_for_api(server)
    return server, dict(zip(("one", "two", "three", "four"), ids))


def ids_of(body):
    return [m["queue_id"] for m in body["messages"]]


# ---------------------------------------------------------------- authentication

PROTECTED = [("GET", "/api/v1/queue"), ("POST", "/api/v1/queue/flush"),
             ("GET", "/api/v1/queue/" + UNKNOWN_ID), ("DELETE", "/api/v1/queue/" + UNKNOWN_ID),
             ("GET", "/api/v1/queue/%s/content" % UNKNOWN_ID),
             ("POST", "/api/v1/queue/%s/hold" % UNKNOWN_ID),
             ("POST", "/api/v1/queue/%s/release" % UNKNOWN_ID),
             ("POST", "/api/v1/queue/%s/flush" % UNKNOWN_ID),
             ("POST", "/api/v1/queue/%s/requeue" % UNKNOWN_ID),
             ("POST", "/api/v1/queue/%s/priority" % UNKNOWN_ID), ("GET", "/api/v1/stats"),
             ("GET", "/api/v1/openapi.json")]


def assert_refused(server, headers, why):
    for method, path in PROTECTED:
        status, response, body = call(server, method, path, headers)
        assert status == 401, (method, path, status, body)
        assert response.getheader("WWW-Authenticate") == 'Bearer realm="elemta"'
        assert why in body["error"], body


def assert_public_routes_answer(server):
    status, _, body = call(server, "GET", "/api/v1/health")
    assert (status, body["status"], body["ready"]) == (200, "ok", True)
    assert call(server, "GET", "/api/v1/health/live")[::2] == (200, {"status": "ok"})
    assert call(server, "GET", "/api/v1/health/ready")[0] == 200
    status, response, text = call(server, "GET", "/metrics")
    assert status == 200 and b"elemta_queue_messages" in text


def test_every_route_but_health_needs_the_token(elemta_server):
    server = elemta_server(api={"token": TOKEN})
    wait_for_api(server)
    assert_refused(server, {}, "Authorization: Bearer")
    assert_refused(server, {"Authorization": "Bearer wrong-token"}, "wrong bearer token")
    assert_refused(server, {"Authorization": "Bearer " + TOKEN + "x"}, "wrong bearer token")
    assert_refused(server, {"Authorization": "Basic " + TOKEN}, "Bearer <token>")
    assert_public_routes_answer(server)
    for method, path in PROTECTED:
        status, _, body = call(server, method, path, AUTH)
        # The priority route wants a body: without one it is refused, but not 401.
        assert status in (200, 404) or (status == 400 and path.endswith("/priority")), (
            method, path, status, body)
    # The scheme's name is case-insensitive (RFC 7235).
    assert call(server, "GET", "/api/v1/queue", {"Authorization": "bearer " + TOKEN})[0] == 200


def test_without_a_configured_token_every_protected_route_is_refused(elemta_server):
    server = elemta_server()
    wait_for_api(server)
    assert_refused(server, AUTH, "no API token is configured")
    assert_refused(server, {"Authorization": "Bearer "}, "no API token is configured")
    assert_public_routes_answer(server)


def test_the_token_file_first_line_wins_over_the_token(elemta_server, tmp_path):
    token_file = tmp_path / "api-token"
    token_file.write_text("from-the-file\nsecond line is ignored\n")
    server = elemta_server(api={"token": TOKEN, "token_file": str(token_file)})
    wait_for_api(server)
    assert_refused(server, AUTH, "wrong bearer token")
    assert_refused(server, {"Authorization": "Bearer second line is ignored"},
                   "wrong bearer token")
    status, _, body = call(server, "GET", "/api/v1/queue",
                           {"Authorization": "Bearer from-the-file"})
    assert (status, body) == (200, {"messages": [], "next_cursor": None})


def test_an_unreadable_token_file_refuses_everyone(elemta_server, tmp_path):
    server = elemta_server(api={"token": TOKEN, "token_file": str(tmp_path / "missing")})
    wait_for_api(server)
    assert_refused(server, AUTH, "no API token is configured")
    assert "cannot read api.token_file" in server.log()


# ---------------------------------------------------------------- listing

def test_the_list_is_elemtactls_json_with_the_same_filters(api_server):
    server, ids = api_server
    status, _, body = call(server, "GET", "/api/v1/queue", AUTH)
    assert status == 200
    assert body["next_cursor"] is None
    assert body["messages"] == elemtactl(server, "list", "--json")
    assert ids_of(body) == sorted(ids.values())
    for query, cli, expected in [
            ({"sender": "*@CLIENT.test"}, ["--from", "*@CLIENT.test"], ["one", "four"]),
            ({"sender": "<>"}, ["--from", "<>"], ["three"]),
            ({"recipient": "erin@*"}, ["--to", "erin@*"], ["two"]),
            ({"domain": "far.test"}, ["--domain", "far.test"], ["four"]),
            ({"state": "incoming"}, ["--state", "incoming"], ["one", "two", "three", "four"]),
            ({"state": "hold,deferred"}, ["--state", "hold,deferred"], []),
            ({"newer_than": "1h"}, ["--newer-than", "1h"], ["one", "two", "three", "four"]),
            ({"older_than": "1h"}, ["--older-than", "1h"], []),
            ({"sender": "alice@*", "domain": "dest.test"},
             ["--from", "alice@*", "--domain", "dest.test"], ["one"])]:
        status, _, body = call(server, "GET", "/api/v1/queue", AUTH, query)
        assert status == 200, body
        assert ids_of(body) == [ids[name] for name in expected], query
        assert body["messages"] == elemtactl(server, "list", "--json", *cli), query


def test_pages_follow_the_cursor_in_arrival_order(api_server):
    server, ids = api_server
    everything = sorted(ids.values())
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 1}
        if cursor:
            query["cursor"] = cursor
        status, _, body = call(server, "GET", "/api/v1/queue", AUTH, query)
        assert status == 200 and len(body["messages"]) <= 1
        seen += ids_of(body)
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert cursor == seen[-1]
    assert (seen, pages) == (everything, 4)
    page = call(server, "GET", "/api/v1/queue", AUTH, {"limit": 3})[2]
    assert (ids_of(page), page["next_cursor"]) == (everything[:3], everything[2])
    rest = call(server, "GET", "/api/v1/queue", AUTH, {"limit": 3, "cursor": everything[2]})[2]
    assert (ids_of(rest), rest["next_cursor"]) == (everything[3:], None)
    # A page exactly as long as what is left says there is no more.
    whole = call(server, "GET", "/api/v1/queue", AUTH, {"limit": 4})[2]
    assert (ids_of(whole), whole["next_cursor"]) == (everything, None)
    # The cursor combines with the filters.
    alice = call(server, "GET", "/api/v1/queue", AUTH,
                 {"sender": "alice@*", "cursor": ids["one"]})[2]
    assert ids_of(alice) == [ids["four"]]


# ---------------------------------------------------------------- one message

def test_show_is_elemtactls_show_json_with_the_headers_and_content(api_server):
    server, ids = api_server
    status, _, body = call(server, "GET", "/api/v1/queue/" + ids["two"], AUTH)
    assert status == 200
    headers, truncated = body.pop("headers"), body.pop("headers_truncated")
    assert body == elemtactl(server, "show", "--json", ids["two"])[0]
    assert body["sender"] == "carol@other.test"
    assert [r["address"] for r in body["recipients"]] == ["dave@dest.test",
                                                          "erin@dest.test"]
    assert "Subject: two\n" in headers and "body of two" not in headers
    assert headers.startswith("Received: ") and not truncated
    status, response, content = call(server, "GET", "/api/v1/queue/%s/content" % ids["two"],
                                     AUTH)
    assert status == 200 and response.getheader("Content-Type") == "message/rfc822"
    assert content == server.message(ids["two"])[1]
    assert content.endswith(b"body of two\r\n")


def test_delete_removes_the_message_and_then_it_is_unknown(api_server):
    server, ids = api_server
    status, _, body = call(server, "DELETE", "/api/v1/queue/" + ids["three"], AUTH)
    assert (status, body) == (200, {"queue_id": ids["three"], "outcome": "deleted",
                                    "changed": True})
    assert ids["three"] not in server.queued_ids()
    for method, path in [("GET", ""), ("DELETE", ""), ("GET", "/content"),
                         ("POST", "/hold")]:
        status, _, body = call(server, method, "/api/v1/queue/%s%s" % (ids["three"], path),
                               AUTH)
        assert (status, body) == (404, {"error": "no such message: " + ids["three"]})
    assert ids["three"] not in ids_of(call(server, "GET", "/api/v1/queue", AUTH)[2])


def test_hold_and_release_show_in_elemtactl(api_server):
    server, ids = api_server
    target = ids["two"]
    status, _, body = call(server, "POST", "/api/v1/queue/%s/hold" % target, AUTH)
    assert (status, body) == (200, {"queue_id": target, "outcome": "placed on hold",
                                    "changed": True})
    assert [m["queue_id"] for m in elemtactl(server, "list", "--json", "--state", "hold")] \
        == [target]
    again = call(server, "POST", "/api/v1/queue/%s/hold" % target, AUTH)[2]
    assert (again["outcome"], again["changed"]) == ("already on hold", False)
    held = call(server, "GET", "/api/v1/queue", AUTH, {"state": "hold"})[2]
    assert ids_of(held) == [target]
    # A held message is not flushed: it waits for its release.
    flushed = call(server, "POST", "/api/v1/queue/%s/flush" % target, AUTH)[2]
    assert (flushed["outcome"], flushed["changed"]) == (
        "on hold, left alone (release it first)", False)
    status, _, body = call(server, "POST", "/api/v1/queue/%s/release" % target, AUTH)
    assert (status, body) == (200, {"queue_id": target, "outcome": "released from hold",
                                    "changed": True})
    listed = {m["queue_id"]: m["queue_name"] for m in elemtactl(server, "list", "--json")}
    assert listed[target] == "incoming"
    assert not elemtactl(server, "list", "--json", "--state", "hold")
    assert call(server, "POST", "/api/v1/queue/%s/release" % target, AUTH)[2]["outcome"] \
        == "not on hold"
    requeued = call(server, "POST", "/api/v1/queue/%s/requeue" % target, AUTH)[2]
    assert (requeued["outcome"], requeued["changed"]) == ("requeued", True)


def set_priority(server, queue_id, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(server, "POST", "/api/v1/queue/%s/priority" % queue_id,
                dict(AUTH, **{"Content-Type": content_type}), body=data)


def test_priority_is_set_over_http_and_elemtactl_shows_it(api_server):
    """Issue 21 req 3: the REST API's elemtactl queue priority."""
    server, ids = api_server
    target = ids["two"]
    status, _, body = set_priority(server, target, {"priority": 40})
    assert (status, body) == (200, {"queue_id": target, "outcome": "priority changed",
                                    "priority": 40, "changed": True})
    listed = {m["queue_id"]: m["priority"] for m in elemtactl(server, "list", "--json")}
    assert listed == {ids["one"]: 0, target: 40, ids["three"]: 0, ids["four"]: 0}
    assert call(server, "GET", "/api/v1/queue/" + target, AUTH)[2]["priority"] == 40
    status, _, body = set_priority(server, target, {"priority": 40})
    assert (status, body["outcome"], body["changed"]) == (
        200, "priority unchanged (already that)", False)
    status, _, body = set_priority(server, ids["one"], {"priority": -100})
    assert (status, body["changed"]) == (200, True)
    assert elemtactl(server, "show", "--json", ids["one"])[0]["priority"] == -100


@pytest.mark.parametrize("body, content_type, why", [
    ({"priority": 101}, "application/json", "body: priority: a priority is from -100 to 100, "
                                             "not 101"),
    ({"priority": "7"}, "application/json", "body: priority: a priority is a whole number "
                                             "from -100 to 100, not '7'"),
    ({"priority": True}, "application/json", "a whole number from -100 to 100, not True"),
    ({"priority": 2.5}, "application/json", "a whole number from -100 to 100, not 2.5"),
    ({}, "application/json", 'body: must be a JSON object {"priority": N}'),
    ([5], "application/json", 'body: must be a JSON object {"priority": N}'),
    ({"priority": 5, "state": "hold"}, "application/json", "body: unknown key state"),
    (b"priority=5", "application/json", 'body: not JSON; send {"priority": N}'),
    (b"", "application/json", "body: not JSON"),
    ({"priority": 5}, "text/plain", "body: must be application/json, not text/plain"),
    (b'{"priority": 5}' + b" " * 2000, "application/json", "body: longer than 1024 bytes"),
])
def test_a_bad_priority_body_is_a_400_saying_why(api_server, body, content_type, why):
    server, ids = api_server
    status, _, answer = set_priority(server, ids["one"], body, content_type)
    assert status == 400 and why in answer["error"], answer
    assert elemtactl(server, "show", "--json", ids["one"])[0]["priority"] == 0


def test_priority_of_an_unknown_or_malformed_id_is_a_404(api_server):
    server, _ = api_server
    for queue_id in (UNKNOWN_ID, "..%2F..%2Fetc%2Fpasswd", "abc"):
        status, _, answer = set_priority(server, queue_id, {"priority": 5})
        assert status == 404, (queue_id, answer)
        assert answer["error"].startswith("no such"), answer


def test_a_link_planted_for_a_spool_file_is_refused_not_followed(api_server, tmp_path):
    server, ids = api_server
    target = ids["one"]
    path = os.path.join(server.spool, "messages", target[-1], target)
    planted = tmp_path / "elsewhere"
    planted.write_bytes(open(path, "rb").read())
    os.unlink(path)
    os.symlink(str(planted), path)
    status, _, body = call(server, "GET", "/api/v1/queue/%s/content" % target, AUTH)
    assert status == 409 and "symbolic link" in body["error"], body
    status, _, body = call(server, "GET", "/api/v1/queue/" + target, AUTH)
    assert status == 200 and body["headers"] is None and "symbolic link" in \
        body["content_error"]
    assert call(server, "GET", "/api/v1/queue/" + ids["two"], AUTH)[0] == 200


def test_stats_are_the_queue_summary(api_server):
    server, ids = api_server
    call(server, "POST", "/api/v1/queue/%s/hold" % ids["one"], AUTH)
    status, _, stats = call(server, "GET", "/api/v1/stats", AUTH)
    assert status == 200
    sizes = {name: server.message(qid)[0].size for name, qid in ids.items()}
    assert stats["states"]["hold"] == {"messages": 1, "bytes": sizes["one"]}
    assert stats["states"]["incoming"] == {
        "messages": 3, "bytes": sizes["two"] + sizes["three"] + sizes["four"]}
    assert (stats["messages"], stats["bytes"]) == (4, sum(sizes.values()))
    summary = elemtactl(server, "summary", "--json")[0]
    assert {k: v for k, v in stats.items() if k not in ("messages", "bytes")} == summary
    assert stats["domains"]["dest.test"][0] == 4 and stats["domains"]["far.test"][0] == 1
    only_far = call(server, "GET", "/api/v1/stats", AUTH, {"domain": "far.test"})[2]
    assert (only_far["messages"], list(only_far["domains"])) == (1, ["far.test"])


# ---------------------------------------------------------------- errors

def test_bad_parameters_are_400_naming_the_parameter(api_server):
    server, ids = api_server
    for path, query, name in [
            ("/api/v1/queue", {"limit": "abc"}, "limit"),
            ("/api/v1/queue", {"limit": "0"}, "limit"),
            ("/api/v1/queue", {"limit": "1001"}, "limit"),
            ("/api/v1/queue", {"limit": ["1", "2"]}, "limit"),
            ("/api/v1/queue", {"cursor": "not-a-queue-id"}, "cursor"),
            ("/api/v1/queue", {"state": "hold,bogus"}, "state"),
            ("/api/v1/queue", {"older_than": "yesterday"}, "older_than"),
            ("/api/v1/queue", {"newer_than": "-5m"}, "newer_than"),
            ("/api/v1/queue", {"sender": ""}, "sender"),
            ("/api/v1/queue", {"color": "blue"}, "color"),
            ("/api/v1/stats", {"state": "queued"}, "state"),
            ("/api/v1/stats", {"limit": "5"}, "limit"),
            ("/api/v1/queue/" + ids["one"], {"verbose": "1"}, "verbose")]:
        status, _, body = call(server, "GET", path, AUTH, query)
        assert status == 400, (path, query, body)
        assert body["error"].startswith("parameter %s: " % name), body
    status, _, body = call(server, "POST", "/api/v1/queue/flush", AUTH, {"domain": ""})
    assert status == 400 and body["error"].startswith("parameter domain: ")
    # Nothing was changed by the refused requests.
    assert elemtactl(server, "list", "--json", "--state", "incoming").__len__() == 4


def test_unknown_ids_routes_and_methods(api_server):
    server, ids = api_server
    for method, path in [("GET", "/api/v1/queue/" + UNKNOWN_ID),
                         ("GET", "/api/v1/queue/not-an-id"),
                         ("DELETE", "/api/v1/queue/" + UNKNOWN_ID),
                         ("POST", "/api/v1/queue/%s/release" % UNKNOWN_ID),
                         ("POST", "/api/v1/queue/%s/flush" % UNKNOWN_ID.lower())]:
        status, response, body = call(server, method, path, AUTH)
        assert status == 404, (method, path, body)
        assert body["error"].startswith("no such message: ")
        assert response.getheader("Content-Type") == "application/json"
    for path in ("/api/v1/nothing", "/api/v1/queue/%s/bounce" % ids["one"], "/api/v2/queue"):
        status, _, body = call(server, "GET", path, AUTH)
        assert (status, body) == (404, {"error": "no such route: " + path})
    for method, path, allowed in [("POST", "/api/v1/stats", "GET"),
                                  ("DELETE", "/api/v1/queue", "GET"),
                                  ("GET", "/api/v1/queue/flush", "POST"),
                                  ("PUT", "/api/v1/queue/" + ids["one"], "DELETE, GET"),
                                  ("GET", "/api/v1/queue/%s/hold" % ids["one"], "POST"),
                                  ("POST", "/metrics", "GET, HEAD")]:
        status, response, body = call(server, method, path, AUTH)
        assert status == 405, (method, path, body)
        assert response.getheader("Allow").startswith(allowed)
        assert body["error"].startswith("method %s not allowed" % method)
    assert ids["one"] in server.queued_ids()


# ---------------------------------------------------------------- flush wakes delivery

def test_flush_delivers_a_deferred_message_at_once(elemta_server):
    accept = threading.Event()

    def rcpt(session, argument):
        return "250 2.1.5 Ok" if accept.is_set() else "450 4.2.0 come back later"
    with ScriptedServer(script={"RCPT": rcpt}) as sink:
        nexthop = "smtp:[127.0.0.1]:%d" % sink.port
        # Retries an hour away: only the flush can bring the messages back in this test.
        server = elemta_server(api={"token": TOKEN}, delivery={
            "workers": 1, "min_backoff": 3600.0, "max_backoff": 3600.0,
            "transport": [{"domain": "later.test", "nexthop": nexthop}]})
        wait_for_api(server)
        send(server, "a@client.test", ["one@later.test"], "first")
        send(server, "b@client.test", ["two@later.test"], "second")
        first, second = wait_for(lambda: len(server.queued_ids()) == 2 and server.queued_ids())

        def deferred():
            body = call(server, "GET", "/api/v1/queue", AUTH, {"state": "deferred"})[2]
            return len(body["messages"]) == 2 and body
        listed = wait_for(deferred)
        reasons = [m["recipients"][0]["delay_reason"] for m in listed["messages"]]
        assert all(r.startswith("450 4.2.0 come back later") for r in reasons), reasons
        accept.set()
        status, _, body = call(server, "POST", "/api/v1/queue/%s/flush" % first, AUTH)
        assert (status, body) == (200, {"queue_id": first, "outcome": "due now",
                                        "changed": True})
        wait_for(lambda: call(server, "GET", "/api/v1/queue/" + first, AUTH)[0] == 404)
        assert server.queued_ids() == [second]
        status, _, body = call(server, "POST", "/api/v1/queue/flush", AUTH)
        assert (status, body) == (200, {"flushed": 1, "outcomes": {"due now": 1}})
        wait_for(lambda: server.queued_ids() == [])
        assert sorted(m.rcpts[0] for m in sink.messages) == ["RCPT TO:<one@later.test>",
                                                              "RCPT TO:<two@later.test>"]


# ---------------------------------------------------------------- schemathesis

EXAMPLES_PER_OPERATION = 25     # per generation mode; about 20 s in all


@pytest.mark.skipif(api_fuzz.schemathesis is None, reason=api_fuzz.MISSING)
def test_schemathesis_finds_no_server_error(elemta_server):
    """Every route of the served document fuzzed (tests/api_fuzz.py); the cluster routes
    answer 404 here: this node is in no cluster (tests/test_cluster_view.py fuzzes them
    on a real one)."""
    server = elemta_server(api={"token": TOKEN})
    send(server, "alice@client.test", ["bob@dest.test"], "fuzzed")
    send(server, "", ["postmaster@dest.test", "x@far.test"], "bounce")
    wait_for_api(server)
    operations = api_fuzz.operations(
        "http://127.0.0.1:%d/api/v1/openapi.json" % server_api_port(server), AUTH)
    # Every route but the document itself.
    assert len(operations) == 23, [o.label for o in operations]
    api_fuzz.fuzz_operations(operations, AUTH, EXAMPLES_PER_OPERATION, timeout=10)


# ---- the api process's one Queue --------------------------------------------------------

_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
except BlockingIOError:
    sys.exit(0)       # someone holds LMDB's shared lock: the lock file is in use
sys.exit(1)           # nobody does: the next opener would reset it under our writers
"""


def test_a_use_during_a_close_waits_for_it_and_the_index_keeps_its_locks(tmp_path):
    """The api's threads share one Queue; an error closes it and the next use opens it
    again. Two environments on the same index in one process must never be open at once:
    closing one drops all of the process's fcntl locks on LMDB's lock file, the other's
    too (the next process to open the index then resets it under running writers), and
    py-lmdb refuses the second open ("already open in this process": a 503 for the
    request that came during a close). A use that comes during a close waits for it,
    then opens the index, which keeps its locks."""
    from elemta.api.queue_access import QueueAccess
    from elemta.config.schema import QueueSettings
    spool_dir = str(tmp_path / "spool")
    access = QueueAccess(QueueSettings(spool_dir=spool_dir, sync_method="fsync",
                                       index_map_size=64 << 20))
    with access.using() as old:
        pass
    closing, reopened = threading.Event(), threading.Event()
    close_env = old.close

    def slow_close():
        closing.set()
        reopened.wait(2)          # a second use, if it can, opens the index meanwhile
        close_env()
    old.close = slow_close
    outcome = []

    def use_again():
        closing.wait(30)
        try:
            with access.using() as queue:
                reopened.set()
                outcome.append(queue)
        except Exception as error:
            outcome.append(error)
    closer = threading.Thread(target=access.close)
    closer.start()
    try:
        user = threading.Thread(target=use_again)
        user.start()
        user.join(60)
    finally:
        reopened.set()
        closer.join(60)
    [new] = outcome
    assert not isinstance(new, Exception), "a use during a close failed: %r" % new
    assert new is not old
    with access.using() as queue:
        assert queue is new and queue.index.count_by_state() == {}
        probe = subprocess.run([sys.executable, "-c", _PROBE,
                                os.path.join(spool_dir, "index.lmdb", "lock.mdb")])
        assert probe.returncode == 0, "the open index lost its LMDB locks"
    access.close()


def test_a_failed_use_closes_the_queue_and_the_next_opens_it_again(tmp_path):
    """An error out of the index answers 503 (QueueUnavailable) and closes the Queue; the
    next use opens it again. A thread late to close the one that failed leaves the new
    one alone."""
    from elemta.api.queue_access import QueueAccess, QueueUnavailable
    from elemta.config.schema import QueueSettings
    access = QueueAccess(QueueSettings(spool_dir=str(tmp_path / "spool"),
                                       sync_method="fsync", index_map_size=64 << 20))
    seen = []

    def broken(queue):
        seen.append(queue)
        raise OSError(5, "Input/output error")
    with pytest.raises(QueueUnavailable, match="Input/output error"):
        access.call(broken)
    [old] = seen
    new = access.call(lambda queue: queue)
    assert new is not old and access.call(lambda q: q.index.count_by_state()) == {}
    access.close(old)
    assert access.call(lambda queue: queue) is new
    access.close()
