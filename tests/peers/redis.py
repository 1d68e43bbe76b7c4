"""A private redis-server on a loopback port: the cluster's shared state store in tests.

Owned by no Elemta process: tests/test_cluster_state.py points cluster.store at it.
Debian's redis-server (a Valkey-compatible store) with a config file and directory of
its own, never the system service. Nothing is saved to disk, so a restart (stop() then
start(), same port) comes back empty, as a replaced store would.

    with RedisServer(workdir) as store: ... "redis://127.0.0.1:%d/0" % store.port

For a Valkey Cluster (tests/test_cluster_shards.py): RedisServer(workdir, name,
cluster=True) for each node, then make_cluster(nodes) gives them the slots.
For Sentinel (tests/test_cluster_sentinel.py): RedisServer(workdir, "replica",
replica_of=primary) is a replica, and Sentinel(workdir, primary) a redis-server in
sentinel mode watching the primary under the name "elemta", quick to fail over.
See also: tests/peers/process.py.
"""

import os
import subprocess

from tests.harness import free_port
from tests.peers.policy import wait_for_port
from tests.peers.process import stop_process

REDIS_SERVER = "/usr/bin/redis-server"


def missing():
    """Why redis-server cannot run here, or None."""
    if not os.path.exists(REDIS_SERVER):
        return "%s is not installed (apt-get install redis-server)" % REDIS_SERVER
    return None


class RedisServer:
    MODE = []              # redis-server's arguments after the config file

    def __init__(self, workdir, name="redis", replica_of=None, tls=None, acl=(),
                 cluster=False):
        """tls: (certificate, key): TLS only (tls-port), the certificate its own CA;
        acl: ACL lines ("user elemta on >secret ~* +@all"); cluster: a Valkey
        Cluster node (make_cluster joins them)."""
        self.tls = tls
        self.dir = os.path.join(str(workdir), name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.config = os.path.join(self.dir, "redis.conf")
        with open(self.config, "w") as f:
            f.write("bind 127.0.0.1\nport %d\ndir %s\nsave \"\"\nappendonly no\n"
                    "daemonize no\nlogfile %s\n"
                    % (self.port, self.dir, os.path.join(self.dir, "redis.log")))
            if tls is not None:
                f.write("port 0\ntls-port %d\ntls-cert-file %s\ntls-key-file %s\n"
                        "tls-ca-cert-file %s\ntls-auth-clients no\n"
                        % (self.port, tls[0], tls[1], tls[0]))
            if cluster:
                f.write("cluster-enabled yes\ncluster-config-file nodes.conf\n"
                        "cluster-node-timeout 2000\n")
            for line in acl:
                f.write(line + "\n")
            if replica_of is not None:
                f.write("replicaof 127.0.0.1 %d\n" % replica_of.port)
            f.write(self.extra_config())
        self.process = None

    def extra_config(self):
        return ""

    @property
    def url(self):
        return "%s://127.0.0.1:%d/0" % ("rediss" if self.tls else "redis", self.port)

    def start(self):
        self.process = subprocess.Popen([REDIS_SERVER, self.config] + self.MODE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process, what="redis-server")
        return self

    def stop(self):
        stop_process(self.process)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Sentinel(RedisServer):
    """A Sentinel watching primary as "elemta": down after 1 s, failover at once (one
    Sentinel, quorum 1). It rewrites its own config file, as Sentinels do."""
    MODE = ["--sentinel"]
    SERVICE = "elemta"

    def __init__(self, workdir, primary):
        self.primary = primary
        super().__init__(workdir, "sentinel")

    def extra_config(self):
        return ("sentinel monitor %s 127.0.0.1 %d 1\n"
                "sentinel down-after-milliseconds %s 1000\n"
                "sentinel failover-timeout %s 5000\n"
                % (self.SERVICE, self.primary.port, self.SERVICE, self.SERVICE))

    @property
    def url(self):
        return "redis+sentinel://127.0.0.1:%d/%s/0" % (self.port, self.SERVICE)


def make_cluster(nodes):
    """Join cluster-mode nodes into one Cluster (primaries only, the slots shared out)
    with redis-cli, as an admin would; returns once every node says cluster_state:ok."""
    import redis
    from tests.harness import wait_for
    subprocess.run(["/usr/bin/redis-cli", "--cluster", "create"] + [
        "127.0.0.1:%d" % node.port for node in nodes] + [
        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True,
        timeout=60)
    wait_for(lambda: all(b"cluster_state:ok" in redis.Redis(port=node.port).execute_command(
        "CLUSTER", "INFO") for node in nodes), 30)
