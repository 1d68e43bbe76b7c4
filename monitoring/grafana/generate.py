"""Elemta's Grafana dashboards as code: writes elemta-*.json beside this file.

Run by `make dashboards` with the development venv, whose test extras hold Grafana's
Python SDK (grafana-foundation-sdk, which needs Python 3.11 or newer; the dashboards, not
the daemon, depend on it). The JSON it writes is committed: operators import it as is,
and tests/test_dashboards.py runs every panel's query against a real Prometheus scraping
a live Elemta. Change this file, run `make dashboards`, commit both.

Every query uses only the metrics Elemta exports (elemta/metrics.py, elemta/api/
collectors.py; the Metrics section of elemta(8)), filtered by the dashboard's $instance
variable, and reads from the Prometheus data source chosen in its $datasource variable.
Written for Python 3.9 syntax, like the rest of the tree, though the SDK itself needs 3.11.
"""

import os
import sys

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import (Dashboard, DatasourceVariable,
                                                      QueryVariable, Row)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (LegendDisplayMode, LegendPlacement,
                                                  StackingMode)
from grafana_foundation_sdk.models.dashboard import (DashboardCursorSync, DataSourceRef,
                                                     VariableOption, VariableRefresh,
                                                     VariableSort)

HERE = os.path.dirname(os.path.abspath(__file__))

# The data source every panel and variable reads from: the one picked in $datasource.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every selector carries this, so one dashboard serves one host or a whole fleet.
INSTANCE = 'instance=~"$instance"'
# A metric the api process always exports (one sample per queue state): the hosts
# offered in $instance are those that have it.
ALWAYS_THERE = "elemta_queue_messages"
TAGS = ["elemta", "mail"]
# Grafana's custom units: the text after "suffix:" follows the value as written.
MESSAGES_PER_SECOND = "suffix: msg/s"
PER_SECOND = "suffix:/s"


# ---- building blocks ---------------------------------------------------------------------

def selector(metric, matchers=""):
    """metric{instance=~"$instance", matchers}."""
    return "%s{%s}" % (metric, ", ".join(m for m in (INSTANCE, matchers) if m))


def rate(metric, by="", matchers=""):
    """Per-second rate of a counter, summed (by the given labels) across processes/hosts."""
    grouping = " by (%s)" % by if by else ""
    return "sum%s (rate(%s[$__rate_interval]))" % (grouping, selector(metric, matchers))


def quantile(q, histogram):
    """The q-quantile of a histogram's observations over the rate interval."""
    return "histogram_quantile(%s, sum by (le) (rate(%s[$__rate_interval])))" % (
        q, selector(histogram + "_bucket"))


def query(expr, legend="__auto"):
    return Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def quantile_queries(histogram):
    return [query(quantile(q, histogram), "p%d" % round(q * 100))
            for q in (0.5, 0.9, 0.99)]


def timeseries(title, description, unit, queries, stacked=False, width=12):
    panel = (Timeseries().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).span(width).height(8).min(0).fill_opacity(10)
             .legend(common_builders.VizLegendOptions()
                     .display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM).show_legend(True)))
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(StackingMode.NORMAL))
    for ref_id, q in zip("ABCDEFGH", queries):     # Grafana names each query of a panel
        panel = panel.with_target(q.ref_id(ref_id))
    return panel


def stat(title, description, unit, expr, width=6):
    return (Stat().title(title).description(description).unit(unit)
            .datasource(DATASOURCE).span(width).height(4)
            .with_target(query(expr, title).instant().ref_id("A")))


def dashboard(uid, title, description):
    return (Dashboard(title).uid(uid).description(description).tags(TAGS)
            .editable().tooltip(DashboardCursorSync.CROSSHAIR)
            .time("now-6h", "now").refresh("1m").timezone("browser")
            .with_variable(DatasourceVariable("datasource").label("Data source")
                           .type("prometheus"))
            .with_variable(QueryVariable("instance").label("Instance")
                           .datasource(DATASOURCE)
                           .query("label_values(%s, instance)" % ALWAYS_THERE)
                           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                           .sort(VariableSort.ALPHABETICAL_ASC)
                           .multi(True).include_all(True).all_value(".*")
                           .current(VariableOption(selected=True, text="All",
                                                   value="$__all"))))


# ---- the panels the dashboards share -----------------------------------------------------

def queue_by_state():
    return timeseries(
        "Queue by state", "Messages in the queue now, by state (elemta_queue_messages): "
        "incoming, active, deferred, hold, failed.", "short",
        [query("sum by (state) (%s)" % selector("elemta_queue_messages"), "{{state}}")],
        stacked=True)


def deliveries_by_result():
    return timeseries(
        "Deliveries by result", "Recipient delivery attempts per second, by result: "
        "sent, deferred (tried again later), bounced (a DSN goes back).", PER_SECOND,
        [query(rate("elemta_deliveries_total", "result"), "{{result}}")], stacked=True)


def delivery_latency(width=12):
    return timeseries(
        "Delivery latency from arrival", "From arrival to each recipient's final result "
        "(sent or bounced): Postfix's delay=. Quantiles of elemta_delivery_delay_seconds.",
        "s", quantile_queries("elemta_delivery_delay_seconds"), width=width)


# ---- the dashboards ----------------------------------------------------------------------

def overview():
    accepted = "elemta_smtpd_messages_accepted_total"
    return (
        dashboard("elemta-overview", "Elemta / Overview",
                  "Mail in and out, what is refused, the queue and how long delivery "
                  "takes.")
        .with_row(Row("Now"))
        .with_panel(stat("Accepted", "Messages accepted (250 after the end of data) over "
                         "the dashboard's time range.", "short",
                         "sum(increase(%s[$__range]))" % selector(accepted)))
        .with_panel(stat("Delivered", "Recipients delivered (result sent) over the "
                         "dashboard's time range.", "short",
                         "sum(increase(%s[$__range]))"
                         % selector("elemta_deliveries_total", 'result="sent"')))
        .with_panel(stat("In the queue", "Messages in the queue now, every state.", "short",
                         "sum(%s)" % selector("elemta_queue_messages")))
        .with_panel(stat("Oldest message", "Age of the oldest message in the queue, "
                         "whatever its state.", "s",
                         "time() - min(%s)"
                         % selector("elemta_queue_oldest_arrival_timestamp_seconds")))
        .with_row(Row("Traffic"))
        .with_panel(timeseries(
            "Messages in", "Messages accepted per second (elemta_smtpd_messages_accepted).",
            MESSAGES_PER_SECOND, [query(rate(accepted), "accepted")]))
        .with_panel(timeseries(
            "Bytes in", "Size of the messages accepted, as queued, per second.", "Bps",
            [query(rate("elemta_smtpd_accepted_bytes_total"), "accepted")]))
        .with_panel(deliveries_by_result())
        .with_panel(timeseries(
            "Rejections by reason", "MAIL, RCPT or content refused per second, by "
            "reason: relay (relay access denied), size, syntax, content, storage, auth, "
            "recipients, policy (restrictions and plugins).", PER_SECOND,
            [query(rate("elemta_smtpd_messages_rejected_total", "reason"), "{{reason}}")],
            stacked=True))
        .with_row(Row("Queue and latency"))
        .with_panel(queue_by_state())
        .with_panel(delivery_latency())
        .with_panel(timeseries(
            "Spool space free", "Share of the spool's file system Elemta may still use; "
            "new mail is refused below queue.min_free_space.", "percentunit",
            [query("min(%s / %s)" % (selector("elemta_spool_filesystem_avail_bytes"),
                                     selector("elemta_spool_filesystem_size_bytes")),
                   "free")]))
        .with_panel(timeseries(
            "SMTP replies by code", "Replies the smtpd workers sent per second, by code.",
            PER_SECOND, [query(rate("elemta_smtpd_replies_total", "code"), "{{code}}")]))
        .with_panel(timeseries(
            "Connections by listener and outcome", "SMTP connections per second, by "
            "listener (address:port) and outcome: accepted, or refused with 421 "
            "(refused_client_limit: limits.connections_per_client; refused_worker_limit: "
            "limits.connections_per_worker; refused_draining: elemtactl drain).",
            PER_SECOND,
            [query(rate("elemta_smtpd_connections_total", "listener, mode, outcome"),
                   "{{listener}} ({{mode}}) {{outcome}}")], stacked=True))
        .with_panel(timeseries(
            "Sessions by how they ended", "SMTP sessions ended per second, by listener "
            "(address:port) and how: quit, timeout, lost (the client went away), "
            "tls_failed, refused, dropped, aborted (the worker stopped).", PER_SECOND,
            [query(rate("elemta_smtpd_sessions_total", "listener, mode, result"),
                   "{{listener}} ({{mode}}) {{result}}")], stacked=True))
    )


def queue_and_delivery():
    return (
        dashboard("elemta-queue-delivery", "Elemta / Queue and delivery",
                  "The queue by state and age, delivery results and times by transport and "
                  "destination domain class, deferrals by reason, "
                  "and the workers the master had to replace.")
        .with_row(Row("Queue"))
        .with_panel(queue_by_state())
        .with_panel(timeseries(
            "Oldest message by state", "Age of the oldest message in each state (no line "
            "for an empty state): a deferred message growing old is mail not leaving.",
            "s", [query("time() - min by (state) (%s)"
                        % selector("elemta_queue_oldest_arrival_timestamp_seconds"),
                        "{{state}}")]))
        .with_row(Row("Delivery"))
        .with_panel(deliveries_by_result())
        .with_panel(timeseries(
            "Deferrals by reason", "Recipient deliveries deferred per second (a temporary "
            "failure, tried again later), by why: dns, connect, timeout, lost_connection, "
            "protocol, tls, policy (MTA-STS, DANE, REQUIRETLS), auth, the next hop's 4xx "
            "by stage (greeting, helo, mail, rcpt, data, end_of_data), lookup, local, "
            "plugin, internal, other. The deferred queue is in Queue by state; the log's "
            "status=deferred lines have the replies.", PER_SECOND,
            [query(rate("elemta_delivery_deferrals_total", "reason"), "{{reason}}")],
            stacked=True))
        .with_panel(timeseries(
            "Delivery failure ratio", "Share of recipient delivery attempts that did not "
            "succeed (deferred or bounced).", "percentunit",
            [query("%s / %s" % (rate("elemta_deliveries_total", matchers='result!="sent"'),
                                rate("elemta_deliveries_total")), "not sent")]))
        .with_panel(timeseries(
            "Deliveries by transport", "Recipient delivery attempts per second, by "
            "transport (smtp, lmtp, local, error) and result.", PER_SECOND,
            [query(rate("elemta_deliveries_total", "transport, result"),
                   "{{transport}} {{result}}")], stacked=True))
        .with_panel(timeseries(
            "Deliveries by domain class", "Recipient delivery attempts per second, by "
            "destination domain class (delivery.domain_classes names, else local, "
            "virtual, relay, relayhost, remote) and result.", PER_SECOND,
            [query(rate("elemta_deliveries_total", "domain_class, result"),
                   "{{domain_class}} {{result}}")], stacked=True))
        .with_panel(timeseries(
            "Deferrals by domain class and reason", "Recipient deliveries deferred per "
            "second, by destination domain class and reason: which destinations hold "
            "mail back, and why (a provider's 4xx to RCPT, a relay host that times out).",
            PER_SECOND,
            [query(rate("elemta_delivery_deferrals_total", "domain_class, reason"),
                   "{{domain_class}} {{reason}}")], stacked=True))
        .with_panel(timeseries(
            "Notices sent", "Notices queued to senders per second: failure (bounces), "
            "delay warnings, success DSNs.", PER_SECOND,
            [query(rate("elemta_delivery_notices_total", "kind"), "{{kind}}")]))
        .with_panel(timeseries(
            "Outbound sessions by TLS version", "SMTP and LMTP connections to next hops "
            "per second, by transport and TLS version (none: plain text).", PER_SECOND,
            [query(rate("elemta_delivery_sessions_total", "transport, tls"),
                   "{{transport}} {{tls}}")], stacked=True))
        .with_panel(timeseries(
            "Delivery attempt time", "Time one delivery attempt (one SMTP or LMTP "
            "transaction) took: quantiles of elemta_delivery_attempt_seconds.", "s",
            quantile_queries("elemta_delivery_attempt_seconds")))
        .with_panel(delivery_latency())
        .with_row(Row("Queue writes"))
        .with_panel(timeseries(
            "Group commit size", "Messages the smtpd workers made durable together by "
            "one group commit (one fsync), on average.", "short",
            [query("%s / %s" % (rate("elemta_smtpd_commit_batch_messages_sum"),
                                rate("elemta_smtpd_commit_batch_messages_count")),
                   "messages per commit")]))
        .with_panel(timeseries(
            "Group commit flush time", "Time one group commit took to make its batch "
            "durable: quantiles of elemta_smtpd_commit_flush_seconds. Every 250 to a "
            "message waits for its commit.", "s",
            quantile_queries("elemta_smtpd_commit_flush_seconds")))
        .with_row(Row("Processes"))
        .with_panel(timeseries(
            "Worker restarts", "Children the master replaced, by kind and reason (crashed, "
            "heartbeat, cannot_start, retired, reload); crashed and heartbeat are trouble.",
            "short",
            [query("sum by (kind, reason) (increase(%s[$__rate_interval]))"
                   % selector("elemta_worker_restarts_total"), "{{kind}} {{reason}}")],
            width=24))
    )


def security():
    refusals = "elemta_smtpd_restriction_refusals_total"
    return (
        dashboard("elemta-security", "Elemta / Security",
                  "Authentication, restrictions and rate limits, TLS, and what the content "
                  "scanners and milters decided.")
        .with_row(Row("Clients"))
        .with_panel(timeseries(
            "AUTH attempts by mechanism and result", "SMTP AUTH credential checks per "
            "second, by mechanism (PLAIN, LOGIN, other) and result: success, failure "
            "(wrong credentials: many are a password-guessing attack), tempfail.",
            PER_SECOND,
            [query(rate("elemta_smtpd_auth_attempts_total", "mechanism, result"),
                   "{{mechanism}} {{result}}")]))
        .with_panel(timeseries(
            "Relay attempts refused", "RCPTs refused with relay access denied, per second: "
            "clients trying to use this host as an open relay.", PER_SECOND,
            [query(rate("elemta_smtpd_messages_rejected_total", matchers='reason="relay"'),
                   "relay denied")]))
        .with_panel(timeseries(
            "Refusals by restriction", "Refusals (4xx and 5xx) per second by the "
            "restriction that gave them (elemtactl restrictions lists them) and stage.",
            PER_SECOND,
            [query(rate(refusals, "restriction, stage"), "{{restriction}} at {{stage}}")],
            stacked=True))
        .with_panel(timeseries(
            "Rate-limit refusals", "Clients refused for going over a rate limit (the "
            "ratelimit restriction: connections, messages or recipients per time unit), "
            "per second, by stage.", PER_SECOND,
            [query(rate(refusals, "stage", 'restriction="ratelimit"'), "{{stage}}")]))
        .with_row(Row("Senders"))
        .with_panel(timeseries(
            "SPF, DKIM, DMARC and ARC results", "Results of the sender authentication "
            "checks per second, by check and result (RFC 8601 words: pass, fail, "
            "softfail, neutral, none, temperror, permerror...).", PER_SECOND,
            [query(rate("elemta_email_authentication_results_total", "check, result"),
                   "{{check}} {{result}}")], stacked=True))
        .with_panel(timeseries(
            "Greylisting", "Greylisting checks per second, by outcome: pass (retried after "
            "the delay), defer (451, first try), exempt, tempfail (the shared store did "
            "not answer).", PER_SECOND,
            [query(rate("elemta_greylist_checks_total", "outcome"), "{{outcome}}")],
            stacked=True))
        .with_row(Row("TLS"))
        .with_panel(timeseries(
            "TLS share", "TLS sessions (STARTTLS or smtps) per accepted connection.",
            "percentunit",
            [query("%s / %s" % (rate("elemta_smtpd_tls_sessions_total"),
                                rate("elemta_smtpd_connections_total",
                                     matchers='outcome="accepted"')), "TLS")]))
        .with_panel(timeseries(
            "TLS sessions by version, handshake failures", "TLS handshakes completed per "
            "second by protocol version, and handshakes that failed or timed out.",
            PER_SECOND,
            [query(rate("elemta_smtpd_tls_sessions_total", "version"), "{{version}}"),
             query(rate("elemta_smtpd_tls_handshake_failures_total"),
                   "handshake failures")]))
        .with_panel(timeseries(
            "Certificate expiry", "Time left before the certificate the smtpd workers "
            "serve expires, by certificate file.", "s",
            [query("min by (file) (%s) - time()"
                   % selector("elemta_tls_certificate_expiry_timestamp_seconds"),
                   "{{file}}")], width=24))
        .with_row(Row("Content"))
        .with_panel(timeseries(
            "Scanner verdicts", "Messages the content scanners judged per second, by "
            "scanner, their result and what Elemta did.", PER_SECOND,
            [query(rate("elemta_scanner_verdicts_total", "scanner, result, action"),
                   "{{scanner}} {{result}}: {{action}}")], stacked=True))
        .with_panel(timeseries(
            "Scanner failures", "Scans that gave no verdict per second (the scanner "
            "unreachable, a bad answer, a timeout), by scanner and kind.", PER_SECOND,
            [query(rate("elemta_scanner_failures_total", "scanner, kind"),
                   "{{scanner}} {{kind}}")]))
        .with_panel(timeseries(
            "Milter verdicts", "Milter answers per second, by milter and action.",
            PER_SECOND,
            [query(rate("elemta_milter_verdicts_total", "milter, action"),
                   "{{milter}}: {{action}}")], stacked=True))
        .with_panel(timeseries(
            "Milter failures", "Milters unreachable, timed out or breaking the protocol, "
            "per second (their default_action applied), by milter and kind.", PER_SECOND,
            [query(rate("elemta_milter_failures_total", "milter, kind"),
                   "{{milter}} {{kind}}")]))
    )


DASHBOARDS = {
    "elemta-overview.json": overview,
    "elemta-queue-delivery.json": queue_and_delivery,
    "elemta-security.json": security,
}


def build(make):
    """The dashboard model make() builds, its panels numbered (Grafana finds a panel by
    its id: the SDK leaves every one at 0)."""
    model = make().build()
    for number, panel in enumerate(model.panels, 1):
        panel.id_val = number
    return model


def main(directory=HERE):
    encoder = JSONEncoder(sort_keys=True, indent=2)
    for name, make in DASHBOARDS.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(encoder.encode(build(make)) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
