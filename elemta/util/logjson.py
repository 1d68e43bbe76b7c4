"""The JSON log format (logging.format: json): one JSON object per line, for Loki,
Elasticsearch, journald's JSON-aware viewers and `jq`.

Used by every process through elemta.util.logs. The keys are stable (elemta.conf(5) and
elemtactl(8) list them): time, level, process, pid, program, then the facts the log call
gave as extra= fields (FIELDS, in that order, each only when given), then message, the
same text the text format writes. The facts come from the caller's own data, so nothing
here parses a message. json.dumps escapes whatever a client sent (quotes, backslashes,
control characters, bytes that are not UTF-8), so every line is valid JSON; ensure_ascii
keeps it valid even for text with lone surrogates. One encode per record: the formatter
reads the record's attributes and dumps one dict.
See also: elemta.util.logs, elemta.report.parse (which reads these lines back),
elemta.util.journal (which sends the same keys to journald as native fields).
"""

import json
import logging
import time

# The facts a log call may pass (extra={...}), in output order. "from" and "to" are
# envelope addresses as given; delay is seconds (a float); size is bytes.
FIELDS = ("queue_id", "event", "client", "helo", "command", "from", "to", "relay", "status",
          "dsn", "delay", "size", "nrcpt", "reason", "restriction", "proto", "sasl_username",
          "uid", "notice_id", "notice")

_process = "elemta"       # which Elemta process this is (set_process), for "process"


def set_process(kind):
    """Name this process in JSON lines: "master", "smtpd", "delivery", ... (the kind in
    its title, "elemta: smtpd")."""
    global _process
    _process = kind


class JsonFormatter(logging.Formatter):
    """A record as one JSON object; see the module docstring for its keys."""

    _LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
               logging.ERROR: "error", logging.CRITICAL: "critical"}

    def __init__(self):
        super().__init__()
        self._second = None         # the whole second last formatted, and its text
        self._stamp = ""
        self._programs = {}

    def format(self, record):
        # default=str: a value a caller passed that JSON has no type for is still written.
        return json.dumps(self.record_object(record), ensure_ascii=True, default=str)

    def record_object(self, record):
        """The record as the dict of stable keys a JSON line holds (also what the
        journal target writes as its ELEMTA_* fields, elemta.util.journal)."""
        created = record.created
        second = int(created)
        if second != self._second:              # strftime once a second, not per record
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        program = self._programs.get(record.name)
        if program is None:
            program = self._programs[record.name] = record.name.partition(".")[2] or "elemta"
        data = {"time": "%s.%03dZ" % (self._stamp, (created - second) * 1000),
                "level": self._LEVELS.get(record.levelno) or record.levelname.lower(),
                "process": _process, "pid": record.process, "program": program}
        attributes = record.__dict__
        for key in FIELDS:
            value = attributes.get(key)
            if value is not None:
                data[key] = value
        message = record.getMessage()
        data["message"] = message
        if record.exc_info:         # as the text format writes it: after the message
            data["exception"] = self.formatException(record.exc_info)
        return data
