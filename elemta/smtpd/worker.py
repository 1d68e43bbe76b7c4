"""The smtpd worker process's main loop: serve until told to stop, retired, or orphaned.

Runs in a child forked by elemta.master (the "smtpd" row of elemta.services). It opens
its own queue (LMDB) after the fork, serves SMTP on the listening sockets it inherited,
and lives the life every gevent child does (elemta.util.child: heartbeat, SIGTERM
graceful, SIGQUIT at once, SIGUSR1 reopen logs, exit when orphaned). It retires once it
has admitted max_use sessions (the base counts them) or idled max_idle seconds. A TLS
certificate or key it cannot load is a boot failure: the master logs why and backs off
(the other workers keep serving). Its watch also picks up a renewed certificate
(elemta.smtpd.certwatch).
"""

import time

from elemta.sharedstate.process import ClusterConfigError
from elemta.smtpd.server import SMTPServer
from elemta.smtpd.tls import CertificateError
from elemta.util.child import BootError, GeventChild


class SMTPDWorker(GeventChild):
    """One smtpd worker process: an SMTPServer plus its life cycle."""

    kind = "smtpd"
    max_use_option = "smtpd"

    def __init__(self, config, listening, slot, scoreboard, client_counts, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.listening = listening
        self.client_counts = client_counts
        self.server = None

    def boot(self):
        try:
            self.server = SMTPServer(self.config, self.listening, self.client_counts)
        except (CertificateError, ClusterConfigError) as exc:
            raise BootError(str(exc)) from None
        self.server.on_admit = self._admitted
        self.server.start()

    def _admitted(self):
        """A session was admitted: the max_use-th retires the worker at once (its
        listeners close now, not a second later; on_stop)."""
        self.used(1, "served %d sessions")

    def on_stop(self):
        """Stop accepting at once; the sessions under way get the grace (shut_down)."""
        if self.server is not None:
            self.server.close_listeners()

    def shut_down(self):
        self.log.info("smtpd stopping: %d session(s) get %ds to finish",
                      self.server.sessions, self.grace)
        self.server.stop(self.grace)

    def watch(self):
        self.server.certificates.check()
        idle_limit = self.config.smtpd.max_idle
        if (idle_limit and not self.server.sessions
                and time.monotonic() - self.server.last_active > idle_limit):
            return "idle for %ds (max_idle)" % idle_limit
        return None


def run_smtpd(config, slot, scoreboard, master_pid, listening, shared):
    """The main of an smtpd child (elemta.services); shared is the ClientCounts table."""
    shared.use_row(slot)
    return SMTPDWorker(config, listening, slot, scoreboard, shared, master_pid).run()
