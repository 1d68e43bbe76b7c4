"""The master binds as root and its children run as master.user/master.group: a packaged
install's workers are not root, except the local delivery agent, which writes each mailbox
as its user. Runs the real daemon with master.user nobody."""

import grp
import os
import pwd
import signal
import smtplib
import subprocess
import sys
import tempfile

import pytest

from elemta.util.procs import children as children_of
from tests.harness import code_for_everyone, free_port, wait_for


def interpreter_for_nobody():
    """A Python that user nobody can run with our venv's packages, or None.

    Forked children import modules lazily, so they must be able to read the interpreter's
    library: here a pyenv Python under /root is not, Debian's /usr/bin/python3 is."""
    version = "python%d.%d" % sys.version_info[:2]
    for candidate in (sys.executable, "/usr/bin/" + version):
        path = os.path.realpath(candidate)
        if path.startswith("/usr/") and os.path.exists(path):
            return path
    return None


def uid_of(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")
def test_children_run_as_master_user(tmp_path):
    python = interpreter_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that user nobody can read")
    workdir = tempfile.mkdtemp()
    os.chmod(workdir, 0o755)               # nobody must reach the spool inside
    pythonpath = code_for_everyone(os.path.join(workdir, "python"))
    mail = os.path.join(workdir, "mail")   # the mail spool, as Debian's /var/mail
    os.mkdir(mail)
    os.chown(mail, 0, grp.getgrnam("mail").gr_gid)
    os.chmod(mail, 0o2775)
    port = free_port()
    config = os.path.join(workdir, "elemta.yaml")
    with open(config, "w") as f:
        f.write("listeners:\n  - {address: 127.0.0.1, port: %d, mode: smtp}\n"
                "queue: {spool_dir: %s/spool}\nmaster: {user: nobody, stop_grace: 3}\n"
                "api: {port: %d}\ndelivery: {workers: 1}\n"
                "local: {aliases_file: null, mail_spool_directory: %s}\n"
                % (port, workdir, free_port(), mail))
    log = open(os.path.join(workdir, "log"), "wb")
    server = subprocess.Popen([python, "-m", "elemta.cli.elemta", "--config", config],
                              stdout=log, stderr=log, start_new_session=True, cwd=workdir,
                              env=dict(os.environ, PYTHONPATH=pythonpath))
    nobody = pwd.getpwnam("nobody").pw_uid
    try:
        def serving():
            # Titled at fork, before a child drops root: wait until all seven (smtpd x2,
            # delivery, local, pickup, api, showq) have started and those that drop root
            # have done so (a child that stays root fails the wait).
            kids = children_of(server.pid)
            settled = len(kids) == 7 and "elemta: master" not in kids.values() and all(
                uid_of(pid) == nobody for pid, title in kids.items()
                if title != "elemta: local")
            return settled and kids
        kids = wait_for(serving)
        assert uid_of(server.pid) == 0
        assert {pid: uid_of(pid) for pid in kids} == {
            pid: 0 if title == "elemta: local" else nobody for pid, title in kids.items()}
        assert sorted(set(kids.values())) == ["elemta: api", "elemta: delivery",
                                               "elemta: local", "elemta: pickup",
                                               "elemta: showq", "elemta: smtpd"]
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("a@c.test", ["root@localhost"], b"Subject: p\r\n\r\nx\r\n")
        messages = os.path.join(workdir, "spool", "messages")
        files = [os.path.join(d, n) for d, _, names in os.walk(messages) for n in names]
        assert len(files) == 1 and os.stat(files[0]).st_uid == nobody
        # The delivery worker (nobody) hands it to the local agent (root), which writes
        # root's mailbox as root.
        mbox = wait_for(lambda: os.path.exists(os.path.join(mail, "root")) and
                        os.path.join(mail, "root"))
        assert os.stat(mbox).st_uid == 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(30) == 0
        log.close()
    with open(os.path.join(workdir, "log")) as f:
        text = f.read()
    assert "Traceback" not in text and "ERROR" not in text, text


@pytest.mark.skipif(os.getuid() != 0, reason="becoming another uid needs root")
def test_no_master_user_accepts_a_uid_without_a_passwd_entry(tmp_path):
    """A container runtime may run the image as any uid (Kubernetes runAsUser, OpenShift's
    random ones), which /etc/passwd does not list. With master.user unset Elemta stays that
    uid instead of failing with "master.user: no such user: None"."""
    python = interpreter_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter another user can read")
    uid = 54321
    try:
        pwd.getpwuid(uid)
        pytest.skip("uid %d has a passwd entry here" % uid)
    except KeyError:
        pass
    workdir = tempfile.mkdtemp()
    os.chmod(workdir, 0o755)
    pythonpath = code_for_everyone(os.path.join(workdir, "python"))
    spool = os.path.join(workdir, "spool")
    os.mkdir(spool)
    os.chown(spool, uid, uid)
    config = os.path.join(workdir, "elemta.yaml")
    with open(config, "w") as f:
        f.write("listeners:\n  - {address: 127.0.0.1, port: 2525, mode: smtp}\n"
                "queue: {spool_dir: %s}\nlocal: {aliases_file: null}\n" % spool)
    os.chmod(config, 0o644)

    def become():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    result = subprocess.run([python, "-m", "elemta.cli.elemta", "--config", config,
                             "--check-config"], capture_output=True, text=True, cwd=workdir,
                            env=dict(os.environ, PYTHONPATH=pythonpath), preexec_fn=become)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
