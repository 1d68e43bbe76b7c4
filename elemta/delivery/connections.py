"""Idle SMTP connections kept for the next message to the same server.

Owned by the delivery worker. Like Postfix's smtp connection cache: after a message is
sent the connection is parked for a short time instead of QUIT, and the next message for
the same host, port and TLS name takes it (after an RSET that proves it still works),
saving a TCP handshake, the greeting, EHLO and any TLS handshake per message.
"""

import time

import gevent

# Postfix's smtp_connection_cache_time_limit: how long an idle connection is kept.
IDLE_LIMIT = 2.0


class ConnectionCache:
    """Parked SMTPClient connections, by (address, port, session key): the key is what
    else the session must match to be reused (the transport's server name and profile)."""

    def __init__(self, idle_limit=IDLE_LIMIT):
        self.idle_limit = idle_limit
        self._idle = {}          # key -> [(client, parked at)]
        self._reaper = gevent.spawn(self._reap)
        self.reused = 0

    def take(self, address, port, server_name):
        """A parked connection that answers RSET, or None."""
        parked = self._idle.get((address, port, server_name))
        while parked:
            client, since = parked.pop()
            if time.monotonic() - since <= self.idle_limit and client.reset():
                self.reused += 1
                return client
            client.quit()
        return None

    def park(self, address, port, server_name, client):
        """Keep a connection that can take another message; close any other."""
        if client.usable:
            self._idle.setdefault((address, port, server_name), []).append(
                (client, time.monotonic()))
        else:
            client.close()

    def close(self):
        self._reaper.kill()
        clients = [client for parked in self._idle.values() for client, _ in parked]
        for parked in self._idle.values():
            del parked[:]            # a take() still looping over one finds it empty
        self._idle.clear()
        for client in clients:
            client.quit()

    def _reap(self):
        while True:
            gevent.sleep(self.idle_limit / 2)
            now = time.monotonic()
            expired = []
            # Sort out every list before any QUIT: a QUIT yields to other greenlets, and a
            # list written back after that could bring back a connection one of them took
            # meanwhile (two greenlets on one socket). Change each list in place: a take()
            # paused in its own QUIT or RSET still loops over the list it fetched, and must
            # not find there a connection this reaper is closing.
            for key, parked in list(self._idle.items()):
                expired += [c for c, t in parked if now - t > self.idle_limit]
                parked[:] = [(c, t) for c, t in parked if now - t <= self.idle_limit]
                if not parked:
                    del self._idle[key]
            for client in expired:
                client.quit()
