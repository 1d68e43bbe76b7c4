"""`elemtactl drain` and `elemtactl undrain`: retire a node without losing or delaying mail.

Runs in the admin's own process (or Kubernetes' preStop hook), as the spool's owner,
the way `elemtactl queue` does (elemta.cli.queuecmd.open_queue). The control path is the
spool: drain writes the flag of elemta.queue.draining, which the smtpd workers and the
api's readiness probe of the running daemon read, so new sessions get 421 4.3.2 and
/api/v1/health/ready says 503; undrain removes it. Then either

  - in a cluster (cluster.store set), this process hands each waiting message
    (incoming or deferred, due or not) to the other live nodes of the registry
    (elemta.cluster.registry: their SMTP hand-over addresses), spread among them, over
    SMTP with its envelope and DSN parameters, removing it here only after the peer's
    250 (elemta.delivery.handover), logged in with the cluster's hand-over credential
    (elemta.cluster.credential) where the peer offers AUTH (its handover listener).
    Nodes that refuse (down, drained themselves) are passed over; nodes whose
    registration is not signed with the cluster's key, or outside cluster.peer_networks,
    are never sent mail (elemta.cluster.registry, elemta.cluster.trust); with no other
    live node, the node delivers its queue itself.
  - with --to HOST[:PORT], the same to that one node, or
  - with --here, or on a node in no cluster, the node delivers its own queue, as it
    would anyway.

Held messages are the admin's: they stay on hold here, counted apart, until released
(a release during --wait hands them over too) or deleted. With --wait the command
returns once no message waits here (or at --timeout); --status says how many remain.
Exit status: 0 done (with --wait and --status: no message waits here), 75 some still
do, 69 no node to hand over to could be reached (without --wait).
See also: man/elemtactl.8 (Draining a node), man/elemta.8 (Running a cluster).
"""

import json
import sys
import time
from os import EX_CONFIG, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE

from elemta.cli import queuecmd
from elemta.cli.config_finder import find_config
from elemta.cli.failure import Failure
from elemta.queue import draining
from elemta.queue.model import ACTIVE, DEFERRED, FAILED, HOLD, INCOMING
from elemta.util.text import printable

PROG = "elemtactl"
# The states of messages that still have to leave this node.
WAITING = (INCOMING, ACTIVE, DEFERRED)
# The drain flag's "to" when the queue goes to the cluster's other nodes.
CLUSTER = "cluster"
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
                            "unless given); it must relay for this one. Default in a "
                            "cluster: the other live nodes of cluster.store")
    drain.add_argument("--here", action="store_true",
                       help="hand nothing over: this node delivers its queue itself")
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
    if args.status and (args.to or args.wait or args.here):
        raise Failure(EX_USAGE, "drain: --status changes nothing: not with --to, --here "
                                "or --wait")
    if args.to and args.here:
        raise Failure(EX_USAGE, "drain: --to or --here, not both")
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
        in_cluster = target is None and not args.here and bool(config.cluster.store)
        # Before the flag: a cluster this node cannot join leaves it accepting.
        peers = _ClusterPeers(config, queue) if in_cluster else None
        draining.begin(queue.spool_dir, args.to or (CLUSTER if in_cluster else None))
        _say("drain: %s takes no new mail (421 4.3.2 to new sessions, not ready)%s"
             % (config.hostname, _running_note(queue.spool_dir)))
        handover = None
        if target is not None:
            address, login = _to_target(config, target)
            handover = _handover(config, queue, address, login=login)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        while True:
            if peers is not None:
                handover = peers.spread()       # who lives changes: asked each pass
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


def _to_target(config, target):
    """(target, login) for --to: the hand-over credential goes only to a host inside
    cluster.peer_networks (to the address found there), never to wherever a typo or a
    poisoned name points; another host must relay for this node as its mynetworks."""
    from elemta.cluster.trust import PeerNetworks, Untrusted
    host, port = target
    try:
        return (PeerNetworks.of(config).address(host, port), port), True
    except Untrusted as error:
        _say("drain: --to: %s: the cluster's hand-over login is not sent there (it must "
             "relay for this node as for its relay.mynetworks)" % printable(str(error)))
        return target, False


def _handover(config, queue, target, name=None, login=True):
    """A Handover to target. With login (a peer's handover listener, or --to inside
    cluster.peer_networks) it logs in with the hand-over credential when the peer offers
    AUTH, which opens relaying on every node: with cluster.handover_tls required (the
    default) only inside TLS, the peer's certificate checked against
    cluster.peer_ca_file when set (a peer that offers no STARTTLS, or fails the check,
    gets no password and the mail stays queued: an attacker on the path can strip the
    STARTTLS offer); with may, inside TLS whenever the peer offers STARTTLS, in plain
    text to one that offers none. Without login, the peer must have this node in its
    relay.mynetworks, as its smtp listener's AUTH is its users'."""
    from elemta.cluster.credential import HANDOVER_LOGIN, handover_password
    from elemta.delivery.handover import Handover
    from elemta.delivery.smtp_client import SMTPClient
    from elemta.delivery.smtp_transport import client_timeouts
    from elemta.util.apitoken import read_token
    delivery = config.delivery
    token, _ = read_token(config.api)
    credentials = None if token is None or not login \
        else (HANDOVER_LOGIN, handover_password(token))
    tls, sasl_require_tls = _handover_tls(config, credentials is not None)
    return Handover(queue, target, lambda: SMTPClient(
        config.hostname, timeouts=client_timeouts(delivery),
        tls=tls, credentials=credentials,
        sasl_require_tls=sasl_require_tls), delivery.lease, name=name)


def _handover_tls(config, with_login):
    """(TLSPolicy, sasl_require_tls) of a handover session."""
    from elemta.delivery.smtp_client import (SASL_TLS_IF_OFFERED, TLS_ENCRYPT, TLS_MAY,
                                             TLS_NONE, TLS_VERIFY, TLSPolicy)
    level = config.delivery.tls_level
    if not with_login:
        return TLSPolicy(level), False
    cluster = config.cluster
    if cluster.handover_tls == "required":
        # Mandatory TLS: a peer without STARTTLS (or with a certificate the cluster CA
        # does not sign) fails the session before AUTH, and the message stays queued.
        if cluster.peer_ca_file:
            return TLSPolicy(TLS_VERIFY, ca_file=cluster.peer_ca_file), True
        return TLSPolicy(TLS_ENCRYPT), True
    return TLSPolicy(TLS_MAY if level == TLS_NONE else level), SASL_TLS_IF_OFFERED


class _ClusterPeers:
    """The other live nodes of the cluster registry, as a Spread of handovers."""

    def __init__(self, config, queue):
        from elemta.cluster import identity
        from elemta.cluster.credential import registry_key
        from elemta.cluster.trust import PeerNetworks
        from elemta.util.apitoken import read_token
        token, problem = read_token(config.api)
        if token is None:
            raise Failure(EX_CONFIG, "drain: %s in %s: the cluster's nodes are known by "
                                     "the api token (or use --to or --here)"
                          % (problem, config.source or "the built-in defaults"))
        self.key = registry_key(token)
        self.config, self.queue = config, queue
        self.me = identity.node_name(config)
        self.trusted = PeerNetworks.of(config)
        self._said = set()          # what was said about the peers: each said once

    def spread(self):
        """A Spread over the nodes to hand mail to, or None (the node delivers itself)."""
        from elemta.cluster.registry import Registry
        from elemta.cluster.trust import Untrusted
        from elemta.delivery.handover import Spread, parse_target
        from elemta.sharedstate.redisstore import connect
        try:
            registry = Registry(connect(self.config.cluster),
                                self.config.cluster.key_prefix, self.key)
        except OSError as error:
            raise Failure(EX_CONFIG, "drain: cluster.password_file: cannot read %s: %s" % (
                self.config.cluster.password_file, error.strerror or error))
        try:
            nodes = registry.nodes()
        except Exception as error:      # redis.RedisError, OSError: the store failed
            self._once("drain: cannot read the cluster's nodes from the store (%s: %s); "
                       "the node delivers its queue itself meanwhile"
                       % (type(error).__name__, printable(str(error))), error=True)
            return None
        finally:
            registry.close()
        handovers, problems = [], []
        for node in nodes:
            if node.name == self.me:
                continue
            if not node.smtp:
                problems.append("node %s registers no SMTP address" % node.name)
                continue
            try:
                host, port = parse_target(node.smtp)
                address = self.trusted.address(host, port)
            except (ValueError, Untrusted) as error:
                problems.append("node %s is sent no mail: %s" % (
                    node.name, printable(str(error))))
                continue
            handovers.append(_handover(self.config, self.queue, (address, port),
                                       name=node.name, login=node.smtp_login))
        for problem in problems:
            self._once("drain: " + problem, error=True)
        if not handovers:
            self._once("drain: no other live node in the cluster takes mail: the node "
                       "delivers its queue itself")
            return None
        return Spread(handovers)

    def _once(self, text, error=False):
        if text not in self._said:
            self._said.add(text)
            (_complain if error else _say)(text)


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
    for why in outcome.unreachable:
        _complain("drain: passed over %s" % printable(why))
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
        to = drain.to if drain.to != CLUSTER else "the other nodes of the cluster"
        state = "draining since %s%s" % (queuecmd.asctime(drain.since),
                                         " to " + to if to else "")
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
