"""elemta.util.metricvalues, the buffered multiprocess values, read the way the api reads
them (prometheus-client's MultiProcessCollector, and elemta.metrics.scrape_registry):
counts of forked processes add up once flushed, a clean exit flushes, a fork starts the
child from its own file as MmapedValue does, and threads lose no count.

Each case runs in a fresh interpreter: metrics.setup() changes prometheus-client's
globals for the whole process. FLUSH_INTERVAL is set to an hour there, so what reaches
the files is what flush(), an exit or a scrape wrote, never a timer."""

import json
import os
import subprocess
import sys

import pytest

from elemta.util.metricfiles import VALUE_SIZE
from tests.harness import REPO

PRELUDE = r"""
import json, os, sys, threading
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from elemta import metrics
from elemta.util import metricvalues
directory = sys.argv[1]
metrics.setup(directory)
metricvalues.FLUSH_INTERVAL = 3600.0
metrics.flush()                   # the first update after this no longer flushes at once
counter = Counter("demo", "A demo counter.", ["who"], registry=None)
live = Gauge("demo_live", "A live gauge.", multiprocess_mode="livesum", registry=None)
sizes = Histogram("demo_size", "A histogram.", buckets=(10, 100), registry=None)

def scrape():
    registry = CollectorRegistry()
    MultiProcessCollector(registry, directory)
    return {"%s%s" % (s.name, sorted(s.labels.items()) or ""): s.value
            for family in registry.collect() for s in family.samples}

def fork(work):
    # work() runs in a child that then exits cleanly (atexit); returns its pid
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            sys.exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid
"""

FORKED = PRELUDE + r"""
seen = {}
counter.labels("parent").inc(5)
metrics.flush()
counter.labels("parent").inc(100)      # not flushed when the children fork
seen["unflushed"] = scrape().get("demo_total[('who', 'parent')]")

def child(n):
    def work():
        if n == 3:    # a fork starts from the child's own file, as MmapedValue's does
            with open(os.path.join(directory, "child3.json"), "w") as out:
                json.dump(counter.labels("parent")._value.get(), out)
        counter.labels("shared").inc(n)
        sizes.observe(n * 20)
        live.inc(1)
    return work

fork(child(3))
fork(child(4))
with open(os.path.join(directory, "child3.json")) as f:
    seen["parent_in_child"] = json.load(f)
seen["after_exits"] = scrape()
metrics.flush()
seen["after_flush"] = scrape()["demo_total[('who', 'parent')]"]
print(json.dumps(seen))
"""


def run(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_forked_processes_add_up_once_flushed_and_a_clean_exit_flushes(tmp_path):
    seen = run(FORKED, tmp_path)
    # Buffered: the parent's second count is in no file until it flushes.
    assert seen["unflushed"] == 5.0
    # Each child began at 0, not at its parent's 105 (its own file; no double count).
    assert seen["parent_in_child"] == 0.0
    samples = seen["after_exits"]
    # The children exited without calling flush: their exit wrote their counts.
    assert samples["demo_total[('who', 'shared')]"] == 7.0
    assert samples["demo_live"] == 2.0
    assert samples["demo_size_count"] == 2.0
    assert samples["demo_size_sum"] == 140.0
    assert samples["demo_size_bucket[('le', '100.0')]"] == 2.0
    assert samples["demo_size_bucket[('le', '10.0')]"] == 0.0
    # The parent's unflushed change at the fork went with neither child.
    assert samples["demo_total[('who', 'parent')]"] == 5.0
    assert seen["after_flush"] == 105.0


MOST_RECENT = PRELUDE + r"""
recent = Gauge("demo_recent", "A gauge.", multiprocess_mode="mostrecent", registry=None)
recent.set(3)
metrics.flush()
fork(lambda: recent.set(7))       # set later: its timestamp wins
print(json.dumps(scrape()["demo_recent"]))
"""


@pytest.mark.skipif(VALUE_SIZE == 8, reason="prometheus-client before 0.17: no timestamps")
def test_most_recent_gauges_keep_their_timestamps(tmp_path):
    assert run(MOST_RECENT, tmp_path) == 7.0


THREADS = PRELUDE + r"""
seen = {}

def count():
    for _ in range(20000):
        counter.labels("threads").inc()
threads = [threading.Thread(target=count) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
# elemta's scrape flushes this process's own counts first (the api's).
registry = metrics.scrape_registry(directory)
seen["threads"] = [s.value for family in registry.collect() for s in family.samples
                   if s.labels.get("who") == "threads" and s.name == "demo_total"]
print(json.dumps(seen))
"""


def test_threads_lose_no_count(tmp_path):
    assert run(THREADS, tmp_path)["threads"] == [80000.0]
