#!/bin/sh
# Hand the mail Postfix left queued over to Elemta, when Elemta replaces Postfix.
#
# Run by the elemta package's postinst (installed as /usr/lib/elemta/postfix-handover),
# and by the RPM's %post (/usr/libexec/elemta/postfix-handover) when Postfix is stopped.
# Installing elemta removes postfix (both provide mail-transport-agent) but keeps
# /var/spool/postfix, and mail accepted there would wait for ever. When that queue holds
# mail (maildrop, incoming, active, deferred or hold), `elemtactl import-postfix-queue`
# moves it into Elemta's queue; it refuses while a Postfix master still runs on it, and
# leaves a damaged file in place. Every line it prints goes to the log; the terminal gets
# one line. It never fails the install: whatever happens, exit status 0, and a problem
# says how to finish by hand.
#
# Usage: postfix-handover [QUEUE_DIR [LOG]]   (default /var/spool/postfix and
# /var/log/elemta/postfix-handover.log; $ELEMTACTL names the program, for tests)
queue_dir=${1:-/var/spool/postfix}
log=${2:-/var/log/elemta/postfix-handover.log}
elemtactl=${ELEMTACTL:-/usr/bin/elemtactl}

[ -d "$queue_dir" ] || exit 0
waiting=$(find "$queue_dir/maildrop" "$queue_dir/incoming" "$queue_dir/active" \
    "$queue_dir/deferred" "$queue_dir/hold" -type f -print 2>/dev/null | head -n 1)
[ -n "$waiting" ] || exit 0

# Senders and recipients are in it, as in mail.log: readable by root alone.
umask 027
if ! mkdir -p "$(dirname "$log")" || ! : >>"$log"; then
    log=/dev/null
fi
out=$(mktemp) || exit 0
"$elemtactl" import-postfix-queue "$queue_dir" >"$out" 2>&1
status=$?
{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $elemtactl import-postfix-queue $queue_dir: exit status $status"
    cat "$out"
} >>"$log"
summary=$(grep -E '^moved ' "$out" | tail -n 1)
rm -f "$out"
if [ "$status" -eq 0 ]; then
    echo "elemta: Postfix's queued mail handed over: $summary (each message: $log)"
else
    echo "elemta: Postfix's queued mail in $queue_dir was not all handed over (exit" \
         "status $status${summary:+; $summary}): see $log, then run" \
         "elemtactl import-postfix-queue $queue_dir" >&2
fi
exit 0
