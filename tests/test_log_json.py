"""logging.format: json through a real server (issue 17 req 4): every line one JSON object,
the facts of each event as keys taken from the code's own data (not parsed out of the
text), an address full of quotes and backslashes kept exact, and the process that wrote
each line named. The traffic and its facts: tests/traffic.py.
"""

import json
import os

from tests import traffic as T


def records(server):
    """Every line of the server's log as a JSON object (a line that is not fails)."""
    lines = server.log().splitlines()
    assert lines
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError("not a JSON line: %r" % line) from None
    return parsed


def test_json_lines_carry_each_events_facts(elemta_server):
    sent = T.run_traffic(elemta_server, "json")
    found = records(sent.server)
    for record in found:
        assert {"time", "level", "process", "pid", "program", "message"} <= set(record)
        assert record["time"].endswith("Z") and record["time"][10] == "T", record
    by_event = {}
    for record in found:
        by_event.setdefault(record.get("event"), []).append(record)

    # Connections, named by the smtpd that served them.
    connects = by_event["connect"]
    assert {r["client"] for r in connects} == {"unknown[127.0.0.1]", "unknown[127.0.0.2]"}
    assert {r["process"] for r in connects} == {"smtpd"}
    # One per message, the refused one, and the harness's probe for the greeting.
    assert len(by_event["disconnect"]) == len(connects) == len(sent.sent) + 2

    # Accepted: one "received" and one "queued" per message, sender and size as values.
    received = [r for r in by_event["received"] if r["process"] == "smtpd"]
    assert len(received) == len(sent.sent)
    ids = [r["queue_id"] for r in received]
    queued = {r["queue_id"]: r for r in by_event["queued"]}
    assert [queued[i]["from"] for i in ids] == [s for s, _ in sent.sent]
    assert [queued[i]["nrcpt"] for i in ids] == [len(r) for _, r in sent.sent]
    assert all(isinstance(queued[i]["size"], int) and queued[i]["size"] > 20 for i in ids)
    assert all(queued[i]["client"] == "unknown[127.0.0.1]" for i in ids)

    # Deliveries: one line per recipient and attempt, with relay, dsn, delay, status.
    deliveries = by_event["delivery"]
    assert {r["process"] for r in deliveries} == {"delivery"}
    relay = "127.0.0.1[127.0.0.1]:%d" % sent.sink.port
    outcome = [(r["to"], r["status"], r["dsn"]) for r in deliveries]
    for address in T.DELIVERED + [T.ODD]:
        assert (address, "sent", "2.0.0") in outcome
    assert (T.DEFERRED_ONCE, "deferred", "4.2.0") in outcome
    assert (T.DEFERRED_ONCE, "sent", "2.0.0") in outcome
    assert (T.BOUNCED, "bounced", "5.1.1") in outcome
    assert all(r["relay"] == relay for r in deliveries)
    assert all(isinstance(r["delay"], (int, float)) and 0 <= r["delay"] < 30
               for r in deliveries)
    bounced = next(r for r in deliveries if r["status"] == "bounced")
    assert "no such user" in bounced["reason"]

    # The bounce: its own queue id, named by the original's notice line, delivered.
    [notice] = by_event["notice"]
    assert notice["queue_id"] == bounced["queue_id"]
    assert notice["notice"] == "non-delivery notification"
    assert queued[notice["notice_id"]]["from"] == ""
    assert (notice["notice_id"], T.SENDER, "sent") in [
        (r["queue_id"], r["to"], r["status"]) for r in deliveries]
    # Every message removed once delivered; the bounced one kept, failed.
    assert {r["queue_id"] for r in by_event["removed"]} == \
        set(ids + [notice["notice_id"]]) - {bounced["queue_id"]}
    assert [r["queue_id"] for r in by_event["failed"]] == [bounced["queue_id"]]

    # The refused relay attempt: every part of Postfix's reject line as its own key.
    [reject] = by_event["reject"]
    assert reject["process"] == "smtpd" and "queue_id" not in reject
    assert (reject["command"], reject["client"], reject["from"], reject["to"]) == \
        ("RCPT", "unknown[127.0.0.2]", T.OTHER_SENDER, T.REFUSED)
    assert reject["dsn"] == "5.7.1" and reject["reason"].startswith("554 5.7.1 ")
    assert "Relay access denied" in reject["reason"]
    assert reject["restriction"] == "reject_unauth_destination"
    assert reject["helo"] == "stranger.test"
    # The master says who it is too.
    assert "master" in {r["process"] for r in found}


def test_an_address_that_needs_escaping_stays_valid_json(elemta_server):
    sent = T.run_traffic(elemta_server, "json")
    raw = [line for line in sent.server.log().splitlines() if "odd" in line]
    assert raw and all(json.loads(line) for line in raw)
    # The quotes and the backslash are escaped in the line and exact in the value.
    assert any('\\"odd \\\\\\"quoted\\\\\\" \\\\\\\\ name\\"@remote.test' in line
               for line in raw), raw
    values = {json.loads(line).get("to") for line in raw}
    assert T.ODD in values


def test_json_to_a_file_target(elemta_server, tmp_path):
    """The file target writes the same lines (and nothing of the text format)."""
    path = str(tmp_path / "mail.json")
    sent = T.run_traffic(elemta_server, "json", log_target=path)
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines and all(json.loads(line)["pid"] > 0 for line in lines)
    assert any(json.loads(line).get("event") == "delivery" for line in lines)
    assert os.path.getsize(path) > 0 and sent.rejected == 1
