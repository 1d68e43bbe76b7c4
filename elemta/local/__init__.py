"""Local delivery, as Postfix's local(8) does it: aliases, .forward files, :include: files,
mbox and Maildir mailboxes, files and commands, each written as the right user.

The pieces and who uses them:

    aliases      the aliases file: parse (file:line errors), look up, re-read on change;
                 used by the local agent, the smtpd's RCPT check and newaliases(1)
    recipients   "is this a known local recipient?" for the smtpd (550 5.1.1 at RCPT)
    addresses    local domains, user+extension, the local part folded as Postfix does
    expand       a recipient -> its destinations (mailboxes, files, commands, addresses
                 to forward), with loop protection and the allow_mail_to_* rights
    mailbox      mbox (From_ line, >From quoting, fcntl and dot-lock, fsync, truncate back
                 on failure) and Maildir (tmp/ -> new/, fsync) writers
    command      |command destinations: /bin/sh -c, Postfix's environment, time limit,
                 sysexits.h exit codes
    privileges   run one function in a forked process that has become a given user
    deliver      one recipient of one message, start to end (in a forked root process)
    protocol     the JSON-lines requests and replies between delivery workers and the agent
    agent        the `elemta: local` process: keeps root, serves spool/run/local.sock

See also: elemta.delivery.local_transport (the delivery worker's side), man/newaliases.1.
"""
