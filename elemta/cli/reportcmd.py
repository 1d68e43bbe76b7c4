"""elemtactl report: a traffic summary from the log, as pflogsumm gives for Postfix's.

Reads the files named by --log (several: rotated ones too; "-" for standard input, as
from `journalctl -u elemta -o short`), else logging.target when it is a file; text or
JSON lines alike (elemta.report.parse). --since keeps the last stretch of time only.
Prints the totals, delivery delays and the top tables, or all of it as JSON (--json).
See also: elemta.report.summary, man/elemtactl.8.
"""

import json
import os
import re
import sys
import time
from typing import List, Optional

from elemta.cli.failure import Failure

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
DEFAULT_TOP = 10


def parse_duration(text: str) -> float:
    """"24h" -> 86400.0; a bare number is seconds."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise Failure(os.EX_USAGE, "--since %s: not a length of time (say 90s, 30m, 24h, "
                                   "7d or 2w)" % text)
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def cmd_report(args) -> int:
    """report: summarise the mail traffic in the log (received, delivered, deferred,
    bounced, rejected by reason, top senders and recipients, delivery delays)"""
    from elemta.report.parse import read_events
    from elemta.report.summary import Summary
    now = time.time()
    since = now - parse_duration(args.since) if args.since else None
    summary = Summary()
    for path in _log_paths(args):
        for stream in _opened(path):
            with stream:
                summary.add_all(read_events(stream, now), since)
    if args.json:
        print(json.dumps(summary.as_dict(args.top), indent=2, sort_keys=False))
    else:
        sys.stdout.write(render(summary, args.top, args.since))
    return 0


def _log_paths(args) -> List[str]:
    if args.log:
        return args.log
    from elemta.cli.config_finder import find_config
    target = find_config(getattr(args, "config", None)).logging.target
    if not target.startswith("/"):
        raise Failure(os.EX_NOINPUT, "logging.target is %s, not a file: name the log with "
                                     "--log FILE (under systemd: journalctl -u elemta -o "
                                     "short | elemtactl report --log -)" % target)
    return [target]


def _opened(path: str):
    """The file to read (a list of one), bad bytes replaced: a log line may hold any."""
    if path == "-":
        return [open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)]
    try:
        return [open(path, encoding="utf-8", errors="replace")]
    except OSError as exc:
        code = os.EX_NOINPUT if isinstance(exc, FileNotFoundError) else os.EX_IOERR
        if isinstance(exc, PermissionError):
            code = os.EX_NOPERM
        raise Failure(code, "%s: %s" % (path, exc.strerror or exc)) from None


def _when(stamp: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def render(summary, top: int = DEFAULT_TOP, since: Optional[str] = None) -> str:
    """The report as an admin reads it, pflogsumm's sections in its order."""
    data = summary.as_dict(top)
    out = ["Elemta traffic report: %s to %s%s" % (
        _when(data["first"]), _when(data["last"]), " (last %s)" % since if since else ""),
        "", "Grand totals", "------------"]
    for label, key in (("received", "received"), ("delivered", "delivered"),
                       ("deferred", "deferred"), ("bounced", "bounced"),
                       ("rejected", "rejected"), ("held", "held"),
                       ("discarded", "discarded"), ("bounce notices", "bounce_notices"),
                       ("bytes received", "bytes_received"),
                       ("bytes delivered", "bytes_delivered"),
                       ("senders", "senders"), ("recipients", "recipients")):
        line = "%8d  %s" % (data[key], label)
        if key == "deferred":
            line += " (%d deferrals)" % data["deferrals"]
        out.append(line)
    out += ["", "Delivery delays (seconds, from arrival, of the recipients delivered)",
            "---------------------------------------------------------------------"]
    delays = data["delays"]
    if delays is None:
        out.append("  none delivered")
    else:
        out.append("  " + "  ".join("%s %.3g" % (name, value)
                                    for name, value in delays.items()))
    for title, key in (("Rejected, by restriction and reason", "rejects"),
                       ("Held, by filter and reason", "holds"),
                       ("Discarded, by filter and reason", "discards"),
                       ("Deferrals, by reason", "deferral_reasons"),
                       ("Bounces, by reason", "bounce_reasons"),
                       ("Top senders", "top_senders"),
                       ("Top sender domains", "top_sender_domains"),
                       ("Top recipients", "top_recipients"),
                       ("Top recipient domains", "top_recipient_domains")):
        out += ["", title, "-" * len(title)]
        out += ["%8d  %s" % (row["count"], row["name"]) for row in data[key]] or ["  none"]
    if data["untimed_left_out"]:
        out += ["", "%d event(s) without a time stamp left out by --since"
                % data["untimed_left_out"]]
    return "\n".join(out) + "\n"


def add_command(commands, parser_class, parents) -> None:
    doc = cmd_report.__doc__.split(": ", 1)[1].replace("\n    ", " ")
    sub = commands.add_parser("report", parents=parents, help=doc.split(" (")[0],
                              description=doc)
    sub.add_argument("--since", metavar="TIME",
                     help="only the last TIME of the log: 90s, 30m, 24h, 7d, 2w "
                          "(default: the whole log)")
    sub.add_argument("--log", metavar="FILE", action="append",
                     help="log file to read, text or JSON; repeat for rotated files; - "
                          "for standard input (default: logging.target)")
    sub.add_argument("--top", metavar="N", type=int, default=DEFAULT_TOP,
                     help="lines in each table (default: %d)" % DEFAULT_TOP)
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.set_defaults(handler=cmd_report)
