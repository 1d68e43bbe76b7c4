"""elemta-sendmail and the pickup process, over real processes: the way cron, git
send-email, PHP and SMTP-over-a-pipe clients submit local mail, with the daemon running
or stopped, and a non-root user who tries to forge the Received trace.

Each test runs `python -m elemta.cli.sendmail -C CONFIG ...` against a real `elemta`
(tests/conftest.py) and then reads the queued message with the queue API.
"""

import io
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.harness import REPO, ElemtaServer, wait_for


def sendmail(server, *args, stdin=b""):
    """Run elemta-sendmail against server's config; (exit status, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path] + list(args),
        input=stdin, capture_output=True, env=dict(os.environ, PYTHONPATH=REPO),
        timeout=30)
    return result.returncode, result.stdout, result.stderr


def queued(server, count):
    """Wait until `count` messages are queued; [(envelope, content)] by arrival."""
    ids = wait_for(lambda: len(server.queued_ids()) >= count and server.queued_ids())
    assert len(ids) == count, ids
    return [server.message(queue_id) for queue_id in ids]


def headers_of(content):
    return content.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n", "\n")


def test_cron_style_echo_body_to_root(elemta_server):
    server = elemta_server()
    status, _, err = sendmail(server, "root", stdin=b"disk almost full\n")
    assert status == 0, err
    [(envelope, content)] = queued(server, 1)
    login = pwd.getpwuid(os.getuid()).pw_name
    assert envelope.sender == "%s@mx.test" % login
    assert [r.address for r in envelope.recipients] == ["root@mx.test"]
    assert envelope.protocol == "local"
    first = content.split(b"\r\n\t")[0]
    assert first == b"Received: from userid %d" % os.getuid()
    assert b"by mx.test (Elemta) with local id %s" % envelope.queue_id.encode() in content
    head = headers_of(content)
    assert re.search(r"^From: .*<?%s@mx\.test>?$" % login, head, re.M), head
    assert re.search(r"^Date: \w{3}, \d", head, re.M), head
    assert re.search(r"^Message-ID: <[^>]+@mx\.test>$", head, re.M), head
    assert content.endswith(b"\r\n\r\ndisk almost full\r\n")
    # The maildrop file goes once the message is queued (just after).
    wait_for(lambda: os.listdir(os.path.join(server.spool, "maildrop")) == [])


PATCH = (b"From 1234abcd Mon Sep 17 00:00:00 2001\n"
         b"From: Dev Eloper <dev@example.org>\n"
         b"Date: Mon, 1 Jan 2024 10:00:00 +0000\n"
         b"Message-ID: <patch-1@example.org>\n"
         b"Subject: [PATCH] fix the thing\n"
         b"\n"
         b"A lone dot follows and must not end the message:\n"
         b".\n"
         b"diff --git a/x b/x\n"
         b"-old\n+new\n")


def test_git_send_email_style_keeps_lone_dot_and_headers(elemta_server):
    server = elemta_server()
    status, _, err = sendmail(server, "-i", "-f", "dev@example.org", "maintainer@example.net",
                              stdin=PATCH)
    assert status == 0, err
    [(envelope, content)] = queued(server, 1)
    assert envelope.sender == "dev@example.org"
    assert [r.address for r in envelope.recipients] == ["maintainer@example.net"]
    head = headers_of(content)
    assert head.count("From:") == 1 and "From: Dev Eloper <dev@example.org>" in head
    assert head.count("Message-ID:") == 1 and "<patch-1@example.org>" in head
    assert "From 1234abcd" not in head                 # the mbox separator line is dropped
    assert content.endswith(b"\r\n.\r\ndiff --git a/x b/x\r\n-old\r\n+new\r\n")


def test_without_i_a_lone_dot_ends_the_message(elemta_server):
    server = elemta_server()
    status, _, err = sendmail(server, "ops@example.net",
                              stdin=b"Subject: dot\n\nbefore\n.\nafter\n")
    assert status == 0, err
    [(_, content)] = queued(server, 1)
    assert content.endswith(b"\r\nbefore\r\n")


def test_php_style_t_i_takes_recipients_from_headers_and_drops_bcc(elemta_server):
    server = elemta_server()
    message = (b"To: Alice <alice@example.net>, bob@example.net\n"
               b"Cc: carol@example.org\n"
               b"Bcc: secret@example.com\n"
               b"Subject: order confirmation\n"
               b"\n"
               b"Thank you.\n")
    status, _, err = sendmail(server, "-t", "-i", "-F", "Web Shop", "-f", "shop@example.org",
                              stdin=message)
    assert status == 0, err
    [(envelope, content)] = queued(server, 1)
    assert sorted(r.address for r in envelope.recipients) == [
        "alice@example.net", "bob@example.net", "carol@example.org", "secret@example.com"]
    head = headers_of(content)
    assert "Bcc" not in head and "secret@example.com" not in head
    assert "From: Web Shop <shop@example.org>" in head
    assert "To: Alice <alice@example.net>, bob@example.net" in head


def test_dsn_options_reach_the_envelope(elemta_server):
    server = elemta_server()
    status, _, err = sendmail(server, "-N", "failure,delay", "-R", "hdrs", "-V", "env-42",
                              "-oi", "-odi", "-oem", "-B", "8BITMIME", "-L", "tag", "-v",
                              "someone@example.net", stdin="Subject: ü\n\nGrüße\n".encode())
    assert status == 0, err
    [(envelope, _)] = queued(server, 1)
    assert envelope.recipients[0].notify == ("FAILURE", "DELAY")
    assert (envelope.ret, envelope.envid, envelope.body) == ("HDRS", "env-42", "8BITMIME")


def test_bs_smtp_dialogue_on_stdin_and_stdout(elemta_server):
    server = elemta_server()
    dialogue = (b"EHLO localhost\r\n"
                b"MAIL FROM:<app@example.org>\r\n"
                b"RCPT TO:<one@example.net>\r\n"
                b"RCPT TO:<two@example.net> NOTIFY=NEVER\r\n"
                b"DATA\r\n"
                b"Subject: over a pipe\r\n\r\nhello\r\n..dot-stuffed\r\n.\r\n"
                b"QUIT\r\n")
    status, out, err = sendmail(server, "-bs", stdin=dialogue)
    assert status == 0, err
    codes = [line[:3] for line in out.decode().splitlines() if line[3:4] == " "]
    assert codes == ["220", "250", "250", "250", "250", "354", "250", "221"], out
    assert b"queued in the maildrop" in out
    [(envelope, content)] = queued(server, 1)
    assert envelope.sender == "app@example.org"
    assert [r.address for r in envelope.recipients] == ["one@example.net", "two@example.net"]
    assert [r.notify for r in envelope.recipients] == [None, ("NEVER",)]
    assert content.startswith(b"Received: from userid %d\r\n" % os.getuid())
    assert content.endswith(b"\r\n\r\nhello\r\n.dot-stuffed\r\n")
    assert "Message-ID:" in headers_of(content)


def test_bp_lists_the_queue_and_q_flushes(elemta_server):
    server = elemta_server()
    status, out, _ = sendmail(server, "-bp")
    assert (status, out) == (0, b"Mail queue is empty\n")
    assert sendmail(server, "root", stdin=b"x\n")[0] == 0
    [(envelope, _)] = queued(server, 1)
    status, out, _ = sendmail(server, "-bp")
    assert status == 0 and envelope.queue_id.encode() in out and b"1 Request." in out
    status, out, _ = sendmail(server, "-q")
    assert status == 0 and b"Due now: 0 messages" in out


def test_bv_verifies_without_queueing(elemta_server):
    server = elemta_server()
    status, out, _ = sendmail(server, "-bv", "root", "nosuchuser-xyz@mx.test",
                              "someone@example.net")
    assert status == 67
    assert b"root@mx.test... deliverable: local user root" in out
    assert b"nosuchuser-xyz@mx.test... undeliverable" in out
    assert b"someone@example.net... deliverable: remote domain" in out
    assert sendmail(server, "-bv", "root")[0] == 0
    assert server.queued_ids() == []
    assert os.listdir(os.path.join(server.spool, "maildrop")) == []


def test_bv_says_remote_mail_bounces_on_a_local_only_host(elemta_server):
    """delivery.default_transport = error: remote mail is returned to its sender, so -bv
    says undeliverable, with the bounce's text; a transport-map domain still goes out."""
    server = elemta_server(delivery={"workers": 0, "default_transport": "error", "transport": [
        {"domain": "partner.test", "nexthop": "smtp:[127.0.0.1]:2525"}]})
    status, out, _ = sendmail(server, "-bv", "root", "someone@example.net",
                              "a@partner.test")
    assert status == 67
    assert b"root@mx.test... deliverable: local user root" in out
    assert (b"someone@example.net... undeliverable: 550 5.1.2 remote delivery is disabled "
            b"on this host (delivery.default_transport = error)") in out
    assert b"a@partner.test... deliverable: remote domain partner.test" in out


@pytest.mark.parametrize("args, stdin, code", [
    (["-Z", "root"], b"x\n", 64),                     # unknown option
    ([], b"x\n", 64),                                 # no recipient
    (["-f"], b"", 64),                                # option without its argument
    (["-N", "sometimes", "root"], b"x\n", 64),
    (["bad address@"], b"x\n", 64),
    (["-t"], b"Subject: nobody\n\nx\n", 65),          # -t, but no recipient in headers
    (["-bd"], b"", 69),
])
def test_bad_usage_exit_codes(elemta_server, args, stdin, code):
    server = elemta_server()
    status, _, err = sendmail(server, *args, stdin=stdin)
    assert status == code, err
    assert err.startswith(b"sendmail: ")
    assert os.listdir(os.path.join(server.spool, "maildrop")) == []


def test_submitted_while_stopped_is_queued_at_start(elemta_server):
    server = elemta_server()
    server.stop()
    status, _, err = sendmail(server, "-i", "-f", "cron@example.org", "admin@example.net",
                              stdin=b"Subject: nightly\n\nall good\n")
    assert status == 0, err
    assert len(os.listdir(os.path.join(server.spool, "maildrop"))) == 1
    assert server.queued_ids() == []
    server.start()
    [(envelope, content)] = queued(server, 1)
    assert envelope.sender == "cron@example.org"
    assert content.endswith(b"\r\n\r\nall good\r\n")
    wait_for(lambda: os.listdir(os.path.join(server.spool, "maildrop")) == [])


def _as_nobody(config_path, argv, stdin):
    """Run sendmail's main() in a forked child that became nobody; its exit status."""
    import email.header  # noqa: F401  (imported before the fork: nobody may not read
    import elemta.cli.elemtactl  # noqa: F401   the interpreter's own files)
    import elemta.cli.sendmail
    import elemta.config
    import elemta.queue.maildrop  # noqa: F401
    import elemta.smtp.address  # noqa: F401
    elemta.config.load_config(config_path)
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
            status = elemta.cli.sendmail.main(["-C", config_path] + argv)
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_non_root_user_cannot_forge_the_received_sender():
    # Somewhere nobody can reach: pytest's tmp_path is under a 0700 directory.
    workdir = tempfile.mkdtemp(prefix="elemta-sendmail-")
    os.chmod(workdir, 0o711)
    server = ElemtaServer(os.path.join(workdir, "server"), {})
    os.chmod(server.workdir, 0o711)
    try:
        server.start()
        forged = (b"Received: from userid 0\n\tby mx.test (Elemta) with local id FORGED\n"
                  b"From: root <root@mx.test>\nSubject: I am root\n\nreally\n")
        status = _as_nobody(server.config_path, ["-f", "root@mx.test", "victim@example.net"],
                            forged)
        assert status == 0
        [(envelope, content)] = queued(server, 1)
        nobody = pwd.getpwnam("nobody").pw_uid
        # The trace Elemta wrote comes first and names the real author; the forgery
        # is only content below it.
        assert content.startswith(b"Received: from userid %d\r\n" % nobody)
        assert content.index(b"with local id %s" % envelope.queue_id.encode()) < \
            content.index(b"FORGED")
        assert envelope.extra.get("uid") == nobody
        # nobody could write the maildrop but cannot read or list it.
        maildrop = os.path.join(server.spool, "maildrop")
        assert oct(os.stat(maildrop).st_mode & 0o7777) == "0o1733"
    finally:
        orphans = server.stop()
        log = server.log()
        shutil.rmtree(workdir, ignore_errors=True)
    assert not orphans
    assert "Traceback" not in log, log


def test_pickup_child_runs_and_removes_junk(elemta_server):
    server = elemta_server()
    titles = wait_for(lambda: [t for t in server.titles().values()
                               if t == "elemta: pickup"])
    assert titles == ["elemta: pickup"]
    maildrop = os.path.join(server.spool, "maildrop")
    with open(os.path.join(maildrop, "junk"), "wb") as f:
        f.write(b"not a submission")
    os.symlink("/etc/passwd", os.path.join(maildrop, "link"))
    assert sendmail(server, "root", stdin=b"x\n")[0] == 0
    queued(server, 1)
    wait_for(lambda: os.listdir(maildrop) == [])
    assert "removing a bad submission" in server.log()


@pytest.mark.skipif(shutil.which("bsd-mailx") is None, reason="bsd-mailx is not installed "
                                                              "(make deps installs it)")
def test_bsd_mailx_mail_command_through_our_sendmail(elemta_server, tmp_path):
    server = elemta_server()
    wrapper = tmp_path / "sendmail"
    wrapper.write_text("#!/bin/sh\nPYTHONPATH=%s exec %s -m elemta.cli.sendmail -C %s \"$@\"\n"
                       % (REPO, sys.executable, server.config_path))
    wrapper.chmod(0o755)
    mailrc = tmp_path / "mailrc"
    mailrc.write_text("set sendmail=%s\n" % wrapper)   # mail(1) then runs it, not Postfix's
    subprocess.run(["bsd-mailx", "-s", "backup report", "-c", "cc@example.net",
                    "ops@example.net"], input=b"3 files copied\n", check=True, timeout=30,
                   env=dict(os.environ, MAILRC=str(mailrc), HOME=str(tmp_path)))
    [(envelope, content)] = queued(server, 1)
    assert sorted(r.address for r in envelope.recipients) == ["cc@example.net",
                                                              "ops@example.net"]
    head = headers_of(content)
    assert "Subject: backup report" in head and "From: " in head
    assert content.endswith(b"\r\n\r\n3 files copied\r\n")


# ---- durability of the maildrop rename --------------------------------------------------

def _traced_sendmail(config_path, argv, stdin, user):
    """Run sendmail's main() in a forked child (become `user` unless it is root) under
    strace; (exit status, the child's stdout, the trace's lines). The child waits on a pipe
    until strace has attached, so the trace misses nothing."""
    import email.header  # noqa: F401  (imported before the fork, as in _as_nobody)
    import elemta.cli.elemtactl  # noqa: F401
    import elemta.cli.sendmail
    import elemta.config
    import elemta.queue.maildrop  # noqa: F401
    import elemta.smtp.address  # noqa: F401
    import elemta.smtp.protocol  # noqa: F401
    elemta.config.load_config(config_path)
    entry = pwd.getpwnam(user)
    work = tempfile.mkdtemp(prefix="elemta-trace-")
    trace, out_path = os.path.join(work, "trace"), os.path.join(work, "out")
    stdin_file, out_file = tempfile.TemporaryFile(), open(out_path, "w+b")
    stdin_file.write(stdin)
    stdin_file.seek(0)
    gate_read, gate_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            os.close(gate_write)
            os.read(gate_read, 1)
            os.dup2(stdin_file.fileno(), 0)
            os.dup2(out_file.fileno(), 1)
            if entry.pw_uid != 0:
                os.setgroups([])
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
            status = elemta.cli.sendmail.main(["-C", config_path] + argv)
        finally:
            os._exit(status)
    os.close(gate_read)
    tracer = subprocess.Popen(
        ["strace", "-f", "-y", "-qq", "-s", "4096", "-o", trace, "-p", str(pid),
         "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,write,exit_group"],
        stderr=subprocess.PIPE)
    try:
        # strace says nothing on attaching with -qq: wait until the kernel shows a tracer.
        def traced():
            with open("/proc/%d/status" % pid) as f:
                return any(line.startswith("TracerPid:") and line.split()[1] != "0"
                           for line in f)
        wait_for(traced)
        os.write(gate_write, b"!")
        os.close(gate_write)
        _, status = os.waitpid(pid, 0)
        tracer.wait(timeout=30)
        with open(trace) as f:
            lines = f.read().splitlines()
        out_file.seek(0)
        return os.waitstatus_to_exitcode(status), out_file.read(), lines
    finally:
        if tracer.poll() is None:
            tracer.kill()
        stdin_file.close()
        out_file.close()
        shutil.rmtree(work, ignore_errors=True)


def _first(lines, pattern, after=-1):
    """The index of the first line after `after` matching pattern, or fail."""
    for number, line in enumerate(lines):
        if number > after and re.search(pattern, line):
            return number
    raise AssertionError("no %r after line %d in:\n%s" % (pattern, after, "\n".join(lines)))


BS_DIALOGUE = (b"HELO localhost\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<one@example.net>\r\n"
               b"DATA\r\nSubject: durable\r\n\r\nhello\r\n.\r\nQUIT\r\n")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("strace") is None,
                    reason="needs root (to become nobody and to trace) and strace")
@pytest.mark.parametrize("user", ["root", "nobody"])
@pytest.mark.parametrize("mode", ["-bm", "-bs"])
def test_the_maildrop_rename_is_made_durable_before_success_is_reported(user, mode):
    """The order of the system calls, as strace sees them: the file is fsync'd, renamed
    into the maildrop, and then the rename is made durable (root: fsync of the directory;
    nobody, who cannot open the 1733 directory: fsync of the renamed file), all before
    sendmail exits 0 or answers 250 to -bs. That this order survives a power cut cannot
    be tested here; see elemta.queue.maildrop.sync_rename for why it does on ext4, XFS
    and btrfs."""
    workdir = tempfile.mkdtemp(prefix="elemta-sendmail-")
    os.chmod(workdir, 0o711)                   # nobody must reach the maildrop
    server = ElemtaServer(os.path.join(workdir, "server"), {})
    os.chmod(server.workdir, 0o711)
    try:
        server.start()
        argv, stdin = ((["-bs"], BS_DIALOGUE) if mode == "-bs"
                       else (["one@example.net"], b"Subject: durable\n\nhello\n"))
        status, out, lines = _traced_sendmail(server.config_path, argv, stdin, user)
        assert status == 0, (out, lines)
        maildrop = re.escape(os.path.join(server.spool, "maildrop"))
        data_synced = _first(lines, r"fsync\(\d+<%s/\.tmp-[^>]+>\) = 0" % maildrop)
        # rename by path, or renameat relative to the maildrop's descriptor
        renamed = _first(lines, r"rename\w*\(.*%s(?:/|>, \")\.tmp-(\w[\w-]*)\".*\) = 0"
                         % maildrop, data_synced)
        name = re.search(r"\.tmp-([\w-]+)", lines[renamed]).group(1)
        durable = (r"fsync\(\d+<%s>\) = 0" % maildrop if user == "root"
                   else r"fsync\(\d+<%s/%s>\) = 0" % (maildrop, name))
        made_durable = _first(lines, durable, renamed)
        if mode == "-bs":
            answered = _first(lines, r'write\(1<[^>]*>, "250 [^"]*queued in the maildrop',
                              renamed)
            assert made_durable < answered
        assert made_durable < _first(lines, r"exit_group\(0\)", renamed)
        [(envelope, content)] = queued(server, 1)          # and pickup took it as usual
        assert content.endswith(b"\r\n\r\nhello\r\n")
    finally:
        orphans = server.stop()
        log = server.log()
        shutil.rmtree(workdir, ignore_errors=True)
    assert not orphans
    assert "Traceback" not in log, log


@pytest.mark.parametrize("flag", ["-bi", "-I"])
def test_bi_checks_the_aliases_file_as_newaliases_does(elemta_server, tmp_path, flag):
    """Package scripts run `sendmail -bi` (or -I) after editing /etc/aliases."""
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: root\nbroken line without a colon\n")
    server = elemta_server(local={"aliases_file": str(aliases)})
    status, out, err = sendmail(server, flag)
    assert status == 1
    assert ("%s:2:" % aliases).encode() in out + err
    aliases.write_text("postmaster: root\n")
    assert sendmail(server, flag)[0] == 0
