"""Prometheus metrics shared by every Elemta process (prometheus-client multiprocess mode).

Each process writes its counters, histograms and live gauges to small mmap'd files named
after its pid in one directory; the api process sums them at scrape time. So:

  master   calls setup(directory, uid, gid) once at start, before forking (the children
           inherit PROMETHEUS_MULTIPROC_DIR and the file-backed values); worker_exited(pid)
           after reaping any child; worker_restarted(kind, reason) when it replaces one.
  children use the metric objects below (CONNECTIONS.labels(...).inc(), ...) and
           count_reply() for every SMTP reply sent.
  api      serves scrape_registry() (see elemta.api.server), which also reads the queue.

Counters of dead processes stay in their files, so totals survive worker restarts and
kill -9; worker_exited() folds a dead child's counters into one archive file per type
(so years of worker recycling do not leave thousands of files to read per scrape) and
removes its live gauges. The fold and every scrape take a lock file in the directory,
so a scrape never sees a dead child's counts twice or not at all.

The directory sits in the spool and belongs to the children's user, who could plant
links in it: the root master never touches it as root. Every file operation of the
master there (the clean-up at start, the fold, its own counter file) runs acting as
that user (elemta.util.eugid.acting_as), as Postfix's master never works in the queue
as root.

Updates reach the files about once a second, and at a process's exit (flush(),
elemta.util.metricvalues): a scrape may be that much behind, and a child killed with
SIGKILL loses its last second's counts.

Metric objects are made on first use, after setup(): prometheus-client chooses between
in-memory and file-backed values when a value is created. Without setup() (tests that run
a server in-process, tools) they are plain in-memory metrics nobody scrapes.
See also: elemta.api.server, elemta.master, issue 3 requirement 5.
"""

import fcntl
import glob
import logging
import os
import stat
from contextlib import contextmanager
from types import SimpleNamespace

from elemta.util.eugid import acting_as, open_nofollow

log = logging.getLogger("elemta.master")

ENV = "PROMETHEUS_MULTIPROC_DIR"
LOCK_NAME = ".lock"
# File types whose values only ever add up (counter, histogram buckets and sums).
_ADDITIVE = ("counter", "histogram", "summary")

# The metric objects, by name; built by _metrics() on first use.
_made = None
# (uid, gid) the root master acts as in the directory (see the module docstring).
_owner = (None, None)


def setup(directory, uid=None, gid=None):
    """Make this process and its future children write metrics under directory.

    Creates it if missing and removes the metric files a previous run left (a new master
    starts from zero, as Prometheus expects of a restarted target). uid, gid: the user the
    children run as; a root master does all of this acting as that user, so the directory
    is theirs and no link planted in it is followed with root's rights. Must run before
    any metric is used in this process, and only by the master holding the spool's lock."""
    global _owner
    if _made is not None:
        raise RuntimeError("metrics.setup() must run before any metric is used")
    directory = os.path.abspath(directory)
    _owner = (uid, gid)
    with _as_owner():
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass
        dir_fd = open_nofollow(directory, os.O_RDONLY, kind=stat.S_IFDIR)
        try:
            for name in os.listdir(dir_fd):
                if name.endswith(".db"):
                    os.unlink(name, dir_fd=dir_fd)     # unlink never follows a link
        finally:
            os.close(dir_fd)
        os.close(_open_lock_file(directory))
    os.environ[ENV] = directory
    from prometheus_client import values
    from elemta.util.metricvalues import BufferedValue
    # Chosen at import, by the environment: choose again. Its files are AllocatedDicts
    # (no SIGBUS on a full spool); it writes them about once a second (issue 20).
    values.ValueClass = BufferedValue


def flush():
    """Write this process's metric changes to its files now (elemta.util.metricvalues
    otherwise does it about once a second); a no-op without setup()."""
    from elemta.util.metricvalues import flush as flush_values
    flush_values()


def _as_owner():
    return acting_as(*_owner)


def directory():
    """The metrics directory of this process, or None when setup() was not called."""
    return os.environ.get(ENV) or None


# Shorter than this, a metric file holds no value (MmapedDict's 8-byte header).
_EMPTY_FILE = 8


def worker_exited(pid):
    """See _fold_dead_child; a file the master may not use (a link planted in the
    directory, say) is one log line, never the master's end."""
    try:
        _fold_dead_child(pid)
    except Exception as exc:       # OSError, a damaged file: never the master's end
        log.warning("metrics: cannot fold the counters of pid %d: %s", pid, exc)


def _fold_dead_child(pid):
    """The master reaped child pid: drop its live gauges, fold its counters into the
    archive. Call it after waitpid and before forking again (so the pid is not reused by
    one of ours meanwhile). A no-op without setup()."""
    path = directory()
    if path is None:
        return
    from prometheus_client import multiprocess
    from elemta.util.metricfiles import AllocatedDict, read_entries, read_value, write_value
    with _as_owner(), _scrape_lock(path, fcntl.LOCK_EX):
        multiprocess.mark_process_dead(pid, path)
        for kind in _ADDITIVE:
            dead = os.path.join(path, "%s_%d.db" % (kind, pid))
            try:
                size = os.path.getsize(dead)
            except FileNotFoundError:
                continue
            if size < _EMPTY_FILE:
                # Killed between creating its file and sizing it: no counts, and a file
                # too short to read would break every scrape until the master stops.
                os.remove(dead)
                continue
            # strict: on a full disk this raises, and the dead file stays for a later fold
            archive = AllocatedDict(os.path.join(path, "%s_archive.db" % kind), strict=True)
            folded = []                 # offsets in `dead` of the values folded
            try:
                for key, value, pos in read_entries(dead):
                    write_value(archive, key, read_value(archive, key) + value)
                    folded.append(pos)
            except BaseException:
                # A full disk, a damaged entry, anything: what is in the archive now is
                # never counted twice.
                _zero_values(dead, folded)
                raise
            finally:
                archive.close()
            os.remove(dead)


def _zero_values(path, positions):
    """Set the values at `positions` (offsets, as metricfiles.read_entries gives them)
    in the metric file at path to zero, after they were folded into the archive and the
    fold stopped part way: the rest waits for a later fold. Written in place, not through
    MmapedDict, which parses the whole file first and so fails again on a damaged
    entry; existing values only: the file neither grows nor needs new pages."""
    from elemta.util.metricfiles import VALUE_SIZE
    zero = bytes(VALUE_SIZE)                    # value 0.0 (and timestamp 0.0)
    fd = open_nofollow(path, os.O_WRONLY)
    try:
        for pos in positions:
            os.pwrite(fd, zero, pos)
    finally:
        os.close(fd)


def worker_restarted(kind, reason):
    """The master replaced a child. kind: smtpd, delivery, pickup, api, local, showq;
    reason: crashed (exited or killed unasked), heartbeat (killed for silence), cannot_start
    (exited with EX_CANTBOOT: elemta.util.child), retired (max_use or max_idle), reload
    (SIGHUP)."""
    try:
        with _as_owner():        # the first count creates the master's own file
            _metrics().WORKER_RESTARTS.labels(kind, reason).inc()
            flush()              # the master runs no flusher; restarts are rare
    except OSError as exc:
        log.warning("metrics: cannot count a %s restart: %s", kind, exc)


def _open_lock_file(path):
    # Read-only is enough for flock, so the api (the children's user) can take the lock
    # on a file the root master made.
    return open_nofollow(os.path.join(path, LOCK_NAME), os.O_RDONLY | os.O_CREAT, 0o644)


@contextmanager
def _scrape_lock(path, how):
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


def scrape_registry(path=None):
    """A CollectorRegistry that sums every process's metric files (for the api process);
    empty when there is no metrics directory."""
    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry(auto_describe=False)
    path = path or directory()
    if path is not None and os.path.isdir(path):
        registry.register(_LockedMultiProcessCollector(path))
    return registry


class _LockedMultiProcessCollector:
    """prometheus-client's MultiProcessCollector, reading under the directory's lock."""

    def __init__(self, path):
        self.path = path

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector
        flush()                  # this process's own counts, up to now
        with _scrape_lock(self.path, fcntl.LOCK_SH):
            # A process starting up (new workers, a reload) creates its file and sizes
            # it without the lock: a file still shorter than the header holds no value
            # yet, and reading it would fail the whole scrape.
            files = [f for f in glob.glob(os.path.join(self.path, "*.db"))
                     if _size(f) >= _EMPTY_FILE]
            return list(MultiProcessCollector.merge(files, accumulate=True))


def _size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:       # folded away meanwhile
        return 0


# ---- what the smtpd labels its connections and sessions with ------------------------------

def listener_labels(listener):
    """(listener, mode) labels of a configured listener (elemta.config.schema.Listener):
    its address and port as configured ("127.0.0.1:25", "[::]:587") and its mode (smtp,
    submission, smtps). Bounded by the configuration, never by who connects; a listener
    whose address or port changes in a reload is a new series, as it is a new socket."""
    address = listener.address
    if ":" in address:
        address = "[%s]" % address
    return "%s:%d" % (address, listener.port), listener.mode


def per_listener(name, listener, *more):
    """The child of the metric `name` (CONNECTIONS, SESSIONS, SESSIONS_OPEN) for this
    listener and further labels, made once: labels() with its checks and locking, for
    every connection, was a percent of the smtpd's CPU (issue #20)."""
    m = _metrics()
    key = (name, listener, more)
    child = m.listener_children.get(key)
    if child is None:
        child = m.listener_children[key] = getattr(m, name).labels(
            *listener_labels(listener), *more)
    return child


# ---- SMTP replies and what they refuse ----------------------------------------------------

# Commands whose refusal refuses (part of) a message.
_TRANSACTION_COMMANDS = ("MAIL", "RCPT", "DATA", "BDAT")


def rejection_reason(command, code, status):
    """Why a reply to command refuses a message, or None if it refuses none.

    Read from the RFC 3463 enhanced status, the one thing every refusal carries whoever
    made it (protocol core or session). Refusing nothing new: sequence errors (x.5.1, as
    "no valid recipients" after refused RCPTs), 500 (a line that was no command, so the
    last command is not what it answers) and 421 (the session closes)."""
    if (code < 400 or code in (421, 500) or command not in _TRANSACTION_COMMANDS
            or not status):
        return None
    detail = status.split(".", 1)[1]          # "7.1" of "5.7.1"
    content = command in ("DATA", "BDAT")
    if detail == "5.1":
        return None
    if detail == "7.1" and command == "RCPT" and code >= 500:
        return "relay"                        # 554 5.7.1 Relay access denied
    if detail == "1.1" and command == "RCPT":
        return "unknown_user"                 # 550 5.1.1 User unknown (no syntax error)
    if detail == "7.0":
        return "auth"                         # 530 5.7.0 authentication required
    if detail == "3.4":
        return "size"                         # 552 5.3.4 (SIZE= or content)
    if detail.startswith("3."):
        return "storage"                      # 451 4.3.0, 452 4.3.1
    if detail == "5.3":
        return "recipients"                   # 452 4.5.3 too many recipients
    if content and (detail.startswith("6.") or detail == "5.2"):
        return "content"                      # bare CR/LF, NUL, undeclared 8-bit
    if detail.startswith(("5.", "1.", "6.")):
        return "syntax"                       # 501 5.5.4, 501 5.1.7, 553 5.6.7, 555 ...
    return "policy"


def count_token_withheld(reason):
    """The cluster view did not send the api token to a node (see CLUSTER_TOKEN_WITHHELD)."""
    _metrics().CLUSTER_TOKEN_WITHHELD.labels(reason).inc()


def count_refusal(restriction, stage):
    """A restriction (elemta.restrictions.catalogue: a core check or a plugin's name)
    refused something at stage."""
    _metrics().RESTRICTION_REFUSALS.labels(restriction, stage).inc()


# RFC 8601's result words (section 2.7) for SPF, DKIM, DMARC and ARC; anything else is
# counted as "other", so the label stays a bounded set whatever a library returns.
_AUTHENTICATION_RESULTS = frozenset(("pass", "fail", "softfail", "neutral", "none",
                                     "policy", "temperror", "permerror"))


def count_email_authentication(check, result):
    """An SPF, DKIM, DMARC or ARC check (`check`) gave `result`."""
    if result not in _AUTHENTICATION_RESULTS:
        result = "other"
    _metrics().EMAIL_AUTHENTICATION.labels(check, result).inc()


def count_reply(code, status, command):
    """An SMTP reply went out in answer to command: count it, and the refusal it makes."""
    m = _metrics()
    child = m.reply_children.get(code)
    if child is None:
        child = m.reply_children[code] = m.REPLIES.labels(str(code))
    child.inc()
    if code >= 400:
        reason = rejection_reason(command, code, status)
        if reason is not None:
            m.MESSAGES_REJECTED.labels(reason).inc()


# ---- the metrics --------------------------------------------------------------------------

def _metrics():
    global _made
    if _made is None:
        _made = _make()
    return _made


def __getattr__(name):
    """metrics.CONNECTIONS and friends: made on first use (see the module docstring)."""
    if name.isupper():
        try:
            return getattr(_metrics(), name)
        except AttributeError:
            pass
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def _make():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    registry = CollectorRegistry(auto_describe=False)   # this process's own; never served

    def counter(name, doc, labels=()):
        return Counter(name, doc, labels, registry=registry)

    def histogram(name, doc, buckets, labels=()):
        return Histogram(name, doc, labels, buckets=buckets, registry=registry)

    return SimpleNamespace(
        registry=registry,
        reply_children={},
        listener_children={},    # per_listener(); bounded by the configured listeners
        # smtpd
        CONNECTIONS=counter(
            "elemta_smtpd_connections", "SMTP connections by listener (its address:port), "
            "its mode (smtp, submission, smtps, handover) and outcome (accepted, "
            "refused_draining, refused_not_peer, refused_worker_limit, "
            "refused_client_limit).",
            ("listener", "mode", "outcome")),
        SESSIONS_OPEN=Gauge(
            "elemta_smtpd_sessions_open", "SMTP sessions open now, by listener "
            "(address:port) and its mode.",
            ("listener", "mode"), multiprocess_mode="livesum", registry=registry),
        REPLIES=counter("elemta_smtpd_replies", "SMTP replies sent, by reply code.",
                        ("code",)),
        MESSAGES_ACCEPTED=counter("elemta_smtpd_messages_accepted",
                                  "Messages accepted (250 after end of data)."),
        ACCEPTED_BYTES=counter("elemta_smtpd_accepted_bytes",
                               "Size of accepted messages as queued, in bytes."),
        MESSAGES_REJECTED=counter(
            "elemta_smtpd_messages_rejected", "Refused MAIL, RCPT or message content, by "
            "reason (relay, unknown_user, size, syntax, content, storage, auth, "
            "recipients, policy).",
            ("reason",)),
        CLUSTER_TOKEN_WITHHELD=counter(
            "elemta_cluster_api_token_withheld", "Requests to another node's api not made, "
            "so as not to send it the api token, by reason (plain_http: an http:// "
            "api_url that cluster.api_plain_http does not allow; outside_peer_networks).",
            ("reason",)),
        RESTRICTION_REFUSALS=counter(
            "elemta_smtpd_restriction_refusals", "Refusals (4xx and 5xx) by the restriction "
            "that gave them (elemtactl restrictions lists them: core checks and plugins) and "
            "stage (connect, helo, auth, mail, rcpt, data, end_of_data).",
            ("restriction", "stage")),
        TLS_SESSIONS=counter("elemta_smtpd_tls_sessions",
                             "TLS handshakes completed (STARTTLS or smtps), by TLS version.",
                             ("version",)),
        TLS_FAILURES=counter("elemta_smtpd_tls_handshake_failures",
                             "TLS handshakes that failed or timed out."),
        TLS_CERTIFICATE_EXPIRY=Gauge(
            "elemta_tls_certificate_expiry_timestamp_seconds", "When a certificate "
            "expires (its notAfter), as a Unix time, by certificate file: the one the "
            "smtpd workers serve (tls.cert_file, or the ACME certificate's), and each "
            "acme.certificates entry's fullchain.pem (set by the acme process); the "
            "earliest when workers of two reloads serve two.",
            ("file",), multiprocess_mode="livemin", registry=registry),
        SESSIONS=counter(
            "elemta_smtpd_sessions", "SMTP sessions ended, by listener (address:port), its "
            "mode and how they ended (quit, timeout, lost, tls_failed, refused, dropped, "
            "aborted).",
            ("listener", "mode", "result")),
        AUTH_ATTEMPTS=counter("elemta_smtpd_auth_attempts",
                              "SMTP AUTH credential checks, by mechanism (PLAIN, LOGIN, "
                              "other) and result (success, failure, tempfail, "
                              "unsupported).",
                              ("mechanism", "result")),
        COMMIT_BATCH=histogram(
            "elemta_smtpd_commit_batch_messages",
            "Messages made durable together by one group commit.",
            (1, 2, 4, 8, 16, 32, 64, 128, 256)),
        COMMIT_FLUSH=histogram(
            "elemta_smtpd_commit_flush_seconds",
            "Time one group commit took to make its batch durable, in seconds.",
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)),
        # delivery (counted by the delivery worker)
        DELIVERIES=counter(
            "elemta_deliveries", "Recipient delivery attempts by result (sent, deferred, "
            "bounced), transport (smtp, lmtp, local, error; none: not routed) and "
            "domain_class (a delivery.domain_classes name, else local, virtual, relay, "
            "relayhost, remote, unknown).",
            ("result", "transport", "domain_class")),
        DEFERRALS=counter(
            "elemta_delivery_deferrals", "Recipient deliveries deferred, by reason (dns, "
            "connect, timeout, lost_connection, protocol, tls, policy: MTA-STS, DANE or "
            "REQUIRETLS; auth; the next hop's 4xx by stage: greeting, helo, mail, rcpt, "
            "data, end_of_data; lookup: a table; local; plugin; internal; other), "
            "transport and domain_class (as elemta_deliveries_total).",
            ("reason", "transport", "domain_class")),
        NOTICES=counter(
            "elemta_delivery_notices", "Notices to senders queued (RFC 3464 DSNs), by "
            "kind (failure: a bounce; delay: a delay warning; success: a success DSN).",
            ("kind",)),
        DELIVERY_DELAY=histogram(
            "elemta_delivery_delay_seconds", "From arrival to a recipient's final result "
            "(sent or bounced), in seconds: Postfix's delay=.",
            (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)),
        DELIVERY_SESSIONS=counter(
            "elemta_delivery_sessions", "SMTP and LMTP sessions the delivery workers "
            "opened, by transport (smtp, lmtp) and TLS version (none: plaintext).",
            ("transport", "tls")),
        DELIVERY_TLS_FAILURES=counter(
            "elemta_delivery_tls_failures", "Delivery sessions given up for TLS (the "
            "handshake failed, or TLS was required and not offered or refused), by "
            "transport.", ("transport",)),
        DELIVERY_ATTEMPT=histogram(
            "elemta_delivery_attempt_seconds",
            "Time one delivery attempt (one SMTP/LMTP transaction) took, in seconds.",
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)),
        # content scanners (elemta.plugins.scanner: the clamav and rspamd plugins, in
        # smtpd and pickup)
        SCANNER_VERDICTS=counter(
            "elemta_scanner_verdicts", "Messages a content scanner judged, by scanner "
            "(clamav, rspamd), its result (clamav: clean, infected, unscanned; rspamd: "
            "no_action, add_header, rewrite_subject, greylist, soft_reject, reject, "
            "unknown, unscanned) and what Elemta did (pass, header, reject, tempfail, hold).",
            ("scanner", "result", "action")),
        SCANNER_SECONDS=histogram(
            "elemta_scanner_scan_seconds", "Time one message took a content scanner to "
            "judge, from connecting to its answer, in seconds.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ("scanner",)),
        SCANNER_FAILURES=counter(
            "elemta_scanner_failures", "Scans that gave no verdict, by scanner and kind "
            "(error: unreachable or a bad answer; timeout: the plugin's timeout).",
            ("scanner", "kind")),
        RSPAMD_SCORE=histogram(
            "elemta_rspamd_score", "Rspamd's score of each message it judged.",
            (-10, -5, -2, 0, 1, 2, 4, 6, 8, 10, 15, 20, 30, 50)),
        # SPF, DKIM, DMARC, ARC and greylisting (their plugins, in smtpd)
        EMAIL_AUTHENTICATION=counter(
            "elemta_email_authentication_results", "SPF, DKIM, DMARC and ARC results, as "
            "Authentication-Results has them (RFC 8601 result words), by check (spf, dkim, "
            "dmarc, arc) and result.", ("check", "result")),
        GREYLIST=counter(
            "elemta_greylist_checks", "Recipients greylisting looked at, by outcome "
            "(pass: a known triplet; defer: 451 4.7.1; exempt: a client or domain not "
            "greylisted; tempfail: the shared store could not answer).", ("outcome",)),
        # milters (elemta.milter.chain, in smtpd and pickup)
        MILTER_VERDICTS=counter(
            "elemta_milter_verdicts", "Milter answers, by milter (its configured name), "
            "stage (connect, helo, mail, rcpt, data, header, eoh, body, eom, unknown) and "
            "action (continue, accept, reject, tempfail, discard, quarantine, skip; a "
            "reply code of the milter's own counts as reject or tempfail by its class).",
            ("milter", "stage", "action")),
        MILTER_FAILURES=counter(
            "elemta_milter_failures", "Milters that could not be reached, timed out or "
            "broke the protocol (their default_action applied), by milter, stage and kind "
            "(connect: refused or nothing listens; timeout: connecting, writing or waiting "
            "for an answer took too long; io: the connection broke or the milter closed "
            "it; protocol: a packet the protocol does not allow).",
            ("milter", "stage", "kind")),
        MILTER_SECONDS=histogram(
            "elemta_milter_scan_seconds", "Time one milter took over one message's content "
            "(header fields, body and end of message, to its answer), in seconds.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ("milter",)),
        # the cluster's shared state store (elemta.sharedstate.guard, in smtpd)
        CLUSTER_STORE_UP=Gauge(
            "elemta_cluster_store_up", "1 while the shared state store (cluster.store) "
            "answers, 0 during an outage; the lowest of the processes that use it.",
            multiprocess_mode="livemin", registry=registry),
        CLUSTER_STORE_OUTAGES=counter(
            "elemta_cluster_store_outages", "Outages of the shared state store seen by "
            "this node (each is logged once, when it begins, by the first process to "
            "see it)."),
        CLUSTER_STORE_FALLBACKS=counter(
            "elemta_cluster_store_fallbacks", "Checks made without the shared state store, "
            "by check (ratelimit, greylist, auth, dnsbl) and what they did instead "
            "(local, tempfail).", ("check", "policy")),
        # the ACME client (elemta.acme.worker, in the acme process)
        ACME_RENEWALS=counter(
            "elemta_acme_renewals", "ACME orders of a certificate (first issue or "
            "renewal), by certificate (its acme.certificates name) and result (success, "
            "failure).", ("certificate", "result")),
        ACME_LAST_RENEWAL_SUCCESS=Gauge(
            "elemta_acme_last_renewal_success", "1 if the latest ACME order of a "
            "certificate succeeded, 0 if it failed (set at each attempt).",
            ("certificate",), multiprocess_mode="livemax", registry=registry),
        ACME_LAST_RENEWAL_ATTEMPT=Gauge(
            "elemta_acme_last_renewal_attempt_timestamp_seconds", "When the latest ACME "
            "order of a certificate ended, as a Unix time.",
            ("certificate",), multiprocess_mode="livemax", registry=registry),
        # master
        WORKER_RESTARTS=counter(
            "elemta_worker_restarts", "Children the master replaced, by kind (smtpd, "
            "delivery, pickup, api, local, showq) and reason.", ("kind", "reason")),
    )
