"""Bearer-token authentication of the REST API.

Owned by the api process. The token comes from the configuration when the process starts
(a reload starts a new api process, so a new token takes effect then): the first line of
api.token_file wins over api.token. With neither, or a token file that cannot be read,
every protected route answers 401: the API fails closed. Resources that set the attribute
`public = True` (health, and /metrics for Prometheus) need no token. At start the api warns
when others can read the token: api.token written in a world-readable config file, or an
api.token_file with group or other read permission (the token lets its holder delete and
read queued mail).
See also elemta.api.app (where the middleware is installed), elemta.config.schema.APISettings.
"""

import hashlib
import hmac
import logging
import os
import stat
from typing import Optional

import falcon

from elemta.util.apitoken import read_token

log = logging.getLogger("elemta.api")

REALM = "elemta"
_CHALLENGE = 'Bearer realm="%s"' % REALM


def load_token(api_config) -> Optional[bytes]:
    """The configured token as bytes, or None when no usable token is configured."""
    token, problem = read_token(api_config)
    if token is None:
        if api_config.token_file:
            log.error("api: %s; the REST API refuses every request", problem)
        else:
            log.warning("api: %s: the REST API refuses every request (only /metrics and "
                        "/api/v1/health answer)", problem)
    return token


def warn_if_exposed(config) -> None:
    """A warning for each place the token can be read by users other than the service."""
    api = config.api
    if api.token_file:
        mode = _mode(api.token_file)
        if mode is not None and mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("api: api.token_file %s is readable by %s (mode %04o): whoever can "
                        "read it can read and delete queued mail; chmod 600 %s (owned by "
                        "the user the api runs as)", api.token_file,
                        "everyone" if mode & stat.S_IROTH else "its group", mode,
                        api.token_file)
    if api.token and config.source:
        mode = _mode(config.source)
        if mode is not None and mode & stat.S_IROTH:
            log.warning("api: api.token is written in %s, which every local user can read "
                        "(mode %04o): move the token to an api.token_file of mode 0600, or "
                        "chmod o-r %s", config.source, mode, config.source)


def _mode(path):
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None         # load_token names a token file it cannot read


def _digest(token: bytes) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever was sent.
    return hashlib.sha256(token).digest()


class RequireBearer:
    """Falcon middleware: every resource but the public ones needs the bearer token."""

    def __init__(self, token: Optional[bytes]):
        self._digest = None if token is None else _digest(token)

    def process_resource(self, req, resp, resource, params):
        if resource is None or getattr(resource, "public", False):
            return
        if self._digest is None:
            raise self._refuse("no API token is configured (api.token or api.token_file)")
        header = req.get_header("Authorization")
        if not header:
            raise self._refuse("this route needs an Authorization: Bearer header")
        scheme, _, presented = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise self._refuse("the Authorization header must be: Bearer <token>")
        # WSGI hands headers over as latin-1 text: encoding back gives the bytes sent.
        sent = presented.strip().encode("latin-1", "replace")
        if not hmac.compare_digest(_digest(sent), self._digest):
            raise self._refuse("wrong bearer token")

    @staticmethod
    def _refuse(description: str) -> falcon.HTTPUnauthorized:
        return falcon.HTTPUnauthorized(title="unauthorized", description=description,
                                       challenges=[_CHALLENGE])
