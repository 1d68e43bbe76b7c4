"""The alert rules and the example Alertmanager configuration under monitoring/: promtool
and amtool (Debian packages prometheus and prometheus-alertmanager) accept them, each
alert fires in its promtool unit test, the rules use only metrics Elemta exports, and a
real Prometheus scraping a live Elemta evaluates every rule without error."""

import os
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile

import pytest
from ruamel.yaml import YAML

from tests.harness import REPO, free_port, wait_for
from tests.peers.prometheus import PrometheusInstance, prometheus_available
from tests.test_metrics import (BODY, exported_series_names, make_certificate,
                                smtpd_workers, start_server)

RULES_DIR = os.path.join(REPO, "monitoring", "prometheus")
RULES = os.path.join(RULES_DIR, "elemta-alerts.yml")
RULE_TESTS = os.path.join(RULES_DIR, "elemta-alerts_test.yml")
ALERTMANAGER = os.path.join(REPO, "monitoring", "alertmanager", "alertmanager.yml")


def tool(name, package):
    """The path of a Debian package's tool; skip when it is missing and we cannot
    install it (not root); as root (CI, make test) it must be there."""
    path = shutil.which(name)
    if path is None:
        if os.geteuid() != 0:
            pytest.skip("%s is not installed (apt-get install %s)" % (name, package))
        pytest.fail("%s is missing: make system-packages installs %s" % (name, package))
    return path


def load(path):
    with open(path) as f:
        return YAML(typ="safe").load(f)


def rules():
    return [rule for group in load(RULES)["groups"] for rule in group["rules"]]


def alert_names():
    return sorted(rule["alert"] for rule in rules() if "alert" in rule)


def test_promtool_checks_the_rules_clean():
    result = subprocess.run([tool("promtool", "prometheus"), "check", "rules", RULES],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: %d rules found" % len(rules()) in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_the_rules_pass_their_promtool_unit_tests():
    result = subprocess.run([tool("promtool", "prometheus"), "test", "rules", RULE_TESTS],
                            capture_output=True, text=True, cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_where_it_fires():
    firing = set()
    for case in load(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                firing.add(check["alertname"])
    assert sorted(firing) == alert_names()
    assert {"ElemtaQueueGrowing", "ElemtaDeferredMessageOld",
            "ElemtaDeliveryFailureRatioHigh", "ElemtaNoMailAccepted",
            "ElemtaWorkerCrashLooping", "ElemtaCertificateExpiringSoon",
            "ElemtaCertificateExpired", "ElemtaSpoolSpaceLow",
            "ElemtaScannerDown", "ElemtaMilterDown"} <= set(alert_names())


def test_the_rules_use_only_metrics_elemta_exports():
    exported = exported_series_names()
    used = set()
    for rule in rules():
        used.update(re.findall(r"\belemta_[a-z0-9_]+", rule["expr"]))
        for text in rule.get("annotations", {}).values():
            used.update(re.findall(r"\belemta_[a-z0-9_]+", text))
    assert used and not used - exported, sorted(used - exported)


def test_amtool_accepts_the_example_alertmanager_config():
    amtool = tool("amtool", "prometheus-alertmanager")
    result = subprocess.run([amtool, "check-config", ALERTMANAGER],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

    def receivers(*labels):
        result = subprocess.run([amtool, "config", "routes", "test", "--config.file",
                                 ALERTMANAGER] + list(labels),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.split()
    # Critical alerts reach the on-call webhook and the postmaster; warnings mail only.
    assert receivers("alertname=ElemtaSpoolFull", "severity=critical") == \
        ["on-call,postmaster"]
    assert receivers("alertname=ElemtaSpoolSpaceLow", "severity=warning") == \
        ["postmaster"]


@pytest.mark.skipif(prometheus_available() is not None, reason=str(prometheus_available()))
def test_a_real_prometheus_evaluates_every_rule_against_a_live_elemta(
        elemta_server, tmp_path, monkeypatch):
    cert, key, _ = make_certificate(str(tmp_path), "mx", 30)
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                    tls={"cert_file": cert, "key_file": key})
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.sendmail("a@c.test", ["b@example.test"], BODY)
    os.kill(smtpd_workers(server.process.pid)[0], signal.SIGKILL)   # a restart counted
    prometheus = PrometheusInstance(tempfile.mkdtemp(prefix="elemta-prometheus-"),
                                    free_port(), ["127.0.0.1:%d" % api_port], [RULES])
    with prometheus:
        def evaluated():
            found = [rule for group in prometheus.api("rules")["groups"]
                     for rule in group["rules"]]
            if len(found) == len(rules()) and all(
                    not r["lastEvaluation"].startswith("0001") for r in found):
                return found
        found = wait_for(evaluated, timeout=30)
        assert [(r["name"], r["health"], r.get("lastError", "")) for r in found] == \
            [(r.get("alert") or r["record"], "ok", "") for r in rules()]
        # The series the rules watch on any host are there to be watched.
        for metric in ("elemta_queue_messages", "elemta_smtpd_messages_accepted_total",
                       "elemta_queue_oldest_arrival_timestamp_seconds",
                       "elemta_tls_certificate_expiry_timestamp_seconds",
                       "elemta_spool_filesystem_avail_bytes",
                       "elemta_spool_filesystem_size_bytes",
                       "elemta_spool_min_free_bytes", "elemta_worker_restarts_total",
                       "elemta:queue_waiting_messages:sum"):
            wait_for(lambda: prometheus.api("query", query=metric)["result"], timeout=15)
        # Nothing is wrong with this Elemta: no alert fires or waits.
        assert prometheus.api("alerts")["alerts"] == []
    prometheus.remove()
