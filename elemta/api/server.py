"""The api process's main: a plain WSGI app served by gevent on api.address:api.port.

Owned by the `elemta: api` child the master forks. Routes:
  GET /metrics        every process's metrics summed (elemta.metrics.scrape_registry) plus
                      the queue size by state, read from the queue index at each scrape
  GET /api/v1/health  {"status": "ok"}, no authentication
Anything else is 404. make_app() returns the WSGI callable, so the REST API (issue 5) can
mount it under whatever framework it picks. SIGTERM/SIGINT stop it after the requests in
progress, SIGQUIT at once, SIGUSR1 reopens the log file; it stops on its own when its master
is gone. See also: elemta.metrics, elemta.master.
"""

import json
import logging
import os
import signal
import socket

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.pywsgi import WSGIServer

from elemta import metrics

log = logging.getLogger("elemta.api")

# How often the process beats its heartbeat and looks for its master.
WATCH_INTERVAL = 1.0
# How long requests in progress may take to finish on SIGTERM.
STOP_GRACE = 5.0


class QueueCollector:
    """elemta_queue_messages{state}, counted in the queue index when scraped.

    Read at scrape time rather than kept by the workers: the index is the one count every
    process agrees on, whoever restarted. Opened on first use, in this process (never
    across a fork), and opened again after an error."""

    def __init__(self, queue_config):
        self.queue_config = queue_config
        self._queue = None

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        from elemta.queue.model import STATES
        try:
            counts = self._open().index.count_by_state()
        except Exception as exc:        # lmdb.Error, OSError: report the rest anyway
            log.error("queue size not reported: cannot read the queue index in %s: %s",
                      self.queue_config.spool_dir, exc)
            self.close()
            return []
        family = GaugeMetricFamily("elemta_queue_messages",
                                   "Messages in the queue, by state.", labels=["state"])
        for state in STATES + tuple(sorted(set(counts) - set(STATES))):
            family.add_metric([state], counts.get(state, 0))
        return [family]

    def _open(self):
        if self._queue is None:
            from elemta.queue.queue import Queue
            q = self.queue_config
            self._queue = Queue(q.spool_dir, sync_method=q.sync_method,
                                map_size=q.index_map_size)
        return self._queue

    def close(self):
        if self._queue is not None:
            queue, self._queue = self._queue, None
            try:
                queue.close()
            except Exception:           # already broken; we only let go of it
                pass


def make_app(config):
    """The WSGI application serving /metrics and /api/v1/health for config."""
    from prometheus_client.exposition import choose_encoder
    if metrics.directory() is None:
        log.warning("no metrics directory (%s unset): /metrics shows only the queue",
                    metrics.ENV)
    registry = metrics.scrape_registry()
    registry.register(QueueCollector(config.queue))
    one_scrape_at_a_time = Semaphore()

    def get_metrics(environ):
        encode, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        # Reading the files and the index blocks: do it in a thread, so the event loop
        # keeps answering (health checks, later the REST API) during a long scrape.
        with one_scrape_at_a_time:
            body = gevent.get_hub().threadpool.apply(encode, (registry,))
        return "200 OK", content_type, body

    def get_health(environ):
        return "200 OK", "application/json", json.dumps({"status": "ok"}).encode()

    routes = {"/metrics": get_metrics, "/api/v1/health": get_health}

    def app(environ, start_response):
        route = routes.get(environ.get("PATH_INFO", ""))
        method = environ.get("REQUEST_METHOD", "GET")
        headers = []
        if route is None:
            status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
        elif method not in ("GET", "HEAD"):
            status, content_type, body = ("405 Method Not Allowed", "text/plain",
                                          b"method not allowed\n")
            headers.append(("Allow", "GET, HEAD"))
        else:
            status, content_type, body = route(environ)
        headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [b"" if method == "HEAD" else body]

    return app


def run_api(config, heartbeat=None, master_pid=None, sock=None):
    """The api process's main: serve until SIGTERM; returns the exit status.

    heartbeat: called every WATCH_INTERVAL seconds (the master's liveness check).
    master_pid: stop when the parent is no longer this process. Pass the master's pid as
    taken before the fork: the default, the parent now, is already init's if the master
    died in between.
    sock: an already bound listening socket; default: bind api.address:api.port here."""
    from setproctitle import setproctitle
    setproctitle("elemta: api")
    api = config.api
    master_pid = os.getppid() if master_pid is None else master_pid
    try:
        sock = sock if sock is not None else listen(api.address, api.port)
    except OSError as exc:
        log.error("api cannot listen on %s port %d: %s", api.address, api.port,
                  exc.strerror or exc)
        return 1
    server = WSGIServer(sock, make_app(config), log=None, error_log=log)
    server.start()
    stopping = Event()
    grace = [STOP_GRACE]

    def handle_term():
        stopping.set()

    def handle_quit():
        grace[0] = 0
        stopping.set()

    gevent.signal_handler(signal.SIGTERM, handle_term)
    gevent.signal_handler(signal.SIGINT, handle_term)
    gevent.signal_handler(signal.SIGQUIT, handle_quit)
    gevent.signal_handler(signal.SIGUSR1, _reopen_logs)
    watcher = gevent.spawn(_watch, stopping, heartbeat, master_pid)
    log.info("api listening on %s port %d", *server.address[:2])
    stopping.wait()
    watcher.kill()
    server.stop(timeout=grace[0])
    return 0


def listen(address, port):
    """The api's listening socket. SO_REUSEPORT: after a reload the new api child binds
    while the old one still finishes its requests, so /metrics never goes away."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)       # gevent's server waits for it in the event loop
    return sock


def _watch(stopping, heartbeat, master_pid):
    while not stopping.is_set():
        if heartbeat is not None:
            heartbeat()
        if os.getppid() != master_pid:
            log.warning("master %d is gone; api stops", master_pid)
            stopping.set()
            return
        gevent.sleep(WATCH_INTERVAL)


def _reopen_logs():
    from elemta.util import logs
    logs.reopen()
