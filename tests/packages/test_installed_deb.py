"""The .deb installed for real in a Debian 12 root, used as an administrator would use it.

Run by `make test-packages` (not part of make test): it builds the .deb if missing, makes or
reuses a debootstrap root (tests/packages/debian-root.sh) and runs this file inside
`unshare --net --mount --pid --fork` with lo up, so port 25 and 2525 here never meet a
server of the host. Skipped unless ELEMTA_PACKAGE_ROOT names that root.

The tests run in file order and share one root: install, start as the unit's ExecStart
does, mail in and out through sendmail, mail(1), mailq and SMTP, reload, kill a worker,
stop, the container entrypoint, purge. Issue #13 requirement 3 (and 6's entrypoint).
"""

import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from tests.harness import REPO
from tests.packages.rootfs import Root, Unit, children, poll, processes

ROOT = os.environ.get("ELEMTA_PACKAGE_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="make test-packages runs this "
                                "(ELEMTA_PACKAGE_ROOT names a prepared Debian root)")
MAILNAME = "mail.test.example"
USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
DEB = "/tmp/elemta.deb"


class State:
    """What the ordered tests hand on: the root, the unit, the daemon's log."""
    root = None
    unit = None
    log = None
    master = None


@pytest.fixture(scope="module", autouse=True)
def debian_root(tmp_path_factory):
    if not ROOT:
        yield None
        return
    assert [name for _, name in socket.if_nameindex()] == ["lo"], \
        "not in a private network namespace: run make test-packages"
    root = Root(ROOT)
    root.mount_kernel_filesystems()
    State.root = root
    State.log = str(tmp_path_factory.mktemp("daemon") / "elemta.log")
    try:
        yield root
    finally:
        if State.unit:
            State.unit.kill()
        root.unmount_kernel_filesystems()
        if os.path.exists(State.log):
            with open(State.log, errors="replace") as stream:
                print("---- the daemon's output ----\n" + stream.read()[-20000:])


def daemon_log():
    with open(State.log, errors="replace") as stream:
        return stream.read()


def smtp(port=25, timeout=30):
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example",
                        timeout=timeout)


def kinds(master):
    """{kind: [Process]} of the master's children."""
    found = {}
    for child in children(master):
        found.setdefault(child.kind, []).append(child)
    return found


def mailbox_has(root, inside, text):
    return text in root.read(inside, default="")


def maildir_messages(root, user):
    new = root("/home/%s/Maildir/new" % user)
    if not os.path.isdir(new):
        return []
    return [os.path.join(new, name) for name in sorted(os.listdir(new))]


def test_install_with_apt(debian_root):
    """apt installs the .deb and bsd-mailx (which needs a mail-transport-agent) with the
    network cut off: every dependency resolves from the root's archive."""
    root = debian_root
    root.run(["debconf-set-selections"],
             input="elemta elemta/mailname string %s\n" % MAILNAME)
    # No --no-download: with it apt 2.6 loses a local .deb's path ("Pathname to install
    # is not absolute"); there is no network here anyway.
    result = root.run(["apt-get", "install", "-y", "-q", DEB, "bsd-mailx", "procmail"],
                      env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300)
    assert "Setting up elemta" in result.stdout
    assert "newaliases failed" not in result.stderr
    assert root.read("/etc/mailname").strip() == MAILNAME
    assert "postmaster:" in root.read("/etc/aliases")
    root.run(["getent", "passwd", "elemta"])
    for user in USERS:
        root.add_user(user)
    # What an admin runs first after installing.
    check = root.run(["elemta", "--config", "/etc/elemta/elemta.yaml", "--check-config"])
    assert check.returncode == 0


def test_starts_as_the_unit_does_and_says_ready(debian_root):
    """ExecStart, sandboxed as the unit says, tells systemd READY=1 and greets on port 25
    with the mail name debconf was given."""
    State.unit = Unit(debian_root)
    State.master = State.unit.start(State.log)
    with socket.create_connection(("127.0.0.1", 25), timeout=30) as conn:
        greeting = conn.recv(512).decode(errors="replace")
    assert greeting.startswith("220 %s " % MAILNAME), greeting


def test_the_units_sandbox_is_in_effect(debian_root):
    """What the daemon sees is what ProtectSystem and PrivateTmp make of the file system
    (so the delivery tests below ran under them), while /var/mail stays writable."""
    def touch(inside):
        return subprocess.run(["nsenter", "--target", str(State.master), "--mount", "--",
                               "touch", debian_root(inside)], capture_output=True, text=True)
    service = State.unit.service
    if service.get("ProtectSystem", "no") in ("yes", "true", "full"):
        assert "Read-only file system" in touch("/usr/sandbox-probe").stderr
    if service.get("ProtectSystem") == "full":
        assert "Read-only file system" in touch("/etc/sandbox-probe").stderr
    if State.unit.yes("PrivateTmp"):
        assert touch("/tmp/sandbox-probe").returncode == 0
        assert not os.path.exists(debian_root("/tmp/sandbox-probe")), "PrivateTmp not private"
    assert touch("/var/mail/sandbox-probe").returncode == 0
    os.unlink(debian_root("/var/mail/sandbox-probe"))


def test_readme_checks_answer(debian_root):
    """The commands README's Install section gives an admin to check the install."""
    status = debian_root.run(["elemtactl", "status"], check=False)
    assert status.returncode == 0, status.stderr
    assert str(State.master) in status.stdout, status.stdout
    assert debian_root.run(["mailq"], check=False).returncode == 0


def test_privileges_dropped(debian_root):
    """The master keeps root (to bind, fork and signal); the local agent keeps root to
    write mailboxes as their users; everything else runs as elemta, with no root group."""
    uid, gid = debian_root.ids("elemta")
    master = [p for p in processes() if p.pid == State.master][0]
    assert master.title.startswith("elemta: master"), master.title
    found = poll(lambda: (lambda k: k if {"smtpd", "delivery", "pickup", "api", "local"}
                          <= set(k) else None)(kinds(State.master)),
                 30, "every kind of child forked")
    for kind, members in found.items():
        for process in members:
            if kind == "local":
                assert process.uids == [0, 0, 0, 0], process
            else:
                assert process.uids == [uid] * 4, process
                assert process.gids == [gid] * 4, process
                assert 0 not in process.groups, process


def test_sendmail_to_root_lands_in_var_mail(debian_root):
    """echo hi | sendmail root, from root (cron) and from an ordinary user."""
    root = debian_root
    root.run(["sh", "-c", "echo hi-from-root | sendmail root"])
    root.run(["sh", "-c", "echo hi-from-alice | /usr/sbin/sendmail root"], user="alice")
    poll(lambda: mailbox_has(root, "/var/mail/root", "hi-from-root")
         and mailbox_has(root, "/var/mail/root", "hi-from-alice"),
         60, "both messages in /var/mail/root")
    info = os.stat(root("/var/mail/root"))
    assert info.st_uid == 0 and info.st_mode & 0o007 == 0, oct(info.st_mode)
    mbox = root.read("/var/mail/root")
    assert mbox.startswith("From "), mbox[:200]
    assert re.search(r"^From: .*alice", mbox, re.M), mbox


def test_mail_from_bsd_mailx(debian_root):
    """bob sends with mail(1), alice reads it with mail(1): the mbox is one mailx reads."""
    root = debian_root
    root.run(["sh", "-c", "echo 'Lunch at noon?' | mail -s 'Lunch plans' alice"],
             user="bob")
    poll(lambda: mailbox_has(root, "/var/mail/alice", "Lunch at noon?"), 60,
         "bob's message in /var/mail/alice")
    info = os.stat(root("/var/mail/alice"))
    assert info.st_uid == root.ids("alice")[0]
    listing = root.run(["sh", "-c", "printf 'print 1\\nquit\\n' | mail"], user="alice")
    assert "Lunch plans" in listing.stdout, listing.stdout
    assert "Lunch at noon?" in listing.stdout, listing.stdout
    assert "bob" in listing.stdout


def test_mailq_as_an_ordinary_user(debian_root):
    """Mail that waits in the queue (frank's ~/.forward command fails temporarily, exit 75:
    deferred; a local-only install bounces remote mail at once, so that cannot wait), and
    an ordinary user's mailq lists it, as Postfix's showq lets every user do."""
    root = debian_root
    frank = root.ids("frank")
    root.write("/home/frank/.forward", '"|exit 75"\n', mode=0o644, owner=frank)
    root.run(["sh", "-c", "echo stuck | /usr/sbin/sendmail frank"], user="alice")
    as_root = poll(lambda: (lambda r: r if "frank@" in r.stdout else None)(
        root.run(["mailq"], check=False)), 60, "root's mailq lists the waiting message")
    assert as_root.returncode == 0, as_root.stderr
    as_user = root.run(["mailq"], user="bob", check=False)
    assert as_user.returncode == 0, "mailq as bob exited %d: %s" % (
        as_user.returncode, as_user.stderr)
    assert "frank@" in as_user.stdout, as_user.stdout


def test_local_only_bounces_remote_mail_at_once(debian_root):
    """The non-interactive install is Debian's "Local only": mail for another domain is
    bounced at once (Postfix's default_transport = error), not sent out by MX."""
    root = debian_root
    root.run(["sh", "-c", "echo out | /usr/sbin/sendmail faraway@example.com"],
             user="alice")
    poll(lambda: "remote delivery is disabled on this host" in root.read("/var/mail/alice", ""),
         60, "alice's bounce for faraway@example.com")


def test_reload_after_traffic_keeps_serving(debian_root):
    """ExecReload (kill -HUP $MAINPID) after traffic: the same master, new workers with
    the new configuration (here: Maildir delivery), no refused connection, and the old
    workers end cleanly."""
    root = debian_root
    config = root.read("/etc/elemta/elemta.yaml")
    assert 'home_mailbox: ""' in config
    root.write("/etc/elemta/elemta.yaml",
               config.replace('home_mailbox: ""', 'home_mailbox: "Maildir/"'))
    before = {p.pid for p in children(State.master)}
    log_mark = len(daemon_log())
    refused = []
    stop = threading.Event()

    def knock():
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", 25), timeout=10) as conn:
                    if not conn.recv(512).startswith(b"220"):
                        refused.append("no greeting")
            except OSError as exc:
                refused.append(repr(exc))
            time.sleep(0.02)

    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        State.unit.reload()
        poll(lambda: not before & {p.pid for p in children(State.master)}, 60,
             "every old child replaced after SIGHUP")
    finally:
        stop.set()
        knocker.join()
    assert State.unit.process.poll() is None, "the master exited on SIGHUP"
    assert not refused, refused[:5]
    after = daemon_log()[log_mark:]
    assert "reload refused" not in after, after
    assert not re.search(r"ended with|Traceback|killing", after), after


def test_forward_and_maildir_under_the_units_sandbox(debian_root):
    """carol's ~/.forward sends her mail to dave, whose mail goes to ~/Maildir: both
    read and written in /home by the daemon started with the unit's sandboxing."""
    root = debian_root
    carol = root.ids("carol")
    root.write("/home/carol/.forward", "dave\n", mode=0o644, owner=carol)
    with smtp() as client:
        client.sendmail("sender@client.test.example", ["carol@%s" % MAILNAME],
                        "Subject: for carol\r\n\r\nforwarded body\r\n")
    found = poll(lambda: maildir_messages(root, "dave"), 60, "a message in ~dave/Maildir/new")
    with open(found[0], errors="replace") as stream:
        text = stream.read()
    assert "forwarded body" in text and "Subject: for carol" in text
    info = os.stat(found[0])
    assert info.st_uid == root.ids("dave")[0]
    assert not maildir_messages(root, "carol"), "carol's .forward was ignored"


def test_forward_to_procmail(debian_root):
    """The classic ~/.forward, '"|exec /usr/bin/procmail"': procmail (setuid root,
    setgid mail) must be able to create and lock erin's mailbox in /var/mail."""
    root = debian_root
    erin = root.ids("erin")
    root.write("/home/erin/.forward", '"|exec /usr/bin/procmail"\n', owner=erin)
    with smtp() as client:
        client.sendmail("sender@client.test.example", ["erin@%s" % MAILNAME],
                        "Subject: for procmail\r\n\r\nprocmail body\r\n")
    poll(lambda: mailbox_has(root, "/var/mail/erin", "procmail body"), 60,
         "procmail's delivery in /var/mail/erin")


def test_killed_worker_is_replaced(debian_root):
    """SIGKILL an smtpd and a delivery worker: the master starts others and mail flows."""
    for kind in ("smtpd", "delivery"):
        victim = kinds(State.master)[kind][0]
        count = len(kinds(State.master)[kind])
        os.kill(victim.pid, signal.SIGKILL)
        poll(lambda: (lambda k: len(k.get(kind, [])) == count
                      and victim.pid not in {p.pid for p in k[kind]})(kinds(State.master)),
             60, "a new %s worker" % kind)
        assert State.unit.process.poll() is None, "the master died with its %s" % kind
    with smtp() as client:
        client.sendmail("sender@client.test.example", ["dave@%s" % MAILNAME],
                        "Subject: after the kill\r\n\r\nstill here\r\n")
    poll(lambda: any("still here" in open(path, errors="replace").read()
                     for path in maildir_messages(debian_root, "dave")),
         60, "mail delivered after the workers were killed")


def test_stop_drains_and_exits_0(debian_root):
    """SIGTERM (systemctl stop, KillMode=mixed) while a client is inside DATA: the
    client still gets its 250, the master exits 0 in time, no process stays behind."""
    client = smtp()
    client.ehlo()
    client.mail("sender@client.test.example")
    client.rcpt("dave@%s" % MAILNAME)
    code, _ = client.docmd("DATA")
    assert code == 354
    client.send(b"Subject: in flight\r\n\r\nsent while stopping\r\n")
    time.sleep(0.5)
    State.unit.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    client.send(b".\r\n")
    code, reply = client.getreply()
    assert code == 250, reply
    client.quit()
    status = State.unit.stop()
    State.unit.close()
    assert status == 0, "the master exited %r after SIGTERM" % status
    assert not [p for p in processes() if p.kind], "processes left after stop"
    assert "Traceback" not in daemon_log()
    # The message accepted while stopping is delivered or still queued: never lost.
    delivered = any("sent while stopping" in open(path, errors="replace").read()
                    for path in maildir_messages(debian_root, "dave"))
    queued = "dave@%s" % MAILNAME in debian_root.run(["mailq"]).stdout
    assert delivered or queued


def image_accounts(root, scratch):
    """/etc/passwd and /etc/group as the Dockerfile's RUN line leaves them: user and group
    elemta with uid and gid 10025 (instead of the package's system user)."""
    made = []
    for name, line in (("passwd", "elemta:x:10025:10025::/var/spool/elemta:/usr/sbin/nologin"),
                       ("group", "elemta:x:10025:")):
        kept = [entry for entry in root.read("/etc/" + name).splitlines()
                if not entry.startswith("elemta:")]
        path = os.path.join(scratch, name)
        with open(path, "w") as stream:
            stream.write("\n".join(kept + [line]) + "\n")
        os.chmod(path, 0o644)
        made.append((path, root("/etc/" + name)))
    return made


# The Dockerfile's USER; OpenShift-style, a uid the image never declared.
IMAGE_UID = 10025
ANY_UID = 1000770000


def container_launcher(root, scratch, uid, volume_owner):
    """The image's view of the root in a mount namespace of its own: its users, its
    elemta.yaml at /etc/elemta, a fresh volume at /var/spool/elemta, the venv as
    /opt/elemta (the .deb's venv holds the same pinned libraries the image's does)."""
    return "\n".join([
        "mount --bind %s %s" % pair for pair in image_accounts(root, scratch)] + [
        "mount -t tmpfs tmpfs %s" % root("/etc/elemta"),
        "cp %s/deploy/docker/elemta.yaml %s" % (REPO, root("/etc/elemta/elemta.yaml")),
        "chmod 0644 %s" % root("/etc/elemta/elemta.yaml"),
        "mount -t tmpfs tmpfs %s" % root("/var/spool/elemta"),
        "chown %d:%d %s" % (volume_owner + (root("/var/spool/elemta"),)),
        "chmod 0750 %s" % root("/var/spool/elemta"),
        'exec chroot --userspec=%d:%d %s "$@"' % (uid, uid, root.path),
    ])


def start_container(root, log_path, uid=IMAGE_UID, volume_owner=None):
    """ENTRYPOINT ["/usr/local/bin/elemta-entrypoint"] with the Dockerfile's USER and ENV."""
    scratch = os.path.dirname(log_path)
    env = {"PATH": "/opt/elemta/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                   "/sbin:/bin",
           "ELEMTA_CONFIG": "/etc/elemta/elemta.yaml", "PYTHONUNBUFFERED": "1",
           "HOME": "/", "LANG": "C.UTF-8"}
    log = open(log_path, "ab")
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec",
         container_launcher(root, scratch, uid, volume_owner or (uid, uid)), "sh",
         "/usr/local/bin/elemta-entrypoint"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    log.close()
    return process


@pytest.fixture
def container_image(debian_root, tmp_path):
    """The image's own files in the root (COPY lines of the Dockerfile), removed after."""
    root = debian_root
    os.symlink("/usr/lib/elemta/venv", root("/opt/elemta"))
    with open(os.path.join(REPO, "deploy/docker/entrypoint.sh")) as stream:
        root.write("/usr/local/bin/elemta-entrypoint", stream.read(), mode=0o755)
    yield str(tmp_path / "container.log")
    os.unlink(root("/opt/elemta"))
    os.unlink(root("/usr/local/bin/elemta-entrypoint"))


@pytest.mark.parametrize("uid", [IMAGE_UID, ANY_UID], ids=["image-user", "any-uid"])
def test_container_entrypoint_serves_and_drains(debian_root, container_image, uid):
    """The image's entrypoint as its unprivileged user (or a uid /etc/passwd does not
    know, as OpenShift assigns): it checks the config, execs elemta, which answers SMTP on
    2525 and the HEALTHCHECK; SIGTERM (docker stop) lets a transaction under way finish
    and exits 0."""
    process = start_container(debian_root, container_image, uid=uid)
    try:
        def greets():
            if process.poll() is not None:
                raise AssertionError("the entrypoint exited %d:\n%s" % (
                    process.returncode, open(container_image).read()))
            try:
                with socket.create_connection(("127.0.0.1", 2525), timeout=5) as conn:
                    return conn.recv(512).startswith(b"220")
            except OSError:
                return False
        poll(greets, 60, "the container's 220 greeting on port 2525")
        health = debian_root.run(
            ["/opt/elemta/bin/python", "-c", "import urllib.request; urllib.request."
             "urlopen('http://127.0.0.1:8025/api/v1/health', timeout=4)"], check=False)
        assert health.returncode == 0, "HEALTHCHECK failed: %s" % health.stderr
        titles = {p.title for p in processes() if p.kind}
        assert any(t.startswith("elemta: master") for t in titles), titles
        assert all(p.uids == [uid] * 4 for p in processes() if p.kind), processes()
        client = smtp(port=2525)
        client.ehlo()
        client.mail("sender@client.test.example")
        code, reply = client.rcpt("postmaster@localhost")
        assert code == 250, reply
        assert client.docmd("DATA")[0] == 354
        process.send_signal(signal.SIGTERM)
        time.sleep(1)
        client.send(b"Subject: draining\r\n\r\nbody\r\n.\r\n")
        code, reply = client.getreply()
        assert code == 250, reply
        client.quit()
        assert process.wait(timeout=30) == 0, open(container_image).read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not [p for p in processes() if p.kind], "processes left after docker stop"


def test_container_entrypoint_refuses_a_root_owned_volume(debian_root, container_image):
    """A fresh volume the runtime mounted root-owned: the entrypoint says so, EX_CANTCREAT."""
    process = start_container(debian_root, container_image, volume_owner=(0, 0))
    assert process.wait(timeout=60) == 73
    text = open(container_image).read()
    assert "spool /var/spool/elemta is not writable by uid 10025" in text, text


def test_plugin_state_directory_is_the_service_users(debian_root):
    """The greylist plugin keeps its database in /var/lib/elemta: the unprivileged smtpd
    must be able to create it there (else every RCPT gets 451 with greylisting on)."""
    info = os.stat(debian_root("/var/lib/elemta"))
    elemta = debian_root.run(["id", "-u", "elemta"]).stdout.strip()
    assert str(info.st_uid) == elemta and info.st_mode & 0o777 == 0o750


def test_reinstall_keeps_what_the_admin_edited(debian_root):
    """An upgrade or reinstall runs postinst again: the debconf answers of the first
    install must not undo the admin's later edits of elemta.yaml and /etc/mailname."""
    root = debian_root
    assert not [p for p in processes() if p.kind], "stop the daemon before reinstalling"
    path = root("/etc/elemta/elemta.yaml")
    with open(path) as f:
        text = f.read()
    edited = re.sub(r'address: "?127\.0\.0\.1"?, port: 25', "address: 0.0.0.0, port: 25", text)
    assert edited != text, "the installed config has no loopback port-25 listener to edit"
    edited += "# the admin's own note\n"
    with open(path, "w") as f:
        f.write(edited)
    with open(root("/etc/mailname"), "w") as f:
        f.write("example.org\n")
    root.run(["apt-get", "install", "-y", "-q", "--reinstall", DEB],
             env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300)
    with open(path) as f:
        assert f.read() == edited
    assert root.read("/etc/mailname") == "example.org\n"


def test_purge_removes_what_it_should(debian_root):
    """apt purge: the program, its venv, config, queue, user and debconf answers go; the
    users' mail, /etc/aliases and /etc/mailname (read by other programs) stay."""
    root = debian_root
    assert not [p for p in processes() if p.kind], "stop the daemon before purging"
    root.run(["apt-get", "purge", "-y", "-q", "elemta", "bsd-mailx", "procmail"],
             env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300)
    for gone in ("/etc/elemta", "/var/spool/elemta", "/usr/lib/elemta", "/usr/bin/elemta",
                 "/usr/sbin/sendmail", "/usr/bin/mailq", "/usr/bin/newaliases",
                 "/lib/systemd/system/elemta.service"):
        assert not os.path.lexists(root(gone)), "%s is still there after purge" % gone
    assert root.run(["getent", "passwd", "elemta"], check=False).returncode == 2
    assert root.run(["getent", "group", "elemta"], check=False).returncode == 2
    assert "elemta/" not in root.run(["debconf-show", "elemta"], check=False).stdout
    for kept in ("/etc/aliases", "/etc/mailname", "/var/mail/root", "/var/mail/alice"):
        assert os.path.exists(root(kept)), "purge removed %s" % kept
    leftovers = root.run(["find", "/", "-xdev", "-name", "*elemta*",
                          "-not", "-path", "/tmp/*", "-not", "-path", "/proc/*"]).stdout
    assert not leftovers.split(), "left after purge:\n" + leftovers
