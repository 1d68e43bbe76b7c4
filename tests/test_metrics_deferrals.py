"""Deferrals by reason and deliveries by destination domain class (issue 17 req 2), as
Prometheus scrapes them from a live Elemta: one message to six next hops that each hold
mail back their own way (real sockets: scripted servers, a port nobody listens on, a
nameserver that never answers), each deferral counted once under its reason, and each
recipient under its domain class (an admin's delivery.domain_classes name, else remote,
or relayhost for mail through delivery.relayhost). Labels never carry a domain.
"""

import smtplib
import socket

from tests.harness import free_port, wait_for
from tests.peers.sink import HANG, ScriptedServer
from tests.test_metrics import BODY, healthy, labelled, scrape


def _dead_port():
    """A loopback port nobody listens on (bound then closed: refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_deferral_is_counted_under_its_reason_and_class(elemta_server):
    api_port, dead, no_dns = free_port(), _dead_port(), free_port()
    with ScriptedServer(script={"GREETING": "421 4.3.2 too busy, come back later"}) \
            as busy, \
            ScriptedServer(script={"RCPT": "450 4.2.1 mailbox busy"}) as full, \
            ScriptedServer(script={"DOT": "451 4.3.0 queue file write error"}) as broken, \
            ScriptedServer(script={"GREETING": HANG}) as silent, \
            ScriptedServer(script={"MAIL": "452 4.3.1 insufficient storage"}) as smarthost:

        def to(server):
            return "smtp:[127.0.0.1]:%d" % server.port
        server = elemta_server(
            api={"enabled": True, "port": api_port},
            relay={"local_domains": ["example.test"], "mynetworks": ["127.0.0.1/32"]},
            delivery={"workers": 1,
                      "domain_classes": [{"name": "partners",
                                          "domains": ["full.test", ".partner.test"]}],
                      "transport": [
                          {"domain": "busy.test", "nexthop": to(busy)},
                          {"domain": "full.test", "nexthop": to(full)},
                          {"domain": "broken.test", "nexthop": to(broken)},
                          {"domain": "silent.test", "nexthop": to(silent)},
                          {"domain": "refused.test",
                           "nexthop": "smtp:[127.0.0.1]:%d" % dead},
                          # MX lookup: its nameserver never answers.
                          {"domain": "nodns.test", "nexthop": "smtp:nodns.test:25"}],
                      "relayhost": "[127.0.0.1]:%d" % smarthost.port,
                      "nameservers": ["127.0.0.1"], "dns_port": no_dns,
                      "dns_timeout": 0.3, "command_timeout": 5.0,
                      # Each recipient deferred once in the test's time.
                      "min_backoff": 3600.0, "max_backoff": 3600.0})
        wait_for(lambda: healthy(api_port) and "delivery worker started" in server.log())
        recipients = ["a@busy.test", "b@full.test", "c@broken.test", "d@silent.test",
                      "e@refused.test", "f@nodns.test", "g@elsewhere.test"]
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("sender@example.test", recipients, BODY)

        def deferrals():         # {(domain_class, reason, transport): count}
            return labelled(scrape(api_port)[0], "elemta_delivery_deferrals_total")
        wait_for(lambda: sum(deferrals().values()) >= len(recipients), timeout=60)
        assert deferrals() == {
            ("remote", "greeting", "smtp"): 1,        # 421 greeting
            ("partners", "rcpt", "smtp"): 1,          # 450 to RCPT TO, an admin's class
            ("remote", "end_of_data", "smtp"): 1,     # 451 after the final dot
            ("remote", "timeout", "smtp"): 1,         # no greeting within command_timeout
            ("remote", "connect", "smtp"): 1,         # connection refused
            ("remote", "dns", "smtp"): 1,             # no MX answer
            ("relayhost", "mail", "smtp"): 1,         # the relay host's 452 to MAIL FROM
        }
        # Counted before its deferral, so written with it or earlier.
        deliveries = labelled(scrape(api_port)[0], "elemta_deliveries_total")
        assert deliveries == {("remote", "deferred", "smtp"): 5,
                              ("partners", "deferred", "smtp"): 1,
                              ("relayhost", "deferred", "smtp"): 1}
        # The log's deferral lines say the same, reply by reply.
        log = server.log()
        assert "status=deferred (421 4.3.2 too busy" in log
        assert "status=deferred (452 4.3.1 insufficient storage" in log
