"""The api process's HTTP request handler: pywsgi's, with a deadline on reading each
request and strict message framing.

Owned by the api process (elemta.api.server hands it to gevent.pywsgi.WSGIServer).
pywsgi alone waits for ever on a client that sends half a request line and stalls (a
slow-loris pins as many connections as it likes), and takes the first of two
Content-Length headers (a proxy in front could then read another request than we do:
request smuggling). Here:

  - the request line, the headers and the body must all arrive within api.read_timeout
    seconds of the start of the wait (trickling a byte at a time does not extend it;
    an idle keep-alive connection is closed after as long); a late client gets 408 and
    the connection is closed, as nginx's client_header_timeout does;
  - Content-Length must be one decimal number (repeated only with the same value) and
    never comes with Transfer-Encoding, whose only accepted value is chunked (RFC 9112
    sections 6.1 and 6.3): anything else is a 400 naming the reason;
  - the body (no route takes one) is read whole, at most MAX_BODY bytes, before the
    application runs, so the application's own time is not counted against the client;
  - once the api stops (elemta.api.server.APIServer.stop), a keep-alive connection
    takes no next request: one waiting for it is closed at once, one whose request is
    under way is closed after the answer.

Each refusal is one warning in the log naming the client and the reason.
See also: elemta.api.server, elemta.api.errors (the same JSON error body).
"""

import http.client
import io
import json
import logging
import re
import socket

import gevent
from gevent.pywsgi import Input, WSGIHandler

log = logging.getLogger("elemta.api")

# No route takes a body; a small JSON object from a client that always sends one fits.
MAX_BODY = 64 * 1024
# RFC 9110 section 8.6: Content-Length = 1*DIGIT.
_DIGITS = re.compile(r"[0-9]+\Z")
_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large"}


class RequestTimedOut(socket.timeout):
    """The read deadline passed (an OSError, as a socket timeout is, for pywsgi's code)."""


class Refusal(Exception):
    """A request answered with `status` and closed; status None: closed without answer."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> bytes:
        # The shape of every API error (elemta.api.errors), without importing Falcon.
        body = json.dumps({"error": self.reason}).encode("ascii")
        head = ("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                "Connection: close\r\n\r\n" % (self.status, _REASONS[self.status], len(body)))
        return head.encode("ascii") + body


def check_framing(headers) -> None:
    """Raise Refusal(400) unless the headers say in one way only where the body ends."""
    lengths = headers.get_all("Content-Length") or []
    encodings = headers.get_all("Transfer-Encoding") or []
    values = {value.strip() for header in lengths for value in header.split(",")}
    if any(not _DIGITS.match(value) for value in values):
        raise Refusal(400, "Content-Length is not a number: %s" % ", ".join(
            repr(v) for v in sorted(values)))
    if len({int(value) for value in values}) > 1:
        raise Refusal(400, "conflicting Content-Length headers: %s" % ", ".join(
            sorted(values)))
    if encodings and lengths:
        raise Refusal(400, "Content-Length and Transfer-Encoding together (RFC 9112 6.1)")
    if encodings and [e.strip().lower() for e in encodings] != ["chunked"]:
        raise Refusal(400, "unsupported Transfer-Encoding: %s (only chunked)"
                      % ", ".join(encodings))


class Handler(WSGIHandler):
    """One client connection of the api process; see the module docstring."""

    read_timeout = 10.0          # api.read_timeout, set by with_timeout()

    @classmethod
    def with_timeout(cls, seconds):
        return type(cls.__name__, (cls,), {"read_timeout": seconds})

    _deadline = None
    _requests = 0
    _body = b""

    def handle_one_request(self):
        # A fresh deadline for each request: it is stopped once the body is in.
        self._deadline = gevent.Timeout(self.read_timeout, RequestTimedOut())
        self._deadline.start()
        try:
            return super().handle_one_request()
        except Refusal as refusal:       # from read_requestline: pywsgi lets it through
            return self._refuse(refusal)
        finally:
            self._deadline.close()
            self._requests += 1

    def read_requestline(self):
        idle = getattr(self.server, "idle", None) if self._requests else None
        if idle is not None:
            # Between two requests of a keep-alive connection: a stopping api takes no
            # next one, and closes this connection at once if it stops while we wait.
            if self.server.closed:
                return ""
            idle.add(self)
        try:
            return super().read_requestline()
        except RequestTimedOut:
            if self._requests:
                # Between requests on a keep-alive connection: just idle, say little.
                log.info("api: closing the idle connection of %s after %gs (read_timeout)",
                         self.client_address[0], self.read_timeout)
            raise Refusal(408, "no complete request within %gs (api.read_timeout)"
                          % self.read_timeout) from None
        finally:
            if idle is not None:
                idle.discard(self)

    def close_idle(self):
        """The api stops while this connection waits for a next request: end the wait
        (the read sees the end of the stream, and the connection closes quietly)."""
        try:
            self.socket.shutdown(socket.SHUT_RD)
        except (OSError, AttributeError):      # gone already
            pass

    def MessageClass(self, *args):
        # Checked before pywsgi reads Content-Length (int() takes "+5" and "5_0") or drops
        # it in favour of chunked.
        headers = super().MessageClass(*args)
        if not headers.status:
            check_framing(headers)
        return headers

    def read_request(self, raw_requestline):
        try:
            super().read_request(raw_requestline)
            self._body = self._read_body()
        except RequestTimedOut:
            raise Refusal(408, "no complete request within %gs (api.read_timeout)"
                          % self.read_timeout) from None
        except http.client.HTTPException as error:       # too many or too long headers
            raise Refusal(400, "bad request headers: %s" % (error,)) from None
        except OSError as error:
            if error.errno is None:      # pywsgi's own: a short or malformed body
                raise Refusal(400, "bad request body: %s" % (error,)) from None
            raise Refusal(None, "connection lost: %s" % (error.strerror or error)) from None
        finally:
            self._deadline.close()       # the application's time is not the client's
        return True

    def _read_body(self) -> bytes:
        chunked = self.headers.get("Transfer-Encoding", "").strip().lower() == "chunked"
        if self.content_length is None and not chunked:
            return b""
        expect = self.headers.get("Expect", "").lower() == "100-continue"
        body = Input(self.rfile, self.content_length, socket=self.socket if expect else None,
                     chunked_input=chunked).read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise Refusal(413, "request body larger than %d bytes (no route takes one)"
                          % MAX_BODY)
        return body

    def get_environ(self):
        # The application reads the body already taken in, never the socket.
        env = super().get_environ()
        self.wsgi_input = Input(io.BytesIO(self._body), len(self._body))
        env["wsgi.input"] = self.wsgi_input
        env.pop("HTTP_TRANSFER_ENCODING", None)
        if self._body:
            env["CONTENT_LENGTH"] = str(len(self._body))
        return env

    def _handle_client_error(self, ex):
        # pywsgi's hook for errors reading a request (read_request raised).
        if isinstance(ex, Refusal):
            return self._refuse(ex)
        return super()._handle_client_error(ex)

    def _refuse(self, refusal):
        """handle_one_request's answer for a refused request: (status, response) or
        None (close without a word)."""
        address = self.client_address[0] if isinstance(self.client_address, tuple) \
            else self.client_address
        if refusal.status is None:
            return None
        if not (refusal.status == 408 and self._requests):
            log.warning("api: refused a request from %s: %s (%d)", address, refusal.reason,
                        refusal.status)
        self.close_connection = True
        return str(refusal.status), refusal.response()
