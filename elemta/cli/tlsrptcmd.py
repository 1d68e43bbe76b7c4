"""`elemtactl tlsrpt show` and `elemtactl tlsrpt send`: the TLS-RPT (RFC 8460) counts the
delivery workers keep under the spool, and their reports sent now.

Used by elemtactl. Run as root, it becomes the spool's owner before it opens anything
there (as the queue commands do). show prints each day's counts per policy (successes,
failures by result type, MX host and reason), or with --json each policy domain's
report as it would be sent. send queues the reports of one day (--date, default
yesterday, UTC) to each policy domain's rua now, even when they were sent before
(a resend has the same Report-ID); a day sent by hand is not sent again by the daily run.
Exit status: 0; 64 (a bad --date); 66 (nothing counted yet); 74 (the counts or the
maildrop cannot be read or written).
See also: elemta.tlsrpt, elemta.delivery.tlsreports, man/elemtactl.8.
"""

import json
import os
import re
import time

from elemta.cli.config_finder import find_config
from elemta.cli.failure import Failure

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_day(text, now=None):
    """"YYYY-MM-DD", "today" or "yesterday" (UTC) as YYYY-MM-DD."""
    from elemta.tlsrpt.counter import day_of
    now = time.time() if now is None else now
    if text in ("today", "yesterday"):
        return day_of(now - (86400 if text == "yesterday" else 0))
    try:
        if _DAY.match(text) and time.strptime(text, "%Y-%m-%d"):
            return text
    except ValueError:
        pass
    raise Failure(os.EX_USAGE, "tlsrpt: --date %s: write YYYY-MM-DD (UTC), today or "
                               "yesterday" % text)


def _open(args):
    """(config, the CountStore), as the spool's owner."""
    from elemta.cli.queuecmd import become_spool_owner
    from elemta.tlsrpt.store import CountStore, path_of
    config = find_config(getattr(args, "config", None))
    spool_dir = os.path.abspath(config.queue.spool_dir)
    if os.path.isdir(spool_dir):
        become_spool_owner(spool_dir)
    try:
        return config, CountStore(spool_dir, create=False)
    except FileNotFoundError:
        raise Failure(os.EX_NOINPUT, "tlsrpt: nothing counted in %s (tlsrpt.enabled is %s)"
                      % (path_of(spool_dir), "on" if config.tlsrpt.enabled else "off"))
    except Exception as error:       # lmdb.Error, OSError
        raise Failure(os.EX_IOERR, "tlsrpt: %s: %s" % (path_of(spool_dir), error))


def cmd_show(args):
    """show: the TLS session results counted, per day and policy"""
    config, store = _open(args)
    with_sent = []
    try:
        days = [parse_day(args.date)] if args.date else store.days()
        for day in days:
            with_sent.append((day, store.counts(day), store.claimed(day)))
    finally:
        store.close()
    if args.json:
        from elemta.tlsrpt.report import build_report
        from elemta.tlsrpt.send import settings
        organization, contact, _, submitter = settings(config)
        for day, counts, _ in with_sent:
            for domain in sorted({entry["policy"]["policy-domain"] for entry in counts}):
                mine = [e for e in counts if e["policy"]["policy-domain"] == domain]
                print(json.dumps(build_report(day, domain, mine, organization, contact,
                                              submitter), sort_keys=True))
        return 0
    if not with_sent:
        print("no TLS sessions counted")
    for day, counts, claimed in with_sent:
        sent = ("reports sent by %s at %s%s" % (
            claimed["by"], time.strftime("%H:%M:%S UTC", time.gmtime(claimed["at"])),
            " (by hand)" if claimed.get("forced") else "") if claimed else "not sent yet")
        print("%s: %s" % (day, sent))
        if not counts:
            print("  no TLS sessions counted")
        for entry in sorted(counts, key=lambda e: (e["policy"]["policy-domain"],
                                                   e["policy"]["policy-type"])):
            policy = entry["policy"]
            print("  %s %s: %d successful, %d failed" % (
                policy["policy-type"], policy["policy-domain"], entry["success"],
                entry["failure"]))
            for detail, count in sorted(entry["details"].items()):
                item = json.loads(detail)
                where = item.get("receiving-mx-hostname", "")
                if item.get("receiving-ip"):
                    where += "[%s]" % item["receiving-ip"]
                print("    %s%s: %d%s" % (item["result-type"], " " + where if where else "",
                                         count, " (%s)" % item["failure-reason-code"]
                                         if "failure-reason-code" in item else ""))
    return 0


def cmd_send(args):
    """send: queue one day's reports (default yesterday, UTC) to each policy domain now"""
    from elemta.tlsrpt.send import send_day
    day = parse_day(args.date or "yesterday")
    config, store = _open(args)
    try:
        if not store.counts(day):
            print("elemtactl: tlsrpt send: no TLS sessions counted on %s: no report" % day)
            return 0
        try:
            outcome = send_day(store, config, day, "elemtactl (uid %d)" % os.getuid(),
                               force=True)
        except OSError as error:
            raise Failure(os.EX_IOERR, "tlsrpt send: cannot write to the maildrop: %s"
                          % (error.strerror or error))
    finally:
        store.close()
    for domain, text in outcome:
        print("%s: %s" % (domain, text))
    return 0


def add_commands(commands, parser_class, parents):
    tlsrpt = commands.add_parser("tlsrpt", help="TLS reporting (RFC 8460): counts, "
                                                "reports")
    actions = tlsrpt.add_subparsers(dest="tlsrpt_command", metavar="ACTION",
                                    parser_class=parser_class)
    actions.required = True
    for name, handler in (("show", cmd_show), ("send", cmd_send)):
        doc = handler.__doc__.split(": ", 1)[1]
        sub = actions.add_parser(name, parents=parents, help=doc, description=doc)
        sub.add_argument("--date", metavar="DAY",
                         help="YYYY-MM-DD (UTC), today or yesterday (show: every day kept; "
                              "send: yesterday)")
        sub.set_defaults(handler=handler)
        if name == "show":
            sub.add_argument("--json", action="store_true",
                             help="each policy domain's report, one JSON object a line")
