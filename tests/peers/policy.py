"""Policy servers for tests: real ones from Debian (postfwd, policyd-spf) and a scripted one.

Owned by no Elemta process: tests/test_policy_service.py points Elemta's policy_service
restriction at them, over TCP on loopback.

- PostfwdServer: Debian's postfwd2 with a rule file, as a daemon on a free port (it has
  no foreground mode that listens: --nodaemon reads requests from files). Its policy and
  cache daemons live in their own session, so stop() signals that process group alone.
- PolicydSPFServer: Debian's policyd-spf, which speaks the protocol on stdin/stdout under
  Postfix's spawn(8); socat plays spawn (a process per connection). Its SPF lookups go to
  a private NSD: a small launcher points pydns (what pyspf uses on Debian) at it, then
  runs the packaged policyd-spf main() unchanged, with its own config file.
- ScriptedPolicyServer: answers what the test says (any bytes: the malformed answers no
  real server gives, silence) and records each connection's requests, in native threads.

    with PostfwdServer(workdir, RULES) as postfwd: ... "inet:127.0.0.1:%d" % postfwd.port
See also: tests/peers/nsd.py, elemta/restrictions/policy_service.py.
"""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

from tests.harness import free_port

POSTFWD = "/usr/sbin/postfwd2"
POLICYD_SPF = "/usr/bin/policyd-spf"
SOCAT = "/usr/bin/socat"
# Debian's python, which has policyd-spf's modules (spf_engine, pyspf, pydns).
SYSTEM_PYTHON = "/usr/bin/python3"


def missing(*programs):
    """Why these programs cannot run here, or None."""
    for program in programs:
        if not os.path.exists(program):
            return "%s is not installed (apt-get install postfwd postfix-policyd-spf-python " \
                   "socat)" % program
    return None


def wait_for_port(port, process=None, timeout=20.0, what="server"):
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError("%s exited with %s before listening" % (what, process.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("%s did not listen on port %d within %.0fs" % (what, port,
                                                                              timeout))
        time.sleep(0.05)


class PostfwdServer:
    """postfwd2 with `rules` (its rule file syntax), on 127.0.0.1:port."""

    def __init__(self, workdir, rules):
        self.workdir = os.path.abspath(str(workdir))
        self.rules = rules
        self.port = free_port()
        self.cache_port = free_port()
        self.pidfile = os.path.join(self.workdir, "postfwd.pid")
        self.log_path = os.path.join(self.workdir, "postfwd.log")
        self.pid = None

    def start(self):
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)          # its children run as nobody
        rules = os.path.join(self.workdir, "rules.cf")
        with open(rules, "w") as f:
            f.write(self.rules)
        os.chmod(rules, 0o644)
        with open(self.log_path, "ab") as log:
            # Daemonizes: the command returns once the daemon is on its way. --perfmon
            # is its "no logging at all": there is no syslog here, and -L (log to
            # stdout) writes into the answers (a policy child's stdout is its socket).
            subprocess.run([POSTFWD, "--perfmon", "-f", rules,
                            "--server_socket", "tcp:127.0.0.1:%d" % self.port,
                            "--cache_socket", "tcp:127.0.0.1:%d" % self.cache_port,
                            "--pidfile", self.pidfile, "-u", "nobody", "-g", "nogroup"],
                           stdout=log, stderr=subprocess.STDOUT, check=True, timeout=30)
        deadline = time.monotonic() + 20
        while self.pid is None:
            try:
                with open(self.pidfile) as f:
                    self.pid = int(f.read().strip())
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError("postfwd wrote no pid file:\n" + self.log())
                time.sleep(0.05)
        wait_for_port(self.port, what="postfwd")
        return self

    def stop(self):
        """SIGTERM postfwd's own process group (its master made the session)."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.pid = None

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


# Runs the packaged policyd-spf with pydns pointed at the test's nameserver.
LAUNCHER = """\
import sys
import DNS
import spf                                   # reads /etc/resolv.conf: override it after
DNS.defaults["server"] = ["127.0.0.1"]
DNS.defaults["port"] = int(sys.argv[1])
sys.argv = ["policyd-spf", sys.argv[2]]
from spf_engine.policyd_spf import main
sys.exit(main())
"""


class PolicydSPFServer:
    """policyd-spf behind socat on 127.0.0.1:port, its DNS from 127.0.0.1:dns_port.

    config: extra policyd-spf.conf lines. skip_addresses is set so that loopback clients
    are checked (Debian's default skips 127.0.0.0/8)."""

    def __init__(self, workdir, dns_port, config=""):
        self.workdir = os.path.abspath(str(workdir))
        self.dns_port = dns_port
        self.config = config
        self.port = free_port()
        self.process = None

    def start(self):
        os.makedirs(self.workdir, exist_ok=True)
        launcher = os.path.join(self.workdir, "policyd-spf-launcher.py")
        with open(launcher, "w") as f:
            f.write(LAUNCHER)
        conf = os.path.join(self.workdir, "policyd-spf.conf")
        with open(conf, "w") as f:
            f.write("debugLevel = 1\nTestOnly = 1\nHELO_reject = Fail\n"
                    "Mail_From_reject = Fail\nskip_addresses = 192.0.2.254/32\n"
                    + self.config)
        command = "%s %s %d %s" % (SYSTEM_PYTHON, launcher, self.dns_port, conf)
        with open(os.path.join(self.workdir, "socat.log"), "ab") as log:
            self.process = subprocess.Popen(
                [SOCAT, "TCP-LISTEN:%d,bind=127.0.0.1,fork,reuseaddr" % self.port,
                 "EXEC:%s" % command],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        wait_for_port(self.port, self.process, what="socat for policyd-spf")
        return self

    def stop(self):
        """socat and the policyd-spf children it forked (one process group)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def remove(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class ScriptedPolicyServer:
    """A policy server whose answer is answer(request: dict) -> bytes (sent as is) or
    None (say nothing: the client times out). connections: one list of requests (dicts)
    per connection accepted, in order. On TCP, or on the unix socket unix_path;
    answers_per_connection > 0: it hangs up after that many answers."""

    def __init__(self, answer, unix_path=None, answers_per_connection=0):
        self.answer = answer
        self.answers_per_connection = answers_per_connection   # then hang up; 0: never
        self.connections = []
        self.closed = []          # indexes of the connections the client closed, in order
        if unix_path is None:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", 0))
            self.port = self.listener.getsockname()[1]
            self.address = "inet:127.0.0.1:%d" % self.port
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(unix_path)
            self.port = None
            self.address = "unix:" + unix_path
        self.listener.listen(16)
        self.listener.settimeout(0.2)      # so stop() is noticed
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            requests = []
            self.connections.append(requests)
            threading.Thread(target=self._serve, args=(conn, requests), daemon=True).start()

    def _serve(self, conn, requests):
        buffer = b""
        with conn:
            while True:
                end = buffer.find(b"\n\n")
                if end < 0:
                    try:
                        chunk = conn.recv(4096)
                    except OSError:
                        return
                    if not chunk:
                        self.closed.append(self.connections.index(requests))
                        return
                    buffer += chunk
                    continue
                block, buffer = buffer[:end], buffer[end + 2:]
                request = {}
                for line in block.decode("utf-8", "replace").split("\n"):
                    name, _, value = line.partition("=")
                    request[name] = value
                request["_order"] = [line.partition("=")[0] for line in
                                     block.decode("utf-8", "replace").split("\n")]
                requests.append(request)
                reply = self.answer(request)
                if reply is None:
                    continue
                try:
                    conn.sendall(reply)
                except OSError:
                    return
                if self.answers_per_connection and \
                        len(requests) >= self.answers_per_connection:
                    return                 # hang up, as a server with an idle limit does

    @property
    def requests(self):
        return [request for connection in self.connections for request in connection]

    def stop(self):
        self._stop = True
        try:
            self.listener.close()
        except OSError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
