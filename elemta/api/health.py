"""/api/v1/health, /api/v1/health/live and /api/v1/health/ready: what a monitor, a load
balancer or Kubernetes asks of a running Elemta (no token needed).

Owned by the api process. live: this process answers, nothing read. ready: mail can come
in: an smtpd worker runs, the node is not being drained (elemtactl drain, whose smtpd
answers 421), the queue index can be read, and the spool's disk has more free than the
reserve (else MAIL FROM gets 452): 200, or 503 with the problems named.
health: always 200 while the api serves (its old promise, "status": "ok"), with the
same facts: which children run, the queue by state and its oldest messages, the disk.

Which children run is read as `elemtactl status` reads it: the master's children in
/proc by process title (elemta: smtpd ...); how many of each the configuration asks
for, from the service table (elemta.services). A child whose heartbeat on the
master's scoreboard is older than half of master.heartbeat_timeout is counted as hung,
not up: its event loop stands still, and the master kills it once the whole timeout
has passed (health shows the state between). See also elemta.api.spool_status.
"""

import json
import time

import falcon
import gevent

from elemta.api.spool_status import queue_figures, spool_space
from elemta.queue import draining
from elemta.util.scoreboard import STARTING
from elemta.util.procs import children

TITLE_PREFIX = "elemta: "


def children_up(master_pid, config, scoreboard=None):
    """{kind: {"up": processes running now and beating, "hung": running but silent,
    "expected": what the configuration asks for}} for every kind of child; up counts a
    retiring child beside its successor, and a starting one (it beats once booted)."""
    from elemta.services import SERVICES
    silences = scoreboard.silences() if scoreboard is not None else {}
    limit = config.master.heartbeat_timeout / 2
    running, hung = {}, {}
    for pid, title in children(master_pid).items():
        if title.startswith(TITLE_PREFIX):
            kind = title[len(TITLE_PREFIX):]
            state, silence = silences.get(pid, (STARTING, 0.0))
            counts = hung if state != STARTING and silence > limit else running
            counts[kind] = counts.get(kind, 0) + 1
    return {service.kind: {"up": running.get(service.kind, 0),
                           "hung": hung.get(service.kind, 0),
                           "expected": service.count(config)}
            for service in SERVICES}


def examine(config, access, master_pid, scoreboard=None):
    """(facts, problems): the health document's members and, for readiness, what keeps
    mail from coming in (empty: ready). Blocks (the index, statvfs, /proc): run it in
    the thread pool."""
    problems = []
    kids = children_up(master_pid, config, scoreboard)
    if not kids["smtpd"]["up"]:
        problems.append("no smtpd worker is running" if not kids["smtpd"]["hung"] else
                        "every smtpd worker is hung: no heartbeat for over %gs (the "
                        "master kills one at master.heartbeat_timeout, %gs)"
                        % (config.master.heartbeat_timeout / 2,
                           config.master.heartbeat_timeout))
    facts = {"children": kids}
    drain = draining.current(config.queue.spool_dir)
    if drain is not None:
        problems.append("the node is being drained (elemtactl drain): new sessions get "
                        "421 until elemtactl undrain")
    facts["draining"] = drain is not None
    try:
        figures = queue_figures(access)
    except Exception as exc:             # QueueUnavailable: says what and why
        problems.append(str(exc))
        facts["queue"] = None
    else:
        now = time.time()
        facts["queue"] = {
            "messages": sum(figures.counts.values()),
            "by_state": figures.counts,
            "oldest_age_seconds": {state: max(0, round(now - arrival))
                                   for state, arrival in figures.oldest.items()}}
    try:
        space = spool_space(config)
    except OSError as exc:
        problems.append("cannot tell the spool's free space: %s" % (exc.strerror or exc))
        facts["spool"] = None
    else:
        facts["spool"] = {"available_bytes": space.available, "size_bytes": space.size,
                          "min_free_bytes": space.reserve}
        if space.refusing:
            problems.append("the spool's file system has %d bytes free, no more than the "
                            "%d it keeps back: new mail is refused" % (
                                space.available, space.reserve))
    return facts, problems


def _answer(resp, status, document):
    resp.status = status
    resp.data = json.dumps(document).encode()
    resp.content_type = falcon.MEDIA_JSON


class _Examining:
    public = True

    def __init__(self, config, access, master_pid, scoreboard=None):
        self.config, self.access, self.master_pid = config, access, master_pid
        self.scoreboard = scoreboard

    def examine(self):
        return gevent.get_hub().threadpool.apply(
            examine, (self.config, self.access, self.master_pid, self.scoreboard))


class HealthResource(_Examining):
    """GET /api/v1/health: 200 while the api serves, with what it sees."""

    def on_get(self, req, resp):
        facts, problems = self.examine()
        _answer(resp, falcon.HTTP_200,
                dict(status="ok", ready=not problems, problems=problems, **facts))

    on_head = on_get


class ReadyResource(_Examining):
    """GET /api/v1/health/ready: 200 when mail can come in, else 503 saying why."""

    def on_get(self, req, resp):
        facts, problems = self.examine()
        if problems:
            _answer(resp, falcon.HTTP_503, dict(status="not ready", ready=False,
                                                problems=problems, **facts))
        else:
            _answer(resp, falcon.HTTP_200, dict(status="ready", ready=True, problems=[],
                                                **facts))

    on_head = on_get


class LiveResource:
    """GET /api/v1/health/live: 200 while this process answers; reads nothing."""
    public = True
    _BODY = json.dumps({"status": "ok"}).encode()

    def on_get(self, req, resp):
        resp.data = self._BODY
        resp.content_type = falcon.MEDIA_JSON

    on_head = on_get
