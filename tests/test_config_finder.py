"""Which configuration file the programs read without --config, and that the daemon and
elemtactl then look at the same spool (elemta.cli.config_finder, issue #12 req 7).

The search order is tested through config_path() with the standard places passed in
(the real /etc/elemta is not the test's to write); the agreement between the programs is
tested by running them, as an admin would, against a real daemon.
See also: tests/test_cli.py (the built-in defaults `make run` uses).
"""

import os
import smtplib
import subprocess
import sys

import pytest

from elemta.cli import config_finder
from elemta.cli.config_finder import ENVIRONMENT_VARIABLE, config_path
from elemta.cli.failure import Failure
from tests.harness import REPO


@pytest.fixture
def places(tmp_path):
    """(standard yaml, standard toml, env file, command-line file), all existing."""
    paths = []
    for name in ("etc/elemta.yaml", "etc/elemta.toml", "env/elemta.yaml", "cli/elemta.yaml"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("")
        paths.append(str(path))
    return paths


def test_order_command_line_then_environment_then_standard_files(places):
    yaml, toml, env_file, cli_file = places
    environ = {ENVIRONMENT_VARIABLE: env_file}
    assert config_path(cli_file, (yaml, toml), environ) == cli_file
    assert config_path(None, (yaml, toml), environ) == env_file
    assert config_path(None, (yaml, toml), {}) == yaml
    assert config_path(None, (yaml, toml), {ENVIRONMENT_VARIABLE: ""}) == yaml
    os.unlink(yaml)
    assert config_path(None, (yaml, toml), {}) == toml
    os.unlink(toml)
    assert config_path(None, (yaml, toml), {}) is None      # the built-in defaults


def test_a_named_file_need_not_exist_to_be_chosen(tmp_path, places):
    """A mistyped --config is reported by the program, never silently replaced."""
    missing = str(tmp_path / "nowhere.yaml")
    assert config_path(missing, places[:2], {}) == missing
    assert config_path(None, places[:2], {ENVIRONMENT_VARIABLE: missing}) == missing


def test_a_directory_means_the_configuration_inside_it(tmp_path):
    (tmp_path / "elemta.toml").write_text("")
    assert config_path(str(tmp_path), (), {}) == str(tmp_path / "elemta.toml")
    (tmp_path / "elemta.yaml").write_text("")
    assert config_path(None, (), {ENVIRONMENT_VARIABLE: str(tmp_path)}) \
        == str(tmp_path / "elemta.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Failure) as failure:
        config_path(str(empty), (), {})
    assert failure.value.code == os.EX_CONFIG
    assert str(failure.value) == "%s: no elemta.yaml or elemta.toml there" % empty


def test_a_set_id_program_ignores_the_callers_environment(places, monkeypatch):
    yaml, toml, env_file, _ = places
    monkeypatch.setattr(config_finder.os, "geteuid", lambda: os.getuid() + 1)
    assert config_path(None, (yaml, toml), {ENVIRONMENT_VARIABLE: env_file}) == yaml


# ---------------------------------------------------------------- the programs agree

def run(module, *args, env=None, cwd=None):
    environ = dict(os.environ, PYTHONPATH=REPO)
    environ.pop(ENVIRONMENT_VARIABLE, None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", module] + list(args), capture_output=True,
                          text=True, timeout=60, env=environ, cwd=cwd)


def test_daemon_and_elemtactl_find_the_same_file_without_config(elemta_server, tmp_path):
    """Neither is given --config; both read $ELEMTA_CONFIG, so elemtactl finds the daemon
    that file configures (not one on ./spool under the built-in defaults)."""
    server = elemta_server()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {ENVIRONMENT_VARIABLE: server.config_path}

    check = run("elemta.cli.elemta", "--check-config", env=env, cwd=str(elsewhere))
    assert check.returncode == 0, check.stderr
    assert check.stdout == "elemta: configuration OK: %s\n" % server.config_path
    check = run("elemta.cli.elemtactl", "config", "check", env=env, cwd=str(elsewhere))
    assert check.stdout == "config OK: %s\n" % server.config_path, check.stderr

    status = run("elemta.cli.elemtactl", "status", env=env, cwd=str(elsewhere))
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[0] == "elemta is running: master pid %d, spool %s" % (
        server.process.pid, server.spool)


def test_elemtactl_user_reads_the_credentials_file_of_the_config_found(tmp_path):
    """Without --config or --file, `elemtactl user list` finds the configuration as the
    daemon does and reads its auth.credentials_file (read-only: run on older code as
    root, a writing command would touch the real /etc/elemta/credentials)."""
    from elemta.util.credentials import set_user
    credentials = tmp_path / "credentials"
    set_user(str(credentials), "alice", "secret")
    config = tmp_path / "elemta.yaml"
    config.write_text("auth:\n  credentials_file: %s\n" % credentials)
    listed = run("elemta.cli.elemtactl", "user", "list",
                 env={ENVIRONMENT_VARIABLE: str(config)})
    assert (listed.returncode, listed.stdout) == (0, "alice\n"), listed.stderr


def test_daemon_and_elemtactl_queue_agree_on_the_spool_with_the_same_config(elemta_server):
    server = elemta_server()
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.sendmail("a@c.test", ["b@example.test"], b"Subject: s\r\n\r\nx\r\n")
    [queue_id] = server.queued_ids()
    listing = run("elemta.cli.elemtactl", "queue", "list", "--json",
                  "--config", server.config_path)
    assert listing.returncode == 0, listing.stderr
    assert queue_id in listing.stdout
    status = run("elemta.cli.elemtactl", "status", "--config", server.config_path)
    assert "spool %s" % server.spool in status.stdout.splitlines()[0]
