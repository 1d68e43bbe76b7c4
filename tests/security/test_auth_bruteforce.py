"""Attack class: guessing passwords through SMTP AUTH.

The penalty for recent failures (elemta.smtpd.authn) is waited BEFORE a guess is
checked, so a right password is answered no sooner than a wrong one: a client cannot
take "no 235 yet" for "wrong" and guess again at once on a new connection. Failures are
counted per IPv4 address or IPv6 /64, in a bounded table (elemta.smtpd.authfailures)
that a flood from many addresses cannot purge of a client that failed often.
"""

import base64
import logging
import smtplib
import time
from types import SimpleNamespace

from elemta.smtpd.authfailures import FailureTable
from elemta.smtpd.authn import Authenticator
from elemta.smtpd.clientnet import client_group

ATTACKER = "127.0.0.3"


def plain(user, password):
    return "AUTH PLAIN " + base64.b64encode(b"\0%s\0%s" % (user, password)).decode()


def attempt(port, password, source=ATTACKER):
    """One guess on a fresh connection, as a guesser would: (code, seconds to answer)."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0)) as smtp:
        smtp.ehlo()
        started = time.monotonic()
        code, _ = smtp.docmd(plain(b"alice", password))
        return code, time.monotonic() - started


def test_a_right_password_is_answered_no_sooner_than_a_wrong_one(elemta_server, credentials):
    server = elemta_server(auth={"credentials_file": credentials, "failure_delay": 0.5,
                                 "allow_plaintext": True})
    assert attempt(server.port, b"guess1")[0] == 535
    assert attempt(server.port, b"guess2")[0] == 535
    # Two recent failures: whatever the next guess is, its answer waits 2 x 0.5 s. (It
    # used to come at once when right and only a wrong one was delayed, so a guesser
    # could hang up after a few milliseconds of silence and guess again.)
    code, right = attempt(server.port, b"wonderland")
    assert code == 235 and right >= 1.0, right
    # The success does not wipe the failures (a guesser with one valid account of his
    # own could otherwise reset his penalty between guesses).
    code, wrong = attempt(server.port, b"guess3")
    assert code == 535 and wrong >= 1.0, wrong
    assert "AUTH from 127.0.0.3 waits 1.0s: 2 recent failure(s) from 127.0.0.3" in server.log()
    # Another client is not slowed down by the guesser's failures.
    assert attempt(server.port, b"wonderland", source="127.0.0.4")[0] == 235
    assert "AUTH from 127.0.0.4 waits" not in server.log()


def test_ipv6_guessers_are_counted_per_64(tmp_path, credentials, caplog):
    authenticator = Authenticator(SimpleNamespace(
        backend="file", credentials_file=credentials, dovecot_socket=None,
        failure_delay=0.2, max_failure_delay=30.0))

    class auth:         # noqa: N801 - reads as the check it stands for
        def check(host, username, password):
            return authenticator.authenticate(host, "127.0.0.1", "PLAIN", username,
                                              password, True).outcome == "ok"
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2"):     # two addresses, one /64
        assert not auth.check(host, "alice", "guess")
    caplog.set_level(logging.INFO, logger="elemta.smtpd")
    started = time.monotonic()
    assert auth.check("2001:db8:1:2:ffff::3", "alice", "wonderland")
    assert time.monotonic() - started >= 0.4
    assert ("AUTH from 2001:db8:1:2:ffff::3 waits 0.4s: 2 recent failure(s) from "
            "2001:db8:1:2::/64") in caplog.text
    assert auth.check("2001:db8:1:3::1", "alice", "wonderland")      # the next /64: free
    assert "AUTH from 2001:db8:1:3::1 waits" not in caplog.text


def test_a_flood_of_new_addresses_does_not_reset_a_guessers_failures():
    table = FailureTable(capacity=1000)
    guesser = client_group("2001:db8:bad::1")
    for second in range(5):
        table.record_failure(guesser, now=float(second))
    # One failure each from 50,000 other /64s: the table stays bounded and evicts the
    # lightest entries, never the guesser's five.
    for n in range(50000):
        table.record_failure(client_group("2001:db8:%x:%x::1" % (n >> 16, n & 0xffff)),
                             now=10.0 + n / 1000.0)
        assert len(table) <= 1000
    assert table.failures(guesser, now=60.0) == 5
    # Failures still expire with the window (600 s after the last one).
    assert table.failures(guesser, now=4.0 + 601) == 0
