"""The REST API's queue routes: list, show, content, delete, hold, release, flush, requeue,
priority, and the queue statistics.

Owned by the api process. They do what `elemtactl queue` does, through the same code: the
filters and the JSON for a message come from elemta.queue.listing, the actions are
elemta.queue.queue.Queue's, and actions that make mail due wake the delivery workers
(elemta.queue.wakeup) as the command does. The message JSON is `elemtactl queue list --json`'s
in listings and `elemtactl queue show --json`'s (plus the headers) for one message.
See also elemta.api.openapi (the document describing these routes), elemta.cli.queuecmd.
"""

import json
from typing import List

import falcon

from elemta.api import params
from elemta.queue import queue as queue_actions
from elemta.queue import wakeup
from elemta.queue.ids import is_queue_id
from elemta.queue.listing import record_show_json, record_to_json
from elemta.queue.model import priority_error
from elemta.queue.queue import NoSuchMessage
from elemta.queue.store import CorruptSpoolFile
from elemta.util.eugid import UnsafePath

# Headers are read up to this many bytes; a message with more says headers_truncated.
MAX_HEADER_BYTES = 256 * 1024
CONTENT_CHUNK = 64 * 1024
# Actions that make mail due: the delivery workers are woken when one changed something.
WAKING_ACTIONS = ("release", "flush", "requeue")
# action -> the outcome meaning it changed the message (as elemtactl counts them)
SUCCESS = {"hold": (queue_actions.HELD,),
           "release": (queue_actions.RELEASED, queue_actions.RESCANNED_CLEAN),
           "flush": (queue_actions.FLUSHED,), "requeue": (queue_actions.REQUEUED,),
           "delete": (queue_actions.DELETED,)}


def reply(resp: falcon.Response, data, status=falcon.HTTP_200) -> None:
    """JSON, ASCII-only: addresses may hold undecodable bytes kept as escapes."""
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps(data).encode("ascii")


def no_such_message(queue_id: str) -> falcon.HTTPNotFound:
    return falcon.HTTPNotFound(title="not found",
                               description="no such message: %s" % params.printable(queue_id))


def _known_id(queue_id: str) -> str:
    """404 at once for what cannot be a queue id: it names no message."""
    if not is_queue_id(queue_id):
        raise no_such_message(queue_id)
    return queue_id


class QueueList:
    """GET /api/v1/queue: messages in id (arrival) order, a page at a time."""

    def __init__(self, access):
        self.access = access

    def on_get(self, req, resp):
        params.check_known(req, params.FILTERS + params.PAGE)
        limit = params.limit(req)
        selection = params.selection(req, after=params.cursor(req))
        messages, more = self.access.run(_page, selection, limit)
        reply(resp, {"messages": messages,
                     "next_cursor": messages[-1]["queue_id"] if more else None})


def _page(queue, selection, limit):
    messages = []
    for record in queue.records_matching(selection):
        if len(messages) == limit:
            return messages, True
        messages.append(record_to_json(record))
    return messages, False


class QueuedMessage:
    """GET /api/v1/queue/{id}: one message in full; DELETE: remove it from the queue."""

    def __init__(self, access):
        self.access = access

    def on_get(self, req, resp, queue_id):
        params.check_known(req, ())
        data = self.access.run(_show, _known_id(queue_id))
        if data is None:
            raise no_such_message(queue_id)
        reply(resp, data)

    def on_delete(self, req, resp, queue_id):
        params.check_known(req, ())
        outcome = self.access.run(_act, "delete", _known_id(queue_id))
        if outcome == queue_actions.NO_SUCH_MESSAGE:
            raise no_such_message(queue_id)
        reply(resp, {"queue_id": queue_id, "outcome": outcome, "changed": True})


def _show(queue, queue_id):
    record = queue.get(queue_id)
    if record is None:
        return None
    data = record_show_json(record, queue.store.path(queue_id))
    try:
        data["headers"], data["headers_truncated"] = read_headers(queue.store, queue_id)
    except FileNotFoundError:
        return None                     # delivered or deleted meanwhile
    except (CorruptSpoolFile, UnsafePath) as exc:
        data["headers"], data["headers_truncated"] = None, False
        data["content_error"] = str(exc)
    return data


def read_headers(store, queue_id):
    """(the header section as text with LF line ends, whether it was cut at the limit)."""
    with store.open_content(queue_id) as content:
        data = content.read(MAX_HEADER_BYTES + 4)
    if data.startswith(b"\r\n") or data.startswith(b"\n"):
        return "", False
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        data, truncated = data[:end + 2], False
    else:
        truncated = len(data) > MAX_HEADER_BYTES
        data = data[:MAX_HEADER_BYTES]
    return data.replace(b"\r\n", b"\n").decode("utf-8", "replace"), truncated


class MessageContent:
    """GET /api/v1/queue/{id}/content: the message as queued (message/rfc822), streamed."""

    def __init__(self, access):
        self.access = access

    def on_get(self, req, resp, queue_id):
        params.check_known(req, ())
        opened = self.access.run(_open_checked, _known_id(queue_id))
        if opened is None:
            raise no_such_message(queue_id)
        if isinstance(opened, str):
            raise falcon.HTTPConflict(title="damaged spool file", description=opened)
        content, length = opened
        resp.content_type = "message/rfc822"
        resp.content_length = length
        resp.stream = _chunks(content)


def _open_checked(queue, queue_id):
    """The content, read through once to check its CRC and rewound, and its length; None if
    there is no such message; the problem as text for a damaged file or a link planted in
    its place (never followed: elemta.queue.store)."""
    try:
        _, content = queue.open_message(queue_id)
    except NoSuchMessage:
        return None
    except (CorruptSpoolFile, UnsafePath) as exc:
        return str(exc)
    length = 0
    try:
        while True:
            chunk = content.read(CONTENT_CHUNK)
            if not chunk:
                break
            length += len(chunk)
        content.seek(0)
    except CorruptSpoolFile as exc:
        content.close()
        return str(exc)
    except BaseException:
        content.close()
        raise
    return content, length


def _chunks(content):
    # The open file keeps the bytes readable even if the message is deleted meanwhile.
    try:
        while True:
            chunk = content.read(CONTENT_CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        content.close()


class MessageAction:
    """POST /api/v1/queue/{id}/ACTION: hold, release, flush or requeue one message.
    release?rescan=true runs the content scanners first (elemta.plugins.rescan), as
    elemtactl queue release --rescan; config gives their settings."""

    def __init__(self, access, action: str, config=None):
        self.access = access
        self.action = action
        self.config = config

    def on_post(self, req, resp, queue_id):
        params.check_known(req, ("rescan",) if self.action == "release" else ())
        if params.flag(req, "rescan"):
            outcome = self.access.run(_rescan, self.config, _known_id(queue_id))
        else:
            outcome = self.access.run(_act, self.action, _known_id(queue_id))
        if outcome == queue_actions.NO_SUCH_MESSAGE:
            raise no_such_message(queue_id)
        changed = outcome in SUCCESS[self.action]
        if changed and self.action in WAKING_ACTIONS:
            wakeup.notify(self.access.queue_config.spool_dir)
        reply(resp, {"queue_id": queue_id, "outcome": outcome, "changed": changed})


def _act(queue, action, queue_id):
    """The outcome of one action on one message (a Queue outcome string)."""
    for _, outcome in getattr(queue, action)([queue_id]):
        return outcome
    return queue_actions.NO_SUCH_MESSAGE


def _rescan(queue, config, queue_id):
    """The outcome of release --rescan on one message (elemta.plugins.rescan)."""
    from elemta.plugins.rescan import Rescanner
    with Rescanner.of(config) as rescanner:
        for _, outcome in rescanner.rescan(queue, [queue_id]):
            return outcome
    return queue_actions.NO_SUCH_MESSAGE


# A priority body is {"priority": N}: a few bytes; anything much longer is refused unread.
MAX_PRIORITY_BODY = 1024


class MessagePriority:
    """POST /api/v1/queue/{id}/priority with {"priority": N}: elemtactl queue priority ID N."""

    def __init__(self, access):
        self.access = access

    def on_post(self, req, resp, queue_id):
        params.check_known(req, ())
        priority = priority_from_body(req)
        outcome = self.access.run(_set_priority, _known_id(queue_id), priority)
        if outcome == queue_actions.NO_SUCH_MESSAGE:
            raise no_such_message(queue_id)
        reply(resp, {"queue_id": queue_id, "outcome": outcome, "priority": priority,
                     "changed": outcome != queue_actions.PRIORITY_UNCHANGED})


def _bad_body(problem: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(title="bad body", description="body: " + problem)


def priority_from_body(req: falcon.Request) -> int:
    """N of a JSON body {"priority": N}; a 400 naming what is wrong otherwise."""
    if req.content_type and req.content_type.split(";")[0].strip().lower() != \
            falcon.MEDIA_JSON:
        raise _bad_body("must be application/json, not %s" % params.printable(
            req.content_type))
    raw = req.bounded_stream.read(MAX_PRIORITY_BODY + 1)
    if len(raw) > MAX_PRIORITY_BODY:
        raise _bad_body("longer than %d bytes" % MAX_PRIORITY_BODY)
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise _bad_body('not JSON; send {"priority": N}') from None
    if not isinstance(data, dict) or "priority" not in data:
        raise _bad_body('must be a JSON object {"priority": N}')
    unknown = sorted(set(data) - {"priority"})
    if unknown:
        raise _bad_body("unknown key %s (only priority)" % params.printable(unknown[0]))
    problem = priority_error(data["priority"])
    if problem:
        raise _bad_body("priority: %s" % params.printable(problem))
    return data["priority"]


def _set_priority(queue, queue_id, priority):
    for _, outcome in queue.set_priority([queue_id], priority):
        return outcome
    return queue_actions.NO_SUCH_MESSAGE


class FlushAll:
    """POST /api/v1/queue/flush: every deferred message (or those selected) due now."""

    def __init__(self, access):
        self.access = access

    def on_post(self, req, resp):
        params.check_known(req, params.FILTERS)
        selection = params.selection(req, default_states=("deferred",))
        outcomes = self.access.run(_flush_selected, selection)
        flushed = outcomes.get(queue_actions.FLUSHED, 0)
        if flushed:
            wakeup.notify(self.access.queue_config.spool_dir)
        reply(resp, {"flushed": flushed, "outcomes": outcomes})


def _flush_selected(queue, selection):
    counts = {}
    ids: List[str] = list(queue.ids_matching(selection))
    for _, outcome in queue.flush(ids):
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


class Stats:
    """GET /api/v1/stats: messages and bytes by state, and qshape's domains by age."""

    def __init__(self, access):
        self.access = access

    def on_get(self, req, resp):
        params.check_known(req, params.FILTERS)
        shape = self.access.run(_summarise, params.selection(req))
        states = {state: {"messages": t.messages, "bytes": t.size}
                  for state, t in shape.by_state.items()}
        reply(resp, {
            "states": states,
            "messages": sum(s["messages"] for s in states.values()),
            "bytes": sum(s["bytes"] for s in states.values()),
            "bucket_minutes": shape.bucket_limits,
            "total": shape.total,
            "domains": shape.domains,
        })


def _summarise(queue, selection):
    return queue.summarise(selection)
