"""A scripted milter on loopback: a real socket server speaking the milter protocol,
answering each command as the test says, and recording what the MTA sent.

Owned by no Elemta process: tests/test_milter.py starts it for the answers real milters
cannot be made to give on demand (header changes, body replacement, recipient changes,
progress, reply codes, discard, quarantine, timeouts). Its codec is written here from
the protocol description (libmilter's mfdef.h), not imported from elemta.milter, so a
mistake in Elemta's codec cannot hide behind the same mistake in the test.

    with ScriptedMilter(port, script={b"R": [reply(b"r")]}) as milter:
        ... send mail through Elemta ...
        milter.commands(b"R")          # data of each RCPT the MTA sent
        milter.macros[b"M"]            # {name: value} of the last MAIL's macros

script maps a command byte (C, H, M, R, T, L, N, B, E) to a list of answers; each answer is
a list of steps taken in order: a packet (command byte, data) sent, a number (seconds to
sleep before the next step) or a callable (called there: a test's hook to learn that the
milter got this far, and to hold it until the test says, see pause()). A command with no script entry is answered "continue"; the list's
last entry serves every later call. actions and steps are what the milter negotiates.
"""

import socket
import struct
import threading
import time

ALL_ACTIONS = 0x1FF
NO_REPLY_COMMANDS = (b"D", b"A", b"Q", b"K")


def reply(command, data=b""):
    """One answer of one packet."""
    return [(command, data)]


class pause:
    """A step that stops the milter's answer where it stands: `reached` is set when the
    milter gets there, and it goes on once the test calls release() (or after
    `timeout` seconds, so a failing test cannot hang the milter for ever)."""

    def __init__(self, timeout=300):
        self.reached = threading.Event()
        self._released = threading.Event()
        self.timeout = timeout

    def __call__(self):
        self.reached.set()
        self._released.wait(self.timeout)

    def release(self):
        self._released.set()


def strings(*texts):
    return b"".join(t.encode() + b"\0" for t in texts)


class ScriptedMilter:
    def __init__(self, port, script=None, actions=ALL_ACTIONS, steps=0, version=6,
                 symlists=b""):
        self.port = port
        self.address = "inet:127.0.0.1:%d" % port
        self.script = dict(script or {})
        self.actions, self.steps, self.version = actions, steps, version
        self.symlists = symlists
        # Per connection, [(command, data)]: every packet but MACRO, in order. The
        # harness's probe for the greeting is a connection too (connect, quit).
        self.sessions = []
        self.macros = {}          # command -> {name: value} of its last MACRO packet
        self.connections = 0
        self.lock = threading.Lock()
        self._calls = {}
        self._listener = None
        self._stop = threading.Event()

    # ---- what the tests read --------------------------------------------------------

    def _talked(self):
        """The sessions that got further than connect and quit (not probes)."""
        return [s for s in self.sessions if any(cmd not in b"CQ" for cmd, _ in s)]

    def commands(self, command):
        """The data of every `command` of every session but probes, in order."""
        with self.lock:
            return [data for session in self._talked() for cmd, data in session
                    if cmd == command]

    def sequence(self):
        """The commands of the last session that was not a probe, as one byte string."""
        with self.lock:
            talked = self._talked()
            return b"".join(cmd for cmd, _ in talked[-1]) if talked else b""

    # ---- the server ---------------------------------------------------------------------

    def __enter__(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._listener.close()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(60)
        received = []
        with self.lock:
            self.sessions.append(received)
        try:
            while True:
                command, data = self._read(conn)
                if command is None:
                    return
                if command == b"O":
                    conn.sendall(self._packet(b"O", struct.pack(
                        "!III", self.version, self.actions, self.steps) + self.symlists))
                    continue
                if command == b"D":
                    pairs = data[1:].split(b"\0")
                    with self.lock:
                        self.macros[data[:1]] = {
                            pairs[i].decode(): pairs[i + 1].decode()
                            for i in range(0, len(pairs) - 1, 2)}
                    continue
                with self.lock:
                    received.append((command, data))
                if command in NO_REPLY_COMMANDS:
                    if command == b"Q":
                        return
                    continue
                for step in self._answer(command):
                    if callable(step):
                        step()
                    elif isinstance(step, (int, float)):
                        time.sleep(step)
                    else:
                        conn.sendall(self._packet(*step))
        except OSError:
            return
        finally:
            conn.close()

    def _answer(self, command):
        answers = self.script.get(command)
        if not answers:
            return [(b"c", b"")]
        with self.lock:
            call = self._calls.get(command, 0)
            self._calls[command] = call + 1
        return answers[min(call, len(answers) - 1)]

    @staticmethod
    def _packet(command, data=b""):
        return struct.pack("!I", len(data) + 1) + command + data

    @staticmethod
    def _read(conn):
        header = _exactly(conn, 5)
        if header is None:
            return None, None
        (length,) = struct.unpack("!I", header[:4])
        data = _exactly(conn, length - 1) if length > 1 else b""
        return header[4:5], data


def _exactly(conn, count):
    parts = []
    while count:
        piece = conn.recv(count)
        if not piece:
            return None
        parts.append(piece)
        count -= len(piece)
    return b"".join(parts)
