"""`elemtactl --cluster queue summary|list|show|hold|release|flush`: every node at once.

Runs in the admin's own process, on any node (or any host that can reach the store and
the nodes). It reads the live nodes from the store named by cluster.store and asks each
through its REST API with the cluster's api token (elemta.cluster.view, the code behind
/api/v1/cluster/... too), then prints the merged answer: the queue command's own layout
with the node named, or the same JSON as the REST API with --json.

A node that does not answer never hides the others: what the others said is printed,
then one line on stderr per missing node ("node NAME (URL) did not answer: why"), and
the exit status is EX_UNAVAILABLE (69), so a script sees the answer is partial.
See also: elemta.cli.queuecmd (one node), elemta.api.cluster_routes, man/elemtactl.8.
"""

import json
import sys
from os import EX_CONFIG, EX_NOUSER, EX_OK, EX_UNAVAILABLE, EX_USAGE
from types import SimpleNamespace

from elemta.cli.config_finder import find_config
from elemta.cli.failure import Failure
from elemta.cli.queuecmd import ACTIONS, Output, write_mailq, write_summary
from elemta.queue.listing import listed_from_json
from elemta.util.text import printable

PROG = "elemtactl"
COMMANDS = ("summary", "list", "show", "hold", "release", "flush")


def open_view(args):
    """The ClusterView of the configuration's cluster.store and api token."""
    from elemta.cluster.credential import registry_key
    from elemta.cluster.peers import Peers
    from elemta.cluster.registry import Registry
    from elemta.cluster.view import ClusterView
    from elemta.sharedstate.redisstore import connect
    from elemta.util.apitoken import read_token
    config = find_config(getattr(args, "config", None))
    where = config.source or "the built-in defaults"
    if not config.cluster.store:
        raise Failure(EX_CONFIG, "--cluster: cluster.store is not set in %s: this node is "
                                 "in no cluster" % where)
    token, problem = read_token(config.api)
    if token is None:
        raise Failure(EX_CONFIG, "--cluster: %s in %s (the nodes' REST APIs need the "
                                 "cluster's api token)" % (problem, where))
    try:
        client = connect(config.cluster)
    except OSError as error:
        raise Failure(EX_CONFIG, "--cluster: cluster.password_file: cannot read %s: %s"
                      % (config.cluster.password_file, error.strerror or error))
    return ClusterView(Registry(client, config.cluster.key_prefix, registry_key(token)),
                       Peers.of(config, token))


def query_of(args, default_states=()):
    """The REST filters of the command line's selection options."""
    states = [s for group in (args.state or ()) for s in group] or list(default_states)
    query = {"state": ",".join(dict.fromkeys(states))} if states else {}
    for name, value in (("sender", args.sender), ("recipient", args.recipient),
                        ("domain", args.domain)):
        if value is not None:
            query[name] = value
    for name, seconds in (("older_than", args.older_than), ("newer_than", args.newer_than)):
        if seconds is not None:
            query[name] = "%.3fs" % seconds
    return query


def run(name, args) -> int:
    """The --cluster form of `queue NAME`; its exit status."""
    from elemta.cluster.view import NodeRefused, NotFound, StoreUnreachable
    if name not in COMMANDS:
        raise Failure(EX_USAGE, "queue %s has no --cluster form (it has: %s)"
                      % (name, ", ".join(COMMANDS)))
    view = open_view(args)
    out = Output()
    try:
        if not view.live_nodes():
            raise Failure(EX_UNAVAILABLE, "--cluster: no node is registered in the "
                                          "cluster store (is any api process running?)")
        missing = globals()["cluster_" + name](view, args, out)
    except StoreUnreachable as error:
        raise Failure(EX_UNAVAILABLE, "--cluster: the cluster store cannot be reached, so "
                                      "the nodes are unknown: %s" % printable(str(error)))
    except NodeRefused as error:
        raise Failure(EX_USAGE, "--cluster: %s" % printable(str(error)))
    except NotFound as absent:
        out.flush()
        _report_missing(absent.missing)
        raise Failure(EX_UNAVAILABLE if absent.missing else EX_NOUSER,
                      "queue: no such message: %s%s" % (absent.queue_id, " on the nodes "
                      "that answered" if absent.missing else ""))
    finally:
        view.registry.close()
    out.flush()
    _report_missing(missing)
    return EX_UNAVAILABLE if missing else EX_OK


def _report_missing(missing):
    sys.stdout.flush()
    for node in missing:
        print("%s: node %s (%s) did not answer: %s" % (
            PROG, printable(node["node"]), printable(node["api_url"]),
            printable(node["error"])), file=sys.stderr)


def _json_line(out, data):
    out.write(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n")


# ---- the commands: each prints, and returns the nodes that did not answer -------------

def cluster_summary(view, args, out):
    """Totals per state for the whole cluster, then per node, then qshape's table."""
    if args.sender_domains:
        raise Failure(EX_USAGE, "queue summary --sender-domains has no --cluster form")
    summary = view.summary(query_of(args))
    if args.json:
        _json_line(out, summary)
        return summary["missing"]
    if not summary["nodes"]:
        return summary["missing"]           # nobody answered: nothing to total
    shape = SimpleNamespace(
        by_state={state: SimpleNamespace(messages=f["messages"], size=f["bytes"])
                  for state, f in summary["states"].items()},
        bucket_limits=summary["bucket_minutes"], total=summary["total"],
        domains=summary["domains"])
    write_summary(out, shape)
    out.write("\n%-20s %-10s %10s %10s\n" % ("Node", "State", "Messages", "Kbytes"))
    for node, figures in sorted(summary["nodes"].items()):
        for state, f in figures["states"].items():
            out.write("%-20s %-10s %10d %10d\n" % (printable(node), state, f["messages"],
                                                   f["bytes"] // 1024))
        out.write("%-20s %-10s %10d %10d\n" % (printable(node), "total",
                                               figures["messages"],
                                               figures["bytes"] // 1024))
    return summary["missing"]


def cluster_list(view, args, out):
    """Every node's messages: one JSON object each (with its node), or mailq's layout
    under a line naming each node."""
    listing = view.listing(query_of(args))
    if args.json:
        for message in listing["messages"]:
            _json_line(out, message)
        return listing["missing"]
    by_node = {}
    for message in listing["messages"]:
        by_node.setdefault(message["node"], []).append(message)
    silent = {m["node"] for m in listing["missing"]}
    names = sorted(set(by_node) | {n.name for n in view.live_nodes()} - silent)
    for n, node in enumerate(names):
        out.write("%sNode %s:\n" % ("\n" if n else "", printable(node)))
        write_mailq(out, map(listed_from_json, by_node.get(node, [])))
    return listing["missing"]


def cluster_show(view, args, out):
    """Each message from the node that has it."""
    from elemta.cli.queuecmd import _queue_ids
    missing = []
    for n, queue_id in enumerate(_queue_ids(args.ids)):
        message = view.show(queue_id)
        missing = message["missing"]
        if args.json:
            _json_line(out, message)
            continue
        out.write("\n" if n else "")
        _write_message(out, message)
    return missing


def _write_message(out, message):
    lines = [("Node", message["node"]), ("Queue ID", message["queue_id"]),
             ("State", message["queue_name"]),
             ("Size", "%d bytes" % message["message_size"]),
             ("Sender", "<%s>" % message["sender"])]
    if message.get("hold"):
        lines.append(("Hold", "held by %s: %s" % (message["hold"]["by"],
                                                 message["hold"]["reason"])))
    if message.get("last_error"):
        lines.append(("Last error", message["last_error"]))
    for label, value in lines:
        out.write("%-12s%s\n" % (label + ":", printable(str(value))))
    out.write("Recipients:\n")
    for recipient in message["recipients"]:
        out.write("  <%s>  %s\n" % (printable(recipient["address"]), recipient["status"]))
    if message.get("headers"):
        out.write("\n" + message["headers"])


def _action(name):
    def act(view, args, out):
        """hold, release, flush: by id on the node that has each, or by selection on
        every node (flush without ids: the deferred mail of every node)."""
        if getattr(args, "reason", None):
            raise Failure(EX_USAGE, "queue hold --reason has no --cluster form (the REST "
                                    "API records the admin as the holder)")
        if getattr(args, "rescan", False):
            raise Failure(EX_USAGE, "queue release --rescan has no --cluster form")
        from elemta.cli.queuecmd import _has_filter, _queue_ids
        if args.ids and (args.all or _has_filter(args)):
            raise Failure(EX_USAGE, "queue %s: give queue ids or a selection (--all, "
                                    "--from, ...), not both" % name)
        _, total_label, default_states = ACTIONS[name]
        if args.ids:
            results, missing = [], []
            for queue_id in _queue_ids(args.ids, "queue " + name):
                result = view.act(queue_id, name)
                results.append(result)
                missing = result["missing"]
        elif name == "flush" and not args.all and not _has_filter(args):
            flushed = view.flush(query_of(args))
            for node, answer in sorted(flushed["nodes"].items()):
                out.write("%s: %s: %d message%s\n" % (
                    printable(node), total_label, answer["flushed"],
                    "" if answer["flushed"] == 1 else "s"))
            out.write("%s: %d message%s\n" % (total_label, flushed["flushed"],
                                              "" if flushed["flushed"] == 1 else "s"))
            return flushed["missing"]
        elif args.all or _has_filter(args):
            done = view.act_selected(name, query_of(args, default_states))
            results, missing = done["results"], done["missing"]
        else:
            raise Failure(EX_USAGE, "queue %s: give queue ids, --all, or a selection "
                                    "such as --from" % name)
        for result in results:
            out.write("%s: %s (node %s)\n" % (result["queue_id"],
                                              printable(result["outcome"]),
                                              printable(result["node"])))
        changed = sum(1 for result in results if result["changed"])
        out.write("%s: %d message%s\n" % (total_label, changed,
                                          "" if changed == 1 else "s"))
        return missing
    return act


cluster_hold = _action("hold")
cluster_release = _action("release")
cluster_flush = _action("flush")
