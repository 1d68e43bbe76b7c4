"""`elemtactl drain` and `elemtactl undrain`: retire a node without losing or delaying mail.

Runs in the admin's own process (or Kubernetes' preStop hook), as the spool's owner,
the way `elemtactl queue` does (elemta.cli.queuecmd.open_queue). The control path is the
spool: drain writes the flag of elemta.queue.draining, which the smtpd workers and the
api's readiness probe of the running daemon read, so new sessions get 421 4.3.2 and
/api/v1/health/ready says 503; undrain removes it. Then either

  - the node delivers its own queue, as it would anyway (the default), or
  - with --to HOST[:PORT], this process hands each waiting message (incoming or
    deferred, due or not) to that node over SMTP with its envelope and DSN parameters,
    removing it here only after the peer's 250 (elemta.delivery.handover).

Held messages are the admin's: they stay on hold here, counted apart, until released
(a release during --wait hands them over too) or deleted. With --wait the command
returns once no message waits here (or at --timeout); --status says how many remain.
Exit status: 0 done (with --wait and --status: no message waits here), 75 some still
do, 69 --to's node could not be reached (without --wait).
See also: man/elemtactl.8 (Draining a node), man/elemta.8 (Running a cluster).
"""

import json
import sys
import time
from os import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE

from elemta.cli import queuecmd
from elemta.cli.config_finder import find_config
from elemta.cli.failure import Failure
from elemta.queue import draining
from elemta.queue.model import ACTIVE, DEFERRED, FAILED, HOLD, INCOMING
from elemta.util.text import printable

PROG = "elemtactl"
# The states of messages that still have to leave this node.
WAITING = (INCOMING, ACTIVE, DEFERRED)
# Seconds between two looks at the queue (and two handover passes) with --wait.
POLL_SECONDS = 2.0


def add_commands(commands, parser_class, parents):
    """Register `drain` and `undrain` on elemtactl's subcommand parsers."""
    spool = parser_class(add_help=False)
    spool.add_argument("--spool-dir", metavar="DIR",
                       help="the spool directory (default: queue.spool_dir of the "
                            "configuration)")
    parents = list(parents) + [spool]
    summary = ("take no new mail (421, readiness fails) while the queue is delivered "
               "here or handed to another node")
    drain = commands.add_parser("drain", parents=parents, help=summary,
                                description=summary[0].upper() + summary[1:] + ".")
    drain.add_argument("--to", metavar="HOST[:PORT]",
                       help="hand the waiting messages to this node over SMTP (port 25 "
                            "unless given); it must relay for this one")
    drain.add_argument("--wait", action="store_true",
                       help="return only once no message waits here (or at --timeout)")
    drain.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="with --wait: give up after this long (exit status 75)")
    drain.add_argument("--status", action="store_true",
                       help="change nothing: say whether the node drains and how many "
                            "messages remain")
    drain.add_argument("--json", action="store_true",
                       help="with --status: one JSON object")
    drain.set_defaults(handler=lambda args: queuecmd.run(cmd_drain, args))
    summary = "take mail again after elemtactl drain"
    undrain = commands.add_parser("undrain", parents=parents, help=summary,
                                  description=summary[0].upper() + summary[1:] + ".")
    undrain.set_defaults(handler=lambda args: queuecmd.run(cmd_undrain, args))


def cmd_drain(args) -> int:
    if args.status and (args.to or args.wait):
        raise Failure(EX_USAGE, "drain: --status changes nothing: not with --to or --wait")
    if args.timeout is not None and not args.wait:
        raise Failure(EX_USAGE, "drain: --timeout goes with --wait")
    if args.json and not args.status:
        raise Failure(EX_USAGE, "drain: --json goes with --status")
    config = find_config(getattr(args, "config", None))
    target = None
    if args.to:
        from elemta.delivery.handover import parse_target
        try:
            target = parse_target(args.to)
        except ValueError as error:
            raise Failure(EX_USAGE, "drain: --to: %s" % error)
    if not args.status:
        queuecmd.log_to_the_mail_log(args)
    with queuecmd.open_queue(args) as queue:
        if args.status:
            return report(queue, args.json)
        draining.begin(queue.spool_dir, args.to)
        _say("drain: %s takes no new mail (421 4.3.2 to new sessions, not ready)%s"
             % (config.hostname, _running_note(queue.spool_dir)))
        handover = None
        if target is not None:
            handover = _handover(config, queue, target)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        while True:
            unreachable = handover is not None and not _pass(handover, queue)
            if unreachable and not args.wait:
                return EX_UNAVAILABLE
            if not count_waiting(queue) or not args.wait or (
                    deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(POLL_SECONDS)
        status = report(queue)
    return status if args.wait else EX_OK


def cmd_undrain(args) -> int:
    queuecmd.log_to_the_mail_log(args)
    with queuecmd.open_queue(args) as queue:
        ended = draining.end(queue.spool_dir)
    _say("undrain: %s" % ("the node takes mail again" if ended else
                          "the node was not draining"))
    return EX_OK


def _running_note(spool_dir):
    from elemta.cli.control import NotRunning, master_pid
    try:
        master_pid(spool_dir)
    except NotRunning:
        return "; elemta is not running here (a start ends the drain)"
    return ""


def _handover(config, queue, target):
    from elemta.delivery.handover import Handover
    from elemta.delivery.smtp_client import SMTPClient, TLSPolicy
    from elemta.delivery.smtp_transport import client_timeouts
    delivery = config.delivery
    return Handover(queue, target, lambda: SMTPClient(
        config.hostname, timeouts=client_timeouts(delivery),
        tls=TLSPolicy(delivery.tls_level)), delivery.lease)


def _pass(handover, queue):
    """One handover pass over the waiting messages; False when the peer cannot be
    reached (with --wait, the next pass tries again)."""
    from elemta.delivery.handover import PeerUnavailable
    from elemta.queue.listing import Selection
    ids = list(queue.ids_matching(Selection(now=time.time(), states=(INCOMING, DEFERRED))))
    try:
        outcome, reached = handover.run(ids), True
    except PeerUnavailable as error:
        outcome, reached = error.done, False
        _complain("drain: cannot reach %s; the messages stay here" % printable(str(error)))
    if outcome.moved or outcome.kept:
        _say("drain: %d message(s) handed over to %s, %d stayed here"
             % (len(outcome.moved), handover.where, len(outcome.kept)))
    for queue_id, why in outcome.kept:
        _complain("drain: %s stays here: %s" % (queue_id, printable(why)))
    return reached


def count_waiting(queue):
    counts = queue.count_by_state()
    return sum(counts.get(state, 0) for state in WAITING)


def report(queue, as_json=False) -> int:
    """Say whether the node drains and what remains; EX_OK when no message waits."""
    drain = draining.current(queue.spool_dir)
    counts = queue.count_by_state()
    waiting = sum(counts.get(state, 0) for state in WAITING)
    if as_json:
        print(json.dumps({
            "draining": drain is not None, "since": drain.since if drain else None,
            "to": drain.to if drain else None, "waiting": waiting,
            "hold": counts.get(HOLD, 0), "failed": counts.get(FAILED, 0),
            "by_state": counts}))
        return EX_TEMPFAIL if waiting else EX_OK
    if drain is None:
        state = "not draining"
    else:
        state = "draining since %s%s" % (queuecmd.asctime(drain.since),
                                         " to " + drain.to if drain.to else "")
    if waiting:
        remain = "%d message(s) remain (%s)" % (waiting, ", ".join(
            "%s %d" % (s, counts[s]) for s in WAITING if counts.get(s)))
    else:
        remain = "the node is empty"
    _say("drain: %s; %s" % (state, remain))
    if counts.get(HOLD):
        _say("drain: %d message(s) on hold stay here until released (then handed over "
             "or delivered) or deleted" % counts[HOLD])
    return EX_TEMPFAIL if waiting else EX_OK


def _say(text):
    print("%s: %s" % (PROG, text))
    sys.stdout.flush()


def _complain(text):
    print("%s: %s" % (PROG, text), file=sys.stderr)
