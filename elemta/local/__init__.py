"""Local delivery, as Postfix's local(8) does it: aliases, .forward files, :include: files,
mbox and Maildir mailboxes, files and commands, each written as the right user.

The pieces and who uses them:

    expand       a recipient -> its destinations (mailboxes, files, commands, addresses
                 to forward), with loop protection and the allow_mail_to_* rights
    mailbox      mbox (From_ line, >From quoting, fcntl and dot-lock, fsync, truncate back
                 on failure) and Maildir (tmp/ -> new/, fsync) writers
    command      |command destinations: /bin/sh -c, Postfix's environment, time limit,
                 sysexits.h exit codes
    privileges   run one function in a forked process that has become a given user
    deliver      one recipient of one message, start to end (in a forked root process)
    agent        the `elemta: local` process: keeps root, serves spool/run/local.sock

What other processes share with it (local domains, recipient lookup, the aliases file,
the request format on spool/run/local.sock) lives in elemta.addressing, which every
process imports; nothing imports this package but the daemon that starts the agent.
See also: elemta.delivery.local_transport (the delivery worker's side), man/newaliases.1.
"""
