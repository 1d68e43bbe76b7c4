"""A store an admin would run off loopback (issue 19, requirement 1): TLS and an ACL
user with a password, against a real redis-server (tests/peers/redis.py) that accepts
nothing else.

What an admin sees: with cluster.store rediss://, cluster.ca_file and
cluster.password_file ("user password"), two nodes count a sender together; a wrong
password is an outage with the store's reason in the log, mail flowing meanwhile; an
untrusted certificate (no ca_file) likewise, so a node never talks to a store it
cannot verify.
See also: elemta.sharedstate.redisstore.connect, tests/test_cluster_state.py.
"""

import subprocess

import pytest

from tests.peers import redis as redis_peer
from tests.test_cluster_state import LIMIT, NOT_US, send

pytestmark = pytest.mark.skipif(redis_peer.missing() is not None,
                                reason=redis_peer.missing() or "")

ACL = ["user default off", "user elemta on >s3cret-pass ~elemta:* &* +@all"]


@pytest.fixture
def store(tmp_path):
    """A redis-server on TLS only, for ACL user elemta alone; its certificate (for
    127.0.0.1) is its own CA."""
    cert, key = str(tmp_path / "redis-cert.pem"), str(tmp_path / "redis-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                    "2", "-subj", "/CN=store.test", "-addext",
                    "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    with redis_peer.RedisServer(tmp_path, tls=(cert, key), acl=ACL) as server:
        server.cert = cert
        yield server


def password_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def start_node(elemta_server, tmp_path, store, name, password, ca_file=True):
    return elemta_server(
        relay={"mynetworks": NOT_US, "local_domains": ["example.test"]},
        cluster={"store": store.url, "timeout": 1, "retry_interval": 0.5,
                 "password_file": password_file(tmp_path, name + "-pw", password),
                 "ca_file": store.cert if ca_file else None},
        plugins={"ratelimit": {"enabled": True, "sender_message_rate_limit": LIMIT,
                               "time_unit": 3600,
                               "database": str(tmp_path / (name + "rl"))}})


def test_nodes_share_state_over_tls_as_an_acl_user(elemta_server, tmp_path, store):
    assert store.url.startswith("rediss://")
    a = start_node(elemta_server, tmp_path, store, "a", "elemta s3cret-pass")
    b = start_node(elemta_server, tmp_path, store, "b", "elemta s3cret-pass")
    assert [send(node.port, "bulk@sender.test") for node in (a, b, a)] == [250] * LIMIT
    assert send(b.port, "bulk@sender.test") == 450
    for node in (a, b):
        assert "unavailable" not in node.log()


def test_a_wrong_password_or_an_unverified_store_is_an_outage_not_lost_mail(
        elemta_server, tmp_path, store):
    wrong = start_node(elemta_server, tmp_path, store, "w", "elemta not-the-password")
    unverified = start_node(elemta_server, tmp_path, store, "u", "elemta s3cret-pass",
                            ca_file=False)
    # Each counts alone (store_failure local): LIMIT passes, then its own refusal.
    for node in (wrong, unverified):
        assert [send(node.port, "solo@sender.test") for _ in range(LIMIT)] == [250] * LIMIT
        assert send(node.port, "solo@sender.test") == 450
    assert "cluster store %s unavailable (AuthenticationError" % store.url in wrong.log()
    assert "certificate verify failed" in unverified.log(), unverified.log()
