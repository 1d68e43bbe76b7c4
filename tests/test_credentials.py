"""Tests for the SMTP AUTH credentials file (elemta.util.credentials) and the
`elemtactl user ...` commands that manage it, run as real subprocesses."""

import contextlib
import fcntl
import logging
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from elemta.util import credentials
from elemta.util.credentials import (CredentialsFile, delete_user, hash_password, list_users,
                                     set_user, verify_password)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def elemtactl(*args, stdin="", new_session=False):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args),
                          input=stdin.encode("utf-8"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, timeout=60,
                          start_new_session=new_session)


@contextlib.contextmanager
def locked(directory):
    """Hold the lock a credentials writer takes (an flock on the file's directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def stderr_line(result):
    """The one line of stderr a failing command printed (asserting it is one line)."""
    text = result.stderr.decode("utf-8")
    assert "Traceback" not in text
    assert text.count("\n") == 1, text
    return text.strip()


# ---------------------------------------------------------------- hashing

def test_hash_is_salted_scrypt_and_never_the_password():
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first != second                      # salted
    assert first.startswith("$scrypt$ln=15,r=8,p=1$")
    assert "correct horse" not in first
    assert verify_password("correct horse", first)
    assert verify_password("correct horse", second)
    assert not verify_password("correct horsE", first)
    assert not verify_password("", first)


def test_non_ascii_password_verifies():
    encoded = hash_password("pässwörd✓")
    assert verify_password("pässwörd✓", encoded)
    assert not verify_password("passwort", encoded)


@pytest.mark.parametrize("encoded", [
    "secret",                                              # plaintext
    "",
    "$2b$12$abcdefghijklmnopqrstuv",                       # bcrypt: not ours
    "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHQ",                   # no key
    "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHQ$!!!notbase64!!!",
    "$scrypt$ln=30,r=8,p=1$c2FsdHNhbHQ$" + "A" * 43,       # would need 128 GiB
])
def test_unknown_or_broken_hash_formats_verify_false(encoded):
    assert verify_password("secret", encoded) is False


# ---------------------------------------------------------------- the reader

def test_check_right_wrong_and_unknown_user(tmp_path):
    path = str(tmp_path / "credentials")
    set_user(path, "alice", "s3cret")
    set_user(path, "bö", "zwei")
    creds = CredentialsFile(path)
    assert creds.check("alice", "s3cret")
    assert not creds.check("alice", "S3cret")
    assert not creds.check("Alice", "s3cret")      # names are case-sensitive
    assert not creds.check("mallory", "s3cret")
    assert creds.check("bö", "zwei")


def test_unknown_user_costs_as_much_as_a_wrong_password(tmp_path):
    path = str(tmp_path / "credentials")
    set_user(path, "alice", "s3cret")
    creds = CredentialsFile(path)

    def fastest(username):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            creds.check(username, "wrong")
            times.append(time.perf_counter() - start)
        return min(times)

    # Without the dummy verify an unknown user answers in microseconds.
    assert fastest("nobody") > fastest("alice") / 3


def test_malformed_lines_are_skipped_with_a_warning_naming_file_and_line(tmp_path, caplog):
    path = str(tmp_path / "credentials")
    good = hash_password("pw")
    with open(path, "wb") as handle:
        handle.write(b"# a comment\n"                      # 1
                     b"\n"                                  # 2
                     + ("alice:%s\n" % good).encode()       # 3
                     + b"no colon here\n"                   # 4
                     + b"bob:plaintext-password\n"          # 5
                     + ("bad user:%s\n" % good).encode()    # 6
                     + b"\xff\xfe:junk\n"                   # 7
                     + ("alice:%s\n" % hash_password("other")).encode()  # 8: repeat
                     + ("carol:%s" % good).encode())        # 9: no final newline
    creds = CredentialsFile(path)
    with caplog.at_level(logging.WARNING, logger="elemta.util.credentials"):
        assert creds.check("alice", "pw")           # the first alice line wins
        assert not creds.check("alice", "other")
        assert creds.check("carol", "pw")
        assert not creds.check("bob", "plaintext-password")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(int(m.split(", line ")[1].split(":")[0]) for m in warned) == [4, 5, 6, 7, 8]
    assert all(m.startswith(path + ", line ") for m in warned)
    assert not any("plaintext-password" in m for m in warned)   # never log secrets
    assert len(warned) == 5                     # warned once, not on every check


def test_reloads_when_the_file_changes(tmp_path):
    path = str(tmp_path / "credentials")
    set_user(path, "alice", "one")
    creds = CredentialsFile(path)
    assert creds.check("alice", "one")

    set_user(path, "alice", "two")              # rename: new inode
    assert not creds.check("alice", "one")
    assert creds.check("alice", "two")

    with open(path, "a") as handle:             # edited in place: same inode
        handle.write("dave:%s\n" % hash_password("four"))
    assert creds.check("dave", "four")

    assert delete_user(path, "alice")
    assert not creds.check("alice", "two")
    assert creds.usernames() == ["dave"]


def test_missing_file_fails_closed_then_loads_when_created(tmp_path):
    path = str(tmp_path / "credentials")
    creds = CredentialsFile(path)
    assert not creds.check("alice", "pw")
    set_user(path, "alice", "pw")
    assert creds.check("alice", "pw")


def test_concurrent_checks_while_the_file_is_rewritten(tmp_path):
    path = str(tmp_path / "credentials")
    set_user(path, "alice", "steady")
    creds = CredentialsFile(path)
    results = []

    def checker():
        for _ in range(3):
            results.append(creds.check("alice", "steady"))

    threads = [threading.Thread(target=checker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for number in range(3):
        set_user(path, "other%d" % number, "x")
    for thread in threads:
        thread.join()
    assert results == [True] * 12
    assert creds.usernames() == ["alice", "other0", "other1", "other2"]


# ---------------------------------------------------------------- the writers

def test_rewrite_keeps_comments_other_users_and_mode(tmp_path):
    path = str(tmp_path / "credentials")
    bob_line = "bob:%s\n" % hash_password("b")
    with open(path, "w") as handle:
        handle.write("# managed by hand\n\n" + bob_line + "# trailing note\n")
    os.chmod(path, 0o600)
    set_user(path, "alice", "a")
    delete_user(path, "nobody")
    text = open(path).read()
    assert text.startswith("# managed by hand\n\n" + bob_line + "# trailing note\nalice:")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert list_users(path) == ["bob", "alice"]
    assert delete_user(path, "bob")
    assert open(path).read().startswith("# managed by hand\n\n# trailing note\nalice:")
    assert [name for name in os.listdir(str(tmp_path))] == ["credentials"]  # no temp left


def test_bad_user_names_and_passwords_are_refused(tmp_path):
    path = str(tmp_path / "credentials")
    for name in ("", "a:b", "a b", "tab\there", "bell\x07", "#root", "x" * 256):
        with pytest.raises(ValueError):
            set_user(path, name, "pw")
    for password in ("", "nul\0inside"):
        with pytest.raises(ValueError):
            set_user(path, "alice", password)
    assert not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_rewrite_keeps_owner_and_group(tmp_path):
    path = str(tmp_path / "credentials")
    set_user(path, "alice", "a")
    os.chown(path, 1234, 4321)
    set_user(path, "bob", "b")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 4321)


# ---------------------------------------------------------------- elemtactl

def test_elemtactl_add_passwd_del_list(tmp_path):
    path = str(tmp_path / "credentials")
    with open(path, "w") as handle:
        handle.write("# our users\n")
    result = elemtactl("user", "add", "alice", "--file", path, "--password-stdin",
                       stdin="first secret\n")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert open(path).read().startswith("# our users\nalice:$scrypt$")
    assert "first secret" not in open(path).read()
    creds = CredentialsFile(path)
    assert creds.check("alice", "first secret")

    assert elemtactl("user", "passwd", "alice", "--file", path, "--password-stdin",
                     stdin="second secret\n").returncode == 0
    assert not creds.check("alice", "first secret")
    assert creds.check("alice", "second secret")

    assert elemtactl("user", "add", "bob", "--file", path, "--password-stdin",
                     stdin="b\n").returncode == 0
    listed = elemtactl("user", "list", "--file", path)
    assert (listed.returncode, listed.stdout) == (0, b"alice\nbob\n")

    assert elemtactl("user", "del", "alice", "--file", path).returncode == 0
    assert not creds.check("alice", "second secret")
    assert open(path).read().startswith("# our users\nbob:")


def test_elemtactl_add_creates_missing_file_with_mode_0640(tmp_path):
    path = str(tmp_path / "credentials")
    result = elemtactl("user", "add", "carol", "--file", path, "--password-stdin",
                       stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert CredentialsFile(path).check("carol", "pw")


def test_elemtactl_waits_for_another_writer(tmp_path):
    path = str(tmp_path / "credentials")
    set_user(path, "alice", "a")
    env = dict(os.environ, PYTHONPATH=REPO)
    with locked(str(tmp_path)):     # what a concurrent writer holds
        proc = subprocess.Popen([sys.executable, "-m", "elemta.cli.elemtactl", "user", "add",
                                 "bob", "--file", path, "--password-stdin"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
        proc.stdin.write(b"b\n")
        proc.stdin.close()
        time.sleep(1.0)
        assert proc.poll() is None                  # still waiting
        assert list_users(path) == ["alice"]
    assert proc.wait(timeout=30) == 0
    assert list_users(path) == ["alice", "bob"]


def test_writer_gives_up_when_the_lock_is_held_too_long(tmp_path, monkeypatch):
    path = str(tmp_path / "credentials")
    monkeypatch.setattr(credentials, "LOCK_TIMEOUT", 0.2)
    with locked(str(tmp_path)):
        with pytest.raises(credentials.CredentialsBusy):
            set_user(path, "alice", "a")
    assert not os.path.exists(path)


@pytest.mark.parametrize("args, stdin, code, message", [
    ("user add alice --password-stdin", "again\n", 73, "alice: user already exists"),
    ("user passwd nobody --password-stdin", "pw\n", 67, "nobody: no such user"),
    ("user del nobody", "", 67, "nobody: no such user"),
    ("user add a:b --password-stdin", "pw\n", 64, "user name may not contain ':'"),
    ("user add bob --password-stdin", "", 65, "no password on standard input"),
    ("user add bob --password-stdin", "\n", 65, "password is empty"),
    ("user add", "", 64, "user add: the following arguments are required: USER"),
    ("user frobnicate", "", 64, "invalid choice: 'frobnicate'"),
    ("user list --bogus", "", 64, "unrecognized arguments: --bogus"),
])
def test_elemtactl_errors_are_one_line_with_sysexits_codes(tmp_path, args, stdin, code,
                                                           message):
    path = str(tmp_path / "credentials")
    set_user(path, "alice", "pw")
    before = open(path).read()
    result = elemtactl(*(args.split() + ["--file", path]), stdin=stdin)
    assert result.returncode == code
    assert message in stderr_line(result)
    assert open(path).read() == before          # a failed command changes nothing


def test_elemtactl_missing_file_is_no_input(tmp_path):
    path = str(tmp_path / "absent")
    for args in (("user", "list"), ("user", "del", "x"), ("user", "passwd", "x")):
        result = elemtactl(*(args + ("--file", path)), stdin="pw\n")
        assert result.returncode == 66
        assert path in stderr_line(result)


def test_elemtactl_unwritable_directory_is_cannot_create(tmp_path):
    path = str(tmp_path / "no-such-dir" / "credentials")
    result = elemtactl("user", "add", "x", "--file", path, "--password-stdin", stdin="pw\n")
    assert result.returncode == 73
    assert "no-such-dir" in stderr_line(result)


def test_elemtactl_without_terminal_asks_for_password_stdin(tmp_path):
    path = str(tmp_path / "credentials")
    result = elemtactl("user", "add", "x", "--file", path, stdin="pw\npw\n", new_session=True)
    assert result.returncode == 64
    assert "--password-stdin" in stderr_line(result)
    assert not os.path.exists(path)


# ---------------------------------------------------------------- elemtactl and the config

def test_elemtactl_uses_the_credentials_file_of_the_config(tmp_path):
    path = str(tmp_path / "creds")
    config = tmp_path / "elemta.yaml"
    config.write_text("auth:\n  credentials_file: %s\n" % path)
    set_user(path, "alice", "a")
    result = elemtactl("user", "add", "bob", "--config", str(config), "--password-stdin",
                       stdin="b\n")
    assert result.returncode == 0, result.stderr
    listed = elemtactl("--config", str(config), "user", "list")   # either position
    assert (listed.returncode, listed.stdout) == (0, b"alice\nbob\n")


def test_elemtactl_user_says_the_file_is_unused_when_dovecot_checks_passwords(tmp_path):
    path = str(tmp_path / "creds")
    config = tmp_path / "elemta.yaml"
    config.write_text("auth:\n  backend: dovecot\n  dovecot_socket: /run/dovecot/auth\n"
                      "  credentials_file: %s\n" % path)
    result = elemtactl("user", "add", "bob", "--config", str(config), "--password-stdin",
                       stdin="b\n")
    assert result.returncode == 0, result.stderr
    assert ("auth.backend is dovecot: the SMTP server does not read this file"
            in result.stderr.decode())


def test_elemtactl_with_a_broken_config_says_what_is_wrong(tmp_path):
    config = tmp_path / "elemta.yaml"
    config.write_text("listeners:\n  - port: 70000\n")
    result = elemtactl("user", "list", "--config", str(config))
    assert result.returncode == 78
    assert "listeners[0].port" in stderr_line(result)
    missing = elemtactl("user", "list", "--config", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 66
    assert "absent.yaml" in stderr_line(missing)


def test_elemtactl_config_check(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.toml"
    good.write_text("smtpd:\n  banner: hello\n")
    bad.write_text("[auth]\nfailure_delay = -1\n\n[[listeners]]\nport = 70000\n")
    result = elemtactl("config", "check", "--config", str(good))
    assert (result.returncode, result.stdout.decode()) == (0, "config OK: %s\n" % good)
    result = elemtactl("config", "check", "--config", str(bad))
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert any("auth.failure_delay" in line for line in lines)
    assert any("listeners[0].port" in line for line in lines)
    assert "Traceback" not in result.stderr.decode()
