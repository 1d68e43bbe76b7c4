"""Chaos under load: kill -9 an MTA's processes while it relays mail, then count what arrived.

Owned by no Elemta process: tests/test_chaos.py (the short CI run) and tests/bench/chaos.py
(`make chaos`, Elemta next to Postfix) both drive a run with `run_chaos`:

    Load     SESSIONS client threads send TOTAL messages over SMTP (a share of them through
             the MTA's own sendmail command, so its pickup path is crashed too). Every
             attempt carries a unique id in an X-Chaos-Id header and an end line; a message
             whose attempt failed (refused connection, 4xx, cut session, sendmail exit !=
             0) is tried again under a new id. An attempt counts as accepted only on a 250
             after DATA (sendmail: exit 0).
    Killer   every 0.2-0.5 s picks a kind of the master's children (in rounds of every kind
             present, each round shuffled), one process of that kind at random (found by
             /proc ppid and its title or program name) and sends it SIGKILL, for at least
             `seconds` and until the load is in.
    DumpSink smtp-sink (Postfix's test server) writing one file per message; a file counts
             once it holds the message's end line (smtp-sink makes the file when the
             transaction starts and removes it if the session is cut).

The result (a Tally) says how many were accepted, how many of those arrived, which were lost,
how many extra copies arrived (duplicates) and how long after the last kill everything had
arrived and the MTA's queue was empty. Needs root and the postfix package (smtp-sink).
See also: tests/peers/postfix.py (PostfixInstance), tests/harness.py (ElemtaServer),
tests/bench/bench_relay.py (the same relay without kills).
"""

import collections
import os
import pwd
import random
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional

from elemta.util import procs
from tests.harness import free_port, wait_for_greeting

SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "chaos@client.test"
RECIPIENT = "rcpt@sink.test"   # a domain neither MTA is final for: everything is relayed
ID_HEADER = "X-Chaos-Id"
END_LINE = re.compile(rb"\nchaos-end (\S+)\r?\n")
# Kill rhythm: a pause drawn from this range (seconds) after each kill.
KILL_PAUSE = (0.2, 0.5)
# A client whose connection failed waits this long before it tries again.
RETRY_PAUSE = 0.1

ELEMTA_KINDS = ("smtpd", "delivery", "local", "pickup", "api", "showq")


def chaos_available():
    """Why a chaos run cannot happen here, or None when it can."""
    if not os.path.exists(SMTP_SINK):
        return "%s is missing (apt-get install postfix)" % SMTP_SINK
    if os.geteuid() != 0:
        return "smtp-sink -u nobody and killing the MTA's children need root"
    return None


# ---- the sink ---------------------------------------------------------------------------

class DumpSink:
    """smtp-sink on a free loopback port, one file per message in its own temp directory."""

    def __init__(self):
        # mkdtemp under /tmp: smtp-sink runs as nobody, who cannot enter pytest's tmp_path.
        self.workdir = tempfile.mkdtemp(prefix="elemta-chaos-sink-")
        os.chmod(self.workdir, 0o755)
        self.dump_dir = os.path.join(self.workdir, "dump")
        os.mkdir(self.dump_dir)
        nobody = pwd.getpwnam("nobody")
        os.chown(self.dump_dir, nobody.pw_uid, nobody.pw_gid)
        self.port = free_port()
        self.process = None        # type: Optional[subprocess.Popen]
        self._ids = {}             # type: Dict[str, str]  # complete file name -> chaos id

    def __enter__(self):
        # The 256 is smtp-sink's listen backlog.
        self.process = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-d", os.path.join(self.dump_dir, "%M."),
             "127.0.0.1:%d" % self.port, "256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_greeting(self.port, self.process, timeout=10, name="smtp-sink")
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def arrivals(self):
        # type: () -> collections.Counter
        """{chaos id: copies} of the complete messages in the sink now."""
        names = set(os.listdir(self.dump_dir))
        for name in set(self._ids) - names:
            del self._ids[name]            # a cut transaction's file, removed by smtp-sink
        for name in names - set(self._ids):
            try:
                with open(os.path.join(self.dump_dir, name), "rb") as f:
                    match = END_LINE.search(f.read())
            except FileNotFoundError:
                continue
            if match:                      # complete; an incomplete one is read again later
                self._ids[name] = match.group(1).decode()
        return collections.Counter(self._ids.values())


# ---- the load ---------------------------------------------------------------------------

def message(chaos_id, size):
    """A message of about `size` bytes whose header and last line name chaos_id."""
    head = ("From: <%s>\r\nTo: <%s>\r\nSubject: chaos %s\r\n%s: %s\r\n\r\n"
            % (SENDER, RECIPIENT, chaos_id, ID_HEADER, chaos_id))
    line = "the quick brown fox jumps over the lazy dog 0123456789\r\n"
    body = line * max(0, (size - len(head)) // len(line))
    return (head + body + "chaos-end %s\r\n" % chaos_id).encode()


class Load:
    """`total` messages from `sessions` threads to 127.0.0.1:port; every `sendmail_every`-th
    message goes through the command `sendmail_argv` (the message on its stdin) instead."""

    def __init__(self, port, total, sessions=20, size=2048, sendmail_argv=None,
                 sendmail_env=None, sendmail_every=10, deadline=300.0):
        self.port = port
        self.total = total
        self.sessions = sessions
        self.size = size
        self.sendmail_argv = sendmail_argv          # type: Optional[List[str]]
        self.sendmail_env = sendmail_env
        self.sendmail_every = sendmail_every if sendmail_argv else 0
        self.deadline = deadline
        self.accepted = set()                       # ids of 250'd attempts (sendmail exit 0)
        self.attempts = 0
        self.failures = collections.Counter()       # why attempts failed
        self.started = self.finished = None         # type: Optional[float]
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []                          # type: List[threading.Thread]

    @property
    def done(self):
        return self.finished is not None

    def start(self):
        self.started = time.monotonic()
        self._threads = [threading.Thread(target=self._session, daemon=True)
                         for _ in range(self.sessions)]
        for thread in self._threads:
            thread.start()
        threading.Thread(target=self._wait, daemon=True).start()
        return self

    def _wait(self):
        for thread in self._threads:
            thread.join()
        self.finished = time.monotonic()

    def stop(self):
        """Give up: the clients end after their current attempt."""
        self._stop.set()

    def _take(self):
        """The number of the next message to send, or None when all are taken."""
        with self._lock:
            if self._next >= self.total or self._stop.is_set():
                return None
            self._next += 1
            return self._next - 1

    def _attempt_id(self, number, attempt):
        with self._lock:
            self.attempts += 1
        return "%d.%d" % (number, attempt)

    def _session(self):
        client = None
        give_up = self.started + self.deadline
        while True:
            number = self._take()
            if number is None:
                break
            attempt = 0
            while time.monotonic() < give_up and not self._stop.is_set():
                chaos_id = self._attempt_id(number, attempt)
                attempt += 1
                if self.sendmail_every and number % self.sendmail_every == 0:
                    ok = self._by_sendmail(chaos_id)
                else:
                    client, ok = self._by_smtp(client, chaos_id)
                if ok:
                    with self._lock:
                        self.accepted.add(chaos_id)
                    break
                time.sleep(RETRY_PAUSE)
        if client is not None:
            _close(client)

    def _by_smtp(self, client, chaos_id):
        """(client to use next, whether chaos_id got its 250)."""
        try:
            if client is None:
                client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                client.ehlo("chaos.client.test")
            client.sendmail(SENDER, [RECIPIENT], message(chaos_id, self.size))
            return client, True
        except (OSError, smtplib.SMTPException) as error:
            self._failed("smtp " + _why(error))
            if client is not None:
                _close(client)
            return None, False

    def _by_sendmail(self, chaos_id):
        try:
            done = subprocess.run(self.sendmail_argv + ["-i", "-f", SENDER, RECIPIENT],
                                  input=message(chaos_id, self.size).replace(b"\r\n", b"\n"),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env=self.sendmail_env, timeout=60)
        except subprocess.TimeoutExpired:
            self._failed("sendmail timeout")
            return False
        if done.returncode != 0:
            self._failed("sendmail exit %d" % done.returncode)
        return done.returncode == 0

    def _failed(self, why):
        with self._lock:
            self.failures[why] += 1


def _why(error):
    if isinstance(error, smtplib.SMTPResponseException):
        return "%d" % error.smtp_code
    return type(error).__name__


def _close(client):
    try:
        client.close()
    except OSError:
        pass


# ---- the killer -------------------------------------------------------------------------

def children_of(parent):
    # type: (int) -> List[int]
    """Live (not zombie) processes whose parent is `parent`, from /proc."""
    return [pid for pid in procs.children(parent) if _alive(pid)]


def elemta_kind(pid):
    """An Elemta child's kind from its title ("elemta: delivery" -> "delivery"), or None
    (not yet titled after its fork, a helper, or gone)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            title = f.read().split(b"\0")[0].decode("utf-8", "replace").strip()
    except OSError:
        return None
    kind = title[len("elemta: "):] if title.startswith("elemta: ") else None
    return kind if kind in ELEMTA_KINDS else None


# Not killed: master (a child not yet exec'd after its fork) and postlogd, which writes
# maillog_file only because there is no syslog here. Killed under load it deadlocks the
# master (blocked writing a log record to postlogd's full socket, so it never starts
# another): an artefact of this setup, not of a Postfix that logs to syslog.
POSTFIX_SPARED = ("", "master", "postlogd")


def postfix_kind(pid):
    """A Postfix child's program name (smtpd, cleanup, qmgr, ...), or None for one that
    is spared (POSTFIX_SPARED) or gone."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            name = f.read().strip()
    except OSError:
        return None
    return None if name in POSTFIX_SPARED else name


def postfix_master_pid(instance):
    """The pid of a PostfixInstance's master, from the queue's pid/master.pid."""
    with open(os.path.join(instance.queue_dir, "pid", "master.pid")) as f:
        return int(f.read().split()[0])


class Killer(threading.Thread):
    """SIGKILL random children of `master_pid` (those `kind_of` names) until `stop_when()`
    is true and `seconds` have passed, or `longest` seconds have passed whatever stop_when
    says; a pause of KILL_PAUSE after each kill."""

    def __init__(self, master_pid, kind_of, seconds, stop_when=lambda: True, rng=None,
                 longest=None):
        # type: (int, Callable[[int], Optional[str]], float, Callable[[], bool], Optional[random.Random], Optional[float]) -> None  # noqa: E501
        super().__init__(daemon=True)
        self.master_pid = master_pid
        self.kind_of = kind_of
        self.seconds = seconds
        self.longest = longest
        self.stop_when = stop_when
        self.rng = rng or random.Random()
        self.kills = collections.Counter()        # kind -> SIGKILLs sent
        self._bag = []                            # kinds still to hit in this round
        self.last_kill = None                     # type: Optional[float]
        self.halt = threading.Event()             # set to end early (a failing test)

    def run(self):
        started = time.monotonic()
        while not self.halt.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= self.seconds and self.stop_when():
                break
            if self.longest is not None and elapsed >= self.longest:
                break
            by_kind = collections.defaultdict(list)
            for pid in children_of(self.master_pid):
                kind = self.kind_of(pid)
                if kind:
                    by_kind[kind].append(pid)
            kind = self._next_kind(by_kind)
            if kind:
                try:
                    os.kill(self.rng.choice(by_kind[kind]), signal.SIGKILL)
                    self.kills[kind] += 1
                    self.last_kill = time.monotonic()
                except ProcessLookupError:
                    pass                          # it ended on its own meanwhile
            self.halt.wait(self.rng.uniform(*KILL_PAUSE))

    def _next_kind(self, by_kind):
        """Kinds in rounds, each round in a random order: every kind is hit as often as
        any other, whatever its number of processes (one pickup, many smtpd)."""
        for _ in range(2):
            for kind in self._bag:
                if kind in by_kind:
                    self._bag.remove(kind)
                    return kind
            self._bag = sorted(by_kind)
            self.rng.shuffle(self._bag)
        return None


# ---- the two MTAs ----------------------------------------------------------------------

def elemta_sections(sink_port):
    """ElemtaServer config sections for a chaos run: relay everything to the sink (the
    client is on loopback, in relay.mynetworks by default), two processes of each kind
    that has a count, the api on."""
    return {"smtpd": {"workers": 2},
            "delivery": {"workers": 2, "relayhost": "[127.0.0.1]:%d" % sink_port}}


def elemta_sendmail(server, repo):
    """(argv, env) of Elemta's sendmail for an ElemtaServer, with our checkout's code."""
    import sys
    return ([sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path],
            dict(os.environ, PYTHONPATH=repo))


def elemta_queue_empty(spool_dir):
    """No message in Elemta's index and none waiting in its maildrop."""
    from elemta.queue.queue import Queue
    maildrop = os.path.join(spool_dir, "maildrop")
    if os.path.isdir(maildrop) and os.listdir(maildrop):
        return False
    with Queue(spool_dir) as queue:
        records = queue.index.iter_records()
        try:
            return next(records, None) is None
        finally:
            records.close()


POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


def postfix_queue_empty(instance):
    """Nothing `postqueue -p` would list: no complete queue file (mode 0700; a file that
    cleanup or postdrop was still writing when killed stays 0600 and is never mail)."""
    return not any(postfix_ready_files(instance, queue) for queue in POSTFIX_QUEUES)


def postfix_ready_files(instance, queue):
    """Complete files in one of a PostfixInstance's queues (incoming, deferred, ...)."""
    count = 0
    for directory, _, files in os.walk(os.path.join(instance.queue_dir, queue)):
        for name in files:
            try:
                mode = os.lstat(os.path.join(directory, name)).st_mode
            except FileNotFoundError:
                continue
            count += (mode & 0o700) == 0o700
    return count


# ---- one run ----------------------------------------------------------------------------

class Tally(NamedTuple):
    """What a chaos run came to."""
    attempts: int
    accepted: int
    delivered: int                 # accepted ids that reached the sink
    lost: List[str]                # accepted ids that did not
    duplicates: int                # extra copies at the sink, of any id
    duplicated: Dict[str, int]     # id -> copies, for ids that came more than once
    unconfirmed: int               # ids that arrived though their attempt got no 250
    kills: Dict[str, int]
    failures: collections.Counter  # why attempts were refused
    load_seconds: float
    delivered_after: Optional[float]   # seconds from the last kill until all had arrived
    empty_after: Optional[float]       # ... until the MTA's queue was empty
    master_died: bool                  # the MTA's master was gone during or after the run

    def summary(self, name):
        """One line for pytest -s or a log."""
        return ("%s: %d accepted (%d attempts), %d delivered, %d lost, %d duplicates, "
                "%d unconfirmed arrived; all delivered %s and queue empty %s after the last "
                "kill; load took %.1fs; kills %s; refused attempts %s%s"
                % (name, self.accepted, self.attempts, self.delivered, len(self.lost),
                   self.duplicates, self.unconfirmed, _seconds(self.delivered_after),
                   _seconds(self.empty_after), self.load_seconds,
                   dict(sorted(self.kills.items())), dict(self.failures.most_common(6)),
                   "; THE MASTER DIED" if self.master_died else ""))


def _seconds(value):
    return "never" if value is None else "%.1fs" % value


def run_chaos(sink, load, killer, queue_empty, wait_seconds):
    # type: (DumpSink, Load, Killer, Callable[[], bool], float) -> Tally
    """Start `load` and `killer` together, wait for both, then up to `wait_seconds` after
    the last kill for every accepted message at the sink and queue_empty() true. A master
    that dies ends the run at once (nothing left to kill or to deliver)."""
    load.start()
    killer.start()
    master_died = False
    while killer.is_alive() or not load.done:
        if not _alive(killer.master_pid):
            master_died = True
            killer.halt.set()
            load.stop()
        time.sleep(0.05)
    killer.join()
    end = killer.last_kill or time.monotonic()
    delivered_after = empty_after = None
    while True:
        now = time.monotonic()
        arrived = sink.arrivals()
        if delivered_after is None and all(i in arrived for i in load.accepted):
            delivered_after = now - end
        if empty_after is None and delivered_after is not None and queue_empty():
            empty_after = time.monotonic() - end
        if not _alive(killer.master_pid):
            master_died = True
        if empty_after is not None or now - end > wait_seconds or master_died:
            break
        time.sleep(0.2)
    time.sleep(0.5)                    # a late duplicate still on its way gets counted
    arrived = sink.arrivals()
    lost = sorted(load.accepted - set(arrived))
    duplicated = {i: n for i, n in arrived.items() if n > 1}
    return Tally(attempts=load.attempts, accepted=len(load.accepted),
                 delivered=len(load.accepted) - len(lost), lost=lost,
                 duplicates=sum(n - 1 for n in duplicated.values()), duplicated=duplicated,
                 unconfirmed=len(set(arrived) - load.accepted), kills=dict(killer.kills),
                 failures=collections.Counter(load.failures),
                 load_seconds=load.finished - load.started,
                 delivered_after=delivered_after, empty_after=empty_after,
                 master_died=master_died or not _alive(killer.master_pid))


def _alive(pid):
    """Whether `pid` still runs (not a zombie: our Popen has not reaped it yet)."""
    fields = procs.stat_fields(pid)
    return fields is not None and fields[0] != "Z"
