"""This node's identity in the cluster: its name, where its REST API answers and where
the other nodes hand it mail when they are drained.

Used by the api process (which registers the node) and by elemtactl --cluster and
elemtactl drain (which name the node they run on). See also elemta.cluster.registry.
"""

import ipaddress
import socket

from elemta import __version__

VERSION = __version__


def node_name(config):
    """cluster.node_name, else the host name."""
    return config.cluster.node_name or socket.gethostname()


def api_url(config):
    """cluster.api_url, else http://api.address:api.port (https:// when the api has a
    certificate); a wildcard address is replaced
    by the host's name, which the other nodes can resolve (an address they cannot
    reach, 0.0.0.0, would be useless to them)."""
    if config.cluster.api_url:
        return config.cluster.api_url.rstrip("/")
    scheme = "https" if config.api.cert_file and config.api.key_file else "http"
    return "%s://%s:%d" % (scheme, _reachable_host(config.api.address), config.api.port)


def _reachable_host(address):
    """A listening address as the other nodes can use it: a wildcard replaced by the
    host's name, an IPv6 address in brackets."""
    if ipaddress.ip_address(address).is_unspecified:
        return socket.getfqdn()
    return "[%s]" % address if ":" in address else address


def handover_address(config):
    """cluster.handover_address, else host:port of the first handover listener (which
    relays for the nodes that log in with the cluster's credential), else of the first
    smtp listener (which relays only for relay.mynetworks), else None."""
    if config.cluster.handover_address:
        return config.cluster.handover_address
    for mode in ("handover", "smtp"):
        for listener in config.listeners:
            if listener.mode == mode:
                return "%s:%d" % (_reachable_host(listener.address), listener.port)
    return None


def handover_logs_in(config):
    """True when the hand-over address is a handover listener of this node (the same
    port), where the others log in with the cluster's credential; False when it is an
    smtp listener, which relays for them only through relay.mynetworks (and may offer
    AUTH to its users, which the hand-over login is not)."""
    address = handover_address(config)
    if not address:
        return False
    port = address.rsplit(":", 1)[-1]
    return any(listener.mode == "handover" and str(listener.port) == port
               for listener in config.listeners)
