"""A private Prometheus server on loopback (Debian package prometheus), scraping what a
test names and evaluating the rule files it is given.

Owned by no Elemta process: tests of the metrics, alert rules and dashboards start it. It
keeps its data in its own directory, scrapes and evaluates every second so a test need
not wait long, and answers its HTTP API on 127.0.0.1.

    with PrometheusInstance(workdir, port, ["127.0.0.1:8025"], [rules]) as prom:
        prom.api("rules")        # the "data" of GET /api/v1/rules

See also: tests/test_alert_rules.py.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

from tests.peers.process import stop_process

PROMETHEUS = "/usr/bin/prometheus"


def prometheus_available():
    """Why a private Prometheus cannot run here, or None when it can."""
    if not os.path.exists(PROMETHEUS):
        return "prometheus is not installed (apt-get install prometheus)"
    return None


class PrometheusInstance:
    """One private Prometheus; see the module docstring."""

    def __init__(self, workdir, port, targets, rule_files=()):
        self.workdir = str(workdir)
        self.port = port
        self.targets = list(targets)
        self.rule_files = [os.path.abspath(f) for f in rule_files]
        self.process = None

    def start(self, timeout=30):
        config = os.path.join(self.workdir, "prometheus.yml")
        with open(config, "w") as f:
            json.dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                       "rule_files": self.rule_files,
                       "scrape_configs": [{"job_name": "elemta",
                                           "static_configs": [{"targets": self.targets}]}]},
                      f)                               # JSON is YAML
        self.log = open(os.path.join(self.workdir, "prometheus.log"), "ab")
        self.process = subprocess.Popen(
            [PROMETHEUS, "--config.file", config,
             "--storage.tsdb.path", os.path.join(self.workdir, "data"),
             "--web.listen-address", "127.0.0.1:%d" % self.port],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("prometheus exited: %s" % self.read_log())
            try:
                with urllib.request.urlopen(self.url("/-/ready"), timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus not ready: %s" % self.read_log())
            time.sleep(0.1)

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def api(self, endpoint, **params):
        """The "data" member of GET /api/v1/<endpoint>?params."""
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(self.url("/api/v1/" + endpoint + query),
                                    timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return answer["data"]

    def read_log(self):
        with open(os.path.join(self.workdir, "prometheus.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")[-3000:]

    def stop(self):
        stop_process(self.process)
        if self.process is not None:
            self.log.close()

    def remove(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
