"""Metrics across processes: what Prometheus scrapes from the api process adds up over
every smtpd worker, dead ones included, and passes promtool; the master's bookkeeping
for dead children (elemta.metrics.worker_exited) keeps totals exact while scrapes run."""

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from elemta.metrics import rejection_reason
from tests.harness import REPO, free_port, wait_for, wait_for_settled
from tests.peers.sink import ScriptedServer
from tests.test_drain import elemtactl
from tests.test_workers import children_of

BODY = b"Subject: metrics\r\n\r\ncounted\r\n"


def scrape(api_port):
    """{(sample name, sorted label pairs): value} from GET /metrics."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % api_port, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, text


def settled(api_port, check, timeout=30):
    """(samples, text) of a scrape check(samples) passes (check asserts), and still
    passes once every process has written its counts again (wait_for_settled: workers
    write them about once a second, so a scrape right after traffic may be behind, and a
    count that must be exact may be exceeded only by the next write). On failure,
    check's own assertion says what is wrong."""
    def passing():
        samples, text = scrape(api_port)
        try:
            check(samples)
        except AssertionError:
            return None
        return samples, text
    try:
        return wait_for_settled(passing, timeout)
    except AssertionError:
        check(scrape(api_port)[0])
        raise


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def labelled(samples, name):
    """{label values, in the order of the label names sorted: value} of one metric's
    samples: {("PLAIN", "failure"): 1.0} for elemta_smtpd_auth_attempts_total."""
    return {tuple(v for _, v in sorted(labels)): count
            for (sample, labels), count in samples.items() if sample == name}


def http_status(url, method="GET"):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def smtpd_workers(master):
    return sorted(pid for pid, title in children_of(master).items()
                  if title == "elemta: smtpd")


def worker_of(client_sock, server_port, workers):
    """Which worker process holds the server side of this client connection."""
    client_port = client_sock.getsockname()[1]
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16) == server_port
                    and int(remote.split(":")[1], 16) == client_port):
                inode = fields[9]
    assert inode is not None
    for pid in workers:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "socket:[%s]" % inode:
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


def sessions_on_every_worker(port, workers):
    """{worker pid: [open smtplib sessions]}: sessions held open until every worker
    has at least one (so every worker is serving)."""
    by_worker = {pid: [] for pid in workers}
    opened = 0
    while not all(by_worker.values()):
        assert opened < 150, "the kernel never handed a connection to one worker"
        smtp = smtplib.SMTP("127.0.0.1", port)
        opened += 1
        by_worker[worker_of(smtp.sock, port, workers)].append(smtp)
    return by_worker


def start_server(elemta_server, tmp_path, monkeypatch, **sections):
    # The master gives its children a metrics directory; for a master that does not yet,
    # the children inherit this one.
    fallback = tmp_path / "metrics"
    fallback.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(fallback))
    api_port = free_port()
    # sessions_on_every_worker may open many sessions from 127.0.0.1 before a busy
    # worker takes one: above limits.connections_per_client (50) they would get 421.
    sections.setdefault("limits", {}).setdefault("connections_per_client", 200)
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2},
                           relay={"mynetworks": ["192.0.2.0/24"]},
                           api={"enabled": True, "port": api_port}, **sections)
    wait_for(lambda: len(smtpd_workers(server.process.pid)) == 2)
    wait_for(lambda: healthy(api_port))
    probe_counted(api_port)
    return server, api_port


def probe_counted(api_port):
    """Wait until the scrape counts the session of the fixture's greeting probe (and so
    all it counted): a baseline taken before would count it as the test's own."""
    def ended(samples):
        assert sum(labelled(samples, "elemta_smtpd_sessions_total").values()) >= 1
    settled(api_port, ended)


def healthy(api_port):
    try:
        return http_status("http://127.0.0.1:%d/api/v1/health" % api_port) == 200
    except OSError:           # not listening yet
        return False


def test_counters_add_up_across_workers_dead_and_alive(elemta_server, tmp_path, monkeypatch):
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch)
    master = server.process.pid
    workers = smtpd_workers(master)
    before, _ = scrape(api_port)      # the fixture's own probe connected once already

    by_worker = sessions_on_every_worker(server.port, workers)
    opened = sum(len(sessions) for sessions in by_worker.values())
    victim, survivor = workers
    sent = quits = 0
    for pid in workers:
        for _ in range(3):
            by_worker[pid][0].sendmail("a@c.test", ["b@example.test"], BODY)
            sent += 1
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        by_worker[victim][0].sendmail("a@c.test", ["x@elsewhere.test"], BODY)

    def victim_counted(samples):
        assert value(samples, "elemta_smtpd_messages_accepted_total") == sent
        assert value(samples, "elemta_smtpd_messages_rejected_total", reason="relay") == 1

    # kill -9 loses what a worker counted in its last second (not yet in its file): kill
    # it once its counts are out, so what follows checks that the dead keep them.
    settled(api_port, victim_counted)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in smtpd_workers(master)
             and len(smtpd_workers(master)) == 2)
    for smtp in by_worker[victim]:
        smtp.close()
    for _ in range(2):
        by_worker[survivor][0].sendmail("a@c.test", ["b@example.test"], BODY)
        sent += 1
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        by_worker[survivor][0].sendmail("a@c.test", ["x@elsewhere.test"], BODY)
    for _ in range(4):                 # whichever worker takes them, the new one too
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            opened += 1
            smtp.sendmail("a@c.test", ["b@example.test", "c@example.test"], BODY)
            sent += 1
        quits += 1
    for smtp in by_worker[survivor]:
        smtp.quit()
        quits += 1

    tracked = os.path.isdir(os.path.join(server.spool, "metrics"))   # master calls setup()
    stale = 0 if tracked else len(by_worker[victim])   # a dead worker's gauge, unless cleared
    listener = "127.0.0.1:%d" % server.port      # the listener label: address:port
    with server.queue() as queue:
        records = list(queue.index.iter_records())
    assert len(records) == sent

    def counted(samples):
        def grew(name, **labels):
            return value(samples, name, **labels) - value(before, name, **labels)

        assert value(samples, "elemta_smtpd_sessions_open", listener=listener,
                     mode="smtp") == stale
        assert value(samples, "elemta_smtpd_messages_accepted_total") == sent
        assert value(samples, "elemta_smtpd_accepted_bytes_total") == sum(
            r.envelope.size for r in records)
        assert value(samples, "elemta_queue_messages", state="incoming") == sent
        assert value(samples, "elemta_queue_messages", state="deferred") == 0
        assert grew("elemta_smtpd_connections_total", listener=listener, mode="smtp",
                    outcome="accepted") == opened
        assert grew("elemta_smtpd_replies_total", code="220") == opened
        assert value(samples, "elemta_smtpd_replies_total", code="354") == sent
        assert grew("elemta_smtpd_replies_total", code="221") == quits
        assert value(samples, "elemta_smtpd_replies_total", code="250") > sent * 3
        assert value(samples, "elemta_smtpd_replies_total", code="554") == 2
        assert value(samples, "elemta_smtpd_messages_rejected_total", reason="relay") == 2
        assert value(samples, "elemta_smtpd_commit_batch_messages_sum") == sent
        assert value(samples, "elemta_smtpd_commit_flush_seconds_count") >= 1
        if tracked:
            assert value(samples, "elemta_worker_restarts_total", kind="smtpd",
                         reason="crashed") == 1

    # The live sessions' gauge drops once the workers have closed their side.
    samples, text = settled(api_port, counted)

    base = "http://127.0.0.1:%d" % api_port
    with urllib.request.urlopen(base + "/api/v1/health", timeout=5) as r:
        assert r.headers["Content-Type"] == "application/json"
        assert json.load(r)["status"] == "ok"
    assert http_status(base + "/nothing-here") == 404
    assert http_status(base + "/metrics", method="POST") == 405
    if shutil.which("promtool"):      # Debian package prometheus (make system-packages)
        check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                               capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout + check.stderr == b"", "promtool lint: %r" % check.stdout


def test_submission_counts_auth_and_tls(elemta_server, tmp_path, monkeypatch, tls_files,
                                        credentials):
    cert, key = tls_files
    submission = free_port()
    server, api_port = start_server(
        elemta_server, tmp_path, monkeypatch,
        listeners=[{"mode": "smtp"}, {"mode": "submission", "port": submission}],
        tls={"cert_file": cert, "key_file": key}, auth={"credentials_file": credentials})
    with smtplib.SMTP("127.0.0.1", submission) as smtp:
        smtp.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused):      # AUTH first on submission
            smtp.sendmail("alice@example.test", ["b@example.test"], BODY)
        smtp.starttls()
        smtp.ehlo()
        smtp.user, smtp.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)     # login() would try every mechanism
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("CRAM-MD5", smtp.auth_cram_md5)   # not offered: 504, no check
        smtp.login("alice", "wonderland")
        smtp.sendmail("alice@example.test", ["b@elsewhere.test"], BODY)

    def counted(samples):
        assert value(samples, "elemta_smtpd_connections_total",
                     listener="127.0.0.1:%d" % submission, mode="submission",
                     outcome="accepted") == 1
        assert value(samples, "elemta_smtpd_messages_rejected_total", reason="auth") == 1
        assert labelled(samples, "elemta_smtpd_auth_attempts_total") == {
            ("PLAIN", "failure"): 1, ("LOGIN", "failure"): 1,    # (mechanism, result)
            ("PLAIN", "success"): 1}
        versions = {dict(labels)["version"]: v for (name, labels), v in samples.items()
                    if name == "elemta_smtpd_tls_sessions_total"}
        assert versions in ({"TLSv1.3": 1}, {"TLSv1.2": 1})
        assert value(samples, "elemta_smtpd_messages_accepted_total") == 1
    settled(api_port, counted)


# The master's side, in a process of its own (setup() changes the environment): children
# count and die by kill -9 while another process scrapes in a loop; the master folds each
# dead child's files away. Every scrape must show the same total, never one counted twice
# or missing, and the dead children's live gauges must go.
FOLD_SCRIPT = r"""
import json, os, signal, sys, time
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from elemta import metrics

CHILDREN, EACH = 40, 25
directory = sys.argv[1]
metrics.setup(directory)

def totals():
    text = generate_latest(metrics.scrape_registry()).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[s.name] = found.get(s.name, 0) + s.value
    return found

children = []
for _ in range(CHILDREN):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for _ in range(EACH):
            metrics.MESSAGES_ACCEPTED.inc()
            metrics.COMMIT_BATCH.observe(2)
        metrics.SESSIONS_OPEN.labels("127.0.0.1:25", "smtp").inc()
        metrics.flush()          # counted and written: kill -9 loses nothing now
        os.write(ready_w, b".")
        time.sleep(60)
        os._exit(0)
    os.read(ready_r, 1)
    children.append(pid)

scraper_r, scraper_w = os.pipe()
stop_r, stop_w = os.pipe()
scraper = os.fork()
if scraper == 0:
    seen = []
    os.set_blocking(stop_r, False)
    while True:
        t = totals()
        seen.append([t.get("elemta_smtpd_messages_accepted_total"),
                     t.get("elemta_smtpd_commit_batch_messages_count")])
        if len(seen) == 1:
            os.write(scraper_w, b"\n")     # scraping: the master may start
        try:
            if os.read(stop_r, 1):
                break
        except BlockingIOError:
            pass
    os.write(scraper_w, json.dumps(seen).encode() + b"\n")
    os._exit(0)
os.close(scraper_w)           # so a scraper that crashed reads as end of file
scraped = os.fdopen(scraper_r)
scraped.readline()

open_sessions = []
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    metrics.worker_exited(pid)
    open_sessions.append(totals().get("elemta_smtpd_sessions_open", 0))
os.write(stop_w, b".")
seen = json.loads(scraped.readline() or '"the scraper crashed"')
os.waitpid(scraper, 0)
metrics.worker_exited(scraper)
print(json.dumps({"seen": seen, "open_sessions": open_sessions, "final": totals(),
                  "files": sorted(os.listdir(directory))}))
"""


def test_dead_workers_are_folded_away_without_a_scrape_seeing_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = subprocess.run([sys.executable, "-c", FOLD_SCRIPT, str(tmp_path / "m")],
                         env=env, capture_output=True, check=True, timeout=60).stdout
    result = json.loads(out)
    assert isinstance(result["seen"], list), result["seen"]  # a scrape failed
    assert len(result["seen"]) > 10                        # scrapes ran during the folds
    assert all(seen == [1000, 1000] for seen in result["seen"]), {
        tuple(s) for s in result["seen"]}
    assert result["open_sessions"] == list(range(39, -1, -1))
    assert result["final"]["elemta_smtpd_messages_accepted_total"] == 1000
    # Nothing of the dead is left but one archive per kind of file.
    assert result["files"] == [".lock", "counter_archive.db", "histogram_archive.db"]


def test_setup_starts_from_zero(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"left by a previous master")
    script = ("import sys; from elemta import metrics; metrics.setup(sys.argv[1]); "
              "from prometheus_client import generate_latest; "
              "print(generate_latest(metrics.scrape_registry()).decode())")
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", script, str(directory)], env=env,
                         capture_output=True, check=True, timeout=30).stdout
    assert out.strip() == b""
    assert [name for name in os.listdir(directory) if name.endswith(".db")] == []


def test_a_child_killed_before_sizing_its_metric_file_breaks_no_scrape(tmp_path):
    """Chaos found it: kill -9 between creating histogram_<pid>.db and sizing it left an
    empty file that made the master's fold, and then every /metrics scrape, fail."""
    directory = tmp_path / "m"
    script = ("import os, sys; from elemta import metrics; metrics.setup(sys.argv[1]); "
              "pid = 2 ** 22 + 17; "
              "open(os.path.join(sys.argv[1], 'histogram_%d.db' % pid), 'wb').close(); "
              "metrics.worker_exited(pid); "
              "from prometheus_client import generate_latest; "
              "generate_latest(metrics.scrape_registry()); "
              "print(sorted(os.listdir(sys.argv[1])))")
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    run = subprocess.run([sys.executable, "-c", script, str(directory)], env=env,
                         capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr.decode()
    assert b"cannot fold" not in run.stderr
    assert b"histogram_" not in run.stdout


@pytest.mark.parametrize("command, code, status, reason", [
    ("RCPT", 554, "5.7.1", "relay"),
    ("RCPT", 550, "5.1.1", "unknown_user"),
    ("RCPT", 450, "4.1.1", "unknown_user"),
    ("MAIL", 552, "5.3.4", "size"),
    ("DATA", 552, "5.3.4", "size"),
    ("MAIL", 501, "5.1.7", "syntax"),
    ("RCPT", 553, "5.6.7", "syntax"),
    ("MAIL", 530, "5.7.0", "auth"),
    ("DATA", 451, "4.3.0", "storage"),
    ("DATA", 452, "4.3.1", "storage"),
    ("RCPT", 452, "4.5.3", "recipients"),
    ("DATA", 550, "5.5.2", "content"),
    ("BDAT", 554, "5.6.1", "content"),
    ("RCPT", 450, "4.7.1", "policy"),
    ("DATA", 554, "5.5.1", None),      # no valid recipients: their refusals were counted
    ("MAIL", 503, "5.5.1", None),
    ("RCPT", 500, "5.5.2", None),      # a line too long answers no command
    ("DATA", 421, "4.4.2", None),
    ("AUTH", 535, "5.7.8", None),
    ("DATA", 250, "2.0.0", None),
])
def test_rejection_reasons(command, code, status, reason):
    assert rejection_reason(command, code, status) == reason


FOLD_A_DAMAGED_FILE = r"""
import json, os, struct, sys
from prometheus_client.mmap_dict import MmapedDict
from elemta import metrics
from elemta.util.metricfiles import VALUE_SIZE, read_entries, write_value
directory = sys.argv[1]
metrics.setup(directory)
pid = 2 ** 22 + 17                      # a dead child with 10 counters, the 6th damaged
dead_path = os.path.join(directory, "counter_%d.db" % pid)
dead = MmapedDict(dead_path)
for n in range(10):
    write_value(dead, "key%d" % n, n + 1.0)
dead.close()
positions = [pos for _, _, pos in read_entries(dead_path)]
with open(dead_path, "r+b") as damaged:         # its length runs past the end
    damaged.seek(positions[4] + VALUE_SIZE)   # the 6th entry's length
    damaged.write(struct.pack("i", 2 ** 30))
for _ in range(2):     # the fold stops at the damage; the file stays for a later one
    metrics.worker_exited(pid)
archive = os.path.join(directory, "counter_archive.db")
print(json.dumps(dict((k, v) for k, v, _ in read_entries(archive))))
"""


def test_a_fold_stopped_by_a_damaged_file_counts_nothing_twice(tmp_path):
    """The master folds a dead child's counters into the archive; a damaged entry stops
    the fold part way (not an OSError) and the file stays for a later fold. What was
    already folded must not be added again then."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", FOLD_A_DAMAGED_FILE, str(tmp_path / "m")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cannot fold the counters of pid" in done.stderr
    assert json.loads(done.stdout) == {"key%d" % n: n + 1.0 for n in range(5)}


def make_certificate(directory, name, days):
    """(cert, key, notAfter as a Unix time read by openssl): a self-signed certificate
    valid for `days` days, as an admin would make it."""
    cert, key = (os.path.join(directory, name + ".pem"),
                 os.path.join(directory, name + ".key"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-days", str(days), "-subj", "/CN=mx.test", "-keyout", key,
                    "-out", cert], check=True, capture_output=True)
    end = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", cert],
                         check=True, capture_output=True, text=True).stdout
    not_after = ssl.cert_time_to_seconds(end.strip().split("=", 1)[1])
    return cert, key, not_after


def certificate_expiries(api_port):
    samples, _ = scrape(api_port)
    return {dict(labels)["file"]: v for (name, labels), v in samples.items()
            if name == "elemta_tls_certificate_expiry_timestamp_seconds"}


def test_certificate_expiry_is_what_the_workers_serve_and_follows_a_reload(
        elemta_server, tmp_path, monkeypatch):
    old_cert, old_key, old_after = make_certificate(str(tmp_path), "old", 20)
    new_cert, new_key, new_after = make_certificate(str(tmp_path), "new", 400)
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                    tls={"cert_file": old_cert, "key_file": old_key})
    assert certificate_expiries(api_port) == {old_cert: old_after}

    # The admin points the config at the renewed certificate and reloads: once the old
    # workers are gone, only the new certificate is reported.
    with open(server.config_path) as f:
        text = f.read()
    with open(server.config_path, "w") as f:
        f.write(text.replace(old_cert, new_cert).replace(old_key, new_key))
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: certificate_expiries(api_port) == {new_cert: new_after}, timeout=20)



def metric_names_in_code():
    """Each metric name the code defines: a string literal "elemta_..." (counters
    without their _total, as prometheus-client takes them)."""
    names = set()
    for directory, _, files in os.walk(os.path.join(REPO, "elemta")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(directory, name)) as f:
                    names.update(re.findall(r'"(elemta_[a-z0-9_]+)"', f.read()))
    return names


def exported_series_names():
    """Every series name a scrape may show: each metric the code defines, with the
    suffixes of counters (_total) and histograms (_bucket, _count, _sum)."""
    return {name + suffix for name in metric_names_in_code()
            for suffix in ("", "_total", "_bucket", "_count", "_sum")}


def test_every_metric_is_documented_in_elemta_8():
    """Each metric name the code defines has its entry in the Metrics section of
    elemta(8); counters are documented with their _total."""
    names = metric_names_in_code()
    with open(os.path.join(REPO, "man", "elemta.8")) as f:
        documented = set(re.findall(r"elemta_[a-z0-9_]+", "\n".join(
            line for line in f if line.startswith(".It Va "))))
    assert "elemta_queue_messages" in names
    missing = sorted(n for n in names if not {n, n + "_total"} & documented)
    assert not missing, "not in elemta(8)'s Metrics section: %s" % missing


def test_queue_age_and_spool_space_are_scraped(elemta_server, tmp_path, monkeypatch):
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                    queue={"min_free_space": 12345678})
    samples, _ = scrape(api_port)
    assert not [k for k in samples
                if k[0] == "elemta_queue_oldest_arrival_timestamp_seconds"]  # empty queue
    for n in range(2):
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.sendmail("a@c.test", ["b@example.test"], BODY)
    first = server.queued_ids()[0]
    arrival = server.message(first)[0].arrival
    samples, _ = scrape(api_port)
    assert value(samples, "elemta_queue_messages", state="incoming") == 2
    assert value(samples, "elemta_queue_oldest_arrival_timestamp_seconds",
                 state="incoming") == arrival
    assert ("elemta_queue_oldest_arrival_timestamp_seconds", (("state", "deferred"),)) \
        not in samples
    disk = os.statvfs(server.spool)
    assert value(samples, "elemta_spool_filesystem_size_bytes") == \
        disk.f_blocks * disk.f_frsize
    free = disk.f_bavail * disk.f_frsize
    assert abs(value(samples, "elemta_spool_filesystem_avail_bytes") - free) < 64 << 20
    assert value(samples, "elemta_spool_min_free_bytes") == 12345678


def test_a_scrape_passes_over_a_metric_file_being_created(tmp_path):
    """A worker starting (a reload) creates its file, then sizes it, without the scrape
    lock: a scrape in between sees an empty file and must still answer."""
    script = ("import sys; from elemta import metrics; metrics.setup(sys.argv[1]); "
              "metrics.MESSAGES_ACCEPTED.inc(3)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True,
                   env=dict(os.environ, PYTHONPATH=REPO))
    (tmp_path / "counter_4242.db").write_bytes(b"")       # a worker's, just created
    (tmp_path / "gauge_livesum_4242.db").write_bytes(b"\0\0")
    from prometheus_client import generate_latest
    from elemta.metrics import scrape_registry
    text = generate_latest(scrape_registry(str(tmp_path))).decode()
    assert "elemta_smtpd_messages_accepted_total 3.0" in text


def test_an_unreadable_certificate_costs_the_metric_not_the_worker(tmp_path, caplog):
    """certificate_expiry runs after the context loaded the file, but the file may go
    or be no certificate by then: a warning naming it, no value, no exception."""
    from elemta.smtpd.tls import certificate_expiry
    missing = str(tmp_path / "gone.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                       "-----END CERTIFICATE-----\n")
    with caplog.at_level("WARNING", logger="elemta.smtpd"):
        assert certificate_expiry(missing) is None
        assert certificate_expiry(str(garbage)) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == \
        ["tls.cert_file %s" % missing, "tls.cert_file %s" % garbage]


def session_endings(api_port):
    """{(listener, mode, result): count} of elemta_smtpd_sessions_total."""
    return labelled(scrape(api_port)[0], "elemta_smtpd_sessions_total")


def greeted(source="127.0.0.1", port=None):
    """A raw client socket past the whole greeting."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    data = b""
    while not re.search(rb"(^|\n)220 [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return sock


def read_to_end(sock):
    """What the server sends until it closes (or resets) the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data
        data += chunk


def test_sessions_are_counted_by_how_they_ended(elemta_server, tmp_path, monkeypatch,
                                                tls_files):
    cert, key = tls_files
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 1},
                           relay={"mynetworks": ["127.0.0.1/32"]},
                           api={"enabled": True, "port": api_port},
                           tls={"cert_file": cert, "key_file": key},
                           timeouts={"command": 1},
                           protocol_tests={"greet_wait": 0.5, "greet_action": "drop"})
    wait_for(lambda: healthy(api_port))
    probe_counted(api_port)
    before = session_endings(api_port)      # the fixture's own probe, say
    failed_handshakes = value(scrape(api_port)[0],
                              "elemta_smtpd_tls_handshake_failures_total")

    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.noop()                         # QUIT on leaving the block
    greeted(port=server.port).close()           # goes away without a word: lost
    silent = greeted(port=server.port)          # says nothing for timeouts.command
    assert read_to_end(silent).startswith(b"421 4.4.2 ")
    silent.close()
    tls = greeted(port=server.port)             # STARTTLS, then no TLS at all
    tls.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
    answer = b""
    while b"\r\n220 2.0.0" not in answer:
        chunk = tls.recv(4096)
        assert chunk, answer
        answer += chunk
    tls.sendall(b"this is no ClientHello\r\n\r\n")
    read_to_end(tls)
    tls.close()
    noisy = greeted(port=server.port)           # 20 errors: the server hangs up
    noisy.sendall(b"BOGUS\r\n" * 20)
    assert b"421 4.7.0 mx.test Error: too many errors" in read_to_end(noisy)
    noisy.close()
    # A client outside mynetworks that talks before its turn: the pregreet test drops it.
    early = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                     source_address=("127.0.0.2", 0))
    early.sendall(b"EHLO bot.test\r\n")
    assert b"521 5.5.1 Protocol error" in read_to_end(early)
    early.close()

    listener = "127.0.0.1:%d" % server.port
    expected = {(listener, "smtp", result): count for result, count in (
        ("quit", 2), ("lost", 1), ("timeout", 1), ("tls_failed", 1), ("dropped", 1),
        ("refused", 1))}

    def grown():
        now = session_endings(api_port)
        return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}
    wait_for(lambda: grown() == expected)
    # The one failed STARTTLS handshake, and no other, is counted as one (counted before
    # the session's end, so in the worker's file by now).
    assert value(scrape(api_port)[0], "elemta_smtpd_tls_handshake_failures_total") == \
        failed_handshakes + 1


def first_reply(port, source):
    """The first line a fresh connection from `source` is given (then it hangs up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        return sock.makefile("rb").readline().decode()


def test_refused_connections_are_counted_by_why(elemta_server, tmp_path, monkeypatch):
    """A client over limits.connections_per_client, a worker at
    limits.connections_per_worker, a drained node: each refusal (421) is counted under
    its outcome and the listener it came to."""
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 1},
                           relay={"mynetworks": ["192.0.2.0/24"]},   # no 127/8: counted
                           api={"enabled": True, "port": api_port},
                           limits={"connections_per_client": 1, "connections_per_worker": 2})
    wait_for(lambda: healthy(api_port))
    probe_counted(api_port)
    listener = "127.0.0.1:%d" % server.port

    def connections():          # {outcome: count} on this listener
        return {outcome: count for (name, mode, outcome), count
                in labelled(scrape(api_port)[0], "elemta_smtpd_connections_total").items()
                if name == listener and mode == "smtp"}
    before = connections()

    def grown():
        now = connections()
        return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}

    one = greeted("127.0.0.2", server.port)
    assert first_reply(server.port, "127.0.0.2").startswith(
        "421 4.7.0 mx.test Error: too many connections from 127.0.0.2")
    two = greeted("127.0.0.3", server.port)           # the worker's second session
    assert first_reply(server.port, "127.0.0.4").startswith(
        "421 4.7.0 mx.test Error: too many connections")
    wait_for(lambda: grown() == {"accepted": 2, "refused_client_limit": 1,
                                 "refused_worker_limit": 1}, timeout=60)
    one.close()
    two.close()
    # Until the worker has seen both go, a new client would meet its worker limit.
    wait_for(lambda: value(scrape(api_port)[0], "elemta_smtpd_sessions_open",
                           listener=listener, mode="smtp") == 0, timeout=60)

    code, out, err = elemtactl(server, "drain")
    assert code == 0, (out, err)
    replies = []                # the smtpd reads the drain flag within a second

    def refused_for_draining():
        # Each probe its own address: a probe's session still closing on the server
        # would make the next one from the same address meet the per-client limit.
        replies.append(first_reply(server.port, "127.0.1.%d" % (len(replies) % 250 + 1)))
        return replies[-1].startswith("421 4.3.2 ")
    wait_for(refused_for_draining, timeout=60)
    replies.append(first_reply(server.port, "127.0.0.6"))
    assert replies[-1].startswith("421 4.3.2 ")
    draining = sum(r.startswith("421 4.3.2 ") for r in replies)
    # Probes that met lingering ones (the last two kinds are rare, but a loaded
    # machine makes them).
    client_limit = sum(" too many connections from " in r for r in replies)
    worker_limit = sum(r.startswith("421 4.7.0") for r in replies) - client_limit
    accepted = len(replies) - draining - worker_limit - client_limit
    wait_for(lambda: grown() == {"accepted": 2 + accepted,
                                 "refused_client_limit": 1 + client_limit,
                                 "refused_worker_limit": 1 + worker_limit,
                                 "refused_draining": draining}, timeout=60)
    wait_for(lambda: value(scrape(api_port)[0], "elemta_smtpd_sessions_open",
                           listener=listener, mode="smtp") == 0, timeout=60)


def test_deliveries_by_transport_and_the_notices_sent(elemta_server, tmp_path, monkeypatch):
    """One message to four transports: local, smtp (a next hop that says 250, one that
    says 450 until the end), and the error transport (delivery.default_transport): every
    recipient is counted under its transport and domain class (an admin's class for
    partner.test, else where the domain belongs), the 450s as deferrals by reason, and
    the bounce, the success DSN and the delay warning the sender gets by kind."""
    sender = "owner@partner.test"
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with ScriptedServer() as partner, \
            ScriptedServer(script={"RCPT": "450 4.2.0 mailbox busy"}) as later:
        server = elemta_server(
            smtpd={"hostname": "mx.test", "workers": 1},
            api={"enabled": True, "port": api_port},
            relay={"local_domains": ["example.test"]},
            delivery={"workers": 1, "default_transport": "error",
                      "domain_classes": [{"name": "partners",
                                          "domains": [".partner.test", "partner.test"]}],
                      "transport": [
                          {"domain": "partner.test",
                           "nexthop": "smtp:[127.0.0.1]:%d" % partner.port},
                          {"domain": "later.test",
                           "nexthop": "smtp:[127.0.0.1]:%d" % later.port}],
                      "delay_warning_time": 1, "nameservers": ["127.0.0.1"],
                      "dns_port": free_port(), "dns_timeout": 0.5,
                      "min_backoff": 0.5, "max_backoff": 1.0})
        os.mkdir(os.path.join(server.workdir, "mail"))       # the test's /var/mail
        wait_for(lambda: "delivery worker started" in server.log())
        wait_for(lambda: healthy(api_port))
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.sendmail(sender, ["root@example.test", "colleague@partner.test",
                                   "friend@gmail.test", "slow@later.test"],
                          b"From: " + sender.encode() + b"\r\nSubject: four ways\r\n\r\n"
                          b"hello\r\n", rcpt_options=["NOTIFY=SUCCESS,FAILURE,DELAY"])
        first = server.queued_ids()[0]

        def notices():
            return labelled(scrape(api_port)[0], "elemta_delivery_notices_total")
        wait_for(lambda: notices() == {("failure",): 1, ("success",): 1, ("delay",): 1},
                 timeout=20)
        # The three notices go to the sender's next hop beside the colleague's copy.
        wait_for(lambda: len(partner.messages) == 4)

        def deliveries():           # {(domain_class, result, transport): count}
            return labelled(scrape(api_port)[0], "elemta_deliveries_total")
        # The colleague and the three notices to the sender: partners; the gmail.test
        # friend: remote (bounced by the error transport); root: local.
        wait_for(lambda: {k: v for k, v in deliveries().items() if k[1] != "deferred"}
                 == {("local", "sent", "local"): 1, ("partners", "sent", "smtp"): 4,
                     ("remote", "bounced", "error"): 1})
        samples, _ = scrape(api_port)
        assert [k for k in labelled(samples, "elemta_deliveries_total")
                if k[1] == "deferred"] == [("remote", "deferred", "smtp")]
        # It warned after a retry.
        assert value(samples, "elemta_deliveries_total", result="deferred",
                     transport="smtp", domain_class="remote") >= 2
        # Each deferral counted by why: the next hop's 450 to RCPT TO.
        deferrals = labelled(samples, "elemta_delivery_deferrals_total")
        assert list(deferrals) == [("remote", "rcpt", "smtp")]
        assert deferrals[("remote", "rcpt", "smtp")] == value(
            samples, "elemta_deliveries_total", result="deferred", transport="smtp",
            domain_class="remote")
        # The message waits for slow@later.test: the queue shows it deferred, since its
        # arrival (unless a retry holds it active just now).
        arrival = server.message(first)[0].arrival

        def deferred():
            s, _ = scrape(api_port)
            return (value(s, "elemta_queue_messages", state="deferred") == 1
                    and value(s, "elemta_queue_oldest_arrival_timestamp_seconds",
                              state="deferred") == arrival)
        wait_for(deferred)
        assert value(samples, "elemta_delivery_delay_seconds_count") == 6   # final ones


def test_a_retiring_worker_takes_none_of_its_counts_with_it(elemta_server, tmp_path,
                                                             monkeypatch):
    """A worker retires (max_use) right after its last session: what it counted in
    its last second reaches the files at its exit, not only once a second."""
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 1, "max_use": 3},
                           relay={"mynetworks": ["192.0.2.0/24"]},
                           api={"enabled": True, "port": api_port})
    first, = wait_for(lambda: smtpd_workers(server.process.pid))
    for _ in range(2):          # the fixture's greeting probe was the first session
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.sendmail("a@c.test", ["b@example.test"], BODY)
    wait_for(lambda: "smtpd child %d ended (retired)" % first in server.log())

    def counted(samples):
        assert value(samples, "elemta_smtpd_messages_accepted_total") == 2
        assert sum(labelled(samples, "elemta_smtpd_sessions_total").values()) == 3
        assert value(samples, "elemta_smtpd_replies_total", code="221") == 2
    settled(api_port, counted)


def test_a_heartbeat_kill_and_a_crash_are_counted_apart(elemta_server, tmp_path,
                                                        monkeypatch):
    """The master counts the worker it killed for a lost heartbeat under reason
    heartbeat, one that died unasked under crashed."""
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                    master={"heartbeat_timeout": 2, "stop_grace": 3})
    master = server.process.pid
    hung, crashed = smtpd_workers(master)
    # Both serve (a child still starting has longer than heartbeat_timeout to beat).
    for sessions in sessions_on_every_worker(server.port, [hung, crashed]).values():
        for smtp in sessions:
            smtp.close()
    os.kill(crashed, signal.SIGKILL)
    os.kill(hung, signal.SIGSTOP)      # no more heartbeats: SIGABRT, then SIGKILL

    def restarts():                    # {(kind, reason): count}
        return labelled(scrape(api_port)[0], "elemta_worker_restarts_total")
    try:
        # The kill comes heartbeat_timeout + 5 s (SIGABRT waits in a stopped process).
        wait_for(lambda: restarts() == {("smtpd", "heartbeat"): 1, ("smtpd", "crashed"): 1},
                 timeout=30)
    finally:
        try:
            os.kill(hung, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "smtpd child %d sent no heartbeat for 2s; killing it" % hung in server.log()


def test_an_unknown_user_is_its_own_rejection_reason(elemta_server, tmp_path, monkeypatch):
    server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                    local={"reject_unknown_users": True})
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        smtp.mail("a@c.test")
        assert smtp.rcpt("nosuchuser@example.test")[0] == 550
        assert smtp.rcpt("somebody@elsewhere.test")[0] == 554

    def counted(samples):
        assert labelled(samples, "elemta_smtpd_messages_rejected_total") == {
            ("unknown_user",): 1, ("relay",): 1}
        assert value(samples, "elemta_smtpd_restriction_refusals_total",
                     restriction="reject_unlisted_recipient", stage="rcpt") == 1
    settled(api_port, counted)


def test_delivery_sessions_by_tls_version_and_tls_failures(elemta_server, tmp_path,
                                                           monkeypatch, tls_files):
    """Outbound: a next hop offering STARTTLS gets a TLS session, one that does not a
    plaintext one at level may, and a TLS failure where delivery.tls_policy says
    encrypt."""
    cert, key = tls_files
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with ScriptedServer(cert_file=cert, key_file=key) as secure, \
            ScriptedServer() as plain, ScriptedServer(address="127.0.0.2") as strict:
        def hop(domain, peer):
            return {"domain": domain,
                    "nexthop": "smtp:[%s]:%d" % (peer.address, peer.port)}
        server = elemta_server(
            api={"enabled": True, "port": api_port},
            delivery={"workers": 1, "tls_level": "may",
                      "transport": [hop("secure.test", secure), hop("plain.test", plain),
                                    hop("strict.test", strict)],
                      "tls_policy": [{"domain": "127.0.0.2", "level": "encrypt"}],
                      "nameservers": ["127.0.0.1"], "dns_port": free_port(),
                      "min_backoff": 0.5, "max_backoff": 1.0})
        wait_for(lambda: "delivery worker started" in server.log())
        wait_for(lambda: healthy(api_port))
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.sendmail("a@c.test", ["a@secure.test", "b@plain.test", "c@strict.test"],
                          BODY)
        wait_for(lambda: len(secure.messages) == 1 and len(plain.messages) == 1)

        def counted():
            samples, _ = scrape(api_port)
            return (labelled(samples, "elemta_delivery_sessions_total"),
                    value(samples, "elemta_delivery_tls_failures_total", transport="smtp"))
        # A series shows (at 0) as soon as a worker makes it; its count follows.
        sessions, _ = wait_for(lambda: counted()[1] >= 1
                               and sum(counted()[0].values()) == 2 and counted())
        version = {tls for tls, transport in sessions if tls != "none"}   # (tls, transport)
        assert sessions == {("none", "smtp"): 1, (version.pop(), "smtp"): 1}
        # Each transaction timed: the two messages handed over (the strict domain's
        # session ended before one began).
        def timed(samples):
            assert value(samples, "elemta_delivery_attempt_seconds_count") == 2
            assert value(samples, "elemta_delivery_attempt_seconds_sum") > 0
            assert value(samples, "elemta_delivery_attempt_seconds_bucket", le="+Inf") == 2
        settled(api_port, timed)
        assert secure.sessions[0].tls and not plain.sessions[0].tls
        # The strict domain's mail waits: TLS is required, and its host offers none.
        assert strict.messages == []
        assert "TLS is required, but was not offered by host 127.0.0.2" in server.log()
