"""A TLS-RPT report POSTed to an https: rua (RFC 8460 section 5.4).

Shared (elemta.tlsrpt): elemta.tlsrpt.send posts each day's reports with it, from a
delivery worker or from `elemtactl tlsrpt send`. The body is the gzipped JSON
(Content-Type application/tlsrpt+gzip); the server's certificate is checked for the
URL's host against tlsrpt.https_ca_file or the system's CAs; the host's address is asked
of delivery.nameservers (elemta.plugins.resolver), as for every lookup the delivery
makes; the whole exchange has tlsrpt.https_timeout. Redirects are not followed. Any
2xx answer is success; anything else raises PostError with the reason, which the caller
logs and retries on its next run. Sockets are gevent's, so a slow report server never
stalls a delivery worker's other greenlets.

The rua is chosen by whoever runs the policy domain's DNS, so it must not turn Elemta
into a probe of its own network (server-side request forgery): unless
tlsrpt.https_allow_private, only port 443 is posted to, and only addresses that are
global (no loopback, RFC 1918, link-local, shared, multicast or reserved address, no
IP literal that is one); each connection goes to the very address that was checked.
What is refused raises PostRefused, which the caller gives up at once.
See also: elemta.tlsrpt.send, elemta.tlsrpt.report (the body).
"""

import http.client
import ipaddress
from urllib.parse import urlsplit

import gevent
from gevent import socket, ssl

from elemta import __version__
from elemta.plugins.resolver import TemporaryDNSError
from elemta.tlsrpt.report import MEDIA_TYPE

# The answer's body is read this far at most (only its status matters).
MAX_ANSWER_BYTES = 64 * 1024


class PostError(Exception):
    """The report was not taken; the text says where and why."""


class PostRefused(PostError):
    """Elemta would not post there (see the module docstring): not worth trying again."""


def post_report(url, body, resolver, ca_file=None, timeout=30.0, allow_private=False):
    """POST body (application/tlsrpt+gzip) to url, trying the host's addresses in turn;
    returns the server's status line, or raises PostError (PostRefused for a port or
    addresses not allowed, allow_private being tlsrpt.https_allow_private)."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 443
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if port != 443 and not allow_private:
        raise PostRefused("refused: port %d is not 443 (tlsrpt.https_allow_private "
                          "is off)" % port)
    addresses = _addresses(host, resolver)
    if not allow_private:
        refused = [address for address in addresses if not is_public(address)]
        addresses = [address for address in addresses if address not in refused]
        if not addresses:
            raise PostRefused("refused: %s is not a global address (%s; "
                              "tlsrpt.https_allow_private is off)" % (
                                  host, ", ".join(refused)))
    problems = []
    for address in addresses:
        try:
            return _post(url, host, address, port, path, body, ca_file, timeout)
        except PostError as error:
            problems.append(str(error))
    raise PostError("; ".join(problems))


def is_public(address):
    """True for a globally routable unicast address (an IPv4-mapped IPv6 one judged by
    its IPv4 address)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local
                                 or ip.is_loopback or ip.is_private)


def _addresses(host, resolver):
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    found = []
    try:
        for rdtype in ("AAAA", "A"):
            found += [record.address for record in resolver.query(host, rdtype).records]
    except TemporaryDNSError as error:
        raise PostError("no address for %s: %s" % (host, error.reason)) from None
    if not found:
        raise PostError("no address for %s" % host)
    return found


def _post(url, host, address, port, path, body, ca_file, timeout):
    where = "%s (%s)" % (url, address)
    timer = gevent.Timeout(timeout)
    timer.start()
    sock = None
    try:
        context = ssl.create_default_context(cafile=ca_file) if ca_file else \
            ssl.create_default_context()
        sock = socket.create_connection((address, port))
        sock = context.wrap_socket(sock, server_hostname=host)
        name = "[%s]" % host if ":" in host else host        # an IPv6 literal
        host_field = name if port == 443 else "%s:%d" % (name, port)
        sock.sendall(("POST %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: Elemta/%s\r\n"
                      "Content-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                      % (path, host_field, __version__, MEDIA_TYPE, len(body))
                      ).encode("ascii") + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read(MAX_ANSWER_BYTES)
        status = "%d %s" % (response.status, response.reason)
        if not 200 <= response.status < 300:
            raise PostError("%s answered %s" % (where, status))
        return status
    except gevent.Timeout as expired:
        if expired is not timer:
            raise
        raise PostError("%s: no answer within %g s" % (where, timeout)) from None
    except ssl.SSLError as error:
        reason = getattr(error, "verify_message", None) or getattr(error, "reason",
                                                                   None) or error
        raise PostError("%s: TLS failed: %s" % (where, reason)) from None
    except (OSError, http.client.HTTPException, ValueError, UnicodeError) as error:
        raise PostError("%s: %s" % (where, getattr(error, "strerror", None) or error
                                    or type(error).__name__)) from None
    finally:
        timer.close()
        if sock is not None:
            sock.close()
