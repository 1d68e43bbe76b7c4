#!/usr/bin/env python3
"""Cluster store benchmark: how many Valkey/Redis operations one message costs.

A script, not a pytest test. Starts one private redis-server (tests/peers/redis.py) and
BENCH_NODES Elemta nodes (2; at most 3) on 127.0.0.2.. with cluster.store pointing at it
and the shared checks on: greylisting (the load's one triplet passed once before the
run, so each message is a known triplet, as most mail is) and every rate limit of the
ratelimit restriction (connections, messages and recipients per client, messages and
recipients per sender; limits far above the load). Then smtp-source sends BENCH_MESSAGES
(2000) 5 KB messages, one per connection, from 20 sessions spread over the nodes at
once, and the script reads redis-server's INFO commandstats and INFO cpu before and
after: the calls per command per message accepted, and the CPU seconds redis-server
spent (used_cpu_sys + used_cpu_user, less what it spends idle, measured for IDLE_SECONDS
before the load) per message. The nodes' heartbeat is set to an hour so their
registration does not count; the DNSBL cache and AUTH failure counts are not in this
load (no DNSBL, no AUTH). Printed: store commands and store CPU per message, messages
per second per node, and from the CPU measured, how many messages a second one store
core can take and how many nodes that is at this load's rate and at BUSY_NODE_RATE.
Mind that the nodes share the machine's cores with redis-server here: the store's CPU
per message is the figure that carries to a bigger site, not the rate.
Needs root and smtp-source (the postfix package) and redis-server.

Environment: BENCH_MESSAGES, BENCH_NODES, BENCH_KEEP=1 keeps the temp dir.
See also: man/elemta.8 (Running a cluster), tests/bench/bench_accept.py, ../shared/peers.md.
"""

import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.harness import ElemtaServer, free_port  # noqa: E402
from tests.peers.redis import RedisServer, missing  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SESSIONS = 20
MESSAGE_BYTES = 5120
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@bench.test"
# Seconds redis-server is watched idle before the load: its own timers' CPU, subtracted.
IDLE_SECONDS = 5.0
# A busy node's intake (Postfix's relay rate on this kind of machine, ../shared/peers.md).
BUSY_NODE_RATE = 1000
# Commands that are ours (the benchmark's INFO), not the nodes'.
OURS = ("info",)


def start_node(scratch, name, address, store_url):
    server = ElemtaServer(os.path.join(scratch, name), {
        "listeners": [{"mode": "smtp", "address": address, "port": free_port(address)}],
        "api": {"address": address, "port": free_port(address)},
        # The load's client (loopback) is outside mynetworks: every check applies.
        "relay": {"mynetworks": ["192.0.2.0/24"], "local_domains": ["bench.test"]},
        "cluster": {"store": store_url, "node_name": name, "heartbeat_interval": 3600,
                    "node_ttl": 7200},
        "plugins": {
            "greylist": {"enabled": True, "delay": 1,
                         "database": os.path.join(scratch, name + "-grey")},
            "ratelimit": {"enabled": True, "time_unit": 60,
                          "connection_rate_limit": 10 ** 6, "message_rate_limit": 10 ** 6,
                          "recipient_rate_limit": 10 ** 6,
                          "sender_message_rate_limit": 10 ** 6,
                          "sender_recipient_rate_limit": 10 ** 6,
                          "database": os.path.join(scratch, name + "-rate")}}})
    return server.start()


def pass_greylisting(nodes):
    """Greylist the load's triplet once, then wait out the delay: the run's messages
    are a known triplet's."""
    for node in nodes:
        with smtplib.SMTP(node.address, node.port, timeout=20) as client:
            client.ehlo("bench.test")
            client.mail(SENDER)
            client.rcpt(RECIPIENT)
    time.sleep(1.5)


def command_calls(store):
    """{command: calls} from redis-server's INFO commandstats."""
    import redis
    client = redis.Redis(port=store.port)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name[len("cmdstat_"):]: int(fields["calls"]) for name, fields in stats.items()
            if name[len("cmdstat_"):] not in OURS}


def cpu_seconds(store):
    """CPU seconds redis-server has used (user and system), from INFO cpu."""
    import redis
    client = redis.Redis(port=store.port)
    try:
        stats = client.info("cpu")
    finally:
        client.close()
    return float(stats["used_cpu_sys"]) + float(stats["used_cpu_user"])


def idle_cpu_rate(store):
    """CPU seconds per second redis-server uses with nothing to do (its serverCron)."""
    first = cpu_seconds(store)
    time.sleep(IDLE_SECONDS)
    return (cpu_seconds(store) - first) / IDLE_SECONDS


def drive(nodes, count):
    """smtp-source to every node at once, count/len(nodes) messages each; the seconds."""
    share = count // len(nodes)
    started = time.monotonic()
    runs = [subprocess.Popen([SMTP_SOURCE, "-s", str(max(1, SESSIONS // len(nodes))),
                              "-m", str(share), "-l", str(MESSAGE_BYTES), "-f", SENDER,
                              "-t", RECIPIENT, "%s:%d" % (node.address, node.port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True) for node in nodes]
    for run in runs:
        output = run.communicate(timeout=max(300, count / 10))[0].strip()
        if run.returncode or output:
            print("  smtp-source exit %d: %s" % (run.returncode, output.splitlines()[:3]))
    return time.monotonic() - started


def accepted(nodes):
    total = 0
    for node in nodes:
        with node.queue() as queue:
            total += sum(queue.count_by_state().values())
    return total


def main():
    for need in (missing(), None if os.path.exists(SMTP_SOURCE) else
                 "%s is missing (apt-get install postfix)" % SMTP_SOURCE):
        if need:
            print("bench_cluster_store: %s" % need)
            return 1
    count = int(os.environ.get("BENCH_MESSAGES", "2000"))
    node_count = min(len(ADDRESSES), int(os.environ.get("BENCH_NODES", "2")))
    scratch = tempfile.mkdtemp(prefix="bench-cluster-")
    store = RedisServer(scratch).start()
    nodes = []
    try:
        for index in range(node_count):
            nodes.append(start_node(scratch, "node-%d" % index, ADDRESSES[index], store.url))
        pass_greylisting(nodes)
        idle = idle_cpu_rate(store)
        before, queued_before = command_calls(store), accepted(nodes)
        cpu_before = cpu_seconds(store)
        seconds = drive(nodes, count)
        cpu = cpu_seconds(store) - cpu_before - idle * seconds
        after = command_calls(store)
        messages = accepted(nodes) - queued_before
        report(before, after, messages, seconds, node_count, max(cpu, 0.0))
    finally:
        for node in nodes:
            node.stop()
        store.stop()
        if os.environ.get("BENCH_KEEP") == "1":
            print("kept: %s" % scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def report(before, after, messages, seconds, node_count, cpu):
    calls = {name: after[name] - before.get(name, 0) for name in after
             if after[name] != before.get(name, 0)}
    total = sum(calls.values())
    if not messages:
        print("no message was accepted")
        return
    per_message = total / messages
    per_node_rate = messages / seconds / node_count
    print("%d nodes, one redis-server: %d messages accepted in %.1f s (%.0f msg/s per node)"
          % (node_count, messages, seconds, per_node_rate))
    # commandstats counts the commands a Lua script runs as well as the EVALSHA: the
    # total is the work the store does; its round trips are fewer.
    print("store commands: %d, %.2f per message (those run inside scripts included)"
          % (total, per_message))
    for name in sorted(calls, key=calls.get, reverse=True):
        print("  %-12s %8d  %.2f per message" % (name, calls[name], calls[name] / messages))
    cpu_per_message = cpu / messages
    print("store CPU: %.3f s for the load (%.0f%% of one core while it ran), %.1f "
          "microseconds per message" % (cpu, 100.0 * cpu / seconds, 1e6 * cpu_per_message))
    if not cpu_per_message:
        print("(too little store CPU to measure: send more messages)")
        return
    core_rate = 1.0 / cpu_per_message
    print("one store core, measured: about %.0f messages/s (%.0f commands/s)"
          % (core_rate, core_rate * per_message))
    for label, rate in (("at this load's rate", per_node_rate),
                        ("at %d msg/s per node" % BUSY_NODE_RATE, BUSY_NODE_RATE)):
        print("  serves about %d nodes %s" % (core_rate // rate, label))


if __name__ == "__main__":
    sys.exit(main())
