"""The conversation between a delivery worker and the local agent: JSON, one object per
line, over the unix stream socket spool/run/local.sock.

Shared by two processes, so it lives below both, in the addressing layer (as Postfix's
deliver_request.c sits in src/global): the delivery worker's LocalTransport
(elemta.delivery.local_transport) asks, the local agent (elemta.local.agent) answers.

    request (one line)   {"queue_id": "...", "recipients": [{"index": 0, "address":
                          "user@example.org", "orcpt": "rfc822;...", "notify": [...]}]}
    replies (one line per recipient, in the order they finish)
                         {"index": 0, "status": "sent", "reply": "250 2.0.0 ..."}

status is "sent", "bounced" or "deferred" (elemta.queue.model). The agent reads the
message itself from the spool; the request only names it. Then the agent closes.
A request with a field of the wrong type is refused whole (decode_request says which
field): the agent logs that line and closes without a reply, and the worker defers.
"""

import json
import os

from elemta.queue import wakeup
from elemta.queue.ids import is_queue_id
from elemta.queue.model import BOUNCED, RCPT_DEFERRED, SENT

SOCKET_NAME = "local.sock"
# Longest request or reply line: many recipients fit; a runaway peer does not.
MAX_LINE = 4 * 1024 * 1024
STATUSES = (SENT, BOUNCED, RCPT_DEFERRED)


class ProtocolError(ValueError):
    """A line that is not what the other side should send."""


def socket_path(spool_dir):
    return os.path.join(wakeup.run_dir(spool_dir), SOCKET_NAME)


def _line(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


def encode_request(queue_id, items):
    """The request for recipients [(index, model.Recipient)] of a message."""
    return _line({"queue_id": queue_id, "recipients": [
        {"index": index, "address": r.address, "orcpt": r.orcpt,
         "notify": list(r.notify) if r.notify else None} for index, r in items]})


def decode_request(line):
    """(queue_id, [recipient dicts]); raises ProtocolError naming the field that is wrong.

    Every field the agent will use is checked here, type and all, so a bad request is
    refused whole with one clear line instead of failing deep inside a delivery."""
    try:
        data = json.loads(line.decode("utf-8"))
    except ValueError as error:          # UnicodeDecodeError and JSONDecodeError too
        raise ProtocolError("bad request: not a line of JSON: %s" % error) from None
    if not isinstance(data, dict):
        raise ProtocolError("bad request: not a JSON object")
    queue_id = data.get("queue_id")
    if not isinstance(queue_id, str) or not is_queue_id(queue_id):
        raise ProtocolError("bad request: queue_id is not a queue id: %s" % _shown(queue_id))
    recipients = data.get("recipients")
    if not isinstance(recipients, list):
        raise ProtocolError("bad request: recipients must be a list, not %s"
                            % _shown(recipients))
    for position, item in enumerate(recipients):
        problem = _recipient_problem(item)
        if problem:
            raise ProtocolError("bad request: recipient %d: %s" % (position, problem))
    return queue_id, recipients


def _recipient_problem(item):
    """What is wrong with one recipient of a request, or None."""
    if not isinstance(item, dict):
        return "not a JSON object"
    index = item.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        return "index must be a whole number, not %s" % _shown(index)
    address = item.get("address")
    if not isinstance(address, str) or not address:
        return "address must be a non-empty string, not %s" % _shown(address)
    orcpt = item.get("orcpt")
    if orcpt is not None and not isinstance(orcpt, str):
        return "orcpt must be a string or null, not %s" % _shown(orcpt)
    notify = item.get("notify")
    if notify is not None and not (isinstance(notify, list)
                                   and all(isinstance(word, str) for word in notify)):
        return "notify must be a list of strings or null, not %s" % _shown(notify)
    return None


def _shown(value):
    """A value for a log line: its JSON type and a short spelling."""
    text = json.dumps(value)
    return "%s %s" % (type(value).__name__, text if len(text) <= 60 else text[:57] + "...")


def encode_reply(index, status, reply):
    return _line({"index": index, "status": status, "reply": reply})


def decode_reply(line):
    """(index, status, reply); raises ProtocolError."""
    try:
        data = json.loads(line.decode("utf-8"))
        index, status, reply = data["index"], data["status"], data["reply"]
    except (ValueError, KeyError, TypeError) as error:
        raise ProtocolError("bad reply: %s" % error) from None
    if not isinstance(index, int) or status not in STATUSES or not isinstance(reply, str):
        raise ProtocolError("bad reply: %r" % (data,))
    return index, status, reply
