"""Greylisting: triplets in a real LMDB, the delay, the retry window, expiry, allow lists,
exemptions, 451 4.7.1, and two processes sharing one database.

Covers elemta.plugins.greylist. Time is passed in explicitly to the store; the plugin is
run through the plugin manager with a one-second delay and a real wait.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from elemta.plugins.api import Context, PluginConfigError
from elemta.plugins.greylist import GreylistStore, client_network
from elemta.plugins.manager import PluginManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1700000000.0


@pytest.fixture
def store(tmp_path):
    db = GreylistStore(str(tmp_path / "grey"), delay=300, retry_window=3600, expiry=86400)
    yield db
    db.close()


def test_delay_then_pass_then_known(store):
    triplet = ("192.0.2.0/24", "a@example.com", "b@elemta.test")
    assert store.check(*triplet, now=T0) == (False, 300)
    assert store.check(*triplet, now=T0 + 100) == (False, 200)
    assert store.check(*triplet, now=T0 + 300) == (True, 0)
    assert store.check(*triplet, now=T0 + 80000) == (True, 0)
    # Each use restarts the expiry clock: 80000 + 86000 is within a day of the last use.
    assert store.check(*triplet, now=T0 + 166000) == (True, 0)
    # Other triplets are strangers.
    assert store.check("192.0.2.0/24", "a@example.com", "c@elemta.test", now=T0 + 300)[0] \
        is False
    assert store.check("198.51.100.0/24", *triplet[1:], now=T0 + 300)[0] is False


def test_expiry_and_retry_window_forget(store):
    triplet = ("192.0.2.0/24", "a@example.com", "b@elemta.test")
    store.check(*triplet, now=T0)
    assert store.check(*triplet, now=T0 + 300) == (True, 0)
    assert store.check(*triplet, now=T0 + 300 + 86401) == (False, 300)      # expired
    late = ("192.0.2.0/24", "late@example.com", "b@elemta.test")
    store.check(*late, now=T0)
    assert store.check(*late, now=T0 + 3601) == (False, 300)               # too late
    assert store.check(*late, now=T0 + 3601 + 300) == (True, 0)


def test_purge_removes_what_is_no_longer_useful(store):
    store.check("n", "old@example.com", "r", now=T0)
    store.check("n", "passed@example.com", "r", now=T0)
    store.check("n", "passed@example.com", "r", now=T0 + 300)
    store.check("n", "fresh@example.com", "r", now=T0 + 86000)
    assert store.count() == 3
    assert store.purge(now=T0 + 86000) == 1          # "old" never came back
    assert store.purge(now=T0 + 300 + 86401) == 1    # "passed" unused for a day
    assert store.count() == 1


def test_client_networks():
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"
    assert client_network("192.0.2.77", prefix_v4=32) == "192.0.2.77/32"
    assert client_network("") == "unknown"


def rcpt(manager, client, sender, recipient, **kw):
    ctx = Context(client_address=client, **kw)
    ctx.new_transaction()
    ctx.sender, ctx.recipient = sender, recipient
    return manager.run("rcpt", ctx)


def test_plugin_greylists_with_451_471_and_lets_the_retry_in(tmp_path, caplog):
    caplog.set_level("INFO", logger="elemta")
    manager = PluginManager.from_mapping({"greylist": {"database": str(tmp_path / "g"), "delay": 1,
                                          "retry_window": 60}}).start()
    first = rcpt(manager, "203.0.113.5", "news@example.com", "u@elemta.test")
    assert first.reply == (451, "4.7.1", "Greylisted, please try again in 1 seconds")
    assert "greylisted: client=[203.0.113.5] network=203.0.113.0/24 " \
           "from=<news@example.com> to=<u@elemta.test>, retry in 1s" in caplog.text
    # The same sender retrying from another address of its /24 right away: still waiting.
    assert rcpt(manager, "203.0.113.6", "news@example.com", "u@elemta.test").refused
    time.sleep(1.05)
    assert rcpt(manager, "203.0.113.6", "news@example.com", "u@elemta.test").reply is None
    manager.close()


def test_exemptions_and_allow_lists(tmp_path):
    manager = PluginManager.from_mapping({"greylist": {
        "database": str(tmp_path / "g"),
        "allow_networks": ["198.51.100.0/24", "2001:db8::/32"],
        "allow_domains": ["partner.example", "elemta.test"]}}).start()
    assert rcpt(manager, "203.0.113.5", "a@example.com", "u@other.test").refused
    for client, sender, recipient, kw in [
            ("203.0.113.5", "a@example.com", "u@other.test", {"auth_user": "alice"}),
            ("203.0.113.5", "a@example.com", "u@other.test", {"trusted": True}),
            ("", "root@localhost", "u@other.test", {"local": True}),
            ("198.51.100.9", "a@example.com", "u@other.test", {}),
            ("::ffff:198.51.100.9", "a@example.com", "u@other.test", {}),
            ("2001:db8::25", "a@example.com", "u@other.test", {}),
            ("203.0.113.5", "a@mail.partner.example", "u@other.test", {}),
            ("203.0.113.5", "a@example.com", "postmaster@elemta.test", {})]:
        assert rcpt(manager, client, sender, recipient, **kw).reply is None, (client, kw)
    assert rcpt(manager, "203.0.113.5", "a@notpartner.example", "u@other.test").refused
    manager.close()


@pytest.mark.parametrize("settings, message", [
    ({"delay": -1}, "plugins.greylist.delay: must be 0 or more, not -1"),
    ({"delay": 600, "retry_window": 300}, "plugins.greylist.retry_window: shorter than"),
    ({"allow_networks": ["10.0.0.0/33"]}, "plugins.greylist.allow_networks[0]: '10.0.0.0/33'"),
    ({"delay": "5m"}, "plugins.greylist.delay: expected an integer, not a string ('5m')"),
    ({"database": "/proc/no/such/place"}, "plugins.greylist.database: cannot open"),
])
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(PluginConfigError) as error:
        PluginManager.from_mapping({"greylist": settings}).start(strict=True)
    assert str(error.value).startswith(message)


def test_two_processes_share_the_triplets(tmp_path):
    """What one smtpd worker learnt, another knows (each opens LMDB after fork)."""
    database = str(tmp_path / "shared")
    script = textwrap.dedent("""
        import sys
        from elemta.plugins.greylist import GreylistStore
        store = GreylistStore(sys.argv[1], delay=300)
        print(store.check("192.0.2.0/24", "a@example.com", "b@elemta.test",
                          now=float(sys.argv[2]))[0])
        store.close()
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    outputs = [subprocess.run([sys.executable, "-c", script, database, str(now)],
                              capture_output=True, env=env, timeout=30).stdout.strip()
               for now in (T0, T0 + 100, T0 + 301)]
    assert outputs == [b"False", b"False", b"True"]
