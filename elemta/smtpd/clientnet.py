"""Which client addresses count as one client, for the per-client limits of the smtpd.

Owned by the smtpd worker: the connection count (elemta.smtpd.clientcount) and the AUTH
failure penalty (elemta.smtpd.authn) both key their tables with client_group().

An IPv4 address is one client. An IPv6 client is its /64: a /64 is what one host or one
LAN is normally given (SLAAC needs it; hosters hand one to each VM), so whoever has one
address has 2^64 of them, and counting per address would let a single host multiply its
allowance at will. Postfix's anvil counts per address (Postfix 3.8 and later group IPv6
by smtpd_client_ipv6_prefix_length, 84 bits by default, which still leaves 2^44
addresses to a /64); we take the /64, the unit an attacker cannot cheaply split. The
cost: hosts of one IPv6 LAN share one allowance, as hosts behind one IPv4 NAT do.
See also: elemta.smtpd.server (the connection limit), elemta.smtpd.authn.
"""

import ipaddress

IPV6_PREFIX = 64


def client_group(address):
    """The key a client address is counted under: the IPv4 address, or the IPv6 /64
    ("2001:db8:1:2::/64"). An IPv4-mapped IPv6 address (a dual-stack listener) is its
    IPv4 address; anything unparsable is counted as itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])     # drop a zone (fe80::1%eth0)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)
