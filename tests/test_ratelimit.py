"""Client rate limits (issue #15 item 2, Postfix's anvil): the counting store, and a real
Elemta with two smtpd workers refusing connections, messages and recipients over the
limits, per client address, AUTH login and sender, shared by the workers and kept across
a worker's restart; exempt networks are never limited.

Covers elemta.restrictions.ratecounter and elemta.restrictions.ratelimit. Time units are
an hour in the server tests, so no window ends while a test runs; the window itself is
tested on the store with explicit times.
"""

import contextlib
import os
import re
import signal
import smtplib
import socket

import lmdb
import pytest

from elemta.plugins.api import PluginConfigError
from elemta.plugins.manager import PluginManager
from elemta.restrictions.ratecounter import LMDBRateCounter
from elemta.restrictions.ratelimit import client_key
from tests.harness import free_port, wait_for
from tests.test_metrics import healthy, labelled, settled
from tests.test_workers import smtpd_workers

T0 = 1700000000.0


def test_counter_counts_per_key_within_a_window(tmp_path):
    counter = LMDBRateCounter(str(tmp_path / "rl"))
    assert [counter.hit("a", 1, 60, now=T0 + i) for i in range(3)] == [1, 2, 3]
    assert counter.hit("b", 1, 60, now=T0 + 3) == 1           # another key
    assert counter.hit("a", 0, 60, now=T0 + 4) == 3           # cost 0 only looks
    assert counter.hit("a", 5, 60, now=T0 + 59) == 8
    # The window began at the first event (anvil): 60 s later a new one starts at 1.
    assert counter.hit("a", 1, 60, now=T0 + 60) == 1
    assert counter.hit("a", 1, 60, now=T0 + 61) == 2
    assert counter.purge(60, now=T0 + 100) == 1               # "b" is over, "a" is not
    assert counter.count() == 1
    counter.close()
    # Another opening (another worker, a restarted one) sees the same counts.
    again = LMDBRateCounter(str(tmp_path / "rl"))
    assert again.hit("a", 1, 60, now=T0 + 62) == 3
    again.close()


def test_ipv6_clients_count_per_64():
    assert client_key("2001:db8:1:2:3::9") == client_key("2001:db8:1:2:ffff::1") \
        == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.7") == "192.0.2.7"


@pytest.mark.parametrize("settings, message", [
    ({"time_unit": 0}, "plugins.ratelimit.time_unit: must be greater than 0, not 0"),
    ({"message_rate_limit": -1}, "plugins.ratelimit.message_rate_limit: must be 0 or more"),
    ({"exceptions": ["10.0.0.0/33"]}, "plugins.ratelimit.exceptions[0]: '10.0.0.0/33'"),
    ({"database": "/proc/no/such/place"}, "plugins.ratelimit.database: cannot open"),
])
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(PluginConfigError) as error:
        PluginManager.from_mapping({"ratelimit": settings}).start(strict=True)
    assert str(error.value).startswith(message)


def server_with_limits(elemta_server, tmp_path, **limits):
    settings = {"enabled": True, "database": str(tmp_path / "ratelimit"),
                "time_unit": 3600, "exceptions": ["127.0.0.4/32"]}
    settings.update(limits)
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 2},
                           relay={"mynetworks": ["127.0.0.1/32", "127.0.0.5/32"]},
                           auth={"credentials_file": credentials_file(tmp_path),
                                 "allow_plaintext": True, "failure_delay": 0.001,
                                 "max_failure_delay": 0.002},
                           plugins={"ratelimit": settings})
    wait_for(lambda: len(smtpd_workers(server.process.pid)) == 2)
    return server


def credentials_file(tmp_path):
    from elemta.util.credentials import set_user
    path = str(tmp_path / "credentials")
    if not os.path.exists(path):
        set_user(path, "alice", "wonderland")
    return path


def greeting(server, client):
    """The first reply a fresh connection from `client` gets."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                  source_address=(client, 0)) as s:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"220 "):
            s.sendall(b"QUIT\r\n")
            s.recv(512)
        return data.decode()


@contextlib.contextmanager
def only_worker(server, pid):
    """Stop (SIGSTOP) every smtpd worker but `pid` meanwhile, so that one takes every
    connection; the others go on (SIGCONT) afterwards."""
    others = [other for other in smtpd_workers(server.process.pid) if other != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def refusing_pids(server, pattern):
    """pids of the workers that logged a line matching pattern."""
    return set(re.findall(r"elemta/smtpd\[(\d+)\]: " + pattern, server.log()))


def test_connection_rate_is_per_client_shared_by_workers_and_kept(elemta_server,
                                                                  tmp_path):
    server = server_with_limits(elemta_server, tmp_path, connection_rate_limit=3)
    refused = "421 4.7.0 mx.test Error: too many connections from 127.0.0.2\r\n"
    first, second = sorted(smtpd_workers(server.process.pid))
    # Two connections to one worker, the third to the other: that one, which has let
    # only one in itself, refuses the fourth, and so does the first worker then.
    with only_worker(server, first):
        assert [greeting(server, "127.0.0.2")[:4] for _ in range(2)] == ["220 "] * 2
    with only_worker(server, second):
        assert greeting(server, "127.0.0.2")[:4] == "220 "
        assert greeting(server, "127.0.0.2") == refused
    with only_worker(server, first):
        assert greeting(server, "127.0.0.2") == refused
    assert refusing_pids(server, r"NOQUEUE: reject: CONNECT from unknown\[127\.0\.0\.2\]: "
                                 r"421 4\.7\.0 Error: too many connections from "
                                 r"127\.0\.0\.2; proto=SMTP \(plugin ratelimit\)") \
        == {str(first), str(second)}
    assert "Connection rate limit exceeded: 4 from unknown[127.0.0.2] per 3600s" \
        in server.log()
    # Another client has its own allowance; exempt ones have none to use up.
    assert [greeting(server, "127.0.0.3")[:4] for _ in range(3)] == ["220 "] * 3
    assert greeting(server, "127.0.0.3").startswith("421 4.7.0")
    for exempt in ("127.0.0.4", "127.0.0.5"):        # exceptions, mynetworks
        assert [greeting(server, exempt)[:4] for _ in range(8)] == ["220 "] * 8
    assert greeting(server, "127.0.0.6")[:4] == "220 "
    # Every worker killed and replaced: the counts are still there.
    old = set(smtpd_workers(server.process.pid))
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(smtpd_workers(server.process.pid)) == 2
             and not old & set(smtpd_workers(server.process.pid)), timeout=30)
    assert greeting(server, "127.0.0.2") == refused
    assert [greeting(server, "127.0.0.6")[:4] for _ in range(2)] == ["220 "] * 2
    assert greeting(server, "127.0.0.6").startswith("421 4.7.0 mx.test Error: too many "
                                                    "connections from 127.0.0.6")


def send(server, client, sender, recipients, login=None):
    """Send one message in a new session; {"MAIL" or recipient: (code, text)} of what
    was refused."""
    refused = {}
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(client, 0),
                      timeout=10) as smtp:
        smtp.ehlo("client.test")
        if login:
            smtp.login(*login)
        code, text = smtp.mail(sender)
        if code != 250:
            return {"MAIL": (code, text.decode())}
        for rcpt in recipients:
            code, text = smtp.rcpt(rcpt)
            if code != 250:
                refused[rcpt] = (code, text.decode())
        if len(refused) < len(recipients):
            smtp.data(b"Subject: rate\r\n\r\nx\r\n")
    return refused


def test_message_and_recipient_rates_per_client(elemta_server, tmp_path):
    server = server_with_limits(elemta_server, tmp_path, message_rate_limit=2,
                                recipient_rate_limit=3)
    for _ in range(2):
        assert send(server, "127.0.0.2", "a@c.test", ["b@example.test"]) == {}
    assert send(server, "127.0.0.2", "a@c.test", ["b@example.test"]) == {
        "MAIL": (450, "4.7.1 Error: too much mail from 127.0.0.2")}
    assert ("NOQUEUE: reject: MAIL from unknown[127.0.0.2]: 450 4.7.1 Error: too much "
            "mail from 127.0.0.2; from=<a@c.test> proto=ESMTP helo=<client.test> (plugin "
            "ratelimit)") in server.log()
    assert "Message delivery request rate limit exceeded: 3 from unknown[127.0.0.2]" \
        in server.log()
    # Recipients: 2 in one message, 1 in the next (both accepted), then the 4th refused.
    assert send(server, "127.0.0.3", "a@c.test", ["b@example.test", "c@example.test"]) \
        == {}
    assert send(server, "127.0.0.3", "a@c.test", ["d@example.test", "e@example.test"]) \
        == {"e@example.test": (450, "4.7.1 Error: too many recipients from 127.0.0.3")}
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.3]: 450 4.7.1 Error: too many "
            "recipients from 127.0.0.3; from=<a@c.test> to=<e@example.test> proto=ESMTP "
            "helo=<client.test> (plugin ratelimit)") in server.log()
    assert len(server.queued_ids()) == 4
    for exempt in ("127.0.0.4", "127.0.0.5"):
        for _ in range(3):
            assert send(server, exempt, "a@c.test", ["x@example.test", "y@example.test"]) \
                == {}


def test_message_rate_per_sender_and_per_login(elemta_server, tmp_path):
    server = server_with_limits(elemta_server, tmp_path, sender_message_rate_limit=2,
                                user_recipient_rate_limit=2)
    # The same sender from two clients, spelled two ways: counted together, in the
    # queue's normal form (the domain's case folded, needless quotes dropped).
    assert send(server, "127.0.0.2", "A@EXAMPLE.test", ["b@example.test"]) == {}
    assert send(server, "127.0.0.3", '"A"@example.TEST.', ["b@example.test"]) == {}
    assert send(server, "127.0.0.6", "A@example.test", ["b@example.test"]) == {
        "MAIL": (450, "4.7.1 Error: too much mail from sender A@example.test")}
    assert "for sender A@example.test per 3600s" in server.log()
    assert send(server, "127.0.0.6", "other@example.test", ["b@example.test"]) == {}
    # Bounces (the null sender) share no allowance.
    for _ in range(3):
        assert send(server, "127.0.0.2", "", ["b@example.test"]) == {}
    # An AUTH login: its recipients counted wherever it connects from.
    alice = ("alice", "wonderland")
    assert send(server, "127.0.0.2", "x1@c.test", ["r1@example.test"], alice) == {}
    assert send(server, "127.0.0.3", "x2@c.test", ["r2@example.test", "r3@example.test"],
                alice) == {"r3@example.test": (450, "4.7.1 Error: too many recipients "
                                                    "from user alice")}
    assert "(plugin ratelimit)" in server.log()
    assert send(server, "127.0.0.3", "x3@c.test", ["r4@example.test"]) == {}


def test_config_error_names_file_line_and_key(tmp_path):
    from elemta.config.errors import ConfigError
    from elemta.config.loader import load_config
    path = tmp_path / "elemta.yaml"
    path.write_text("plugins:\n  ratelimit:\n    enabled: true\n"
                    "    connection_rate_limit: lots\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value) == ("%s:4: plugins.ratelimit.connection_rate_limit: expected "
                                "an integer, not a string ('lots')" % path)


def test_a_store_flooded_with_keys_forgets_the_least_recently_used(tmp_path):
    counter = LMDBRateCounter(str(tmp_path / "small"), map_size=1 << 20)
    counter.hit("ended", 1, 60, now=T0 - 100)
    for i in range(30000):              # far more keys than 1 MB holds
        counter.hit("client-%06d" % i, 1, 60, now=T0 + i / 1000.0)
        if i % 100 == 0:
            counter.hit("busy", 1, 60, now=T0 + i / 1000.0)
    assert counter.count() < 15000
    # The key in use all along kept its count; the ended and the oldest are gone.
    assert counter.hit("busy", 0, 60, now=T0 + 30) == 300
    assert counter.hit("ended", 0, 60, now=T0 + 30) == 0
    assert counter.hit("client-000000", 0, 60, now=T0 + 30) == 0
    assert counter.hit("client-029999", 0, 60, now=T0 + 30) == 1
    counter.close()


def test_a_store_full_to_the_last_page_is_emptied_not_failed(tmp_path):
    path = str(tmp_path / "full")
    env = lmdb.open(path, map_size=1 << 20, subdir=True)
    with pytest.raises(lmdb.MapFullError):
        for i in range(100000):         # as full as LMDB gets: not even a delete fits
            with env.begin(write=True) as txn:
                txn.put(b"connect\0127.1.%d.%d" % (i >> 8, i & 255), b"x" * 24)
    env.close()
    counter = LMDBRateCounter(path, map_size=1 << 20)
    assert counter.hit("newcomer", 1, 60, now=T0) == 1
    assert counter.count() <= 1
    assert counter.hit("next", 1, 60, now=T0) == 1
    counter.close()


def test_a_flood_of_client_addresses_cannot_fill_the_store_against_everyone(
        elemta_server, tmp_path):
    """Clients choose the keys: many addresses must not fill the counters into refusing
    every client (it was 421 4.3.0 for all once LMDB was full). The flood goes through
    the store the workers use, with their keys, as thousands of connections would;
    a client over its limit, connecting meanwhile, stays refused, and a new one is let
    in."""
    server = server_with_limits(elemta_server, tmp_path, connection_rate_limit=3,
                                map_size_mb=1)
    refused = "421 4.7.0 mx.test Error: too many connections from 127.0.0.2\r\n"
    assert [greeting(server, "127.0.0.2")[:4] for _ in range(3)] == ["220 "] * 3
    flood = LMDBRateCounter(str(tmp_path / "ratelimit"), map_size=1 << 20)
    for i in range(30000):
        flood.hit("connect\0" + client_key("127.1.%d.%d" % (i >> 8, i & 255)), 1, 3600)
        if i % 3000 == 0:
            assert greeting(server, "127.0.0.2") == refused
    assert flood.count() < 10000
    flood.close()
    for client in ("127.0.0.7", "127.0.0.8", "127.1.0.1"):
        assert greeting(server, client)[:4] == "220 "
    assert greeting(server, "127.0.0.2") == refused
    assert "Traceback" not in server.log()


def test_message_rate_per_login_and_recipient_rate_per_sender(elemta_server, tmp_path):
    server = server_with_limits(elemta_server, tmp_path, user_message_rate_limit=1,
                                sender_recipient_rate_limit=2)
    alice = ("alice", "wonderland")
    assert send(server, "127.0.0.2", "s1@c.test", ["b@example.test"], alice) == {}
    assert send(server, "127.0.0.3", "s9@c.test", ["b@example.test"], alice) == {
        "MAIL": (450, "4.7.1 Error: too much mail from user alice")}
    assert "Message delivery request rate limit exceeded: 2 from unknown[127.0.0.3] for " \
           "user alice per 3600s" in server.log()
    assert send(server, "127.0.0.2", "s2@c.test",
                ["a@example.test", "b@example.test", "c@example.test"]) == {
        "c@example.test": (450, "4.7.1 Error: too many recipients from sender s2@c.test")}
    # Exempt clients are not counted at all, logins and senders included.
    assert send(server, "127.0.0.4", "s2@c.test", ["d@example.test"], alice) == {}


# 127.0.0.3 is on the DNS block list.
DNSBL_ZONES = {"bl.test": "3.0.0.127 A 127.0.0.2\n"}


def test_connections_refused_early_are_counted_too(elemta_server, tmp_path):
    """anvil counts every connection: those the pregreet test drops and those a DNSBL
    refuses use up the client's allowance as well."""
    from tests.peers.nsd import NSDInstance, nsd_available
    if nsd_available():
        pytest.skip(nsd_available())
    with NSDInstance(str(tmp_path / "nsd"), DNSBL_ZONES) as dns:
        server = elemta_server(
            smtpd={"hostname": "mx.test", "workers": 1},
            relay={"mynetworks": ["127.0.0.1/32"]},
            dns={"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": 2.0},
            protocol_tests={"greet_wait": 1, "greet_action": "drop"},
            plugins={"ratelimit": {"enabled": True, "database": str(tmp_path / "rl"),
                                   "time_unit": 3600, "connection_rate_limit": 2},
                     "dnsbl": {"enabled": True, "sites": ["bl.test"]}})
        for _ in range(2):               # talks before its turn: dropped
            with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                          source_address=("127.0.0.2", 0)) as s:
                s.sendall(b"EHLO bot.test\r\n")
                assert b"521 5.5.1 Protocol error" in s.recv(512) + s.recv(512)
        assert greeting(server, "127.0.0.2") == \
            "421 4.7.0 mx.test Error: too many connections from 127.0.0.2\r\n"
        for _ in range(2):               # listed: the pregreet bait, then the refusal
            with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                          source_address=("127.0.0.3", 0)) as s:
                replies = b""
                while not re.search(rb"(^|\n)\d{3} [^\n]*\n", replies):
                    replies += s.recv(512)
            assert replies.decode() == (
                "220-mx.test ESMTP Elemta\r\n554 5.7.1 mx.test Service unavailable; client "
                "[127.0.0.3] blocked using bl.test\r\n")
        assert greeting(server, "127.0.0.3") == \
            "421 4.7.0 mx.test Error: too many connections from 127.0.0.3\r\n"


def test_connections_are_counted_before_the_name_lookup(elemta_server, tmp_path):
    """Counted as they arrive: clients that hang up while their name is looked up use
    up their allowance, and one over it is refused without a lookup."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # never answers
    silent.bind(("127.0.0.1", 0))
    try:
        server = elemta_server(
            smtpd={"hostname": "mx.test", "workers": 1, "peername_timeout": 1.0},
            relay={"mynetworks": ["127.0.0.1/32"]},
            dns={"nameservers": ["127.0.0.1"], "port": silent.getsockname()[1],
                 "timeout": 5.0},
            plugins={"ratelimit": {"enabled": True, "database": str(tmp_path / "rl2"),
                                   "time_unit": 3600, "connection_rate_limit": 2}})
        for _ in range(2):               # gone before the lookup ends
            socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                     source_address=("127.0.0.2", 0)).close()
        wait_for(lambda: server.log().count("127.0.0.2: lookup timed out") == 2,
                 timeout=30)
        assert greeting(server, "127.0.0.2") == \
            "421 4.7.0 mx.test Error: too many connections from 127.0.0.2\r\n"
        assert server.log().count("127.0.0.2: lookup timed out") == 2
    finally:
        silent.close()


def test_rate_limit_hits_are_counted_as_the_ratelimit_restrictions_refusals(
        elemta_server, tmp_path, monkeypatch):
    """elemta(8): a rate limit hit is elemta_smtpd_restriction_refusals_total
    {restriction="ratelimit"}, by stage, on the api's /metrics."""
    api_port = free_port()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    server = elemta_server(
        relay={"mynetworks": ["127.0.0.1/32"]}, api={"enabled": True, "port": api_port},
        plugins={"ratelimit": {"enabled": True, "database": str(tmp_path / "ratelimit"),
                               "time_unit": 3600, "connection_rate_limit": 3,
                               "message_rate_limit": 1, "recipient_rate_limit": 2}})
    wait_for(lambda: healthy(api_port))
    assert send(server, "127.0.0.2", "a@c.test", ["b@example.test"]) == {}
    assert list(send(server, "127.0.0.2", "a@c.test", ["b@example.test"])) == ["MAIL"]
    assert greeting(server, "127.0.0.2").startswith("220 ")       # the 3rd of 3
    assert greeting(server, "127.0.0.2").startswith("421 4.7.0 ")
    assert list(send(server, "127.0.0.3", "a@c.test",
                     ["b@example.test", "c@example.test", "d@example.test"])) == \
        ["d@example.test"]
    def counted(samples):
        refusals = labelled(samples, "elemta_smtpd_restriction_refusals_total")
        assert {stage: count for (restriction, stage), count in refusals.items()
                if restriction == "ratelimit"} == {"connect": 1, "mail": 1, "rcpt": 1}
    settled(api_port, counted)
