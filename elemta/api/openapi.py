"""The OpenAPI 3 document of the REST API, written by hand, served at /api/v1/openapi.json.

Owned by the api process (elemta.api.app serves it, without a token). Keep it in step with
elemta.api.queue_routes and elemta.api.params: the test suite runs schemathesis against a
live server with this document and fails on any answer it does not describe.
"""

import copy

from elemta.api.params import DEFAULT_LIMIT, MAX_LIMIT
from elemta.queue.model import PRIORITY_MAX, PRIORITY_MIN, RECIPIENT_STATUSES, STATES

QUEUE_ID = {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{20}$",
            "description": "20 characters of Crockford base32; sorts by arrival.",
            "example": "0D8J3K5RZQ1T4A7B9C2E"}
AGE = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?[smhdw]?$",
       "description": "An age: a number of seconds, or with a unit s, m, h, d or w (30m)."}
NULLABLE_STRING = {"type": "string", "nullable": True}
PRIORITY = {"type": "integer", "minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX}


def _param(name, description, schema, where="query", **extra):
    return dict({"name": name, "in": where, "required": where == "path",
                 "description": description, "schema": schema}, **extra)


FILTER_PARAMETERS = [
    _param("state", "Only messages in these states (comma-separated; may be repeated).",
           {"type": "array", "items": {"type": "string", "enum": list(STATES)},
            "minItems": 1}, style="form", explode=False),
    _param("sender", "Sender matches this shell pattern (*, ?, [...]; any case); <> is "
                     "the null sender.", {"type": "string", "minLength": 1}),
    _param("recipient", "A recipient not yet delivered matches this shell pattern.",
           {"type": "string", "minLength": 1}),
    _param("domain", "A recipient not yet delivered is at this domain.",
           {"type": "string", "minLength": 1}),
    _param("older_than", "Arrived more than this long ago.", AGE),
    _param("newer_than", "Arrived less than this long ago.", AGE),
]

PAGE_PARAMETERS = [
    _param("limit", "Messages per page (default %d)." % DEFAULT_LIMIT,
           {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
            "default": DEFAULT_LIMIT}),
    _param("cursor", "Start after this queue id: the next_cursor of the previous page.",
           QUEUE_ID),
]

ID_PARAMETER = _param("queue_id", "The message's queue id.", QUEUE_ID, where="path")


def _error(description, headers=None):
    response = {"description": description,
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}}
    if headers:
        response["headers"] = headers
    return response


def _json(description, schema_name):
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/" + schema_name}}}}


ERRORS = {
    "400": _error("A parameter is wrong; the message names it."),
    "401": _error("No token, a wrong token, or no token configured.",
                  {"WWW-Authenticate": {"description": 'Bearer realm="elemta"',
                                        "schema": {"type": "string"}}}),
    "503": _error("The queue index cannot be read or written now."),
}
NOT_FOUND = {"404": _error("No message has this queue id (or it left the queue).")}


def _responses(ok, *extra):
    responses = {"200": ok}
    for more in (ERRORS,) + extra:
        responses.update(more)
    return responses


RESCAN_PARAMETER = {
    "name": "rescan", "in": "query", "required": False,
    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
    "description": "true: run the content scanners (the enabled plugins that scan content: "
                   "clamav, rspamd, milters) over the held message first. Nothing found: "
                   "released. A scanner still holds, rejects or discards it: it stays on "
                   "hold, held by that scanner with the new reason (outcome 'rescanned: "
                   "still on hold: ...'). A scanner that cannot decide now (down, a "
                   "soft reject): it stays on hold as it was (outcome 'rescan failed: "
                   "...'). Without it the message is released unscanned."}


def _action(verb, summary, description, extra=()):
    return {"post": {
        "operationId": verb + "Message", "summary": summary, "description": description,
        "tags": ["queue"], "parameters": [ID_PARAMETER] + list(extra),
        "responses": _responses(_json("What was done.", "ActionResult"), NOT_FOUND)}}


MESSAGE_PROPERTIES = {
    "queue_name": {"type": "string", "enum": list(STATES),
                   "description": "The message's queue state."},
    "queue_id": QUEUE_ID,
    "arrival_time": {"type": "integer", "description": "Arrival, seconds since the epoch."},
    "message_size": {"type": "integer", "minimum": 0, "description": "Content bytes."},
    "forced_expire": {"type": "boolean"},
    "sender": {"type": "string", "description": "The envelope sender; empty for <>."},
    "attempts": {"type": "integer", "minimum": 0},
    "next_attempt": {"type": "number", "description": "Seconds since the epoch."},
    "last_error": NULLABLE_STRING,
    "priority": dict(PRIORITY, description="Higher is delivered sooner among messages "
                                           "due; 0 by default (queue.priority_rules)."),
    "hold": {"type": "object", "nullable": True, "required": ["by", "reason", "since"],
             "description": "Who held the message and why; null when it is not on hold. "
                            "by: a plugin (clamav, rspamd), a milter, a content check "
                            "(header_checks), admin (elemtactl queue hold, this API), or "
                            "unknown (held by an Elemta that kept no reason).",
             "properties": {"by": {"type": "string"}, "reason": {"type": "string"},
                            "since": {"type": "number",
                                      "description": "Seconds since the epoch; 0 when "
                                                     "unknown."}}},
}
MESSAGE_REQUIRED = sorted(MESSAGE_PROPERTIES) + ["recipients"]

SCHEMAS = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
    "Message": {
        "description": "One queued message as `elemtactl queue list --json` prints it "
                       "(postqueue -j's fields and Elemta's own).",
        "type": "object", "required": MESSAGE_REQUIRED,
        "properties": dict(MESSAGE_PROPERTIES, recipients={
            "type": "array", "description": "The recipients not yet delivered.",
            "items": {"type": "object", "required": ["address", "status"], "properties": {
                "address": {"type": "string"},
                "status": {"type": "string", "enum": list(RECIPIENT_STATUSES)},
                "delay_reason": {"type": "string"}}}})},
    "MessageDetail": {
        "description": "One message as `elemtactl queue show --json` prints it, with its "
                       "headers.",
        "type": "object",
        "required": MESSAGE_REQUIRED + ["body", "smtputf8", "ret", "envid", "requiretls",
                                        "client_address", "client_helo", "protocol",
                                        "auth_user", "extra", "arrival", "history",
                                        "spool_file", "headers", "headers_truncated"],
        "properties": dict(
            MESSAGE_PROPERTIES,
            recipients={"type": "array", "description": "Every recipient, delivered or not.",
                         "items": {"type": "object",
                                   "required": ["address", "notify", "orcpt", "status",
                                                "last_reply"],
                                   "properties": {
                                       "address": {"type": "string"},
                                       "notify": {"type": "array", "nullable": True,
                                                  "items": {"type": "string"}},
                                       "orcpt": NULLABLE_STRING,
                                       "status": {"type": "string",
                                                  "enum": list(RECIPIENT_STATUSES)},
                                       "last_reply": NULLABLE_STRING}}},
            body={"type": "string", "description": "7BIT, 8BITMIME or BINARYMIME."},
            smtputf8={"type": "boolean"},
            ret=NULLABLE_STRING, envid=NULLABLE_STRING,
            requiretls={"type": "boolean", "description": "REQUIRETLS (RFC 8689): sent "
                        "on only over verified TLS to servers that offer REQUIRETLS."},
            client_address={"type": "string"}, client_helo={"type": "string"},
            protocol={"type": "string"}, auth_user=NULLABLE_STRING,
            extra={"type": "object"},
            arrival={"type": "number"},
            history={"type": "array", "description": "Delivery results, oldest first.",
                     "items": {"type": "object", "properties": {
                         "time": {"type": "number"}, "recipient": {"type": "string"},
                         "status": {"type": "string"}, "relay": NULLABLE_STRING,
                         "reply": NULLABLE_STRING}}},
            spool_file={"type": "string"},
            headers={"type": "string", "nullable": True,
                     "description": "The header section, LF line ends; null if the spool "
                                    "file is damaged (see content_error)."},
            headers_truncated={"type": "boolean"},
            content_error={"type": "string"})},
    "MessagePage": {
        "type": "object", "required": ["messages", "next_cursor"],
        "properties": {
            "messages": {"type": "array",
                         "items": {"$ref": "#/components/schemas/Message"}},
            "next_cursor": {"type": "string", "nullable": True,
                            "pattern": QUEUE_ID["pattern"],
                            "description": "Pass as cursor for the next page; null on the "
                                           "last page."}}},
    "ActionResult": {
        "type": "object", "required": ["queue_id", "outcome", "changed"],
        "properties": {
            "queue_id": QUEUE_ID,
            "outcome": {"type": "string", "description": "What happened, as elemtactl "
                                                         "prints it (placed on hold, "
                                                         "already on hold, due now, ...)."},
            "changed": {"type": "boolean",
                        "description": "False when there was nothing to do."}}},
    "PriorityResult": {
        "type": "object", "required": ["queue_id", "outcome", "priority", "changed"],
        "properties": {
            "queue_id": QUEUE_ID,
            "outcome": {"type": "string", "description": "What happened, as elemtactl "
                                                         "queue priority prints it."},
            "priority": PRIORITY,
            "changed": {"type": "boolean",
                        "description": "False when it already had this priority."}}},
    "FlushResult": {
        "type": "object", "required": ["flushed", "outcomes"],
        "properties": {
            "flushed": {"type": "integer", "minimum": 0,
                        "description": "Messages made due now."},
            "outcomes": {"type": "object", "description": "Messages per outcome.",
                         "additionalProperties": {"type": "integer"}}}},
    "Stats": {
        "type": "object",
        "required": ["states", "messages", "bytes", "bucket_minutes", "total", "domains"],
        "properties": {
            "states": {"type": "object", "description": "Messages and bytes per state.",
                       "additionalProperties": {
                           "type": "object", "required": ["messages", "bytes"],
                           "properties": {"messages": {"type": "integer"},
                                          "bytes": {"type": "integer"}}}},
            "messages": {"type": "integer"},
            "bytes": {"type": "integer"},
            "bucket_minutes": {"type": "array", "items": {"type": "integer"},
                               "description": "Upper age limit of each age bucket but the "
                                              "last, in minutes (qshape)."},
            "total": {"type": "array", "items": {"type": "integer"},
                      "description": "qshape's TOTAL row: all, then per age bucket."},
            "domains": {"type": "object", "description": "qshape's rows: recipient domain "
                                                        "-> all, then per age bucket.",
                        "additionalProperties": {"type": "array",
                                                 "items": {"type": "integer"}}}}},
    "Live": {"type": "object", "required": ["status"],
             "properties": {"status": {"type": "string", "enum": ["ok"]}}},
    "Health": {
        "type": "object",
        "required": ["status", "ready", "problems", "children", "draining", "queue",
                     "spool"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "ready", "not ready"],
                       "description": "health: ok while the api serves; ready: ready "
                                      "or not ready."},
            "ready": {"type": "boolean",
                      "description": "Whether /api/v1/health/ready says 200."},
            "problems": {"type": "array", "items": {"type": "string"},
                         "description": "What keeps mail from coming in; empty when "
                                        "ready."},
            "children": {"type": "object", "description": "Per kind of child (smtpd, "
                                                         "api, delivery, pickup, local, "
                                                         "showq): processes running and "
                                                         "beating (up), running but "
                                                         "without a heartbeat for half "
                                                         "of master.heartbeat_timeout "
                                                         "(hung), and how many the "
                                                         "configuration asks for.",
                         "additionalProperties": {
                             "type": "object", "required": ["up", "hung", "expected"],
                             "properties": {"up": {"type": "integer"},
                                            "hung": {"type": "integer"},
                                            "expected": {"type": "integer"}}}},
            "draining": {"type": "boolean",
                         "description": "True while elemtactl drain has the node take "
                                        "no new mail (not ready)."},
            "queue": {"type": "object", "nullable": True,
                      "description": "Null when the queue index cannot be read.",
                      "required": ["messages", "by_state", "oldest_age_seconds"],
                      "properties": {
                          "messages": {"type": "integer"},
                          "by_state": {"type": "object",
                                       "additionalProperties": {"type": "integer"}},
                          "oldest_age_seconds": {
                              "type": "object", "description": "Per state with "
                                                               "messages: the age of its "
                                                               "oldest.",
                              "additionalProperties": {"type": "integer"}}}},
            "spool": {"type": "object", "nullable": True,
                      "description": "The spool's file system; null when it cannot be "
                                     "read. At or below min_free_bytes free, new mail is "
                                     "refused (queue.min_free_space).",
                      "required": ["available_bytes", "size_bytes", "min_free_bytes"],
                      "properties": {"available_bytes": {"type": "integer"},
                                     "size_bytes": {"type": "integer"},
                                     "min_free_bytes": {"type": "integer"}}}}},
}

# ---- the cluster view (elemta.api.cluster_routes)

MISSING = {"type": "array", "description": "The nodes that did not answer, and why; the "
                                            "figures are those of the others.",
           "items": {"type": "object", "required": ["node", "api_url", "error"],
                     "properties": {"node": {"type": "string"},
                                    "api_url": {"type": "string"},
                                    "error": {"type": "string"}}}}
COMPLETE = {"type": "boolean", "description": "True when every live node answered."}
NODE = {"type": "string", "description": "The node (cluster.node_name) the message is on."}


def _cluster(schema):
    """schema with the members every cluster answer has: complete and missing."""
    schema = copy.deepcopy(schema)
    schema.setdefault("required", []).extend(["complete", "missing"])
    schema.setdefault("properties", {}).update(complete=COMPLETE, missing=MISSING)
    return schema


def _tagged(name):
    """A schema of SCHEMAS with the node member, answered by the cluster view."""
    return _cluster({"allOf": [{"$ref": "#/components/schemas/" + name},
                               {"type": "object", "required": ["node"],
                                "properties": {"node": NODE}}]})


STATE_FIGURES = {"type": "object", "description": "Messages and bytes per state.",
                 "additionalProperties": {
                     "type": "object", "required": ["messages", "bytes"],
                     "properties": {"messages": {"type": "integer"},
                                    "bytes": {"type": "integer"}}}}
SCHEMAS.update({
    "ClusterNodes": _cluster({
        "type": "object", "required": ["nodes"],
        "properties": {"nodes": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "api_url", "version", "started", "last_heartbeat",
                         "heartbeat_age", "answers"],
            "properties": {
                "name": {"type": "string"}, "api_url": {"type": "string"},
                "smtp_address": dict(NULLABLE_STRING, description="Where it "
                                    "takes the mail of a drained node (host:port); "
                                    "null: nowhere."),
                "version": {"type": "string"},
                "started": {"type": "number", "description": "When its api process "
                                                             "started (its clock)."},
                "last_heartbeat": {"type": "number", "description": "Its last "
                                   "registration, seconds since the epoch (the store's "
                                   "clock)."},
                "heartbeat_age": {"type": "number", "minimum": 0},
                "answers": {"type": "boolean", "description": "Whether its REST API "
                                                              "answered just now."}}}}}}),
    "ClusterSummary": _cluster({
        "type": "object",
        "required": ["states", "messages", "bytes", "bucket_minutes", "total", "domains",
                     "nodes"],
        "properties": dict(SCHEMAS["Stats"]["properties"], nodes={
            "type": "object", "description": "Per node: its states, messages and bytes.",
            "additionalProperties": {
                "type": "object", "required": ["states", "messages", "bytes"],
                "properties": {"states": STATE_FIGURES, "messages": {"type": "integer"},
                               "bytes": {"type": "integer"}}}})}),
    "ClusterPage": _cluster({
        "type": "object", "required": ["messages", "next_cursor"],
        "properties": {
            "messages": {"type": "array", "items": {"allOf": [
                {"$ref": "#/components/schemas/Message"},
                {"type": "object", "required": ["node"], "properties": {"node": NODE}}]}},
            "next_cursor": SCHEMAS["MessagePage"]["properties"]["next_cursor"]}}),
    "ClusterMessage": _tagged("MessageDetail"),
    "ClusterActionResult": _tagged("ActionResult"),
    "ClusterFlushResult": _cluster({
        "type": "object", "required": ["flushed", "outcomes", "nodes"],
        "properties": dict(SCHEMAS["FlushResult"]["properties"], nodes={
            "type": "object", "description": "Per node: its own flush result.",
            "additionalProperties": {"$ref": "#/components/schemas/FlushResult"}})}),
})

CLUSTER_ERRORS = dict(ERRORS, **{
    "404": _error("This node is in no cluster (cluster.store is not set), or no node has "
                  "this message."),
    "503": _error("The cluster store cannot be reached (so the nodes are unknown), or no "
                  "node that answered has the message while some did not answer."),
})


def _cluster_responses(description, schema_name):
    responses = {"200": _json(description + " Nodes that did not answer are named in "
                              "missing.", schema_name)}
    responses.update(CLUSTER_ERRORS)
    return responses


def _cluster_action(verb, summary):
    return {"post": {
        "operationId": "cluster" + verb.capitalize() + "Message", "tags": ["cluster"],
        "summary": summary + " on whichever node has it.",
        "parameters": [ID_PARAMETER],
        "responses": _cluster_responses("What was done, and on which node.",
                                        "ClusterActionResult")}}


CLUSTER_PATHS = {
    "/api/v1/cluster/nodes": {"get": {
        "operationId": "clusterNodes", "tags": ["cluster"],
        "summary": "The live nodes (registered in the store within cluster.node_ttl) and "
                   "whether each answers.",
        "responses": _cluster_responses("The nodes.", "ClusterNodes")}},
    "/api/v1/cluster/queue": {"get": {
        "operationId": "clusterListQueue", "tags": ["cluster"],
        "summary": "Every node's queued messages, in queue id (arrival) order, each "
                   "tagged with its node (elemtactl --cluster queue list --json).",
        "parameters": FILTER_PARAMETERS + PAGE_PARAMETERS,
        "responses": _cluster_responses("A page of messages.", "ClusterPage")}},
    "/api/v1/cluster/queue/summary": {"get": {
        "operationId": "clusterQueueSummary", "tags": ["cluster"],
        "summary": "Every node's /api/v1/stats summed, and per node (elemtactl --cluster "
                   "queue summary --json).",
        "parameters": FILTER_PARAMETERS,
        "responses": _cluster_responses("The counts.", "ClusterSummary")}},
    "/api/v1/cluster/queue/flush": {"post": {
        "operationId": "clusterFlushQueue", "tags": ["cluster"],
        "summary": "Make deferred messages due now on every node.",
        "parameters": FILTER_PARAMETERS,
        "responses": _cluster_responses("How many were flushed, and per node.",
                                        "ClusterFlushResult")}},
    "/api/v1/cluster/queue/{queue_id}": {"get": {
        "operationId": "clusterShowMessage", "tags": ["cluster"],
        "summary": "One message in full, from whichever node has it.",
        "parameters": [ID_PARAMETER],
        "responses": _cluster_responses("The message and its node.", "ClusterMessage")}},
    "/api/v1/cluster/queue/{queue_id}/hold": _cluster_action("hold", "Put a message on "
                                                                     "hold"),
    "/api/v1/cluster/queue/{queue_id}/release": _cluster_action("release", "Take a message "
                                                                           "off hold"),
    "/api/v1/cluster/queue/{queue_id}/flush": _cluster_action("flush", "Make a deferred "
                                                                       "message due now"),
    "/api/v1/cluster/queue/{queue_id}/requeue": _cluster_action("requeue", "Start a "
                                                                           "message over"),
}

DOCUMENT = {
    "openapi": "3.0.3",
    "info": {
        "title": "Elemta REST API",
        "version": "1",
        "description": (
            "The queue of an Elemta mail server: what `elemtactl queue` does, over HTTP on "
            "loopback. Every route but /api/v1/health and this document needs "
            "`Authorization: Bearer <token>` (api.token_file or api.token). Listings are "
            "paginated with a cursor: pass `limit`, then the `next_cursor` of each page as "
            "`cursor` until it is null; messages come in arrival (queue id) order. Errors "
            "are {\"error\": \"...\"}. /metrics (Prometheus) is served beside it. With "
            "cluster.store set, /api/v1/cluster/... asks every live node of the cluster "
            "through its own API and merges the answers, naming the nodes that did not "
            "answer."),
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "tags": [{"name": "queue"}, {"name": "service"}, {"name": "cluster"}],
    "paths": {
        "/api/v1/queue": {"get": {
            "operationId": "listQueue", "tags": ["queue"],
            "summary": "List queued messages (elemtactl queue list --json).",
            "parameters": FILTER_PARAMETERS + PAGE_PARAMETERS,
            "responses": _responses(_json("A page of messages.", "MessagePage"))}},
        "/api/v1/queue/flush": {"post": {
            "operationId": "flushQueue", "tags": ["queue"],
            "summary": "Make deferred messages due now (elemtactl queue flush).",
            "description": "Without filters every deferred message; the filters narrow it "
                           "(state defaults to deferred). The delivery workers are woken.",
            "parameters": FILTER_PARAMETERS,
            "responses": _responses(_json("How many were flushed.", "FlushResult"))}},
        "/api/v1/queue/{queue_id}": {
            "get": {"operationId": "showMessage", "tags": ["queue"],
                    "summary": "One message: envelope, state, recipients, history, headers.",
                    "parameters": [ID_PARAMETER],
                    "responses": _responses(_json("The message.", "MessageDetail"),
                                            NOT_FOUND)},
            "delete": {"operationId": "deleteMessage", "tags": ["queue"],
                       "summary": "Delete a message from the queue.",
                       "parameters": [ID_PARAMETER],
                       "responses": _responses(_json("Deleted.", "ActionResult"),
                                               NOT_FOUND)}},
        "/api/v1/queue/{queue_id}/content": {"get": {
            "operationId": "messageContent", "tags": ["queue"],
            "summary": "The message as queued (headers and body).",
            "parameters": [ID_PARAMETER],
            "responses": _responses(
                {"description": "The content.",
                 "content": {"message/rfc822": {"schema": {"type": "string",
                                                           "format": "binary"}}}},
                NOT_FOUND, {"409": _error("The spool file is damaged, or something other "
                                           "than a plain file (a link) is in its place.")})}},
        "/api/v1/queue/{queue_id}/hold": _action(
            "hold", "Put a message on hold.", "Never tried until released; its hold "
            "says held by admin."),
        "/api/v1/queue/{queue_id}/release": _action(
            "release", "Take a message off hold.",
            "Due now; the delivery workers are woken. It is sent on as queued, not "
            "scanned again, unless rescan=true.", [RESCAN_PARAMETER]),
        "/api/v1/queue/{queue_id}/flush": _action(
            "flush", "Make a deferred message due now.",
            "The delivery workers are woken. Held and failed messages are left alone."),
        "/api/v1/queue/{queue_id}/requeue": _action(
            "requeue", "Start a message over.",
            "Due now, attempts reset, every recipient not delivered pending again."),
        "/api/v1/queue/{queue_id}/priority": {"post": {
            "operationId": "prioritiseMessage", "tags": ["queue"],
            "summary": "Set a message's priority (elemtactl queue priority).",
            "description": "Among messages due for delivery the higher priority is taken "
                           "first, also among messages a worker holds waiting for a "
                           "connection; a delivery under way goes on, and the new "
                           "priority counts from its next attempt.",
            "parameters": [ID_PARAMETER],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["priority"], "additionalProperties": False,
                "properties": {"priority": PRIORITY}}}}},
            "responses": _responses(_json("What was done.", "PriorityResult"), NOT_FOUND)}},
        "/api/v1/stats": {"get": {
            "operationId": "queueStats", "tags": ["queue"],
            "summary": "Messages and bytes by state, domains by age (queue summary).",
            "parameters": FILTER_PARAMETERS,
            "responses": _responses(_json("The counts.", "Stats"))}},
        "/api/v1/health": {"get": {
            "operationId": "health", "tags": ["service"], "security": [],
            "summary": "What runs, the queue and the spool's disk (no token needed).",
            "description": "200 whenever the api process serves; `ready` says what "
                           "/api/v1/health/ready would.",
            "responses": {"200": _json("It serves.", "Health")}}},
        "/api/v1/health/live": {"get": {
            "operationId": "healthLive", "tags": ["service"], "security": [],
            "summary": "Liveness: the api process answers (no token needed).",
            "responses": {"200": _json("It answers.", "Live")}}},
        "/api/v1/health/ready": {"get": {
            "operationId": "healthReady", "tags": ["service"], "security": [],
            "summary": "Readiness: mail can come in (no token needed).",
            "description": "Ready when an smtpd worker runs, the queue index can be read "
                           "and the spool's disk has more free than it keeps back.",
            "responses": {"200": _json("Ready.", "Health"),
                          "503": _json("Not ready; `problems` says why.", "Health")}}},
        "/api/v1/openapi.json": {"get": {
            "operationId": "openapi", "tags": ["service"],
            "summary": "This document.",
            "responses": _responses({"description": "The OpenAPI document.",
                                     "content": {"application/json": {
                                         "schema": {"type": "object"}}}})}},
        **CLUSTER_PATHS,
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "api.token_file or api.token"}},
        "schemas": SCHEMAS,
    },
}


def document() -> dict:
    """A copy of the document (callers may change it)."""
    return copy.deepcopy(DOCUMENT)
