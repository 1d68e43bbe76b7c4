"""A tls.cert_file looked after by an admin or certbot, end to end: the real `elemta`
server with two smtpd workers serves it over STARTTLS, picks up a replacement by itself
(the files rewritten in place, or certbot's symlinks swapped to a new archive pair) with
no SIGHUP, and warns once, from one worker, when it comes within 14 and then 3 days of
its expiry. Certificates are made by openssl, as an admin makes them.
See also: elemta.smtpd.certwatch, elemta.certs.expiry, tests/test_acme.py (ACME ones).
"""

import os
import re
import shutil
import smtplib
import ssl
import subprocess

from cryptography import x509

from tests.harness import wait_for

# A loaded machine may take seconds to start a worker or finish a handshake.
DEADLINE = 60.0


def make_certificate(directory, name, days):
    """(cert file, key file) of a self-signed certificate for mx.test valid `days` days."""
    cert, key = (os.path.join(directory, name + ".pem"),
                 os.path.join(directory, name + ".key"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", str(days),
                    "-subj", "/CN=mx.test", "-addext", "subjectAltName=DNS:mx.test",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def serial_of(cert_file):
    with open(cert_file, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number


def served_serial(port):
    """The serial number of the certificate a new STARTTLS session gets."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.starttls(context=ssl._create_unverified_context())
        der = client.sock.getpeercert(binary_form=True)
        client.ehlo("client.test")
    return x509.load_der_x509_certificate(der).serial_number


def loaded(server, cert_file):
    """How many workers (by pid) have logged loading a new cert_file."""
    return len(set(re.findall(r"smtpd\[(\d+)\]: new certificate %s loaded"
                              % re.escape(cert_file), server.log())))


def serves_only(port, serial, sessions=6):
    """True when several new sessions in a row (both workers, likely) get serial."""
    return all(served_serial(port) == serial for _ in range(sessions))


def start(elemta_server, cert_file, key_file, serial):
    """The server with two smtpd workers, once both serve serial: a worker that booted
    after a change would load the new pair from the start, and log nothing."""
    server = elemta_server(smtpd={"workers": 2}, api={"enabled": False},
                           tls={"cert_file": cert_file, "key_file": key_file})

    def both_serve():
        assert served_serial(server.port) == serial
        return len(set(re.findall(r"smtpd\[(\d+)\]: TLS connection established",
                                  server.log()))) == 2
    wait_for(both_serve, timeout=DEADLINE)
    return server


def test_a_certificate_rewritten_in_place_is_served_and_its_expiry_warned_of_once(
        elemta_server, tmp_path):
    """The admin copies a new pair over the served files (same inodes, no SIGHUP):
    both workers load it. A 10-day certificate is warned of once at 14 days, its
    2-day replacement once at 3 days, however many workers look every second."""
    workdir = str(tmp_path)
    old = make_certificate(workdir, "old", 10)
    new = make_certificate(workdir, "new", 2)
    cert_file, key_file = os.path.join(workdir, "mail.pem"), os.path.join(workdir,
                                                                          "mail.key")
    shutil.copy(old[0], cert_file)
    shutil.copy(old[1], key_file)
    server = start(elemta_server, cert_file, key_file, serial_of(old[0]))
    fourteen = re.compile(r"warning: tls\.cert_file %s \(mx\.test\) expires in "
                          r"(9\.9|10\.0) days \(\d{4}-\d\d-\d\d [\d:]+ UTC\): replace it"
                          % re.escape(cert_file))
    wait_for(lambda: fourteen.search(server.log()), timeout=DEADLINE)

    inode = os.stat(cert_file).st_ino
    shutil.copyfile(new[1], key_file)           # as `cp` does: the same files rewritten
    shutil.copyfile(new[0], cert_file)
    assert os.stat(cert_file).st_ino == inode
    wait_for(lambda: loaded(server, cert_file) == 2, timeout=DEADLINE)
    assert serves_only(server.port, serial_of(new[0]))
    three = re.compile(r"warning: tls\.cert_file %s \(mx\.test\) expires in (1\.9|2\.0) "
                       r"days" % re.escape(cert_file))
    wait_for(lambda: three.search(server.log()), timeout=DEADLINE)
    # Both workers have looked many times since each warning was due: one line each.
    log = server.log()
    assert len(fourteen.findall(log)) == 1 and len(three.findall(log)) == 1, log
    assert "Traceback" not in log


def test_certbots_symlink_swap_is_picked_up_without_a_reload(elemta_server, tmp_path):
    """certbot's layout: live/NAME/{fullchain,privkey}.pem are symlinks into
    archive/NAME/; a renewal writes fullchain2.pem and privkey2.pem there and points the
    links at them. The workers follow the links by themselves (no SIGHUP), and the
    certificate, 400 days from expiry, is not warned of."""
    archive = tmp_path / "archive" / "mail.test"
    live = tmp_path / "live" / "mail.test"
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    first = make_certificate(str(archive), "fullchain1", 400)
    second = make_certificate(str(archive), "fullchain2", 400)
    cert_file, key_file = str(live / "fullchain.pem"), str(live / "privkey.pem")
    os.symlink("../../archive/mail.test/fullchain1.pem", cert_file)
    os.symlink("../../archive/mail.test/fullchain1.key", key_file)
    server = start(elemta_server, cert_file, key_file, serial_of(first[0]))

    for link, target in ((key_file, "fullchain2.key"), (cert_file, "fullchain2.pem")):
        os.symlink("../../archive/mail.test/" + target, link + ".new")
        os.rename(link + ".new", link)          # the link replaced in one step
    wait_for(lambda: loaded(server, cert_file) == 2, timeout=DEADLINE)
    assert serves_only(server.port, serial_of(second[0]))
    log = server.log()
    assert "tls.cert_file %s" % cert_file not in log      # no expiry warning
    assert "Traceback" not in log
