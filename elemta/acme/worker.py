"""The acme child (`elemta: acme`): orders each certificate of acme.certificates when it is
due (elemta.acme.schedule) and installs it in the state directory, where the smtpd
workers pick it up by themselves (elemta.smtpd.certwatch).

Runs as master.user, forked by the master (the "acme" row of elemta.services). An order
runs in a pool thread (the acme library blocks), so the heartbeat goes on meanwhile.
A failure is logged with the ACME server's reason and retried with backoff; the
certificate in use stays until a new one has been installed. SIGUSR2 (elemtactl cert
renew) orders every certificate now, due or not. Each order's result is counted
(elemta_acme_renewals_total, elemta_acme_last_renewal_success); each certificate's
expiry is a gauge (elemta_tls_certificate_expiry_timestamp_seconds, by its fullchain.pem,
whether or not tls.acme serves it), and one 14 and then 3 days from expiry is warned of
in the log, once each (ExpiryWarnings).
See also: elemta.acme.client, elemta.acme.http01 and elemta.acme.tlsalpn01 (who answer
the challenges).
"""

import signal
import time

import gevent
from gevent.event import Event

from elemta import metrics
from elemta.acme.client import OrderFailed, obtain
from elemta.acme.schedule import Backoff, renewal_reason
from elemta.certs.expiry import ExpiryWarnings
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
        self.expiry_warnings = ExpiryWarnings()
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
                self.watch_expiry(certificate)
            self.wake.clear()
            self.wake.wait(self.sleep_time())

    def sleep_time(self):
        interval = self.settings.check_interval
        retry = self.backoff.next_try()
        if retry is not None:
            interval = min(interval, max(0.0, retry - time.time()))
        return interval

    def watch_expiry(self, certificate):
        """The certificate's expiry gauge, and a warning when it comes within 14, then 3
        days of its expiry (its renewal has not succeeded by then)."""
        info = self.store.certificate(certificate.name)
        if info is None:
            return
        metrics.TLS_CERTIFICATE_EXPIRY.labels(
            self.store.live_files(certificate.name)[0]).set(info.not_after)
        now = time.time()
        if self.expiry_warnings.due(certificate.name, info.not_after, now) is None:
            return
        left = info.not_after - now
        renewal = info.renewal_time(self.settings.renew_at)
        self.log.warning("acme: certificate %s for %s %s (%s); %s", certificate.name,
                         ", ".join(info.names), "expires in %.1f days" % (left / 86400)
                         if left > 0 else "has expired", _when(info.not_after),
                         "its renewal, due since %s, has not succeeded yet" % _when(renewal)
                         if renewal <= now else "its renewal is due %s" % _when(renewal))

    def count(self, certificate, result):
        metrics.ACME_RENEWALS.labels(certificate.name, result).inc()
        metrics.ACME_LAST_RENEWAL_SUCCESS.labels(certificate.name).set(
            1 if result == "success" else 0)
        metrics.ACME_LAST_RENEWAL_ATTEMPT.labels(certificate.name).set(time.time())

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
            self.count(certificate, "failure")
            failures, delay = self.backoff.failed(certificate.name, time.time())
            kept = ("the certificate in use (serial %s, valid until %s) stays"
                    % (info.serial, _when(info.not_after)) if info is not None
                    else "STARTTLS stays unavailable until one is obtained")
            self.log.error("acme: certificate %s for %s failed: %s; %s; failure %d in a "
                           "row, next attempt in %ds", certificate.name, names,
                           getattr(exc, "strerror", None) or exc, kept, failures, delay)
            return
        self.count(certificate, "success")
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
