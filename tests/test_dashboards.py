"""The Grafana dashboards under monitoring/grafana/: the committed JSON is what generate.py
writes, Grafana can import it (uids, titles, panels reading the $datasource variable),
it names only metrics Elemta exports, and every query of every panel, run by a real
Prometheus (Debian package) scraping a live Elemta before and through two rounds of real
traffic, parses and returns finite values, above 0 where the traffic drives the panel."""

import glob
import importlib.util
import json
import math
import os
import re
import signal
import smtplib
import socket
import sys
import tempfile
import time
import urllib.error

import pytest

from tests.harness import REPO, free_port, wait_for
from tests.peers.milter import ScriptedMilter
from tests.peers.prometheus import PrometheusInstance, prometheus_available
from tests.peers.sink import ScriptedServer
from tests.test_metrics import (BODY, exported_series_names, healthy, labelled, scrape,
                                smtpd_workers)

DASHBOARDS_DIR = os.path.join(REPO, "monitoring", "grafana")
GENERATOR = os.path.join(DASHBOARDS_DIR, "generate.py")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana puts in place of its variables before a query reaches Prometheus: every
# host (the ranges, $__rate_interval and $__range, cover the whole test: with_values).
GRAFANA_VARIABLES = {"$instance": ".*"}


def dashboard_files():
    return sorted(glob.glob(os.path.join(DASHBOARDS_DIR, "*.json")))


def load(path):
    with open(path) as f:
        return json.load(f)


def panels(dashboard):
    """Every panel but the rows, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries():
    """[(dashboard file, panel title, expr)] of every dashboard."""
    found = []
    for path in dashboard_files():
        for panel in panels(load(path)):
            for target in panel["targets"]:
                found.append((os.path.basename(path), panel["title"], target["expr"]))
    return found


def with_values(expr, window):
    """expr as Prometheus gets it from Grafana, every range `window` long."""
    for variable in ("$__rate_interval", "$__range"):
        expr = expr.replace(variable, window)
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, "a variable the test does not fill: %s" % expr
    return expr


def test_the_three_dashboards_are_there():
    assert [os.path.basename(p) for p in dashboard_files()] == [
        "elemta-overview.json", "elemta-queue-delivery.json", "elemta-security.json"]


@pytest.mark.skipif(sys.version_info < (3, 11),
                    reason="grafana-foundation-sdk needs Python 3.11 or newer")
def test_the_committed_dashboards_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("elemta_dashboards", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(generator)
    except ImportError as error:
        pytest.fail("%s: the test extras have grafana-foundation-sdk (make venv)" % error)
    generator.main(str(tmp_path))
    for path in dashboard_files():
        with open(path) as committed, open(tmp_path / os.path.basename(path)) as fresh:
            assert committed.read() == fresh.read(), (
                "%s is not what generate.py writes: run make dashboards and commit it"
                % os.path.relpath(path, REPO))


@pytest.mark.parametrize("path", dashboard_files(), ids=os.path.basename)
def test_a_dashboard_is_importable_grafana_json(path):
    dashboard = load(path)
    assert "id" not in dashboard          # Grafana gives it one on import
    assert re.fullmatch(r"elemta-[a-z-]+", dashboard["uid"]) and len(dashboard["uid"]) <= 40
    assert dashboard["title"].startswith("Elemta / ")
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == DATASOURCE
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat: %s" % ids
    for panel in panels(dashboard):
        assert panel["title"] and panel["description"], panel
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and all(ref_ids), panel["title"]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_the_dashboards_use_only_metrics_elemta_exports():
    exported = exported_series_names()
    used = set()
    for _, _, expr in queries():
        used.update(re.findall(r"\belemta_[a-z0-9_]+", expr))
    assert used and not used - exported, sorted(used - exported)


# ---- every query against a real Prometheus -----------------------------------------------

def rcpt_reply(session, argument):
    """The relay host the delivery worker hands mail to: one recipient of each fate."""
    if "<later@" in argument:
        return "450 4.2.0 mailbox busy, try later"
    if "<bad@" in argument:
        return "550 5.1.1 no such user"
    return "250 2.1.5 Ok"


def first_reply(port, source):
    """The first line a fresh connection from `source` (a loopback address) is given."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:
        return s.makefile("rb").readline().decode()


def failed_tls_handshake(port):
    """STARTTLS, then plain text where the ClientHello should be."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        replies = s.makefile("rb")
        replies.readline()
        s.sendall(b"EHLO client.test\r\n")
        while replies.readline()[3:4] == b"-":
            pass
        s.sendall(b"STARTTLS\r\n")
        assert replies.readline().startswith(b"220 ")
        s.sendall(b"this is no TLS handshake\r\n")
        try:
            assert replies.read() == b""        # the server hangs up
        except ConnectionResetError:            # on what it did not read
            pass


def send_traffic(server, submission, sink, round_number, api_port):
    """Mail of every kind the dashboards show; each round adds to every panel's counters
    (round 1 also creates their series: Prometheus sees no increase in a series' first
    sample, so only a second round moves a rate())."""
    # Relayed from mynetworks; the relay host takes one recipient, defers one, refuses one
    # (a bounce goes back to a@c.test through it too).
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.sendmail("a@c.test", ["ok@elsewhere.test", "later@elsewhere.test",
                                   "bad@elsewhere.test"], BODY)
    # A stranger tries to relay.
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0)) as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("x@spam.test", ["victim@elsewhere.test"], BODY)
    # A stranger's mail for a local user: SPF, DKIM, DMARC and ARC are checked (their DNS
    # is down: temperror, none), and greylisting defers its first try (a new sender each
    # round: a new triplet).
    sender = "x%d@far.test" % round_number
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.4", 0)) as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail(sender, ["user@example.test"], BODY)
        smtp.sendmail(sender, ["user@example.test"], BODY)
    # A client over its connection rate (one per hour): refused from its second
    # connection on.
    if round_number == 1:
        assert first_reply(server.port, "127.0.0.3").startswith("220 ")
    assert first_reply(server.port, "127.0.0.3")[:1] in ("4", "5")
    # Submission over TLS: a wrong password, then the right one.
    with smtplib.SMTP("127.0.0.1", submission) as smtp:
        smtp.starttls()
        smtp.ehlo()
        smtp.user, smtp.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)
        smtp.login("alice", "wonderland")
        smtp.sendmail("alice@example.test", ["ok@elsewhere.test"], BODY)
    failed_tls_handshake(server.port)
    # A crashed smtpd worker, which the master replaces. kill -9 loses what a worker
    # counted in its last second: first wait until the api serves this round's last
    # session (the failed handshake's), and so all the worker counted before it.
    wait_for(lambda: sum(n for labels, n in labelled(
        scrape(api_port)[0], "elemta_smtpd_sessions_total").items()
        if labels[-1] == "tls_failed") >= round_number, timeout=30)
    master = server.process.pid
    victim = smtpd_workers(master)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: smtpd_workers(master) and victim not in smtpd_workers(master))
    # Delivered (ok@ twice, the bounce to a@c.test), deferred and bounced, this round.
    log = server.log
    wait_for(lambda: len(sink.messages) >= 3 * round_number
             and log().count("status=deferred") >= round_number
             and log().count("status=bounced") >= round_number, timeout=30)
    # The delivery worker's connection to the relay host is closed, not parked: the next
    # round opens a new outbound session.
    wait_for(lambda: all(session.closed.is_set() for session in sink.sessions),
             timeout=30)


def scraped_after(prometheus, moment):
    """Wait until Prometheus has scraped Elemta after `moment` (a Unix time)."""
    def scraped():
        result = prometheus.api("query", query='timestamp(up{job="elemta"})')["result"]
        return result and float(result[0]["value"][1]) > moment
    wait_for(scraped, timeout=30)


# Panels the test's traffic cannot move, by title: the reason why; every other panel's
# query must give a value above 0 (and every query a finite one). None today: a panel
# added here needs a reason a test cannot drive it (a heartbeat kill, say, is a series
# of Worker restarts, whose crashed series the traffic moves).
NOT_DRIVEN = {}


def problem(title, answer):
    """What is wrong with a query's answer (run_query's), or None."""
    if not isinstance(answer, list):
        return "error" if answer is not None else "not run"
    if not answer:
        return "no series"
    values = [float(series["value"][1]) for series in answer]
    if not all(math.isfinite(v) for v in values):
        return "not finite"
    if title not in NOT_DRIVEN and not any(v > 0 for v in values):
        return "never above 0"
    return None


def run_query(prometheus, expr):
    """The series an instant query returns, or the error Prometheus gives for it."""
    try:
        return prometheus.api("query", query=expr)["result"]
    except urllib.error.HTTPError as error:
        return "%s: %s" % (error.code, error.read().decode(errors="replace"))


@pytest.mark.skipif(prometheus_available() is not None, reason=str(prometheus_available()))
def test_every_panel_query_returns_series_from_a_live_elemta(
        elemta_server, tmp_path, tls_files, credentials):
    cert, key = tls_files
    api_port, submission = free_port(), free_port()
    dead = free_port()              # where the broken scanner and milter are: nobody
    with ScriptedServer(script={"RCPT": rcpt_reply}, address="127.0.0.1") as sink, \
            ScriptedMilter(free_port()) as milter:
        server = elemta_server(
            smtpd={"hostname": "mx.test", "workers": 1, "peername_lookup": False},
            listeners=[{"mode": "smtp"}, {"mode": "submission", "port": submission}],
            relay={"mynetworks": ["127.0.0.1/32"]},
            # The sender checks' nameserver answers nothing (temperror): quickly.
            dns={"nameservers": ["127.0.0.1"], "port": dead, "timeout": 0.2},
            api={"enabled": True, "port": api_port},
            tls={"cert_file": cert, "key_file": key},
            auth={"credentials_file": credentials},
            # Retries an hour away: the deferred recipient stays in the deferred queue.
            delivery={"workers": 1, "relayhost": "[127.0.0.1]:%d" % sink.port,
                      "min_backoff": 3600.0, "max_backoff": 3600.0},
            plugins={
                "ratelimit": {"enabled": True, "database": str(tmp_path / "ratelimit"),
                              "time_unit": 3600, "connection_rate_limit": 1,
                              "exceptions": ["127.0.0.1/32", "127.0.0.2/32",
                                             "127.0.0.4/32"]},
                # Scanner verdicts without a clamd: every message is over max_size, so
                # passes unscanned (counted); Rspamd is down and fail_open lets mail
                # through (a scanner failure).
                "spf": {"enabled": True}, "dkim": {"enabled": True},
                "dmarc": {"enabled": True}, "arc": {"enabled": True},
                "greylist": {"enabled": True, "delay": 0,
                             "database": str(tmp_path / "greylist")},
                "clamav": {"enabled": True, "address": "127.0.0.1:%d" % dead,
                           "max_size": 1},
                "rspamd": {"enabled": True, "address": "127.0.0.1:%d" % dead,
                           "fail_open": True}},
            milters=[{"socket": milter.address, "name": "scripted"},
                     {"socket": "inet:127.0.0.1:%d" % dead, "name": "gone",
                      "default_action": "accept"}])
        wait_for(lambda: healthy(api_port) and "delivery worker started" in server.log())

        began = time.time()
        prometheus = PrometheusInstance(tempfile.mkdtemp(prefix="elemta-prometheus-"),
                                        free_port(), ["127.0.0.1:%d" % api_port])
        with prometheus:
            # $instance's own query, label_values(METRIC, instance), as Grafana asks it:
            # answered once Prometheus has scraped Elemta before any traffic.
            for path in dashboard_files():
                for variable in load(path)["templating"]["list"]:
                    if variable["type"] == "query":
                        metric = re.fullmatch(r"label_values\((\w+), instance\)",
                                              variable["query"]).group(1)
                        wait_for(lambda: prometheus.api(
                            "label/instance/values", **{"match[]": metric}), timeout=15)
            for round_number in (1, 2):
                send_traffic(server, submission, sink, round_number, api_port)
                scraped_after(prometheus, time.time())
            every = queries()
            answers = {}

            def all_answered():
                # Every window covers the whole test, from before the first scrape.
                window = "%ds" % (time.time() - began + 10)
                for _, title, expr in every:
                    if problem(title, answers.get(expr)):
                        answers[expr] = run_query(prometheus, with_values(expr, window))
                if not any(problem(title, answers[expr]) for _, title, expr in every):
                    return True
                time.sleep(0.5)      # the next scrapes
                return False
            try:
                wait_for(all_answered, timeout=30)
            except AssertionError:
                pass                 # the assertion below names the queries that failed
            failed = ["%s / %s: %s -> %s: %r" % (name, title, expr,
                                                 problem(title, answers[expr]),
                                                 answers[expr])
                      for name, title, expr in every if problem(title, answers[expr])]
            assert not failed, "\n".join(failed)
    prometheus.remove()
