"""The showq process: answers mailq's listing requests from any local user on
spool/public/showq, as Postfix's showq does. See elemta.showq.server and
elemta.queue.showq (the wire format)."""
