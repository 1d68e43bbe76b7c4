"""SMTP TLS Reporting (RFC 8460): what outbound TLS sessions under MTA-STS and DANE
policies came to, counted per UTC day and policy, and the daily report to each policy
domain.

Shared by the delivery workers (they count, and send each day's reports) and elemtactl
(`tlsrpt show`, `tlsrpt send`); owned by neither, so neither imports the other:

    results   the RFC's result types and the ReportedPolicy a session was under
    store     the counts on disk (spool/tlsrpt, LMDB) and the claim on a day's sending
    counter   the delivery worker's buffer of counts, written in batches
    report    the JSON report, its gzip and the MIME message; the rua of a TXT record
    post      a report POSTed to an https: rua
    send      one day's reports queued through the maildrop and posted, one per policy
              domain; failed posts tried again
"""
