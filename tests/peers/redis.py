"""A private redis-server on a loopback port: the cluster's shared state store in tests.

Owned by no Elemta process: tests/test_cluster_state.py points cluster.store at it.
Debian's redis-server (a Valkey-compatible store) with a config file and directory of
its own, never the system service. Nothing is saved to disk, so a restart (stop() then
start(), same port) comes back empty, as a replaced store would.

    with RedisServer(workdir) as store: ... "redis://127.0.0.1:%d/0" % store.port
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
    def __init__(self, workdir):
        self.dir = os.path.join(str(workdir), "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.config = os.path.join(self.dir, "redis.conf")
        with open(self.config, "w") as f:
            f.write("bind 127.0.0.1\nport %d\ndir %s\nsave \"\"\nappendonly no\n"
                    "daemonize no\nlogfile %s\n"
                    % (self.port, self.dir, os.path.join(self.dir, "redis.log")))
        self.process = None

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self):
        self.process = subprocess.Popen([REDIS_SERVER, self.config],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process, what="redis-server")
        return self

    def stop(self):
        stop_process(self.process)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
