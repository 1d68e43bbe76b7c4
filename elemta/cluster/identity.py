"""This node's identity in the cluster view: its name and where its REST API answers.

Used by the api process (which registers the node) and by elemtactl --cluster (which
names the node it runs on). See also elemta.cluster.registry.
"""

import ipaddress
import socket

from elemta import __version__

VERSION = __version__


def node_name(config):
    """cluster.node_name, else the host name."""
    return config.cluster.node_name or socket.gethostname()


def api_url(config):
    """cluster.api_url, else http://api.address:api.port; a wildcard address is replaced
    by the host's name, which the other nodes can resolve (an address they cannot
    reach, 0.0.0.0, would be useless to them)."""
    if config.cluster.api_url:
        return config.cluster.api_url.rstrip("/")
    host = config.api.address
    if ipaddress.ip_address(host).is_unspecified:
        host = socket.getfqdn()
    elif ":" in host:
        host = "[%s]" % host
    return "http://%s:%d" % (host, config.api.port)
