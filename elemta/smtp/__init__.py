"""The SMTP protocol, without I/O.

protocol.py is the server state machine (bytes in, events and replies out; its
TRANSITIONS table is the only place the session's state changes), address.py
parses envelope addresses and ESMTP parameters, replies.py formats replies, events.py
names what the state machine tells its driver. No module here imports gevent or socket:
the smtpd worker (elemta.smtpd) drives them, and tests feed them bytes directly.
"""
