"""The built-in ACME client end to end: Elemta's acme child orders certificates from a
real ACME server (pebble, tests/peers/pebble.py) on loopback, its acme-http child answers
pebble's HTTP-01 requests, and the smtpd serves what was obtained over STARTTLS. Names
resolve through NSD: mail and smtp to 127.0.0.1, where the responder listens; dead to
127.0.0.9, where nothing does."""

import json
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.harness import REPO, ElemtaServer, free_port, wait_for
from tests.peers.nsd import NSDInstance, nsd_available
from tests.peers.pebble import PebbleInstance, pebble_available
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.skipif(bool(nsd_available() or pebble_available()),
                                reason=nsd_available() or pebble_available() or "")

ZONE = """
mail A 127.0.0.1
smtp A 127.0.0.1
dead A 127.0.0.9
"""
NAMES = ["mail.acme.test", "smtp.acme.test"]


def pebble_and_nsd(tmp_path_factory, validity=None):
    workdir = tmp_path_factory.mktemp("acme-peers")
    http_port = free_port()
    with NSDInstance(workdir / "nsd", {"acme.test": ZONE}) as dns:
        with PebbleInstance(workdir / "pebble", http_port, dns.port, validity) as server:
            root = workdir / "pebble-root.pem"
            root.write_bytes(server.issuer_root())
            server.root_file = str(root)
            yield server


@pytest.fixture(scope="module")
def pebble(tmp_path_factory):
    yield from pebble_and_nsd(tmp_path_factory)


@pytest.fixture(scope="module")
def short_pebble(tmp_path_factory):
    """A pebble whose certificates are valid for 10 days."""
    yield from pebble_and_nsd(tmp_path_factory, validity=10 * 86400)


def start_elemta(tmp_path, pebble, names=NAMES, **acme):
    settings = {"enabled": True, "directory_url": pebble.directory_url,
                "ca_file": pebble.ca_file, "http_address": "127.0.0.1",
                "http_port": pebble.http_port,
                "state_directory": str(tmp_path / "acme"),
                "certificates": [{"name": "mail", "domains": list(names)}],
                "retry_delay": 1.0, "retry_delay_max": 2.0}
    settings.update(acme)
    server = ElemtaServer(tmp_path / "elemta", {"tls": {"acme": "mail"}, "acme": settings})
    return server.start()


def renewal_metrics(server):
    """The acme metrics the api process serves: ({result: orders}, last success)."""
    with open(server.config_path) as f:
        api_port = int(re.search(r"api:\n\s+port: (\d+)", f.read()).group(1))
    samples, _ = scrape(api_port)
    orders = {result: value(samples, "elemta_acme_renewals_total", certificate="mail",
                            result=result) for result in ("success", "failure")}
    return orders, samples.get(("elemta_acme_last_renewal_success",
                                (("certificate", "mail"),)))


def installed(server):
    return server.log().count("acme: certificate mail for %s installed" % ", ".join(NAMES))


def starttls(port, pebble, name):
    """An SMTP session after STARTTLS, the server's certificate checked against pebble's
    root for name; returns (smtplib.SMTP, the certificate's serial)."""
    context = ssl.create_default_context(cafile=pebble.root_file)
    client = smtplib.SMTP(timeout=10)
    client._host = name          # what starttls() checks the certificate against
    client.connect("127.0.0.1", port)
    client.ehlo("client.test")
    client.starttls(context=context)
    serial = client.sock.getpeercert()["serialNumber"]
    client.ehlo("client.test")
    return client, serial


def elemtactl(server, *args):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args)
                          + ["--config", server.config_path], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)


def offers_starttls(port):
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    try:
        client.ehlo("client.test")
        return client.has_extn("starttls")
    finally:
        client.quit()


def test_a_certificate_for_two_names_is_obtained_and_served_over_starttls(tmp_path, pebble):
    server = start_elemta(tmp_path, pebble)
    try:
        titles = set(server.titles().values())
        assert {"elemta: acme", "elemta: acme-http"} <= titles
        wait_for(lambda: installed(server) == 1, timeout=60)
        wait_for(lambda: offers_starttls(server.port), timeout=10)
        serials = set()
        for name in NAMES:          # both names are in the one certificate
            client, serial = starttls(server.port, pebble, name)
            client.quit()
            serials.add(serial)
        assert len(serials) == 1
        log = server.log()
        assert "answered the challenge" in log
        # The key is for master.user alone; the state directory is root's.
        key = tmp_path / "acme" / "live" / "mail" / "privkey.pem"
        assert oct(os.stat(key).st_mode & 0o777) == "0o600"
        assert oct(os.stat(tmp_path / "acme").st_mode & 0o777) == "0o755"
        # Served, the challenge files are gone again.
        assert os.listdir(tmp_path / "acme" / "challenges") == []
        # What the admin sees.
        shown = elemtactl(server, "cert", "status")
        assert shown.returncode == 0, shown.stderr
        assert "mail (source acme, served)" in shown.stdout
        assert "names:   mail.acme.test, smtp.acme.test" in shown.stdout
        assert "issuer:  CN=Pebble Intermediate CA" in shown.stdout
        listed = [json.loads(line) for line in
                  elemtactl(server, "cert", "status", "--json").stdout.splitlines()]
        assert [(c["name"], c["source"], c["names"], c["served"]) for c in listed] == [
            ("mail", "acme", NAMES, True)]
        assert listed[0]["serial"] == serials.pop().lower().lstrip("0")
        # The responder serves pending tokens and nothing else.
        for path in ("/.well-known/acme-challenge/..%2F..%2Faccount",
                     "/.well-known/acme-challenge/", "/live/mail/privkey.pem"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen("http://127.0.0.1:%d%s" % (pebble.http_port, path),
                                       timeout=10)
            assert refused.value.code == 404
    finally:
        server.stop()


def test_a_renewal_replaces_the_certificate_without_a_restart_or_a_broken_session(
        tmp_path, pebble):
    server = start_elemta(tmp_path, pebble)
    try:
        wait_for(lambda: installed(server) == 1, timeout=60)
        wait_for(lambda: offers_starttls(server.port), timeout=10)
        before = dict(server.titles())
        open_session, old_serial = starttls(server.port, pebble, "mail.acme.test")
        renew = elemtactl(server, "cert", "renew")
        assert renew.returncode == 0, renew.stdout + renew.stderr
        assert "asked the acme process" in renew.stdout
        wait_for(lambda: installed(server) == 2, timeout=60)

        def serving_a_new_one():
            client, serial = starttls(server.port, pebble, "smtp.acme.test")
            client.quit()
            return serial != old_serial
        wait_for(serving_a_new_one, timeout=10)
        # The session opened before the renewal goes on with its own certificate.
        open_session.sendmail("a@client.test", ["b@example.test"],
                              b"Subject: across a renewal\r\n\r\nbody\r\n")
        open_session.quit()
        assert len(server.queued_ids()) == 1
        assert server.titles() == before          # no process was restarted
        assert "renewal of every certificate forced" in server.log()
    finally:
        server.stop()


def test_a_failed_challenge_is_logged_and_retried_while_the_old_certificate_serves(
        tmp_path, pebble):
    server = start_elemta(tmp_path, pebble)
    try:
        wait_for(lambda: installed(server) == 1, timeout=60)
        wait_for(lambda: offers_starttls(server.port), timeout=10)
        client, old_serial = starttls(server.port, pebble, "mail.acme.test")
        client.quit()
        # The admin adds a name whose address does not reach this host.
        text = open(server.config_path).read().replace(
            "- smtp.acme.test", "- smtp.acme.test\n    - dead.acme.test")
        assert "dead.acme.test" in text
        with open(server.config_path, "w") as f:
            f.write(text)
        server.process.send_signal(signal.SIGHUP)
        failure = ("acme: certificate mail for mail.acme.test, smtp.acme.test, "
                   "dead.acme.test failed: challenge failed: dead.acme.test:")
        wait_for(lambda: "failure 2 in a row" in server.log(), timeout=60)
        lines = [l for l in server.log().splitlines() if failure in l]
        assert len(lines) >= 2, server.log()
        assert "127.0.0.9" in lines[0]                  # pebble's reason, passed on
        assert "the certificate in use (serial %s" % old_serial.lower().lstrip("0") \
            in lines[0]
        assert "failure 1 in a row, next attempt in 1s" in lines[0]
        assert "failure 2 in a row, next attempt in 2s" in lines[1]
        for name in NAMES:
            client, serial = starttls(server.port, pebble, name)
            client.quit()
            assert serial == old_serial
        # Prometheus sees the failures, and that the latest order failed (within the
        # second the acme process may hold its counts).
        def failed():
            orders, last_success = renewal_metrics(server)
            return orders["success"] == 1 and orders["failure"] >= 2 and last_success == 0
        wait_for(failed, timeout=30)
    finally:
        server.stop()


def test_a_certificate_near_expiry_is_warned_of_once_per_threshold(tmp_path, short_pebble):
    """A 10-day certificate is within 14 days of expiry from the start: one warning,
    however often the acme process looks (check_interval 0.2 s); its renewal, at two
    thirds of its lifetime, is still ahead."""
    server = start_elemta(tmp_path, short_pebble, check_interval=0.2)
    try:
        wait_for(lambda: installed(server) == 1, timeout=60)
        warning = re.compile(r"warning: acme: certificate mail for mail.acme.test, "
                             r"smtp.acme.test expires in (9\.\d|10\.0) days \(\d{4}-.* "
                             r"UTC\); its renewal is due \d{4}-")
        wait_for(lambda: warning.search(server.log()), timeout=10)
        time.sleep(1.5)             # several more looks at the certificate
        assert len(warning.findall(server.log())) == 1, server.log()
        wait_for(lambda: renewal_metrics(server) == ({"success": 1, "failure": 0}, 1),
                 timeout=30)
    finally:
        server.stop()


@pytest.mark.skipif(os.getuid() != 0, reason="dropping to master.user needs root")
@pytest.mark.parametrize("challenge, responder", [("http-01", "elemta: acme-http"),
                                                  ("tls-alpn-01", "elemta: acme-tls")])
def test_as_a_packaged_install_the_keys_are_master_users_in_a_directory_of_roots(
        tmp_path, pebble, challenge, responder):
    """master.user nobody: the master (root) makes the state directory and binds the
    responder's port, the acme child and the challenge responder (HTTP-01 or TLS-ALPN-01)
    run as nobody, the key they write is nobody's alone, and the smtpd (nobody) serves
    it."""
    import pwd
    import tempfile
    from elemta.util.procs import children as children_of
    from tests.harness import code_for_everyone
    from tests.test_privileges import interpreter_for_nobody, uid_of
    python = interpreter_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter that user nobody can read")
    workdir = tempfile.mkdtemp()
    os.chmod(workdir, 0o755)
    pythonpath = code_for_everyone(os.path.join(workdir, "python"))
    port, state = free_port(), os.path.join(workdir, "acme")
    ca_file = os.path.join(workdir, "pebble-ca.pem")      # one nobody may read
    with open(pebble.ca_file, "rb") as source, open(ca_file, "wb") as copy:
        copy.write(source.read())
    config = os.path.join(workdir, "elemta.yaml")
    with open(config, "w") as f:
        f.write("listeners:\n  - {address: 127.0.0.1, port: %d, mode: smtp}\n"
                "smtpd: {peername_lookup: false, workers: 1}\n"
                "queue: {spool_dir: %s/spool}\nmaster: {user: nobody, stop_grace: 3}\n"
                "api: {enabled: false}\ndelivery: {workers: 0}\ntls: {acme: mail}\n"
                "acme: {enabled: true, directory_url: '%s', ca_file: %s,\n"
                "       http_address: 127.0.0.1, http_port: %d, state_directory: %s,\n"
                "       challenge: %s, tls_address: 127.0.0.1, tls_port: %d,\n"
                "       certificates: [{name: mail, domains: [%s]}]}\n"
                % (port, workdir, pebble.directory_url, ca_file, pebble.http_port,
                   state, challenge, pebble.tls_port, ", ".join(NAMES)))
    log_path = os.path.join(workdir, "log")
    log = open(log_path, "wb")
    server = subprocess.Popen([python, "-m", "elemta.cli.elemta", "--config", config],
                              stdout=log, stderr=log, start_new_session=True, cwd=workdir,
                              env=dict(os.environ, PYTHONPATH=pythonpath))
    nobody = pwd.getpwnam("nobody").pw_uid
    key = os.path.join(state, "live", "mail", "privkey.pem")
    try:
        wait_for(lambda: os.path.exists(key), timeout=60)
        kids = children_of(server.pid)
        acme_kids = {pid for pid, title in kids.items()
                     if title in ("elemta: acme", responder)}
        assert len(acme_kids) == 2 and {uid_of(pid) for pid in acme_kids} == {nobody}
        info = os.stat(key)
        assert (info.st_uid, info.st_mode & 0o777) == (nobody, 0o600)
        top = os.stat(state)
        assert (top.st_uid, top.st_mode & 0o777) == (0, 0o755)
        for sub in ("account", "live", "challenges"):
            info = os.stat(os.path.join(state, sub))
            assert (info.st_uid, info.st_mode & 0o777) == (nobody, 0o700)
        wait_for(lambda: offers_starttls(port), timeout=10)
        client, _ = starttls(port, pebble, "smtp.acme.test")
        client.quit()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(30) == 0
        log.close()
    with open(log_path) as f:
        text = f.read()
    assert "Traceback" not in text and "ERROR" not in text, text


def test_two_certificates_are_obtained_and_each_has_its_expiry_gauge(tmp_path, pebble):
    """Two acme.certificates entries: both ordered and installed, tls.acme serves one,
    and Prometheus sees each one's expiry (the one not served too), by its file."""
    from elemta.certs.store import CertificateInfo
    server = start_elemta(tmp_path, pebble, certificates=[
        {"name": "mail", "domains": list(NAMES)},
        {"name": "submit", "domains": ["smtp.acme.test"]}])
    try:
        wait_for(lambda: installed(server) == 1 and
                 "acme: certificate submit for smtp.acme.test installed" in server.log(),
                 timeout=90)
        live = tmp_path / "acme" / "live"
        expiries = {}
        for name in ("mail", "submit"):
            chain = str(live / name / "fullchain.pem")
            with open(chain, "rb") as f:
                expiries[chain] = CertificateInfo.from_pem(f.read()).not_after
        with open(server.config_path) as f:
            api_port = int(re.search(r"api:\n\s+port: (\d+)", f.read()).group(1))

        def gauges():
            samples, _ = scrape(api_port)
            return {dict(labels)["file"]: v for (metric, labels), v in samples.items()
                    if metric == "elemta_tls_certificate_expiry_timestamp_seconds"}
        wait_for(lambda: gauges() == expiries, timeout=30)
        status = elemtactl(server, "cert", "status")
        assert status.returncode == 0, status.stderr
        assert "submit" in status.stdout and "smtp.acme.test" in status.stdout
    finally:
        server.stop()
