"""The `elemta` command as an admin runs it: config checking, both spellings of the
config option, and the built-in development defaults that `make run` uses."""

import os
import signal
import smtplib
import subprocess
import sys
import time

from tests.harness import REPO


def elemta(*args, cwd=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemta"] + list(args),
                          capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=30, **kwargs)


def test_check_config_accepts_a_good_file(tmp_path):
    cfg = tmp_path / "elemta.yaml"
    cfg.write_text("listeners:\n  - {address: 127.0.0.1, port: 2526, mode: smtp}\n")
    for option in ("--config", "-config"):
        result = elemta(option, str(cfg), "--check-config")
        assert result.returncode == 0, result.stderr
        assert str(cfg) in result.stdout


def test_check_config_reports_file_line_and_key(tmp_path):
    cfg = tmp_path / "elemta.yaml"
    cfg.write_text("listeners:\n"
                   "  - address: 127.0.0.1\n"
                   "    port: 70000\n"
                   "limits:\n"
                   "  message_sise: 10\n")
    result = elemta("--config", str(cfg), "--check-config")
    assert result.returncode == 1
    assert "%s:3: listeners[0].port:" % cfg in result.stderr
    assert "%s:5: limits.message_sise:" % cfg in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_refuses_to_start(tmp_path):
    cfg = tmp_path / "elemta.toml"
    cfg.write_text('[smtpd]\nbare_line_endings = "sometimes"\n')
    result = elemta("--config", str(cfg))
    assert result.returncode == 1
    assert "%s:2: smtpd.bare_line_endings:" % cfg in result.stderr


def test_version():
    result = elemta("--version")
    assert result.returncode == 0 and result.stdout.startswith("elemta ")


def test_occupied_port_is_a_clear_error(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = tmp_path / "elemta.yaml"
        cfg.write_text("listeners:\n  - {address: 127.0.0.1, port: %d, mode: smtp}\n"
                       "queue: {spool_dir: %s}\n" % (port, tmp_path / "spool"))
        result = elemta("--config", str(cfg))
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1 port %d: Address already in use" % port \
        in result.stderr


def test_development_defaults_without_a_config(tmp_path):
    """What `make run` starts: 127.0.0.1:2525, spool ./spool, logs on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "elemta.cli.elemta"], cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                smtp = smtplib.SMTP("127.0.0.1", 2525, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        with smtp:
            # To nowhere, and no bounce asked (NOTIFY=NEVER): mail to a local user would
            # land in this host's real /var/mail, the built-in default.
            smtp.ehlo()
            smtp.sendmail("root@localhost", ["nobody@nowhere.invalid"],
                          b"Subject: dev\r\n\r\nhi\r\n", rcpt_options=["NOTIFY=NEVER"])
        assert os.path.isdir(tmp_path / "spool" / "messages")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert b"smtp 127.0.0.1:2525" in err and b"(queue active)" in err


def test_ctrl_c_during_start_up_ends_without_a_traceback(tmp_path):
    """Ctrl-C reaches the whole foreground group at any moment, also before the master has
    taken over SIGINT (here: once the daemon has made its spool, while it opens the queue
    and reconciles it): the process ends quietly or stops cleanly, never with a Python
    traceback (the first Ctrl-C of issue 21's admin)."""
    from tests.harness import free_port, wait_for
    spool = tmp_path / "spool"
    cfg = tmp_path / "elemta.yaml"
    cfg.write_text("listeners:\n  - {address: 127.0.0.1, port: %d, mode: smtp}\n"
                   "queue: {spool_dir: %s}\napi: {enabled: false}\n" % (free_port(), spool))
    proc = subprocess.Popen([sys.executable, "-m", "elemta.cli.elemta", "--config",
                             str(cfg)], env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    wait_for(lambda: spool.exists() or proc.poll() is not None, timeout=30)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    text = err.decode("utf-8", "replace")
    assert "Traceback" not in text, text
    assert proc.returncode in (0, -signal.SIGINT), (proc.returncode, text)


MAILBOX_DOMAINS_WITHOUT_USERS = (
    "listeners:\n  - {address: 127.0.0.1, port: 2526, mode: smtp}\n"
    "virtual:\n"
    "  mailbox_domains: [virt.test]\n"
    "  transport: lmtp:unix:/run/dovecot/lmtp\n")
NO_MAILBOX_MAPS = ("virtual.mailbox_domains: no virtual.mailbox_maps is set, so every "
                   "recipient in these domains is accepted at RCPT and mail for unknown "
                   "users bounces later: set virtual.mailbox_maps to the table of the users "
                   "(Postfix's virtual_mailbox_maps)")


def test_the_config_checks_warn_of_mailbox_domains_without_a_user_table(tmp_path):
    """A warning, not an error: the file is OK (exit 0) and names file:line:key."""
    cfg = tmp_path / "elemta.yaml"
    cfg.write_text(MAILBOX_DOMAINS_WITHOUT_USERS)
    checked = elemta("--config", str(cfg), "--check-config")
    assert (checked.returncode, checked.stdout) == (0, "elemta: configuration OK: %s\n" % cfg)
    assert checked.stderr == "elemta: warning: %s:4: %s\n" % (cfg, NO_MAILBOX_MAPS)
    ctl = subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "config", "check",
                          "--config", str(cfg)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert (ctl.returncode, ctl.stdout) == (0, "config OK: %s\n" % cfg)
    assert ctl.stderr == "elemtactl: warning: %s:4: %s\n" % (cfg, NO_MAILBOX_MAPS)
    cfg.write_text(MAILBOX_DOMAINS_WITHOUT_USERS + "  mailbox_maps: {anne@virt.test: ok}\n")
    checked = elemta("--config", str(cfg), "--check-config")
    assert (checked.returncode, checked.stderr) == (0, "")


def test_the_daemon_logs_the_warning_at_start_and_reload(elemta_server):
    from tests.harness import wait_for
    server = elemta_server(virtual={"mailbox_domains": ["virt.test"]})
    assert "warning: config: %s:" % server.config_path in server.log()
    assert server.log().count(NO_MAILBOX_MAPS) == 1
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log().count(NO_MAILBOX_MAPS) == 2)
