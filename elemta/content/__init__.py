"""Content inspection as the message streams in: Postfix's cleanup checks on headers and
body lines (header_checks(5)) and the Received hop count (hopcount_limit).

Below the process packages, like elemta.maps: the smtpd uses it (and pickup may), and it
imports only elemta.maps, elemta.smtp.replies and elemta.util.

    scanner   ContentScanner: bytes in, logical (unfolded) header lines and body lines
              out, each classed as Postfix classes them (primary, MIME, nested header;
              body line), with a small MIME boundary state machine; never holds more
              than one logical line
    actions   the action words of a check table's result (REJECT, HOLD, DISCARD, WARN,
              IGNORE, PREPEND, REPLACE, REDIRECT, DUNNO, OK), parsed
    tablespec ActionTableSpec: the config type of a check table, whose results are
              checked as actions with the config (file:line)
    checks    ContentChecks (the tables of one config) and ContentFilter (one message):
              feed() returns the bytes to write, edited (IGNORE, PREPEND, REPLACE), and
              the filter ends with a verdict (reject, discard, hold, redirect)

See also: header_checks(5), elemta.smtpd.session (on_data_chunk feeds the filter).
"""
