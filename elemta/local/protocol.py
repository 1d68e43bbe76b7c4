"""The conversation between a delivery worker and the local agent: JSON, one object per
line, over the unix stream socket spool/run/local.sock.

Shared by two processes: the delivery worker's LocalTransport
(elemta.delivery.local_transport) asks, the local agent (elemta.local.agent) answers.

    request (one line)   {"queue_id": "...", "recipients": [{"index": 0, "address":
                          "user@example.org", "orcpt": "rfc822;...", "notify": [...]}]}
    replies (one line per recipient, in the order they finish)
                         {"index": 0, "status": "sent", "reply": "250 2.0.0 ..."}

status is "sent", "bounced" or "deferred" (elemta.queue.model). The agent reads the
message itself from the spool; the request only names it. Then the agent closes.
"""

import json
import os

from elemta.queue import wakeup
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
    """(queue_id, [recipient dicts]); raises ProtocolError."""
    try:
        data = json.loads(line.decode("utf-8"))
        queue_id = data["queue_id"]
        recipients = data["recipients"]
        if not isinstance(queue_id, str) or not isinstance(recipients, list):
            raise TypeError("queue_id must be a string and recipients a list")
        for item in recipients:
            if not isinstance(item.get("index"), int) or not isinstance(
                    item.get("address"), str) or not item["address"]:
                raise TypeError("each recipient needs an index and an address")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ProtocolError("bad request: %s" % error) from None
    return queue_id, recipients


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
