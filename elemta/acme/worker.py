"""The acme child (`elemta: acme`): orders each certificate of acme.certificates when it is
due (elemta.acme.schedule) and installs it in the state directory, where the smtpd
workers pick it up by themselves (elemta.smtpd.certwatch).

Runs as master.user, forked by the master (the "acme" row of elemta.services). An order
runs in a pool thread (the acme library blocks), so the heartbeat goes on meanwhile.
A failure is logged with the ACME server's reason and retried with backoff; the
certificate in use stays until a new one has been installed. SIGUSR2 (elemtactl cert
renew) orders every certificate now, due or not.
See also: elemta.acme.client, elemta.acme.http01 (who answers the challenges).
"""

import signal
import time

import gevent
from gevent.event import Event

from elemta.acme.client import OrderFailed, obtain
from elemta.acme.schedule import Backoff, renewal_reason
from elemta.certs.store import Store
from elemta.util.child import BootError, GeventChild
from elemta.util.threads import in_thread


class ACMEChild(GeventChild):
    """The one acme process."""

    kind = "acme"

    def __init__(self, config, slot, scoreboard, master_pid):
        super().__init__(config, slot, scoreboard, master_pid)
        self.settings = config.acme
        self.store = Store(self.settings.state_directory)
        self.backoff = Backoff(self.settings.retry_delay, self.settings.retry_delay_max)
        self.wake = Event()
        self.forced = False

    def boot(self):
        import os
        for sub in ("account", "live", "challenges"):
            path = os.path.join(self.store.root, sub)
            if not os.access(path, os.W_OK | os.X_OK):
                raise BootError("acme.state_directory: cannot write %s (the master "
                                "prepares it at start)" % path)
        gevent.signal_handler(signal.SIGUSR2, self.handle_usr2)

    def handle_usr2(self):
        """SIGUSR2: renew every certificate now."""
        self.forced = True
        self.wake.set()

    def on_stop(self):
        self.wake.set()

    def serve(self):
        while not self.stopping.is_set():
            forced, self.forced = self.forced, False
            if forced:
                self.log.info("acme: renewal of every certificate forced")
                self.backoff.forget()
            for certificate in self.settings.certificates:
                if self.stopping.is_set():
                    break
                self.consider(certificate, forced)
            self.wake.clear()
            self.wake.wait(self.sleep_time())

    def sleep_time(self):
        interval = self.settings.check_interval
        retry = self.backoff.next_try()
        if retry is not None:
            interval = min(interval, max(0.0, retry - time.time()))
        return interval

    def consider(self, certificate, forced):
        now = time.time()
        if not self.backoff.ready(certificate.name, now):
            return
        info = self.store.certificate(certificate.name)
        reason = "renewal forced" if forced else renewal_reason(
            certificate, info, self.settings.renew_at, now)
        if reason is None:
            return
        names = ", ".join(certificate.domains)
        self.log.info("acme: ordering certificate %s for %s from %s: %s",
                      certificate.name, names, self.settings.directory_url, reason)
        try:
            key_pem, chain_pem = in_thread(obtain, self.settings, self.store,
                                           list(certificate.domains))
            self.store.save_certificate(certificate.name, key_pem, chain_pem)
        except (OrderFailed, OSError) as exc:
            failures, delay = self.backoff.failed(certificate.name, time.time())
            kept = ("the certificate in use (serial %s, valid until %s) stays"
                    % (info.serial, _when(info.not_after)) if info is not None
                    else "STARTTLS stays unavailable until one is obtained")
            self.log.error("acme: certificate %s for %s failed: %s; %s; failure %d in a "
                           "row, next attempt in %ds", certificate.name, names,
                           getattr(exc, "strerror", None) or exc, kept, failures, delay)
            return
        self.backoff.succeeded(certificate.name)
        new = self.store.certificate(certificate.name)
        self.log.info("acme: certificate %s for %s installed: serial %s, issuer %s, valid "
                      "until %s", certificate.name, names, new.serial, new.issuer,
                      _when(new.not_after))


def _when(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def run_acme(config, slot, scoreboard, master_pid):
    """The main of the acme child (its row in elemta.services.SERVICES)."""
    return ACMEChild(config, slot, scoreboard, master_pid).run()
