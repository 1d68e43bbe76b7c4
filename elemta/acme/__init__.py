"""The built-in ACME client (RFC 8555): the `elemta: acme` child obtains and renews the
certificates of acme.certificates (elemta.acme.worker, elemta.acme.client,
elemta.acme.schedule), and as acme.challenge says either the `elemta: acme-http` child
answers the ACME server's HTTP-01 requests (elemta.acme.http01) or the `elemta: acme-tls`
child its TLS-ALPN-01 handshakes (elemta.acme.tlsalpn01), on the port the master bound
for it. They share only the challenge files of the state directory
(elemta.certs.store)."""
