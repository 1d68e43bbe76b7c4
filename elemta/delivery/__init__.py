"""Delivery: what empties the queue, inside the delivery workers (`elemta: delivery`).

mx.py finds the hosts that take mail for a domain (MX, implicit MX, null MX), cooperatively
under gevent; smtp_client.py talks SMTP to one of them over one connection, for one or more
messages, and says per recipient what happened; wire.py holds the byte-level pieces the client
uses (reply parsing, dot-stuffing, xtext), free of sockets. The worker, scheduler, transports and
bounces come with issue 4. See also: elemta.queue (what is delivered), design.md.
"""
