"""The built-in ACME client (RFC 8555): the `elemta: acme` child obtains and renews the
certificates of acme.certificates (elemta.acme.worker, elemta.acme.client,
elemta.acme.schedule), and the `elemta: acme-http` child answers the ACME server's
HTTP-01 requests on the port the master bound for it (elemta.acme.http01). The two
share only the challenge files of the state directory (elemta.certs.store)."""
