"""elemtactl top (issue 17 req 5) against a live server: totals and queue sizes as the
api's /metrics gives them, rates over the interval while mail arrives, plain text when
not on a terminal, refreshing frames on one, and a clear error without an api.
"""

import os
import pty
import re
import select
import signal
import smtplib
import subprocess
import sys
import time

import pytest

from tests.harness import REPO, free_port, wait_for

ELEMTACTL = [sys.executable, "-m", "elemta.cli.elemtactl"]
ENV = dict(os.environ, PYTHONPATH=REPO)


def send(server, count):
    for number in range(count):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@client.test", ["b@example.test"],
                            b"Subject: top %d\r\n\r\nhi\r\n" % number)


def served(server, accepted):
    """Wait until the api serves `accepted` messages accepted: the workers write their
    counts about once a second, and a test whose top starts sooner would see them arrive
    as a rate."""
    from tests.test_metrics import scrape, value
    with open(server.config_path) as f:
        api_port = int(re.search(r"api:\n\s+port: (\d+)", f.read()).group(1))
    wait_for(lambda: value(scrape(api_port)[0],
                           "elemta_smtpd_messages_accepted_total") == accepted, timeout=30)


def row(output, label):
    """(total, per second, per minute) of one row of the snapshot."""
    match = re.search(r"^%s\s+(\d+)\s+([\d.]+)\s+([\d.]+)$" % label, output, re.MULTILINE)
    assert match, output
    return int(match.group(1)), float(match.group(2)), float(match.group(3))


@pytest.fixture
def server(elemta_server):
    """No delivery: what is accepted stays queued, where top counts it."""
    return elemta_server()


def test_once_gives_totals_and_queue_sizes(server):
    send(server, 2)
    served(server, 2)
    done = subprocess.run(ELEMTACTL + ["--config", server.config_path, "top", "--once",
                                       "--interval", "0.5"],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b" not in out and out.count("elemta top") == 1
    assert row(out, "accepted") == (2, 0.0, 0.0)          # nothing came in meanwhile
    assert row(out, "delivered") == (0, 0.0, 0.0)
    queue = dict((state, int(n)) for state, n in re.findall(r"(\w+) (\d+)",
                                                           out.split("queue: ")[1]))
    assert queue["total"] == 2 == sum(n for s, n in queue.items() if s != "total")
    assert "sessions open: 0" in out


def test_rates_follow_the_mail_as_it_arrives(server):
    """Not on a terminal: one plain snapshot after another. 3 messages sent right after
    the first snapshot are the second one's rate: 3 over its interval of 2 s."""
    process = subprocess.Popen(ELEMTACTL + ["--config", server.config_path, "top",
                                            "--interval", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENV)
    try:
        frames, frame = [], []
        for line in process.stdout:
            frame.append(line)
            if line.startswith("queue: "):          # a snapshot's last line
                frames.append("".join(frame))
                frame = []
                if len(frames) == 2:
                    break
                send(server, 3)
    finally:
        process.terminate()
        process.wait(10)
    first, second = frames
    assert row(first, "accepted") == (0, 0.0, 0.0)
    total, per_second, per_minute = row(second, "accepted")
    assert total == 3
    # The scrapes are 2 s apart, a little more for the scrape itself.
    assert 3 / 2.6 <= per_second <= 3 / 2.0, per_second
    # Per minute: over the whole 4 s seen so far, scaled.
    assert 3 / 4.6 * 60 <= per_minute <= 3 / 4.0 * 60, per_minute
    assert "\x1b" not in first + second


def test_live_view_refreshes_on_a_terminal(server):
    send(server, 1)
    served(server, 1)
    master, slave = pty.openpty()
    process = subprocess.Popen(ELEMTACTL + ["--config", server.config_path, "top",
                                            "--interval", "0.3"],
                               stdout=slave, stderr=subprocess.PIPE, env=ENV,
                               start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 15
        while seen.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
    finally:
        process.send_signal(signal.SIGINT)       # how an admin leaves it
        assert process.wait(10) == 0, process.stderr.read()
        os.close(master)
    frames = seen.split(b"\x1b[H\x1b[2J")[1:]
    assert len(frames) >= 3
    assert all(re.search(rb"^accepted\s+1\s", frame, re.MULTILINE) for frame in frames)


def test_without_an_api_top_says_why(elemta_server):
    server = elemta_server(api={"enabled": False})
    done = subprocess.run(ELEMTACTL + ["--config", server.config_path, "top", "--once"],
                          capture_output=True, text=True, env=ENV, timeout=30)
    assert (done.returncode, done.stdout) == (69, "")
    assert done.stderr == ("elemtactl: api.enabled is false: top reads the api's /metrics "
                           "(or name one with --api HOST:PORT)\n")
    port = free_port()
    done = subprocess.run(ELEMTACTL + ["top", "--once", "--api", "127.0.0.1:%d" % port],
                          capture_output=True, text=True, env=ENV, timeout=30)
    assert (done.returncode, done.stderr) == (69, (
        "elemtactl: cannot read http://127.0.0.1:%d/metrics: Connection refused (is "
        "elemta running, with api.enabled?)\n" % port))
    done = subprocess.run(ELEMTACTL + ["top", "--interval", "0"], capture_output=True,
                          text=True, env=ENV, timeout=30)
    assert (done.returncode, done.stderr) == (
        64, "elemtactl: --interval 0: must be more than 0 seconds\n")
