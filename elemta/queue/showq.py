"""The showq wire format: how mailq, run by any local user, asks the showq process for the
queue listing (Postfix's public/showq service).

Shared by two processes: mailq (elemta.cli.queuecmd, as whatever user ran it) connects
to spool/public/showq; the showq child (elemta.showq.server, Elemta's user) answers. The
spool stays private: the listing is the only thing that crosses, and it holds what
Postfix's mailq shows (queue id, state, size, arrival, sender, the recipients still
waiting and why), never a message's content. The only module that knows this format.

    spool/public/       0711, owned by Elemta's user: anyone may pass, nobody may list it
                        (made with the maildrop: elemta.queue.maildrop.prepare)
    spool/public/showq  a stream socket, mode 0666: any local user may connect; who may
                        see the queue is decided by the server from the peer's uid
                        (SO_PEERCRED) and mailq.authorized_users

A request is one line of ASCII JSON, at most MAX_REQUEST bytes with its newline, sent
within REQUEST_TIMEOUT seconds of connecting:

    {"version": 1, "states": [...], "sender": pattern or null, "recipient": ...,
     "domain": ..., "older_than": seconds or null, "newer_than": seconds or null}

The reply is lines of JSON: one object per message (elemta.queue.listing.record_to_json,
postqueue -j's fields), then one last line {"end": count} - or, instead of the end, one
{"error": text, "status": kind}, kind one of REFUSED, BAD_REQUEST, BUSY, FAILED. A reply
without either last line was cut short and is an error, never a shorter listing.
See also: elemta.showq.server, elemta.cli.queuecmd (mailq), elemta.queue.maildrop (the
other world-reachable directory of the spool).
"""

import json
import os
from typing import List, Optional

from elemta.queue.listing import Selection
from elemta.queue.maildrop import PUBLIC_DIR
from elemta.queue.model import STATES

SOCKET_NAME = "showq"
SOCKET_MODE = 0o666
VERSION = 1
# A request is a few filters: anything longer is not mailq talking.
MAX_REQUEST = 4096
# Seconds a client has to send its request, and each piece of the reply may wait for it
# to be read: a client that stalls holds one connection slot for no longer.
REQUEST_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
# One message's line: 1000 recipients with their addresses and reasons fit many times.
MAX_REPLY_LINE = 16 * 1024 * 1024

REFUSED = "refused"
BAD_REQUEST = "bad request"
BUSY = "busy"
FAILED = "failed"

_FILTERS = ("sender", "recipient", "domain")
_AGES = ("older_than", "newer_than")


class ShowqError(ValueError):
    """A request or reply that breaks the format; the text says how."""


def public_dir(spool_dir):
    return os.path.join(os.path.abspath(spool_dir), PUBLIC_DIR)


def socket_path(spool_dir):
    return os.path.join(public_dir(spool_dir), SOCKET_NAME)


# ---- the request ------------------------------------------------------------------------

def encode_request(selection: Selection) -> bytes:
    data = {"version": VERSION, "states": list(selection.states)}
    for name in _FILTERS + _AGES:
        data[name] = getattr(selection, name)
    line = json.dumps(data, separators=(",", ":")).encode("ascii") + b"\n"
    if len(line) > MAX_REQUEST:
        raise ShowqError("the selection is longer than %d bytes" % MAX_REQUEST)
    return line


def decode_request(line: bytes, now: float) -> Selection:
    """The Selection a request line asks for; raises ShowqError naming what is wrong."""
    if not line.endswith(b"\n"):
        raise ShowqError("no complete request line (at most %d bytes ending in a newline)"
                         % MAX_REQUEST)
    try:
        data = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ShowqError("the request is not one line of ASCII JSON") from None
    if not isinstance(data, dict):
        raise ShowqError("the request is not a JSON object")
    if data.get("version") != VERSION:
        raise ShowqError("unknown request version %r (this server speaks %d)"
                         % (data.get("version"), VERSION))
    states = data.get("states", [])
    if not isinstance(states, list) or any(s not in STATES for s in states):
        raise ShowqError("states must be a list of %s" % ", ".join(STATES))
    values = {}
    for name in _FILTERS:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise ShowqError("%s must be a string or null" % name)
        values[name] = value
    for name in _AGES:
        value = data.get(name)
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float)) or value < 0):
            raise ShowqError("%s must be a number of seconds or null" % name)
        values[name] = value
    return Selection(now=now, states=tuple(dict.fromkeys(states)), **values)


# ---- the reply --------------------------------------------------------------------------

def encode_message(listed: dict) -> bytes:
    return json.dumps(listed, separators=(",", ":")).encode("ascii") + b"\n"


def encode_end(count: int) -> bytes:
    return b'{"end":%d}\n' % count


def encode_error(status: str, text: str) -> bytes:
    return json.dumps({"error": text, "status": status}).encode("ascii") + b"\n"


class Refused(Exception):
    """The server answered with an error line: .status (REFUSED, ...) and the text."""

    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


def decode_reply_line(line: bytes) -> Optional[dict]:
    """One reply line: a message's dict, or None at the end; raises Refused for an error
    line and ShowqError for anything else."""
    if not line.endswith(b"\n"):
        raise ShowqError("the listing was cut short" if len(line) < MAX_REPLY_LINE
                         else "a reply line is longer than %d bytes" % MAX_REPLY_LINE)
    try:
        data = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ShowqError("a reply line is not ASCII JSON") from None
    if not isinstance(data, dict):
        raise ShowqError("a reply line is not a JSON object")
    if "error" in data:
        raise Refused(str(data.get("status")), str(data["error"]))
    if "end" in data:
        return None
    if not _is_listed(data):
        raise ShowqError("a reply line is not a queue listing entry")
    return data


def _is_listed(data: dict) -> bool:
    """The fields mailq prints have the types it needs."""
    recipients: List = data.get("recipients")
    return (isinstance(data.get("queue_id"), str) and isinstance(data.get("queue_name"), str)
            and isinstance(data.get("sender"), str)
            and all(isinstance(data.get(name), (int, float))
                    for name in ("message_size", "arrival_time"))
            and isinstance(recipients, list)
            and all(isinstance(r, dict) and isinstance(r.get("address"), str)
                    and isinstance(r.get("delay_reason", ""), str) for r in recipients))
