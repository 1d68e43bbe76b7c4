"""Secrets stay the service user's, and nobody else needs them (issue 10, items 4 and 5).

An ordinary user's sendmail works while the TLS key, the AUTH credentials and the DKIM
and ARC keys are readable by root or the service user alone; `elemtactl dkim keygen` and
`elemtactl user add`, run as root, write files the workers (master.user) can read and
other users cannot; `elemta --check-config`, run as root, opens every such file as
master.user and names each one it cannot read.

Runs as root (the tests switch users). User nobody cannot read a Python under /root nor a
mktemp directory, so the children run Debian's /usr/bin/python3 on a copy of the code in
a directory everyone can enter, with the venv's site-packages on the path.
"""

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from tests.harness import code_for_everyone, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

NOBODY = pwd.getpwnam("nobody")
OTHER = pwd.getpwnam("daemon")          # a user who is neither root nor the service


def python_for_everyone():
    version = "/usr/bin/python%d.%d" % sys.version_info[:2]
    if not os.path.exists(version):
        pytest.skip("no %s for user nobody" % version)
    return version


@pytest.fixture
def workdir():
    """A directory every user may enter, holding a copy of the code."""
    path = tempfile.mkdtemp(prefix="elemta-secrets-")
    os.chmod(path, 0o755)
    code_for_everyone(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(workdir, argv, user=None, stdin=b""):
    """Run `python -m argv...` from the copied code, as `user` (a pwd entry) or root."""
    env = dict(os.environ, PYTHONPATH=os.path.join(workdir, "code") + ":"
               + os.path.join(workdir, "site-packages"))
    env.pop("ELEMTA_CONFIG", None)
    kwargs = {}
    if user is not None:
        kwargs = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        env.update(HOME=workdir, USER=user.pw_name, LOGNAME=user.pw_name)
    return subprocess.run([python_for_everyone(), "-m"] + list(argv), input=stdin,
                          capture_output=True, cwd=workdir, env=env, timeout=60, **kwargs)


def can_read(user, path):
    """Whether `user` (with no supplementary groups, as the workers run) can open path."""
    result = subprocess.run(["cat", path], capture_output=True, user=user.pw_uid,
                            group=user.pw_gid, extra_groups=[])
    return result.returncode == 0


def secret(path, text="-----BEGIN PRIVATE KEY-----\nnot really\n"
                      "-----END PRIVATE KEY-----\n", owner=0, group=0, mode=0o600):
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, owner, group)
    os.chmod(path, mode)
    return path


def config_with_secrets(workdir, secrets, user="nobody"):
    """A config whose TLS key, credentials and DKIM and ARC keys are the given files."""
    spool = os.path.join(workdir, "spool")
    path = os.path.join(workdir, "elemta.yaml")
    with open(path, "w") as f:
        f.write("smtpd: {hostname: mx.test}\n"
                "listeners:\n"
                "  - {address: 127.0.0.1, port: %(smtp)d, mode: smtp}\n"
                "  - {address: 127.0.0.1, port: %(submission)d, mode: submission}\n"
                "tls:\n"
                "  cert_file: %(cert)s\n"
                "  key_file: %(key)s\n"
                "auth:\n"
                "  credentials_file: %(credentials)s\n"
                "queue: {spool_dir: %(spool)s}\n"
                "master: {user: %(user)s}\n"
                "plugins:\n"
                "  dkim: {enabled: true, sign: true, domain: mx.test, selector: s1,\n"
                "         key_file: %(dkim)s}\n"
                "  arc: {enabled: true, seal: true, domain: mx.test, selector: a1,\n"
                "        key_file: %(arc)s}\n"
                "api: {port: %(api)d}\n"
                "delivery: {sasl_password_file: %(sasl)s}\n"
                % dict(secrets, spool=spool, user=user, smtp=free_port(),
                       submission=free_port(), api=free_port()))
    os.chmod(path, 0o644)
    return path


def root_only_secrets(workdir):
    d = os.path.join(workdir, "secrets")
    os.mkdir(d, 0o755)
    return {"cert": secret(os.path.join(d, "cert.pem"), mode=0o644),
            "key": secret(os.path.join(d, "key.pem")),
            "credentials": secret(os.path.join(d, "credentials"), "# no users\n"),
            "dkim": secret(os.path.join(d, "dkim.pem")),
            "arc": secret(os.path.join(d, "arc.pem")),
            "sasl": secret(os.path.join(d, "sasl_passwd"), "[relay.test]:587 me:pw\n")}


# ---------------------------------------------------------------- 4. sendmail needs no secret

@pytest.mark.parametrize("sender", [NOBODY, OTHER], ids=lambda user: user.pw_name)
def test_ordinary_user_sendmail_works_while_secrets_are_root_only(workdir, sender):
    from elemta.queue import maildrop
    config = config_with_secrets(workdir, root_only_secrets(workdir))
    spool = os.path.join(workdir, "spool")
    maildrop.prepare(spool, NOBODY.pw_uid, NOBODY.pw_gid)    # what the daemon does at start

    result = run(workdir, ["elemta.cli.sendmail", "-C", config, "root"], user=sender,
                 stdin=b"Subject: cron\n\nthe backup ran\n")
    assert result.returncode == 0, result.stderr
    drop = os.path.join(spool, "maildrop")
    [name] = os.listdir(drop)
    info = os.stat(os.path.join(drop, name))
    assert info.st_uid == sender.pw_uid         # pickup names the sender from the owner
    with open(os.path.join(drop, name), "rb") as f:
        assert b"the backup ran" in f.read()


def test_newaliases_needs_no_secret_either(workdir):
    config = config_with_secrets(workdir, root_only_secrets(workdir))
    result = run(workdir, ["elemta.cli.newaliases", "--config", config], user=OTHER)
    assert result.returncode == 0, result.stderr
    assert b"key" not in result.stderr and b"credentials" not in result.stderr


def test_the_daemon_still_refuses_a_key_it_cannot_read(workdir):
    """Skipping the secrets is sendmail's, not the daemon's: root starting elemta with a
    missing key is still told which key, before anything is bound."""
    secrets = root_only_secrets(workdir)
    os.unlink(secrets["dkim"])
    config = config_with_secrets(workdir, secrets)
    result = run(workdir, ["elemta.cli.elemta", "--config", config])
    assert result.returncode == 1
    assert "plugins.dkim.key_file: cannot read %s: No such file" % secrets["dkim"] in \
        result.stderr.decode()


# ---------------------------------------------------------------- 5. --check-config as master.user

def test_check_config_opens_every_secret_as_master_user(workdir):
    secrets = root_only_secrets(workdir)
    config = config_with_secrets(workdir, secrets)
    result = run(workdir, ["elemta.cli.elemta", "--config", config, "--check-config"])
    assert result.returncode == 1, result.stdout
    errors = result.stderr.decode()
    for key, name in (("tls.key_file", "key"), ("auth.credentials_file", "credentials"),
                      ("plugins.dkim.key_file", "dkim"), ("plugins.arc.key_file", "arc"),
                      ("delivery.sasl_password_file", "sasl")):
        # FILE:LINE: KEY: cannot read FILE: why (as master.user nobody ...)
        assert "%s: cannot read %s: Permission denied (as master.user nobody" % (
            key, secrets[name]) in errors, errors
        assert "%s:" % config in errors
    assert "tls.cert_file" not in errors       # 0644: the workers read it
    assert "Traceback" not in errors

    # Fixed as the tools now leave such files: root-owned, the service's group reads.
    for name in ("key", "credentials", "dkim", "arc", "sasl"):
        os.chown(secrets[name], 0, NOBODY.pw_gid)
        os.chmod(secrets[name], 0o640)
    result = run(workdir, ["elemta.cli.elemta", "--config", config, "--check-config"])
    assert result.returncode == 0, result.stderr
    assert b"configuration OK" in result.stdout


def test_check_config_names_a_directory_the_workers_cannot_enter(workdir):
    secrets = root_only_secrets(workdir)
    for name in ("key", "credentials", "dkim", "arc", "sasl"):
        os.chown(secrets[name], NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(os.path.join(workdir, "secrets"), 0o700)
    config = config_with_secrets(workdir, secrets)
    result = run(workdir, ["elemta.cli.elemta", "--config", config, "--check-config"])
    assert result.returncode == 1
    assert "tls.cert_file: cannot read %s: Permission denied (as master.user nobody" % (
        secrets["cert"]) in result.stderr.decode()


def test_check_config_refuses_an_unknown_master_user(workdir):
    secrets = root_only_secrets(workdir)
    config = config_with_secrets(workdir, secrets, user="no-such-elemta-user")
    result = run(workdir, ["elemta.cli.elemta", "--config", config, "--check-config"])
    assert result.returncode == 1
    assert "master.user: no such user: no-such-elemta-user" in result.stderr.decode()
    assert b"Traceback" not in result.stderr


# ---------------------------------------------------------------- 5. files made for the daemon

def owner_group_mode(path):
    info = os.stat(path)
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def test_dkim_keygen_as_root_writes_a_key_the_workers_can_read(workdir):
    secrets = root_only_secrets(workdir)
    os.unlink(secrets["dkim"])      # the key the config names, made now
    config = config_with_secrets(workdir, secrets)
    result = run(workdir, ["elemta.cli.elemtactl", "--config", config, "dkim", "keygen",
                           "-d", "mx.test", "-s", "s1", "-k", secrets["dkim"]])
    assert result.returncode == 0, result.stderr
    assert owner_group_mode(secrets["dkim"]) == (0, NOBODY.pw_gid, 0o640)
    assert can_read(NOBODY, secrets["dkim"])
    assert not can_read(OTHER, secrets["dkim"])
    assert b"readable by master.user nobody" in result.stdout


def test_dkim_keygen_default_directory_lets_the_workers_in(workdir, monkeypatch):
    """The default key directory is made root:<service group> 0750, not root-only."""
    from elemta.cli import elemtactl
    secrets = root_only_secrets(workdir)
    config = config_with_secrets(workdir, secrets)
    keys = os.path.join(workdir, "dkim-default")
    monkeypatch.setattr(elemtactl, "DEFAULT_DKIM_DIR", keys)
    status = elemtactl.main(["--config", config, "dkim", "keygen", "-d", "mx.test",
                             "-s", "s2"])
    assert status == 0
    assert owner_group_mode(keys) == (0, NOBODY.pw_gid, 0o750)
    [name] = os.listdir(keys)
    assert can_read(NOBODY, os.path.join(keys, name))
    assert not can_read(OTHER, os.path.join(keys, name))


def test_user_add_as_root_writes_credentials_the_workers_can_read(workdir):
    secrets = root_only_secrets(workdir)
    os.unlink(secrets["credentials"])
    config = config_with_secrets(workdir, secrets)
    result = run(workdir, ["elemta.cli.elemtactl", "--config", config, "user", "add",
                           "alice", "--file", secrets["credentials"], "--password-stdin"],
                 stdin=b"wonderland\n")
    assert result.returncode == 0, result.stderr
    assert owner_group_mode(secrets["credentials"]) == (0, NOBODY.pw_gid, 0o640)
    assert can_read(NOBODY, secrets["credentials"])
    assert not can_read(OTHER, secrets["credentials"])
    check = run(workdir, ["elemta.cli.elemta", "--config", config, "--check-config"])
    assert b"auth.credentials_file" not in check.stderr


def test_user_passwd_repairs_a_file_the_workers_could_not_read(workdir):
    """A credentials file left root:root 0640 by an older elemtactl: every AUTH failed.
    The next change gives it to the service's group."""
    secrets = root_only_secrets(workdir)
    config = config_with_secrets(workdir, secrets)
    add = ["elemta.cli.elemtactl", "--config", config, "user", "add", "bob",
           "--password-stdin"]
    assert run(workdir, add, stdin=b"builder\n").returncode == 0
    assert owner_group_mode(secrets["credentials"]) == (0, NOBODY.pw_gid, 0o640)
    assert can_read(NOBODY, secrets["credentials"])


def test_user_add_keeps_an_owner_the_workers_can_read_through(workdir):
    secrets = root_only_secrets(workdir)
    os.chown(secrets["credentials"], NOBODY.pw_uid, grp.getgrnam("root").gr_gid)
    config = config_with_secrets(workdir, secrets)
    result = run(workdir, ["elemta.cli.elemtactl", "--config", config, "user", "add",
                           "carol", "--password-stdin"], stdin=b"pw\n")
    assert result.returncode == 0, result.stderr
    assert owner_group_mode(secrets["credentials"]) == (NOBODY.pw_uid, 0, 0o640)
