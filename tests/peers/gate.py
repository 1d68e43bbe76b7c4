"""A TCP relay with a gate, to put a real scanner behind a link as slow as a test needs.

Owned by no Elemta process: tests/test_scanning_load.py puts it between Elemta and a
real clamd, so a 30 MB scan is under way for as long as the test wants, with no timing
guesses. Each connection is relayed byte for byte, in native threads (never gevent),
both ways; once a connection has sent more than `stall_after` bytes towards the
scanner, its relay stops (the sender's socket buffers fill, as with a scanner too busy
to read) and `stalled` is set, until the test calls open(). Connections that stay under
the limit (a small message) pass straight through meanwhile.

    with GateProxy(("127.0.0.1", clamd.port), stall_after=1 << 20) as gate:
        ...point the plugin at gate.address; gate.stalled.wait(); ...; gate.open()

See also: tests/peers/clamd.py.
"""

import socket
import threading


class GateProxy:
    """See the module docstring."""

    def __init__(self, upstream, stall_after):
        self.upstream = upstream
        self.stall_after = stall_after
        self.stalled = threading.Event()     # some connection is held at the gate
        self._open = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self._sockets = []

    def open(self):
        """Let every held connection go on (and no later one stop)."""
        self._open.set()

    def __enter__(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._open.set()
        self.listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False),
                             daemon=True).start()

    def _pipe(self, source, target, gated):
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                if gated and sent + len(data) > self.stall_after and not self._open.is_set():
                    self.stalled.set()
                    self._open.wait()
                target.sendall(data)
                sent += len(data)
        except OSError:
            return
