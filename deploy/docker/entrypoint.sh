#!/bin/sh
# Container entrypoint: check the configuration, make sure the spool volume is usable
# by this (non-root) user, then exec elemta so it is PID 1 and receives the runtime's
# SIGTERM itself (graceful stop within master.stop_grace; the master reaps orphans).
# Arguments: none runs the daemon; arguments starting with "-" go to elemta; anything
# else is run as a command (e.g. "elemtactl queue list").
set -eu

: "${ELEMTA_CONFIG:=/etc/elemta/elemta.yaml}"
export ELEMTA_CONFIG

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

if [ ! -r "$ELEMTA_CONFIG" ]; then
    echo "entrypoint: no readable configuration at $ELEMTA_CONFIG" >&2
    exit 78   # EX_CONFIG
fi

# A fresh volume may be mounted root-owned: say so plainly instead of failing later.
spool=${ELEMTA_SPOOL:-/var/spool/elemta}
if [ ! -w "$spool" ]; then
    echo "entrypoint: spool $spool is not writable by uid $(id -u);" \
         "give the volume to this user (Kubernetes: securityContext.fsGroup)" >&2
    exit 73   # EX_CANTCREAT
fi

elemta --config "$ELEMTA_CONFIG" --check-config
exec elemta --config "$ELEMTA_CONFIG" "$@"
