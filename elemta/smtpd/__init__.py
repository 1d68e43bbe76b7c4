"""The smtpd worker: accepts SMTP connections and puts mail safely in the queue.

server.py listens and spawns one greenlet per connection; session.py drives the sans-IO
protocol core (elemta.smtp) over the socket; policy.py decides who may relay; authn.py
checks AUTH credentials; committer.py makes accepted messages durable in groups;
received.py writes the trace header; tls.py builds the TLS context.
Process: `elemta: smtpd`. See also: elemta.smtp, elemta.queue, design.md.
"""
