"""A milter built on libmilter, the reference C library (Debian's python3-milter wraps it),
that does at the end of message whatever the message's X-Test-Action header fields
say, so Elemta's milter client is checked against libmilter's wire format rather than
against a codec the test suite wrote itself (tests/peers/milter.py).

Run with the system python, where python3-milter lives (not the project's venv):

    /usr/bin/python3 -I tests/peers/libmilter_milter.py PORT

It listens on inet:PORT@127.0.0.1 and prints "ready" once libmilter is up. Each
X-Test-Action value is one action (several fields: several actions, in order):

    headers      add X-Added, insert X-Inserted at the top, change Subject, delete the
                 first X-Old
    body         replace the body (two chunks, bare LF line endings)
    add-rcpt     add <added@elsewhere.test>      del-rcpt     delete <b@example.test>
    add-rcpt-par add <par@elsewhere.test> with the ESMTP parameter NOTIFY=NEVER
    chgfrom      change the sender to <bounces@sender.test>
    chgfrom-par  the same, with the ESMTP parameter RET=HDRS
    quarantine   hold it, reason "held by libmilter"
    progress     PROGRESS every 0.3 s for 3 s before answering
    discard      discard it (the client hears 250, nothing is queued)
    accept       accept it: the actions after this one are not done
    accept-early (at the header itself) accept it there: no more of the message, no
                 end of message for this milter
    reject       550 5.7.1 Rejected by libmilter (a custom reply code)
    reject-plain reject without a reply code of its own (the MTA's default reply)
    tempfail-plain  tempfail without a reply code of its own
    tempfail     451 4.7.0 Try again, said libmilter
    reject-rcpt  (at RCPT, for a recipient whose local part is "refused") 550 5.1.1
    reject-helo  (at HELO, for the name "refused.test") 554 5.7.1

It also records what it was told, one line each in the file named by $MILTER_LOG:
"helo NAME", "mail <ADDR> [ARGS]", "rcpt <ADDR>", "macro NAME=VALUE" for {i} at EOM.
"""

import os
import sys
import time

import Milter

ADDED_BODY = [b"A body from libmilter\n", b"in two chunks\n"]


def record(line):
    path = os.environ.get("MILTER_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


class TestMilter(Milter.Base):

    def __init__(self):
        self.actions = []

    def hello(self, name):
        record("helo %s" % name)
        if name == "refused.test":
            self.setreply("554", "5.7.1", "HELO refused by libmilter")
            return Milter.REJECT
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        record("mail %s %s" % (sender, " ".join(params)))
        self.actions = []
        return Milter.CONTINUE

    def envrcpt(self, recipient, *params):
        record("rcpt %s" % recipient)
        if recipient.lower().startswith("<refused@"):
            self.setreply("550", "5.1.1", "No such user here, says libmilter")
            return Milter.REJECT
        return Milter.CONTINUE

    def header(self, name, value):
        if name.lower() == "x-test-action":
            self.actions.append(value.strip())
            if value.strip() == "accept-early":
                return Milter.ACCEPT
        return Milter.CONTINUE

    def eom(self):
        record("macro i=%s" % self.getsymval("i"))
        for action in self.actions:
            if action == "headers":
                self.addheader("X-Added", "by libmilter")
                self.addheader("X-Inserted", "at the top", 0)
                self.chgheader("Subject", 1, "changed by libmilter")
                self.chgheader("X-Old", 1, "")
            elif action == "body":
                for chunk in ADDED_BODY:
                    self.replacebody(chunk)
            elif action == "add-rcpt":
                self.addrcpt("<added@elsewhere.test>")
            elif action == "add-rcpt-par":
                self.addrcpt("<par@elsewhere.test>", "NOTIFY=NEVER")
            elif action == "del-rcpt":
                self.delrcpt("<b@example.test>")
            elif action == "chgfrom":
                self.chgfrom("<bounces@sender.test>")
            elif action == "chgfrom-par":
                self.chgfrom("<bounces@sender.test>", "RET=HDRS")
            elif action == "quarantine":
                self.quarantine("held by libmilter")
            elif action == "progress":
                for _ in range(10):
                    time.sleep(0.3)
                    self.progress()
            elif action == "discard":
                return Milter.DISCARD
            elif action == "accept":
                return Milter.ACCEPT
            elif action == "reject-plain":
                return Milter.REJECT
            elif action == "tempfail-plain":
                return Milter.TEMPFAIL
            elif action == "reject":
                self.setreply("550", "5.7.1", "Rejected by libmilter")
                return Milter.REJECT
            elif action == "tempfail":
                self.setreply("451", "4.7.0", "Try again, said libmilter")
                return Milter.TEMPFAIL
        return Milter.CONTINUE


def main():
    port = int(sys.argv[1])
    Milter.factory = TestMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT
                     | Milter.ADDRCPT_PAR | Milter.DELRCPT | Milter.CHGFROM
                     | Milter.QUARANTINE)
    print("ready", flush=True)
    Milter.runmilter("libmilter-test", "inet:%d@127.0.0.1" % port, 60)


if __name__ == "__main__":
    main()
