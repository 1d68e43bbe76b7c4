"""TLS-RPT in the delivery worker: its counts flushed to disk, and the daily reports.

Owned by the delivery worker (`elemta: delivery`), which runs TLSReporting.run in a
greenlet of its own when tlsrpt.enabled, and calls TLSReporting.close at its stop:

    flush    every FLUSH_EVERY seconds, the counts its SMTP transport made
             (elemta.tlsrpt.counter) go to spool/tlsrpt in one transaction, in a thread
             (its fsync never stalls a delivery)
    report   every REPORT_CHECK seconds (a little spread among workers), each day before
             today with counts whose time has come (tlsrpt.send_hour UTC the next day)
             and that nobody claimed yet is claimed and its reports queued
             (elemta.tlsrpt.send): with several workers, the first to claim sends
    retry    before that, the reports an https: rua did not take on an earlier run are
             posted again (elemta.tlsrpt.send.retry_posts)
    prune    then the days older than tlsrpt.keep_days are forgotten

See also: elemta.tlsrpt, elemta.cli.tlsrptcmd (elemtactl tlsrpt), tests/test_tlsrpt.py.
"""

import calendar
import logging
import random
import time

import gevent

from elemta.tlsrpt.counter import FLUSH_EVERY, day_of
from elemta.tlsrpt.send import retry_posts, send_day
from elemta.util.threads import in_thread

log = logging.getLogger("elemta.delivery")

REPORT_CHECK = 600.0


def due_days(days, now, send_hour):
    """The days of `days` (YYYY-MM-DD) whose reports may go out at now."""
    today = day_of(now)
    due = []
    for day in days:
        midnight_after = calendar.timegm(time.strptime(day, "%Y-%m-%d")) + 86400
        if day < today and now >= midnight_after + send_hour * 3600:
            due.append(day)
    return due


class TLSReporting:
    """One delivery worker's part of TLS-RPT (see the module docstring)."""

    def __init__(self, config, counter, store, owner):
        self.config = config
        self.counter = counter
        self.store = store
        self.owner = owner
        self._next_check = time.time() + random.uniform(5.0, 30.0)

    def run(self):
        while True:
            gevent.sleep(FLUSH_EVERY)
            self.flush()
            if time.time() >= self._next_check:
                self._next_check = time.time() + REPORT_CHECK * random.uniform(0.9, 1.1)
                self.send_due()

    def flush(self, thread=True):
        if not self.counter.pending:
            return
        tallies = self.counter.take()
        try:
            if thread:
                in_thread(self.store.add, tallies)
            else:
                self.store.add(tallies)
        except Exception as error:       # statistics: logged, never a worker's end
            log.error("TLS-RPT: cannot record %d count(s) in the spool: %s",
                      len(tallies), error)

    def send_due(self, now=None):
        now = time.time() if now is None else now
        try:
            # First the posts that failed on earlier runs, then the new days' reports.
            for domain, text in retry_posts(self.store, self.config, now=now):
                log.info("TLS-RPT: %s: %s", domain, text)
            for day in due_days(self.store.days(), now, self.config.tlsrpt.send_hour):
                outcome = send_day(self.store, self.config, day, self.owner, now=now)
                for domain, text in outcome or ():
                    log.info("TLS-RPT: %s: %s", domain, text)
            cutoff = day_of(now - self.config.tlsrpt.keep_days * 86400)
            self.store.prune(cutoff)
        except Exception as error:
            log.error("TLS-RPT: daily reports: %s", error)

    def close(self):
        self.flush(thread=False)
        self.store.close()
