"""Which registered nodes this node trusts with its api token and its drained mail.

Used by elemta.cluster.peers (before a request carries the api token), by elemtactl
drain (before a message is handed to a node found in the registry) and by the smtpd's
handover listeners (which talk to no client outside them). The
registry is only as private as the store: whoever can write to it could register a
node whose API URL or SMTP address is his own, and collect the token or the mail.
Registrations are signed (elemta.cluster.credential), which keeps out whoever has not
the api token; on top of that a node's address must lie in cluster.peer_networks (by
default relay.mynetworks), and the connection goes to the very address that was
checked, so a name cannot resolve one way for the check and another way for the
connection.
See also: elemta.cluster.registry, man/elemta.conf.5 (cluster.peer_networks).
"""

import ipaddress
import socket


class Untrusted(Exception):
    """A node's address is outside cluster.peer_networks or cannot be resolved; str()
    says which and why."""


class PeerNetworks:
    def __init__(self, networks):
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    @classmethod
    def of(cls, config):
        """cluster.peer_networks, else relay.mynetworks."""
        return cls(config.cluster.peer_networks or config.relay.mynetworks)

    def __str__(self):
        return ", ".join(str(network) for network in self.networks)

    def holds(self, address):
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks
                   if network.version == address.version)

    def holds_text(self, text):
        """holds() of an address as text (a zone dropped); False when it is none."""
        try:
            return self.holds(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError:
            return False

    def address(self, host, port):
        """The IP address (text) to connect to for host: host itself when it is an
        address inside the networks, else the first of its addresses that is. Raises
        Untrusted."""
        host = host.strip("[]")
        try:
            found = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as error:
                raise Untrusted("cannot resolve %s: %s" % (host, error)) from None
            found = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        for address in found:
            if self.holds(address):
                return str(address)
        raise Untrusted("%s is outside cluster.peer_networks (%s)" % (
            host if [str(a) for a in found] == [host] else "%s (%s)" % (
                host, ", ".join(str(a) for a in found)), self))
