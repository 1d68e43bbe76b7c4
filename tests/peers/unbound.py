"""A private unbound: a DNSSEC-validating resolver on loopback in front of a private NSD.

Owned by no Elemta process: tests that need answers a resolver vouches for with the AD bit
(DANE, RFC 7672) start it, as an admin runs a local validating resolver for Postfix's
smtp_dns_support_level = dnssec. Every zone the NSD serves is a stub zone pointing at it;
the DS records of its signed zones are the only trust anchors (no root key, no network),
so those zones validate (secure, AD set), unsigned ones are insecure (no AD), and spoiled
signatures are bogus (SERVFAIL). Each instance lives in its own directory (unbound.conf,
anchors, log), runs in the foreground as a child of the test (`unbound -d`), never
chroots nor changes user, is stopped by SIGTERM to that child alone, and never touches the
system's unbound.

    with NSDInstance(dir1, zones, signed={"secure.test": ()}) as nsd, \\
            UnboundInstance(dir2, nsd) as resolver:
        MXResolver(["127.0.0.1"], port=resolver.port, dnssec=True)

See also: tests/peers/nsd.py, tests/peers/dnssec.py, tests/test_dane.py.
"""

import os
import shutil
import subprocess

from tests.peers.nsd import free_udp_and_tcp_port, wait_until_answering
from tests.peers.process import stop_process

UNBOUND = "/usr/sbin/unbound"
UNBOUND_CHECKCONF = "/usr/sbin/unbound-checkconf"


def unbound_available():
    """Why a private unbound cannot run here, or None when it can."""
    if not os.path.exists(UNBOUND):
        return "unbound is not installed (apt-get install unbound)"
    return None


class UnboundError(RuntimeError):
    """unbound would not start or its configuration is refused."""


class UnboundInstance:
    """One private validating resolver for the zones of `nsd` (a started NSDInstance)."""

    def __init__(self, workdir, nsd, port=None, address="127.0.0.1"):
        self.workdir = os.path.abspath(str(workdir))
        self.nsd = nsd
        self.address = address
        self.port = port or free_udp_and_tcp_port(address)
        self.config = os.path.join(self.workdir, "unbound.conf")
        self.anchors = os.path.join(self.workdir, "anchors")
        self.log_path = os.path.join(self.workdir, "unbound.log")
        self.process = None

    def _write_config(self):
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.anchors, "w") as anchors:
            anchors.write("".join(ds + "\n" for ds in self.nsd.trust_anchors.values()))
        lines = [
            "server:",
            "  interface: %s@%d" % (self.address, self.port),
            "  port: %d" % self.port,
            "  do-ip6: no",
            '  username: ""',
            '  chroot: ""',
            '  directory: "%s"' % self.workdir,
            '  pidfile: "%s/unbound.pid"' % self.workdir,
            "  use-syslog: no",
            '  logfile: "%s"' % self.log_path,
            "  verbosity: 1",
            # Say in the log why an answer is bogus.
            "  val-log-level: 2",
            "  num-threads: 1",
            "  access-control: 127.0.0.0/8 allow",
            # The authoritative server is on loopback, which unbound avoids by default.
            "  do-not-query-localhost: no",
            "  qname-minimisation: no",
            "  module-config: \"validator iterator\"",
            '  trust-anchor-file: "%s"' % self.anchors,
            "remote-control:",
            "  control-enable: no",
        ]
        # unbound answers NXDOMAIN itself for the special-use names of RFC 6761 (test.,
        # invalid., ...) where test zones live: let their queries through.
        for top in sorted({zone.rstrip(".").rsplit(".", 1)[-1] for zone in self.nsd.zones}):
            lines.insert(lines.index("remote-control:"), '  local-zone: "%s." nodefault' % top)
        for zone in self.nsd.zones:
            lines += ["stub-zone:", '  name: "%s"' % zone.rstrip("."),
                      "  stub-addr: %s@%d" % (self.nsd.address, self.nsd.port)]
        with open(self.config, "w") as config:
            config.write("\n".join(lines) + "\n")
        if os.path.exists(UNBOUND_CHECKCONF):
            check = subprocess.run([UNBOUND_CHECKCONF, self.config], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, universal_newlines=True)
            if check.returncode != 0:
                raise UnboundError("unbound refuses %s: %s" % (self.config,
                                                               check.stdout.strip()))

    def start(self, timeout=10.0):
        """Write the config and anchors, start unbound in the foreground, wait until it
        answers."""
        reason = unbound_available()
        if reason:
            raise UnboundError(reason)
        self._write_config()
        self.process = subprocess.Popen([UNBOUND, "-d", "-c", self.config],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_until_answering(self, "unbound", next(iter(self.nsd.zones), "test"),
                                 timeout, UnboundError)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self):
        stop_process(self.process, grace=10)

    def read_log(self):
        try:
            with open(self.log_path, errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def remove(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
