"""Crafted maildrop files (issue 10 requirements 2 and 6): any local user may write the
maildrop, so pickup meets each file the way smtpd meets a client.

A real Elemta runs; the files are framed the way sendmail frames them (elemta.queue.maildrop's
layout, around a crafted envelope), or planted by hand. Each bad one gives exactly one log line
naming it and why, is removed, is never queued and is not tried again on the next scan;
pickup never logs a traceback (tests/conftest.py checks every server's log), and a good
submission behind the bad ones is queued as usual.
See also: tests/test_sendmail.py (sendmail and pickup doing their ordinary work).
"""

import json
import os
import socket
import subprocess
import sys
import time

from elemta.queue import maildrop
from tests.harness import REPO, wait_for

GOOD = {"sender": "cron@example.test", "recipients": [{"address": "root@example.test",
                                                      "notify": None, "orcpt": None}],
        "ret": None, "envid": None, "body": "7BIT", "smtputf8": False}
LIMIT = 3


def crafted(**changes):
    envelope = dict(GOOD, **changes)
    return {k: v for k, v in envelope.items() if v is not REMOVED}


def recipient(**changes):
    return [dict(GOOD["recipients"][0], **changes)]


REMOVED = object()
# (envelope, the reason its log line gives)
BAD_ENVELOPES = [
    (crafted(recipients="root@example.test"),
     "recipients must be a non-empty list, not 'root@example.test'"),
    (crafted(recipients=[]), "recipients must be a non-empty list, not []"),
    (crafted(recipients=REMOVED), "recipients must be a non-empty list, not None"),
    (crafted(recipients=[5]), "recipient 0: not a JSON object: 5"),
    (crafted(recipients=recipient(address=5)), "recipient 0: address must be a string"),
    (crafted(recipients=recipient(address="root@example.test\nBcc: x@evil.test")),
     "recipient 0 'root@example.test\\nBcc: x@evil.test': bad local part"),
    (crafted(sender=["a@b.test"]), "sender must be a string, not ['a@b.test']"),
    (crafted(recipients=recipient(notify="SUCCESS")), "recipient 0: NOTIFY must be a "
                                                      "list of words"),
    (crafted(recipients=recipient(notify=["SOMETIMES"])),
     "recipient 0: NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY"),
    (crafted(recipients=recipient(notify=["NEVER", "SUCCESS"])),
     "recipient 0: NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY"),
    (crafted(recipients=recipient(orcpt="rfc822;root@example.test\n\nFrom forger@x.test")),
     "recipient 0: ORCPT contains a control character"),
    (crafted(recipients=recipient(orcpt="root@example.test")),
     "recipient 0: ORCPT must be addr-type;address"),
    (crafted(recipients=recipient(orcpt=7)), "recipient 0: ORCPT must be a string"),
    (crafted(envid="id\r\nX-Injected: yes"), "ENVID contains a control character"),
    (crafted(envid=42), "ENVID must be a non-empty string"),
    (crafted(ret="ALL"), "ret must be null, FULL or HDRS, not 'ALL'"),
    (crafted(body="BINARYMIME"), "body must be 7BIT or 8BITMIME, not 'BINARYMIME'"),
    (crafted(smtputf8="yes"), "smtputf8 must be true or false, not 'yes'"),
    (crafted(recipients=recipient(address="j\u00f6se@example.test")),
     "non-ASCII address requires SMTPUTF8"),
    (crafted(recipients=[{"address": "u%d@example.test" % i} for i in range(LIMIT + 1)]),
     "4 recipients, more than limits.recipients (3)"),
]


def sendmail(server, *args, stdin=b""):
    result = subprocess.run(
        [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path] + list(args),
        input=stdin, capture_output=True, env=dict(os.environ, PYTHONPATH=REPO),
        timeout=30)
    return result.returncode, result.stdout, result.stderr


def drop(server, envelope, content=b"Subject: crafted\r\n\r\nbody\r\n"):
    """A maildrop file framed as sendmail frames one, around this envelope (a dict any
    user could write: sendmail itself only writes well-formed ones); its name."""
    line = json.dumps(envelope, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return drop_raw(server, line, content)


def drop_raw(server, envelope_line, content=b"x\r\n"):
    """A maildrop file with a well-formed frame around any envelope bytes; its name."""
    name = "%014x-raw-%s" % (int(time.time() * 1000000), os.urandom(4).hex())
    directory = maildrop.maildrop_dir(server.spool)
    data = (maildrop.MAGIC + content + maildrop.ENVELOPE_TAG + envelope_line + b"\n"
            + maildrop.FOOTER_FORMAT % (len(content), len(envelope_line)))
    with open(os.path.join(directory, ".tmp-" + name), "wb") as f:
        f.write(data)
    os.rename(os.path.join(directory, ".tmp-" + name), os.path.join(directory, name))
    return name


def scan_and_settle(server, expected_queued, leftover=()):
    """A good submission behind whatever was planted: once it is queued, pickup has
    been through everything before it."""
    assert sendmail(server, "-f", "cron@example.test", "root")[0] == 0
    wait_for(lambda: len(server.queued_ids()) == expected_queued, timeout=20)
    wait_for(lambda: maildrop.iter_names(server.spool) == list(leftover), timeout=20)


def lines_naming(server, name):
    return [line for line in server.log().splitlines() if name in line]


def test_each_bad_envelope_gives_one_line_and_is_removed(elemta_server):
    server = elemta_server(limits={"recipients": LIMIT})
    server.stop()            # planted while it is down: the first scan meets them all
    names = [(drop(server, envelope), reason) for envelope, reason in BAD_ENVELOPES]
    names.append((drop_raw(server, b"{not json"), "damaged envelope (not JSON)"))
    names.append((drop_raw(server, b"[" * 100000), "damaged envelope (not JSON)"))
    names.append((drop_raw(server, b"[1, 2]"), "damaged envelope (not a JSON object)"))
    server.start()
    scan_and_settle(server, 1)
    for name, reason in names:
        lines = lines_naming(server, name)
        assert len(lines) == 1, (reason, lines)
        assert "removing a bad submission" in lines[0] and reason in lines[0], \
            (reason, lines[0])
    # Only the good one was queued; another scan finds nothing more to say.
    [queue_id] = server.queued_ids()
    assert server.message(queue_id)[0].sender == "cron@example.test"
    scan_and_settle(server, 2)
    for name, _ in names:
        assert len(lines_naming(server, name)) == 1


def test_the_envelope_line_names_the_user_who_wrote_it(elemta_server):
    server = elemta_server()
    name = drop(server, crafted(envid="a\nb"))
    scan_and_settle(server, 1)
    [line] = lines_naming(server, name)
    assert "(uid %d): bad envelope: ENVID contains a control character" % os.getuid() \
        in line


def test_a_good_envelope_keeps_its_dsn_fields(elemta_server):
    server = elemta_server()
    drop(server, crafted(envid="batch 42", ret="HDRS", recipients=recipient(
        notify=["SUCCESS", "FAILURE"], orcpt="rfc822;Root@Example.test")))
    maildrop.notify(server.spool)
    [queue_id] = wait_for(lambda: server.queued_ids(), timeout=20)
    envelope, _ = server.message(queue_id)
    assert (envelope.envid, envelope.ret) == ("batch 42", "HDRS")
    assert [(r.notify, r.orcpt) for r in envelope.recipients] == [
        (("SUCCESS", "FAILURE"), "rfc822;Root@Example.test")]


def test_stray_entries_are_removed_once(elemta_server):
    server = elemta_server()
    server.stop()
    directory = maildrop.maildrop_dir(server.spool)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(directory, "a-socket"))
    sock.close()
    os.mkdir(os.path.join(directory, "empty-dir"))
    os.mkdir(os.path.join(directory, "full-dir"))
    with open(os.path.join(directory, "full-dir", "inside"), "w") as f:
        f.write("x")
    # Hidden leftovers a day old: a dead sendmail's temp file, and someone's junk.
    old = time.time() - 2 * 86400
    for name in (".tmp-dead-sendmail", ".junk"):
        with open(os.path.join(directory, name), "w") as f:
            f.write("x")
        os.utime(os.path.join(directory, name), (old, old))
    with open(os.path.join(directory, ".tmp-fresh"), "w") as f:
        f.write("being written")
    server.start()
    scan_and_settle(server, 1, leftover=["full-dir"])
    scan_and_settle(server, 2, leftover=["full-dir"])
    left = sorted(os.listdir(directory))
    assert left == [".tmp-fresh", "full-dir"], left
    [line] = lines_naming(server, "a-socket")
    assert "removing a bad submission" in line and "a socket" in line
    [line] = lines_naming(server, "empty-dir")
    assert "removing a bad submission" in line and "not a regular file" in line
    # What pickup cannot remove (a user's directory with files in it) is named once.
    [line] = lines_naming(server, "full-dir")
    assert "cannot remove it" in line and "removed by hand" in line
    for name in (".tmp-dead-sendmail", ".junk"):
        [line] = lines_naming(server, name)
        assert "a day old" in line


def test_sendmail_refuses_more_recipients_than_the_limit(elemta_server):
    server = elemta_server(limits={"recipients": LIMIT})
    status, _, err = sendmail(server, "a@example.test", "b@example.test", "c@example.test",
                              "d@example.test", stdin=b"x\n")
    assert status == 65
    assert err.decode().strip() == ("sendmail: too many recipients: 4, limits.recipients "
                                    "is 3")
    assert maildrop.iter_names(server.spool) == []
    assert sendmail(server, "a@example.test", "b@example.test", "c@example.test",
                    stdin=b"x\n")[0] == 0
