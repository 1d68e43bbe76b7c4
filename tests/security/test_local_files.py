""":include: and .forward files that others could have written are not obeyed
(issue 10 requirement 6), as Postfix's local(8) refuses them.

Owned by the test suite. Mail goes over SMTP into a real Elemta whose local agent
delivers to real users (the users and directories of tests/test_local_delivery.py;
needs root). Whoever can write such a file chooses where the recipient's mail goes and
which commands run with its owner's rights, so:

  - an :include: file that is group- or world-writable (or not a regular file) bounces
    the recipient with 550 5.3.5 "mail system configuration error" and a warning naming
    the file (Postfix: local/include.c, which refuses world-writable ones);
  - a .forward that is group- or world-writable or owned by another user is ignored
    with a warning, and the mail goes to the mailbox (Postfix: local/dotforward.c).
See also: elemta.local.deliver (read_include_as_user, read_forward_as_user).
"""

import os
import re

import pytest

from tests.harness import wait_for
from tests.test_local_delivery import (place, read_when_there, send, start,  # noqa: F401
                                       status_lines, users, write_forward)

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="makes users: needs root")


@pytest.mark.parametrize("mode, who", [(0o666, "world"), (0o664, "group")],
                         ids=["world-writable", "group-writable"])
def test_an_include_file_others_can_write_bounces_the_recipient(elemta_server, place, mode,
                                                               who):
    include = os.path.join(place.top, "team.list")
    with open(include, "w") as f:
        f.write("elemta-maildir\n")
    os.chmod(include, mode)
    server = start(elemta_server, place, aliases="team: :include:%s\n" % include)
    send(server, "elemta-mbox@example.test", ["team@example.test"], "to the team\r\n")
    wait_for(lambda: status_lines(server, "team@example.test"))
    assert status_lines(server, "team@example.test") == [
        ("bounced", "550 5.3.5 mail system configuration error")]
    assert re.search(r"to=<team@example\.test>: :include: file %s is %s writable "
                     r"\(mode %04o\): refused; chmod go-w it"
                     % (re.escape(include), who, mode), server.log())
    # The sender is local: its bounce lands in its mailbox; the member got nothing.
    dsn = read_when_there(os.path.join(place.mail, "elemta-mbox"))
    assert b"5.3.5" in dsn and b"team@example.test" in dsn
    assert not os.path.exists(os.path.join(place.mail, "elemta-maildir"))


def test_an_include_file_only_its_owner_can_write_is_obeyed(elemta_server, place):
    include = os.path.join(place.top, "team.list")
    with open(include, "w") as f:
        f.write("elemta-maildir\n")
    os.chmod(include, 0o644)
    server = start(elemta_server, place, aliases="team: :include:%s\n" % include)
    send(server, "elemta-mbox@example.test", ["team@example.test"], "to the team\r\n")
    assert b"to the team" in read_when_there(os.path.join(place.mail, "elemta-maildir"))
    wait_for(lambda: status_lines(server, "team@example.test"))
    assert status_lines(server, "team@example.test") == [
        ("sent", "250 2.0.0 delivered to mailbox")]


@pytest.mark.parametrize("mode, owner, why", [
    (0o666, "elemta-mbox", "is group or world writable"),
    (0o620, "elemta-mbox", "is group or world writable"),
    (0o644, "elemta-maildir", "is owned by uid %d, not by its user"),
], ids=["world-writable", "group-writable", "owned-by-another-user"])
def test_a_forward_file_others_could_write_is_ignored(elemta_server, place, mode, owner, why):
    user = place.users["elemta-mbox"]
    stranger = place.users[owner]
    write_forward(user, "elemta-maildir\n", mode=mode)
    os.chown(os.path.join(user.pw_dir, ".forward"), stranger.pw_uid, stranger.pw_gid)
    server = start(elemta_server, place)
    send(server, "someone@client.test", ["elemta-mbox@example.test"], "stay here\r\n")
    assert b"stay here" in read_when_there(os.path.join(place.mail, "elemta-mbox"))
    assert not os.path.exists(os.path.join(place.mail, "elemta-maildir"))
    if "%d" in why:
        why %= stranger.pw_uid
    assert "to=<elemta-mbox@example.test>: %s/.forward %s: ignored, delivering to the " \
           "mailbox" % (user.pw_dir, why) in server.log()
