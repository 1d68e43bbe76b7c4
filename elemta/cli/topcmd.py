"""elemtactl top: live mail rates and queue sizes in the terminal, for the admin without
Grafana.

Reads what Prometheus reads, the api process's /metrics (the counters of every process,
dead ones included, and the queue by state counted in the index at each scrape), every
--interval seconds: totals, rates per second over the last interval and per minute over
the last minute (or since start, when that is shorter). On a terminal each snapshot
replaces the last; otherwise (a pipe, a file) snapshots follow one another as plain text.
--once prints one snapshot, after two scrapes one interval apart.
See also: elemta.api.monitoring, elemta.metrics (the names in METRICS), man/elemtactl.8.
"""

import collections
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, Tuple

from elemta.cli.failure import Failure

# The rows: label, metric sample name, label filter.
METRICS = (("accepted", "elemta_smtpd_messages_accepted_total", None),
           ("rejected", "elemta_smtpd_messages_rejected_total", None),
           ("delivered", "elemta_deliveries_total", ("result", "sent")),
           ("deferred", "elemta_deliveries_total", ("result", "deferred")),
           ("bounced", "elemta_deliveries_total", ("result", "bounced")))
QUEUE = "elemta_queue_messages"
SESSIONS = "elemta_smtpd_sessions_open"
STATES = ("incoming", "active", "deferred", "hold", "failed")
WINDOW = 60.0
CLEAR = "\033[H\033[2J"
Snapshot = Tuple[float, Dict[str, float], Dict[str, float], float]   # when, totals, queue, open


def scrape(url: str) -> Snapshot:
    """(time, {row: total}, {state: messages}, sessions open) from /metrics at url."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Failure(os.EX_UNAVAILABLE, "cannot read %s: %s (is elemta running, with "
                                         "api.enabled?)" % (url, getattr(reason, "strerror",
                                                                          None) or reason))
    totals = {label: 0.0 for label, _, _ in METRICS}
    queue, sessions = {}, 0.0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                for label, name, match in METRICS:
                    if sample.name == name and (
                            match is None or sample.labels.get(match[0]) == match[1]):
                        totals[label] += sample.value
                if sample.name == QUEUE:
                    state = sample.labels.get("state", "?")
                    queue[state] = queue.get(state, 0.0) + sample.value
                elif sample.name == SESSIONS:
                    sessions += sample.value
    except ValueError as exc:
        raise Failure(os.EX_PROTOCOL, "%s: not Prometheus metrics: %s" % (url, exc))
    return time.time(), totals, queue, sessions


def rates(history) -> Dict[str, Tuple[float, float]]:
    """{row: (per second over the last interval, per minute over the window)}."""
    now_t, now, _, _ = history[-1]
    last_t, last, _, _ = history[-2]
    first_t, first, _, _ = history[0]
    out = {}
    for label, _, _ in METRICS:
        per_second = (now[label] - last[label]) / max(now_t - last_t, 1e-6)
        per_minute = (now[label] - first[label]) / max(now_t - first_t, 1e-6) * 60
        out[label] = (max(per_second, 0.0), max(per_minute, 0.0))   # a reset is no negative
    return out


def render(history, source: str, interval: float) -> str:
    when, totals, queue, sessions = history[-1]
    per = rates(history)
    lines = ["elemta top  %s  (%s, every %gs)" % (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)), source, interval), "",
        "%-10s %10s %9s %9s" % ("", "total", "/s", "/min")]
    for label, _, _ in METRICS:
        lines.append("%-10s %10d %9.2f %9.1f" % (label, totals[label], *per[label]))
    states = list(STATES) + sorted(set(queue) - set(STATES))
    lines += ["", "sessions open: %d" % sessions,
              "queue: " + "  ".join("%s %d" % (s, queue.get(s, 0)) for s in states)
              + "  total %d" % sum(queue.values())]
    return "\n".join(lines) + "\n"


def cmd_top(args) -> int:
    """top: live mail rates (accepted, rejected, delivered, deferred, bounced per second
    and minute) and queue sizes, refreshed in the terminal"""
    if args.interval <= 0:
        raise Failure(os.EX_USAGE, "--interval %g: must be more than 0 seconds"
                      % args.interval)
    source = args.api or _configured_api(args)
    url = "http://%s/metrics" % source
    out = sys.stdout
    live = out.isatty() and not args.once
    history = collections.deque([scrape(url)])
    try:
        while True:
            time.sleep(args.interval)
            history.append(scrape(url))
            while len(history) > 2 and history[-1][0] - history[1][0] >= WINDOW:
                history.popleft()
            frame = render(history, source, args.interval)
            out.write(CLEAR + frame if live else frame)
            out.flush()
            if args.once:
                return 0
            if not live:
                out.write("\n")
    except KeyboardInterrupt:       # how a live view ends
        if live:
            out.write("\n")
        return 0


def _configured_api(args) -> str:
    from elemta.cli.config_finder import find_config
    api = find_config(getattr(args, "config", None)).api
    if not api.enabled:
        raise Failure(os.EX_UNAVAILABLE, "api.enabled is false: top reads the api's "
                                         "/metrics (or name one with --api HOST:PORT)")
    address = "[%s]" % api.address if ":" in api.address else api.address
    return "%s:%d" % (address, api.port)


def add_command(commands, parser_class, parents) -> None:
    doc = cmd_top.__doc__.split(": ", 1)[1].replace("\n    ", " ")
    sub = commands.add_parser("top", parents=parents, help=doc.split(" (")[0] +
                              " and queue sizes, refreshed", description=doc)
    sub.add_argument("--interval", metavar="SECONDS", type=float, default=2.0,
                     help="seconds between refreshes (default: 2; the processes write "
                          "their counts about once a second, so shorter intervals give "
                          "jumpy rates)")
    sub.add_argument("--once", action="store_true",
                     help="print one snapshot (rates over one interval) and exit")
    sub.add_argument("--api", metavar="HOST:PORT",
                     help="the api to read /metrics from (default: api.address and "
                          "api.port of the configuration)")
    sub.set_defaults(handler=cmd_top)
