"""The cluster credential: what proves a node is one of the cluster's, derived from the
api token every node shares (api.token_file, in Kubernetes the Secret).

Used by elemta.cluster.registry (each registration is signed, and only signed ones are
believed), by elemtactl drain (the SMTP AUTH login it hands mail over with) and by the
smtpd's handover listeners (elemta.smtpd.handoverauth, which take relayed mail only
from a client that logs in with it). Whoever can reach the store or the pod network but
has not the token can therefore neither pose as a node (and collect the token or drained
mail) nor relay through a handover listener.

Each use gets its own key (HMAC of the token with a label), so what crosses the network
(the hand-over password) never reveals the token, nor the registry's key.
See also: elemta.cluster.trust (the address check that comes on top).
"""

import hashlib
import hmac

# The SMTP AUTH login name of a node handing over mail; no mailbox has it.
HANDOVER_LOGIN = "elemta-cluster-handover"


def _derived(token: bytes, label: bytes) -> bytes:
    return hmac.new(token, label, hashlib.sha256).digest()


def registry_key(token: bytes) -> bytes:
    """The key registrations are signed with."""
    return _derived(token, b"elemta cluster registry v1")


def handover_password(token: bytes) -> str:
    """The SMTP AUTH password of the hand-over (hex: any SASL mechanism carries it)."""
    return _derived(token, b"elemta cluster smtp hand-over v1").hex()


def sign(key: bytes, payload: str) -> str:
    return hmac.new(key, payload.encode("utf-8"), hashlib.sha256).hexdigest()


def signed_by(key: bytes, payload: str, signature) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(key, payload), signature)
