"""A private NSD (authoritative DNS server) serving test zones on 127.0.0.1 and a free port.

Owned by no Elemta process: tests that need real DNS answers (MX routing, and later SPF, DKIM,
DMARC) start it. Each instance lives in its own directory (nsd.conf, zone files, pid file, log),
runs in the foreground as a child of the test (`nsd -d`), never drops privileges or chroots,
and is stopped by SIGTERM to that child alone. It never touches the system's NSD.

    zones = {"example.test": '''
        @    MX 10 mx1
        mx1  A  127.0.0.2
    '''}
    with NSDInstance(tmpdir, zones) as dns:
        Resolver(nameservers=["127.0.0.1"], port=dns.port)

    with private_nsd(zones) as dns:       # a fresh directory, removed afterwards
        ...

Each zone's text is written after an SOA and an NS record that the fixture supplies
($ORIGIN is the zone, $TTL 60). Zones named in `signed` are served signed for DNSSEC
(tests/peers/dnssec.py); their DS records, in `trust_anchors`, are what a validating
resolver (tests/peers/unbound.py) trusts:

    NSDInstance(tmpdir, zones, signed={"secure.test": (), "odd.test": ("_25._tcp.mx",)})

(the names after a zone get spoiled signatures: bogus, so SERVFAIL from a validator).
See also: tests/test_mx.py, tests/test_dane.py, elemta.delivery.mx.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from typing import Dict, Optional, Sequence

from tests.peers.dnssec import ldns_available, sign_zone

NSD = "/usr/sbin/nsd"
NSD_CHECKZONE = "/usr/sbin/nsd-checkzone"


def nsd_available():
    """Why a private NSD cannot run here, or None when it can."""
    if not os.path.exists(NSD):
        return "nsd is not installed (apt-get install nsd)"
    return None


def free_udp_and_tcp_port(address="127.0.0.1"):
    """A port free for both UDP and TCP on `address` (DNS listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def wait_until_answering(server, name, zone, timeout, error):
    """Wait until server (with process, address, port, read_log()) answers a query for
    zone's SOA; raise error (naming the server `name`, with its log) if it exits or stays
    silent for timeout seconds."""
    import dns.message
    import dns.query
    query = dns.message.make_query(zone.rstrip(".") + ".", "SOA")
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise error("%s exited with %s; log:\n%s" % (name, server.process.returncode,
                                                         server.read_log()))
        try:
            dns.query.udp(query, server.address, timeout=0.2, port=server.port)
            return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise error("%s did not answer on port %d within %.0fs; log:\n%s"
                        % (name, server.port, timeout, server.read_log()))
        time.sleep(0.02)


class NSDError(RuntimeError):
    """NSD would not start or rejected a zone."""


class NSDInstance:
    """One private NSD: `with NSDInstance(workdir, {"zone.test": "records"}) as dns: ...`."""

    SOA = ("$ORIGIN {zone}.\n$TTL 60\n"
           "@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 60\n"
           "@ IN NS ns.{zone}.\n")

    def __init__(self, workdir, zones, port=None, address="127.0.0.1", signed=None):
        # type: (str, Dict[str, str], Optional[int], str, Optional[Dict[str, Sequence[str]]]) -> None
        self.workdir = os.path.abspath(str(workdir))
        self.zones = dict(zones)
        self.signed = {zone.rstrip("."): tuple(bogus)
                       for zone, bogus in (signed or {}).items()}
        self.trust_anchors = {}    # signed zone -> its DS record
        self.address = address
        self.port = port or free_udp_and_tcp_port(address)
        self.config = os.path.join(self.workdir, "nsd.conf")
        self.log_path = os.path.join(self.workdir, "nsd.log")
        self.process = None  # type: Optional[subprocess.Popen]

    def _write_config(self):
        os.makedirs(self.workdir, exist_ok=True)
        lines = [
            "server:",
            "  ip-address: %s@%d" % (self.address, self.port),
            "  port: %d" % self.port,
            "  do-ip6: no",
            # Stay the user we are, outside any chroot: everything lives in workdir.
            '  username: ""',
            '  chroot: ""',
            '  zonesdir: "%s"' % self.workdir,
            '  database: ""',
            '  zonelistfile: "%s/zone.list"' % self.workdir,
            '  xfrdfile: "%s/xfrd.state"' % self.workdir,
            '  pidfile: "%s/nsd.pid"' % self.workdir,
            '  logfile: "%s"' % self.log_path,
            "  server-count: 1",
            "  verbosity: 1",
            "  hide-version: yes",
            "remote-control:",
            "  control-enable: no",
        ]
        for zone, records in self.zones.items():
            zone = zone.rstrip(".")
            path = os.path.join(self.workdir, zone + ".zone")
            with open(path, "w") as zonefile:
                zonefile.write(self.SOA.format(zone=zone))
                zonefile.write(textwrap.dedent(records).strip() + "\n")
            if os.path.exists(NSD_CHECKZONE):
                check = subprocess.run([NSD_CHECKZONE, zone, path], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, universal_newlines=True)
                if check.returncode != 0:
                    raise NSDError("zone %s does not load: %s" % (zone, check.stdout.strip()))
            zonefile = zone + ".zone"
            if zone in self.signed:
                self.trust_anchors[zone] = sign_zone(self.workdir, zone, path,
                                                     self.signed[zone])
                zonefile += ".signed"
            lines += ["zone:", '  name: "%s"' % zone, '  zonefile: "%s"' % zonefile]
        with open(self.config, "w") as config:
            config.write("\n".join(lines) + "\n")

    def start(self, timeout=10.0):
        """Write config and zones, start NSD in the foreground, wait until it answers."""
        reason = nsd_available() or (ldns_available() if self.signed else None)
        if reason:
            raise NSDError(reason)
        self._write_config()
        self.process = subprocess.Popen([NSD, "-d", "-c", self.config],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self._wait_until_answering(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _wait_until_answering(self, timeout):
        zone = next(iter(self.zones), "test")
        wait_until_answering(self, "nsd", zone, timeout, NSDError)

    def stop(self, timeout=10.0):
        """SIGTERM our NSD (it takes its own helper processes down) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

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


@contextlib.contextmanager
def private_nsd(zones, **options):
    """A started NSDInstance serving `zones` from a fresh directory (options: those of
    NSDInstance), stopped and its directory removed afterwards."""
    instance = NSDInstance(tempfile.mkdtemp(prefix="elemta-nsd-"), zones, **options)
    try:
        with instance:
            yield instance
    finally:
        instance.remove()
