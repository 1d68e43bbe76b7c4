"""Attack class: starving a client of connections by way of the shared per-client count.

The connection count (elemta.smtpd.clientcount) hashes each client into two slots of a
count-min table. With an unkeyed hash an attacker computes two addresses whose slots
cover a victim's, holds limits.connections_per_client sessions from each, and the victim
gets 421 without having a single session open. The hash is now keyed with a secret
drawn at master start. IPv6 clients are counted per /64 (elemta.smtpd.clientnet).
"""

import hashlib
import ipaddress
import socket

from elemta.smtpd.clientcount import SLOTS, ClientCounts
from elemta.smtpd.clientnet import client_group

VICTIM = "127.0.0.2"


def unkeyed_slots(address):
    """The slots the table used before it was keyed: anyone could compute them."""
    digest = hashlib.blake2b(address.encode("ascii"), digest_size=8).digest()
    return (int.from_bytes(digest[:4], "big") % SLOTS,
            SLOTS + int.from_bytes(digest[4:], "big") % SLOTS)


def colliding_addresses(victim):
    """Two loopback addresses: one shares the victim's first slot, one its second."""
    first, second = unkeyed_slots(victim)
    found = {}
    for n in range(1 << 16, 1 << 24):
        address = str(ipaddress.IPv4Address((127 << 24) + n))
        a, b = unkeyed_slots(address)
        if a == first and "first" not in found:
            found["first"] = address
        if b == second and "second" not in found:
            found["second"] = address
        if len(found) == 2:
            return found["first"], found["second"]
    raise AssertionError("no colliding addresses found")


def connect(port, source):
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    s.settimeout(5)
    return s, s.recv(200)


def test_addresses_colliding_under_the_old_hash_no_longer_lock_out_a_victim(elemta_server):
    attacker_a, attacker_b = colliding_addresses(VICTIM)
    assert unkeyed_slots(attacker_a)[0] == unkeyed_slots(VICTIM)[0]
    assert unkeyed_slots(attacker_b)[1] == unkeyed_slots(VICTIM)[1]
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2},
                           limits={"connections_per_client": 3},
                           relay={"mynetworks": ["127.0.0.1/32"]})
    held = [connect(server.port, source) for source in [attacker_a] * 3 + [attacker_b] * 3]
    try:
        assert all(greeting.startswith(b"220 ") for _, greeting in held), held
        victim, greeting = connect(server.port, VICTIM)
        victim.close()
        assert greeting.startswith(b"220 "), greeting     # was 421 4.7.0 with the old hash
        # The attackers themselves are still held to the limit.
        extra, greeting = connect(server.port, attacker_a)
        extra.close()
        assert greeting.startswith(b"421 4.7.0 mx.test Error: too many connections from "
                                   + attacker_a.encode()), greeting
    finally:
        for s, _ in held:
            s.close()


def test_each_master_start_draws_a_new_secret():
    # Two tables (two master starts) put the same client in different slots: what an
    # attacker learns from one start (by timing, say) is useless after a restart.
    tables = [ClientCounts(1) for _ in range(4)]
    assert len({table._slots(VICTIM) for table in tables}) > 1


def test_ipv6_clients_are_counted_per_64():
    counts = ClientCounts(2)
    counts.use_row(1)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2:a::b"):
        counts.add(host, 1)
    # Any address of that /64 sees the three sessions; the next /64 sees none of them.
    assert counts.count("2001:db8:1:2:1234::5") == 3
    assert counts.count("2001:db8:1:3::1") == 0
    assert client_group("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    # IPv4 is per address, also when a dual-stack listener reports it IPv4-mapped.
    counts.add("192.0.2.1", 1)
    assert counts.count("::ffff:192.0.2.1") == 1 and counts.count("192.0.2.2") == 0
