"""elemtactl status, reload and stop against a real running elemta, and when none runs."""

import os
import signal
import smtplib
import subprocess
import sys

from tests.harness import REPO, wait_for


def elemtactl(*args):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))


def test_status_reload_stop(elemta_server):
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2},
                           master={"stop_grace": 3})
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.sendmail("a@c.test", ["b@example.test"], b"Subject: s\r\n\r\nx\r\n")
    master = server.process.pid
    status = elemtactl("status", "--config", server.config_path)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "elemta is running: master pid %d, spool %s" % (master, server.spool)
    assert "  elemta: smtpd x2" in lines and "  queue: incoming 1" in lines

    reload = elemtactl("reload", "--config", server.config_path)
    assert reload.returncode == 0
    wait_for(lambda: "reloading the configuration" in server.log())

    stop = elemtactl("stop", "--config", server.config_path)
    assert (stop.returncode, stop.stdout) == (
        0, "elemtactl: stop: elemta stopped (master pid %d)\n" % master)
    assert server.process.wait(10) == 0
    assert server.group_pids(wait=5) == []


def test_nothing_running(tmp_path):
    config = tmp_path / "elemta.yaml"
    config.write_text("queue: {spool_dir: %s}\n" % (tmp_path / "spool"))
    status = elemtactl("status", "--config", str(config))
    assert status.returncode == 3
    assert status.stdout == "elemta: no master has run on spool %s\n" % (tmp_path / "spool")
    for command in ("reload", "stop"):
        result = elemtactl(command, "--config", str(config))
        assert result.returncode == 1 and "no master has run" in result.stdout
