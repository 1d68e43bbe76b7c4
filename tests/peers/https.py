"""A test CA and loopback HTTPS servers: one serves MTA-STS policies (RFC 8461 3.3), one
takes TLS-RPT reports (RFC 8460 5.4).

Owned by the test suite (tests/test_mta_sts.py, tests/test_tlsrpt_https.py). LoopbackCA
makes a CA and certificates for any names it signs (the cryptography package, EC P-256);
PolicyServer answers GET /.well-known/mta-sts.txt with the policy its `policies` give for
the request's Host (mta-sts.<domain>), in native threads (never gevent), counting the
fetches; ReportServer keeps what is POSTed to it.

    ca = LoopbackCA(workdir)
    cert, key = ca.issue("mta-sts.example.test")
    with PolicyServer("127.0.0.30", port, cert, key, {"mta-sts.example.test": text}) as web:
        ... web.fetches ...
"""

import datetime
import os
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class LoopbackCA:
    """A CA of its own in workdir: ca.pem is what the client trusts."""

    def __init__(self, workdir, common_name="Elemta MTA-STS Test CA"):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.name = name
        self.cert = (self._builder(name, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True,
                                                  True, False, False), True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = os.path.join(self.workdir, "ca.pem")
        with open(self.ca_file, "wb") as out:
            out.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2)))

    def issue(self, *names):
        """(cert_file, key_file) of a server certificate for names, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = (self._builder(subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               False)
                .sign(self.key, hashes.SHA256()))
        base = os.path.join(self.workdir, names[0])
        with open(base + ".pem", "wb") as out:
            out.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(base + ".key", "wb") as out:
            out.write(key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return base + ".pem", base + ".key"


class PolicyServer:
    """HTTPS on address:port; policies maps a Host header to the policy text served."""

    def __init__(self, address, port, cert_file, key_file, policies):
        self.policies = dict(policies)
        self.fetches = []            # the Host of each policy request, in order
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                host = (self.headers.get("Host") or "").split(":")[0]
                server.fetches.append(host)
                text = server.policies.get(host)
                if self.path != "/.well-known/mta-sts.txt" or text is None:
                    self.send_error(404)
                    return
                body = text.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        """Stop answering: the port is closed, so a fetch now fails."""
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


class ReportServer:
    """HTTPS on address:port that takes TLS-RPT report POSTs (RFC 8460 5.4), in native
    threads: each is kept in `posts` as (path, headers, body); `status` maps a path to
    the status it answers (200 when not named), so a test can refuse, then accept."""

    def __init__(self, address, port, cert_file, key_file):
        self.posts = []
        self.status = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                server.posts.append((self.path, dict(self.headers), body))
                code = server.status.get(self.path, 200)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.httpd.shutdown()
        self.httpd.server_close()
