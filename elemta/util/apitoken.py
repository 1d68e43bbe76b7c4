"""The REST API's bearer token as configured: api.token_file's first line, else api.token.

Used by the api process (elemta.api.auth: the token it requires) and by whoever calls
the nodes of a cluster with it (elemta.cluster.peers through elemtactl and the api).
"""

from typing import Optional, Tuple


def read_token(api_config) -> Tuple[Optional[bytes], Optional[str]]:
    """(the token, None), or (None, why there is none: a sentence naming the option)."""
    if api_config.token_file:
        try:
            with open(api_config.token_file, "rb") as f:
                token = f.readline().strip()
        except OSError as exc:
            return None, "cannot read api.token_file %s: %s" % (
                api_config.token_file, exc.strerror or exc)
        if not token:
            return None, "api.token_file %s has an empty first line" % api_config.token_file
        return token, None
    if api_config.token:
        return api_config.token.encode("utf-8"), None
    return None, "no api.token or api.token_file"
