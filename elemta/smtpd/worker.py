"""The smtpd worker process's main loop: serve until told to stop, retired, or orphaned.

Runs in a child forked by elemta.master. It opens its own queue (LMDB) after the fork,
serves SMTP on the listening sockets it inherited, and lives the life every gevent child
does (elemta.util.child: heartbeat, SIGTERM/SIGINT graceful, SIGQUIT at once, SIGUSR1
reopen logs, exit when orphaned). It retires once it has admitted max_use sessions or
idled max_idle seconds. A TLS certificate or key it cannot load is a boot failure: the
master logs why and backs off (the other workers keep serving).
"""

import time

from elemta.smtpd.server import SMTPServer
from elemta.smtpd.tls import CertificateError
from elemta.util.child import BootError, GeventChild, jittered


class SMTPDWorker(GeventChild):
    """One smtpd worker process: an SMTPServer plus its life cycle."""

    kind = "smtpd"

    def __init__(self, config, listening, slot, scoreboard, client_counts, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.listening = listening
        self.client_counts = client_counts
        self.server = None
        self.max_use = jittered(config.smtpd.max_use)

    def boot(self):
        try:
            self.server = SMTPServer(self.config, self.listening, self.client_counts)
        except CertificateError as exc:
            raise BootError(str(exc)) from None
        self.server.max_use = self.max_use
        self.server.on_retire = self.retire      # at once, when the last session is admitted
        self.server.start()

    def shut_down(self):
        self.log.info("smtpd stopping: %d session(s) get %ds to finish",
                      self.server.sessions, self.grace)
        self.server.stop(self.grace)

    def watch(self):
        idle_limit = self.config.smtpd.max_idle
        if (idle_limit and not self.server.sessions
                and time.monotonic() - self.server.last_active > idle_limit):
            return "idle for %ds (max_idle)" % idle_limit
        return None
