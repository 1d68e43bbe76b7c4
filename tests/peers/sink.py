"""A small scriptable SMTP server for tests: the misbehaving peer real servers will not play.

Owned by no Elemta process: tests/test_smtp_client.py points the delivery client at it to see
421 greetings, 450-then-250, 550, garbage, lost connections, missing extensions, tiny SIZE
limits, STARTTLS with chosen certificates. It runs in native threads (never gevent), so it
serves whatever the test's gevent loop is doing. It records every session: the commands, how
they arrived (which came in one read: pipelining), whether TLS was on, and each message's data.

    script = {"RCPT": Replies("450 4.2.0 busy", "250 2.1.5 ok")}   # per server, in turn
    with ScriptedServer(script=script, extensions=["PIPELINING", "SIZE 1000"]) as server:
        ...connect to ("127.0.0.1", server.port)...
        server.sessions[0].commands

A script maps a verb (GREETING, EHLO, HELO, MAIL, RCPT, DATA, DOT for the reply after the
final dot, RSET, STARTTLS, QUIT, NOOP) to a reply: a str (CRLF added), bytes (sent raw),
Replies(...) (one after another, the last one repeating), a callable (session, argument) ->
any of these, CLOSE (hang up without a word) or HANG (never answer).
See also: tests/peers/postfix.py (the real server), make_test_pki below.
"""

import os
import select
import socket
import ssl
import subprocess
import threading
from typing import Dict, List, Optional

CLOSE = object()
HANG = object()

DEFAULT_EXTENSIONS = ["PIPELINING", "SIZE 10240000", "ENHANCEDSTATUSCODES", "8BITMIME",
                      "DSN", "SMTPUTF8"]
DEFAULT_REPLIES = {
    "GREETING": "220 fake.test ESMTP scripted",
    "HELO": "250 fake.test",
    "MAIL": "250 2.1.0 Ok",
    "RCPT": "250 2.1.5 Ok",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    "DOT": "250 2.0.0 Ok: queued",
    "RSET": "250 2.0.0 Ok",
    "NOOP": "250 2.0.0 Ok",
    "QUIT": "221 2.0.0 Bye",
    "STARTTLS": "220 2.0.0 Ready to start TLS",
}


class Replies:
    """Replies given one after another (across sessions of one server); the last repeats."""

    def __init__(self, *replies):
        self._replies = list(replies)
        self._lock = threading.Lock()

    def __call__(self, session, argument):
        with self._lock:
            return self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]


class Message:
    """One DATA transaction as the server saw it."""

    def __init__(self, mail, rcpts, wire):
        self.mail = mail          # the MAIL FROM line
        self.rcpts = rcpts        # the RCPT TO lines whose reply was 2xx
        self.wire = wire          # the bytes between DATA's 354 and the final dot, as sent
        # Undo the dot-stuffing (RFC 5321 4.5.2): what the server would store.
        self.content = b"".join(line[1:] if line.startswith(b".") else line
                                for line in wire.splitlines(keepends=True))


class Session:
    """One connection: commands as received, the reads they came in, messages, TLS."""

    def __init__(self):
        self.commands = []        # type: List[str]
        self.reads = []           # type: List[bytes]
        self.messages = []        # type: List[Message]
        self.tls = False
        self.peer = None          # the client's (address, port)
        self.closed = threading.Event()


class ScriptedServer:
    """An SMTP server on `address`, a free port unless one is given."""

    def __init__(self, script=None, extensions=None, address="127.0.0.1", port=0,
                 cert_file=None, key_file=None):
        # type: (Optional[Dict[str, object]], Optional[List[str]], str, int, Optional[str], Optional[str]) -> None
        self.script = dict(DEFAULT_REPLIES)
        self.script.update(script or {})
        self._scripted = set(script or ())
        self.extensions = list(DEFAULT_EXTENSIONS if extensions is None else extensions)
        self.cert_file, self.key_file = cert_file, key_file
        if cert_file and "STARTTLS" not in self.extensions:
            self.extensions.append("STARTTLS")
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(16)
        self.address = address
        self.port = self.listener.getsockname()[1]
        self.sessions = []        # type: List[Session]
        self._stopping = threading.Event()
        self._connections = []

    # -- life cycle -------------------------------------------------------------------------

    def start(self):
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self):
        self._stopping.set()
        self.listener.close()
        for conn in list(self._connections):
            try:
                conn.close()
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def messages(self):
        return [m for s in self.sessions for m in s.messages]

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            session = Session()
            session.peer = peer
            self.sessions.append(session)
            self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn, session), daemon=True).start()

    # -- one connection ---------------------------------------------------------------------

    def _serve(self, conn, session):
        try:
            self._conversation(_Conn(conn, session, self._stopping), session)
        except (OSError, ssl.SSLError, _Hangup):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            session.closed.set()

    def _conversation(self, conn, session):
        conn.reply(self._reply_for("GREETING", session, ""))
        mail, rcpts = None, []
        while True:
            line = conn.readline()
            if line is None:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            session.commands.append(text)
            verb, _, argument = text.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                reply = self._resolve(self.script.get("EHLO") or self._ehlo_reply(), session,
                                      argument)
            elif verb == "RCPT" and mail is None:
                reply = "503 5.5.1 Error: need MAIL command"
            elif verb == "DATA" and not rcpts and "DATA" not in self._scripted:
                reply = "554 5.5.1 Error: no valid recipients"   # as real servers say
            elif verb in self.script:
                reply = self._reply_for(verb, session, argument)
            else:
                reply = "502 5.5.2 Error: command not recognized"
            if verb == "MAIL" and _is_positive(reply):
                mail, rcpts = text, []
            if verb == "RCPT" and _is_positive(reply):
                rcpts.append(text)
            if verb == "RSET":
                mail, rcpts = None, []
            conn.reply(reply)
            if verb == "QUIT" and _is_positive(reply):
                return
            if verb == "STARTTLS" and isinstance(reply, str) and reply.startswith("220"):
                conn.start_tls(self.cert_file, self.key_file)
                session.tls = True
            if verb == "DATA" and isinstance(reply, str) and reply.startswith("354"):
                wire = conn.read_data()
                if wire is None:
                    return
                reply = self._reply_for("DOT", session, "")
                if _is_positive(reply):
                    session.messages.append(Message(mail, rcpts, wire))
                mail, rcpts = None, []
                conn.reply(reply)

    def _ehlo_reply(self):
        lines = ["fake.test"] + self.extensions
        return "\r\n".join("250%s%s" % ("-" if i < len(lines) - 1 else " ", line)
                             for i, line in enumerate(lines))

    def _reply_for(self, verb, session, argument):
        return self._resolve(self.script[verb], session, argument)

    def _resolve(self, reply, session, argument):
        while callable(reply) and reply not in (CLOSE, HANG):
            reply = reply(session, argument)
        return reply


def _is_positive(reply):
    return isinstance(reply, str) and reply[:1] in ("2", "3")


class _Hangup(Exception):
    pass


class _Conn:
    """Line I/O over one client socket, with the session's record keeping."""

    MAX_LINE = 100000

    def __init__(self, sock, session, stopping):
        self.sock = sock
        self.session = session
        self.stopping = stopping
        self.buffer = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            return False
        self.session.reads.append(data)
        self.buffer += data
        return True

    def readline(self):
        while b"\n" not in self.buffer:
            if len(self.buffer) > self.MAX_LINE or not self._fill():
                return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read_data(self):
        """The DATA bytes up to (not including) the line ".", CRLF line endings required."""
        while True:
            end = self.buffer.find(b"\r\n.\r\n")
            if self.buffer.startswith(b".\r\n"):
                wire, self.buffer = b"", self.buffer[3:]
                return wire
            if end >= 0:
                wire, self.buffer = self.buffer[:end + 2], self.buffer[end + 5:]
                return wire
            if not self._fill():
                return None

    def reply(self, reply):
        if reply is CLOSE:
            raise _Hangup()
        if reply is HANG:
            # Say nothing until the client gives up (or the test stops the server).
            while not self.stopping.is_set():
                readable, _, _ = select.select([self.sock], [], [], 0.05)
                if readable and not self.sock.recv(65536):
                    break
            raise _Hangup()
        data = reply if isinstance(reply, bytes) else (reply + "\r\n").encode("utf-8")
        self.sock.sendall(data)

    def start_tls(self, cert_file, key_file):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.buffer = b""


def make_test_pki(workdir, hostname):
    """A test CA and a certificate for `hostname` signed by it (openssl, EC P-256 keys).
    Returns (ca_file, cert_file, key_file)."""
    os.makedirs(workdir, exist_ok=True)
    path = lambda name: os.path.join(workdir, name)   # noqa: E731

    def run(*argv):
        subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=Elemta Test CA",
        "-keyout", path("ca.key"), "-out", path("ca.pem"),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", *ec, "-subj", "/CN=" + hostname, "-keyout", path("key.pem"),
        "-out", path("cert.csr"))
    with open(path("cert.ext"), "w") as ext:
        ext.write("subjectAltName=DNS:%s\nbasicConstraints=CA:FALSE\n"
                  "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
                  "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n" % hostname)
    run("openssl", "x509", "-req", "-in", path("cert.csr"), "-CA", path("ca.pem"),
        "-CAkey", path("ca.key"), "-CAcreateserial", "-days", "2", "-out", path("cert.pem"),
        "-extfile", path("cert.ext"))
    # Postfix's smtpd reads the key as root at start; others need not.
    os.chmod(path("key.pem"), 0o600)
    return path("ca.pem"), path("cert.pem"), path("key.pem")
