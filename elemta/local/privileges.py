"""Run one function as another user: fork, give up root for that user for good
(setgroups with the user's groups, setgid, setuid), run, send the JSON result back
through a pipe, exit.

Used by the local agent's per-recipient process (elemta.local.deliver) for everything
that touches a user's files: reading .forward and :include: files, writing mailboxes and
files, running commands, and (as the spool's owner) queueing forwarded mail. When the
agent is not root (a development run), the function runs as the agent's own user: what
that user may not do fails with its own error, said plainly by the caller.

The forked process runs only code already loaded: after setuid it may not be able to
read the Python library (a Python under /root), so modules it needs are imported at the
top of the modules that use them.
See also: elemta.local.agent (which keeps root), Postfix's set_eugid().
"""

import json
import logging
import os
import signal
import traceback

from elemta.util.procs import ended_how

log = logging.getLogger("elemta.local")


class ChildFailed(Exception):
    """The forked process died or gave no answer."""


def is_root():
    return os.geteuid() == 0


def become(user, extra_groups=()):
    """Switch this process to user (a pwd entry) for good; no-op when not root."""
    if not is_root():
        return
    groups = sorted(set(os.getgrouplist(user.pw_name, user.pw_gid)) | set(extra_groups))
    os.setgroups(groups)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    if os.geteuid() == 0 and user.pw_uid != 0:        # never carry on as root by mistake
        raise PermissionError("still root after setuid(%d)" % user.pw_uid)


def run_as(user, function, *args, extra_groups=()):
    """function(*args) in a forked process that became user; its JSON-able result.
    Raises ChildFailed when the process crashed (the reason is logged)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # the child: never returns
        status = 0
        try:
            os.close(read_end)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.umask(0o077)
            become(user, extra_groups)
            payload = json.dumps({"result": function(*args)})
        except BaseException as error:
            payload = json.dumps({"crash": "%s: %s" % (type(error).__name__, error),
                                  "trace": traceback.format_exc()})
            status = 1
        try:
            data = payload.encode("utf-8")
            while data:
                data = data[os.write(write_end, data):]
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    try:
        while True:
            data = os.read(read_end, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    try:
        answer = json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError:
        raise ChildFailed("the process working as %s ended with %s and no answer"
                          % (user.pw_name, ended_how(wait_status))) from None
    if "crash" in answer:
        log.error("working as %s: %s", user.pw_name, answer.get("trace") or answer["crash"])
        raise ChildFailed("working as %s: %s" % (user.pw_name, answer["crash"]))
    return answer["result"]
