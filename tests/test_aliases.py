"""The parts of local delivery that need no running server, over real files and real
processes: the aliases parser and its file:line errors, re-reading a changed aliases file,
newaliases(1), the mbox and Maildir writers, commands and their exit codes, and alias
expansion against the real password database.

See also: tests/test_local_delivery.py (the same through a running Elemta),
elemta.addressing.aliases, elemta.local.mailbox, elemta.local.command, elemta.local.expand.
"""

import io
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from elemta.config.schema import Config, LocalSettings, RelaySettings, SMTPDSettings
from elemta.addressing.resolve import Addressing
from elemta.addressing.aliases import (ADDRESS, COMMAND, FILE, INCLUDE, AliasTable, Member,
                                  parse_aliases, parse_destinations)
from elemta.local.command import run_command
from elemta.local.expand import FAILED, FORWARD, MAILBOX, Expander
from elemta.local.mailbox import MessageCopy, deliver_maildir, deliver_mbox
from elemta.local.deliver import SystemLookups, delivered_to_headers
from tests.harness import REPO

ALIASES = """\
# See man 5 aliases for format
postmaster:    root
Team: alice, bob@remote.example,
    /var/log/team.mbox,
# a comment between continuation lines does not end the entry
    "|/usr/bin/procmail -m /etc/team.rc", :include:/etc/mail/team.list
"odd name": \\alice
box: /srv/archive/
"""


def test_aliases_file_parses_as_postfix_reads_it():
    table, problems = parse_aliases(ALIASES, "/etc/aliases")
    assert problems == []
    assert table["postmaster"] == ([Member(ADDRESS, "root")], 2)
    members, line = table["team"]                    # names are matched without case
    assert line == 3
    assert members == [Member(ADDRESS, "alice"), Member(ADDRESS, "bob@remote.example"),
                       Member(FILE, "/var/log/team.mbox"),
                       Member(COMMAND, "/usr/bin/procmail -m /etc/team.rc"),
                       Member(INCLUDE, "/etc/mail/team.list")]
    assert table["odd name"][0] == [Member(ADDRESS, "\\alice")]
    assert table["box"][0] == [Member(FILE, "/srv/archive/")]


def test_mistakes_are_named_by_file_and_line_and_the_rest_is_kept():
    text = ("  leading: blanks\n"                      # 1: continuation with nothing above
            "good: root\n"                             # 2
            "no colon here\n"                          # 3
            "empty:\n"                                 # 4
            "quote: \"|unclosed command\n"             # 5
            "incl: :include:relative/path\n"           # 6
            "user@domain: root\n"                      # 7
            "GOOD: someone-else\n"                     # 8: duplicate of line 2
            "spaces: john smith\n")                    # 9
    table, problems = parse_aliases(text, "/etc/aliases")
    assert [str(p).split(":")[:2] for p in problems] == [
        ["/etc/aliases", str(n)] for n in (1, 3, 4, 5, 6, 7, 8, 9)]
    assert "no colon" in str(problems[1])
    assert "duplicate entry 'GOOD' (the one on line 2 is used)" in str(problems[6])
    assert table["good"] == ([Member(ADDRESS, "root")], 2)
    assert set(table) == {"good"}


def test_forward_file_takes_commas_and_lines():
    members, problems = parse_destinations(
        "# my forward\nme@work.example, \\myself\n\"|/usr/bin/vacation myself\"\n",
        "/home/me/.forward")
    assert problems == []
    assert members == [Member(ADDRESS, "me@work.example"), Member(ADDRESS, "\\myself"),
                       Member(COMMAND, "/usr/bin/vacation myself")]


def test_alias_table_reads_the_file_again_when_it_changes(tmp_path):
    path = tmp_path / "aliases"
    path.write_text("ops: root\n")
    table = AliasTable(str(path))
    assert table.refresh() and table.lookup("OPS") == [Member(ADDRESS, "root")]
    assert not table.refresh()                        # unchanged: not read again
    path.write_text("ops: alice, bob\n")
    os.utime(path, (time.time() + 2, time.time() + 2))
    assert table.refresh()
    assert [m.value for m in table.lookup("ops")] == ["alice", "bob"]
    path.unlink()
    table.refresh()
    assert table.lookup("ops") is None and len(table) == 0


def newaliases(config_path, *args):
    result = subprocess.run([sys.executable, "-m", "elemta.cli.newaliases", "-c",
                             str(config_path)] + list(args), capture_output=True,
                            env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_newaliases_prints_each_mistake_with_file_and_line(tmp_path):
    aliases = tmp_path / "aliases"
    config = tmp_path / "elemta.yaml"
    config.write_text("local: {aliases_file: %s}\n" % aliases)
    aliases.write_text(ALIASES)
    assert newaliases(config) == (0, "", "")
    assert newaliases(config, "-v") == (0, "newaliases: %s: 4 aliases\n" % aliases, "")
    aliases.write_text(ALIASES + "broken line\nx: \"|oops\n")
    status, out, err = newaliases(config)
    assert status == 1 and out == ""
    assert err.splitlines() == [
        "%s:9: no colon: write \"name: destination, ...\"" % aliases,
        "%s:10: a double quote is not closed" % aliases,
        "newaliases: %s: 2 mistakes; delivery skips them" % aliases]
    aliases.unlink()
    status, _, err = newaliases(config)
    assert status == 1 and "%s:0: cannot read: No such file or directory" % aliases in err


# ---- mailbox writers --------------------------------------------------------------------

CONTENT = (b"Received: from x\r\nSubject: hi\r\n\r\nFrom the start\r\n>From kept\r\n"
           b"From: not a header here\r\nlast line without end")


def copy_of(content=CONTENT, sender="a@client.example"):
    return MessageCopy(io.BytesIO(content), sender, "u@example.test", "orig@example.test",
                       arrival=1700000000.0)


def test_mbox_entry_is_postfix_shaped_and_appended(tmp_path):
    path = str(tmp_path / "user")
    with open(path, "wb") as f:
        f.write(b"From old@x Mon Jan  1 00:00:00 2024\nold\n\n")
    os.chmod(path, 0o600)
    deliver_mbox(path, copy_of(), owner=os.getuid())
    deliver_mbox(path, copy_of(sender=""))
    with open(path, "rb") as f:
        data = f.read()
    old, first, second = data.split(b"\n\nFrom ")
    assert old.startswith(b"From old@x")
    date = time.asctime(time.localtime(1700000000.0)).encode()
    assert first == (b"a@client.example " + date + b"\n"
                     b"Return-Path: <a@client.example>\nX-Original-To: orig@example.test\n"
                     b"Delivered-To: u@example.test\nReceived: from x\nSubject: hi\n\n"
                     b">From the start\n>From kept\nFrom: not a header here\n"
                     b"last line without end")
    assert second.startswith(b"MAILER-DAEMON " + date + b"\nReturn-Path: <>\n")
    assert data.endswith(b"last line without end\n\n")
    assert os.listdir(tmp_path) == ["user"]           # the dot-lock is gone


def test_mbox_refuses_links_and_a_stranger_s_file(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"")
    os.symlink(target, tmp_path / "sym")
    os.link(target, tmp_path / "hard")
    from elemta.local.mailbox import DeliveryFailure
    for name, why in (("sym", "symbolic link"), ("hard", "more than one hard link")):
        with pytest.raises(DeliveryFailure, match=why) as failure:
            deliver_mbox(str(tmp_path / name), copy_of())
        assert failure.value.temporary
    mine = tmp_path / "mine"
    mine.write_bytes(b"")
    with pytest.raises(DeliveryFailure, match="owned by uid %d" % os.getuid()):
        deliver_mbox(str(mine), copy_of(), owner=os.getuid() + 1)
    assert target.read_bytes() == b"" and mine.read_bytes() == b""


def test_a_stale_dot_lock_is_removed(tmp_path):
    path = str(tmp_path / "user")
    with open(path + ".lock", "w"):
        pass
    os.utime(path + ".lock", (time.time() - 3600, time.time() - 3600))
    deliver_mbox(path, copy_of())
    assert os.listdir(tmp_path) == ["user"]


def test_a_failed_append_cuts_the_mbox_back(tmp_path):
    """A real write failure: the file size limit (EFBIG) hits half-way through."""
    path = str(tmp_path / "user")
    before = b"From old@x Mon Jan  1 00:00:00 2024\nold\n\n"
    with open(path, "wb") as f:
        f.write(before)
    big = b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n" * 5000
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 3000, resource.RLIM_INFINITY))
            try:
                deliver_mbox(path, copy_of(big))
            except OSError as error:
                code = 0 if error.errno == 27 else 2          # EFBIG
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == ["user"]


def test_maildir_is_made_and_the_message_lands_in_new(tmp_path):
    maildir = str(tmp_path / "Maildir") + "/"
    final = deliver_maildir(maildir, copy_of())
    assert sorted(os.listdir(tmp_path / "Maildir")) == ["cur", "new", "tmp"]
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []
    assert os.path.dirname(final) == str(tmp_path / "Maildir" / "new")
    with open(final, "rb") as f:
        data = f.read()
    assert data.startswith(b"Return-Path: <a@client.example>\nX-Original-To: ")
    assert b"\nFrom the start\n" in data and b">From the start" not in data
    assert deliver_maildir(maildir, copy_of()) != final       # unique names


# ---- commands -----------------------------------------------------------------------------

@pytest.mark.parametrize("script, status, reply", [
    ("cat >/dev/null", "sent", "250 2.0.0 delivered to command: cat >/dev/null"),
    ("echo disk full >&2; exit 75", "deferred",
     "451 4.3.0 temporary failure. Command output: disk full"),
    ("echo who; exit 67", "bounced", "550 5.1.1 user unknown. Command output: who"),
    ("exit 3", "bounced", "550 5.3.0 Command died with status 3: \"exit 3\""),
    ("kill -TERM $$", "deferred", "451 4.3.0 Command died with signal 15: \"kill -TERM $$\""),
    ("sleep 5", "bounced", "550 5.3.0 Command time limit exceeded: \"sleep 5\""),
])
def test_command_exit_codes_as_sysexits_says(script, status, reply):
    started = time.monotonic()
    assert run_command(script, copy_of().plain_bytes(from_line=True), {"PATH": "/bin"},
                       "/", timeout=1) == (status, reply)
    assert time.monotonic() - started < 3


def test_command_reads_the_message_with_a_from_line(tmp_path):
    out = tmp_path / "got"
    status, _ = run_command("cat > %s" % out, copy_of().plain_bytes(from_line=True),
                            {"PATH": "/bin"}, "/", timeout=5)
    assert status == "sent"
    assert out.read_bytes().startswith(b"From a@client.example ")
    assert out.read_bytes().endswith(b"\nFrom the start\n>From kept\nFrom: not a header "
                                     b"here\nlast line without end\n")


# ---- expansion against the real password database -------------------------------------

@pytest.fixture
def readable_dir():
    """A directory every user may read (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="elemta-aliases-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path)


def expander(tmp_path, text, **local):
    path = tmp_path / "aliases"
    path.write_text(text)
    config = Config(smtpd=SMTPDSettings(hostname="mx.test"),
                    relay=RelaySettings(local_domains=("example.test",)),
                    local=LocalSettings(aliases_file=str(path), **local))
    table = AliasTable(str(path))
    table.refresh()
    warnings = []
    return Expander(config.local, Addressing.from_config(config), table,
                    SystemLookups(warnings.append), warn=warnings.append), warnings


def kinds(targets):
    return [(t.kind, t.value, t.rights) for t in targets]


@pytest.mark.skipif(os.getuid() != 0, reason="reads as other users: needs root")
def test_expansion_follows_postfix_rules(tmp_path, readable_dir):
    include = readable_dir / "list"         # read as nobody (the aliases' rights)
    include.write_text("nobody\n/tmp/never-written\n")
    ex, _ = expander(tmp_path, "team: root, someone@remote.example, ROOT, /tmp/f\n"
                               "loop1: loop2\nloop2: loop1\n"
                               "root: root, \"|cat >/dev/null\"\n"
                               "ghost: no-such-user-zz\n"
                               "incl: :include:%s\n" % include,
                     recipient_delimiter="+")
    assert kinds(ex.expand("team@example.test")) == [
        (MAILBOX, "root", "root"),                    # root: root -> its own mailbox
        ("command", "cat >/dev/null", "nobody"),      # never as root: default_privileges
        (FORWARD, "someone@remote.example", None),
        ("file", "/tmp/f", "nobody")]                 # root-owned aliases: nobody's rights
    assert kinds(ex.expand("Team+tag@example.test"))[0] == (MAILBOX, "root", "root")
    [loop] = ex.expand("loop1@example.test")
    assert loop.kind == FAILED and loop.value.startswith("550 5.4.6 mail forwarding loop")
    [ghost] = ex.expand("ghost@example.test")
    assert ghost.value == "550 5.1.1 <no-such-user-zz@mx.test>: unknown user: " \
                          "\"no-such-user-zz\""
    targets = ex.expand("incl@example.test")
    assert kinds(targets)[0] == (MAILBOX, "nobody", "nobody")
    assert targets[1].kind == FAILED and targets[1].value == \
        "550 5.7.1 mail to file is restricted"        # not allowed from :include:
    ex.delivered_to = {"root@mx.test"}
    assert ex.expand("root@mx.test")[0].value == \
        "550 5.4.6 mail forwarding loop for <root@mx.test>"


def test_delivered_to_headers_are_read_folded_and_all():
    content = io.BytesIO(b"Delivered-To: a@x\r\nSubject: s\r\ndelivered-to:\r\n <B@Y>\r\n"
                         b"\r\nDelivered-To: body@z\r\n")
    assert delivered_to_headers(content) == ["a@x", "b@y"]
