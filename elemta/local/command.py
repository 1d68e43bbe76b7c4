"""|command destinations: run `/bin/sh -c command` with the message on its standard input,
the environment Postfix's local(8) gives, a time limit, and its exit status read as
sysexits.h says.

Runs in a process that has already become the user the command runs as
(elemta.local.privileges). The outcome, as Postfix's pipe_command():

    exit 0                        delivered
    EX_TEMPFAIL (75), EX_OSERR    deferred (4.3.0), the command's output in the reason
    another sysexits.h code       bounced with that code's status (EX_NOUSER 5.1.1, ...)
    any other non-zero status     bounced, 5.3.0 "Command died with status N"
    killed by a signal            deferred, 4.3.0 "Command died with signal N"
    over local.command_timeout    the whole process group killed; bounced, 5.3.0

See also: elemta.local.deliver, elemta.local.mailbox (MessageCopy).
"""

import errno
import os
import selectors
import signal
import subprocess
import time

from elemta.queue.model import BOUNCED, RCPT_DEFERRED, SENT
from elemta.util.text import printable

SHELL = "/bin/sh"
# Postfix's _PATH_DEFPATH for commands.
COMMAND_PATH = "/usr/bin:/bin"
# The command's output quoted in a reason, at most.
OUTPUT_KEPT = 300
# How often the command is checked for its end while its output pipe stays open (a
# background child of the command may hold it).
POLL_INTERVAL = 0.05
# Variables passed on from the agent's own environment when set.
PASSED_ON = ("TZ", "LANG", "LC_ALL")

# sysexits.h code -> (temporary, RFC 3463 status, text), Postfix's sys_exits.c table.
SYSEXITS = {
    64: (False, "5.3.0", "command line usage error"),
    65: (False, "5.6.0", "data format error"),
    66: (False, "5.3.0", "cannot open input"),
    67: (False, "5.1.1", "user unknown"),
    68: (False, "5.1.2", "host name unknown"),
    69: (False, "5.3.0", "service unavailable"),
    70: (False, "5.3.0", "internal software error"),
    71: (True, "4.3.0", "system resource problem"),
    72: (False, "5.3.0", "critical OS file missing"),
    73: (False, "5.2.0", "can't create user output file"),
    74: (False, "5.3.0", "input/output error"),
    75: (True, "4.3.0", "temporary failure"),
    76: (False, "5.5.0", "remote error in protocol"),
    77: (False, "5.7.0", "permission denied"),
    78: (False, "5.3.5", "local configuration error"),
}


def command_environment(user, recipient, local, extension, domain, sender,
                        original_recipient, home, shell):
    """The variables local(8) exports to a command (see its man page). What comes from
    the envelope goes through printable(): a shell script that echoes $ORIGINAL_RECIPIENT
    into a file or a header must never get a line break (or a NUL, which exec refuses)."""
    env = {"PATH": COMMAND_PATH, "LOGNAME": user, "USER": user,
           "SENDER": printable(sender), "RECIPIENT": printable(recipient),
           "LOCAL": printable(local), "DOMAIN": printable(domain),
           "HOME": home, "SHELL": shell or SHELL}
    if extension is not None:
        env["EXTENSION"] = printable(extension)
    if original_recipient:
        env["ORIGINAL_RECIPIENT"] = printable(original_recipient)
    for name in PASSED_ON:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _printable(output):
    text = output.decode("utf-8", "replace")
    text = " ".join(text.split())
    if len(text) > OUTPUT_KEPT:
        text = text[:OUTPUT_KEPT - 3] + "..."
    return text


def _with_output(text, output):
    return text + (". Command output: %s" % _printable(output) if output.strip() else "")


def outcome_of(returncode, command, output, timed_out):
    """(status, reply) for how the command ended (the table in the module docstring)."""
    if timed_out:
        return BOUNCED, "550 5.3.0 " + _with_output(
            "Command time limit exceeded: \"%s\"" % command, output)
    if returncode == 0:
        return SENT, "250 2.0.0 delivered to command: %s" % command
    if returncode < 0:
        return RCPT_DEFERRED, "451 4.3.0 " + _with_output(
            "Command died with signal %d: \"%s\"" % (-returncode, command), output)
    if returncode in SYSEXITS:
        temporary, status, text = SYSEXITS[returncode]
        return (RCPT_DEFERRED if temporary else BOUNCED,
                "%s %s %s" % ("451" if temporary else "550", status,
                              _with_output(text, output)))
    return BOUNCED, "550 5.3.0 " + _with_output(
        "Command died with status %d: \"%s\"" % (returncode, command), output)


def run_command(command, chunks, env, cwd, timeout):
    """Run command with chunks (bytes) on stdin; returns (status, reply). Its output
    (stdout and stderr together) is read as it comes; the first bytes are kept for the
    reason. At the time limit the whole process group is killed."""
    process = subprocess.Popen([SHELL, "-c", command], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               cwd=cwd, start_new_session=True, close_fds=True,
                               preexec_fn=_default_signals)
    deadline = time.monotonic() + timeout
    output = bytearray()
    pending = b""
    chunks = iter(chunks)
    stdin, stdout = process.stdin.fileno(), process.stdout.fileno()
    os.set_blocking(stdin, False)
    timed_out = False
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_WRITE)
        selector.register(stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(min(remaining, POLL_INTERVAL)):
                if key.fd == stdout:
                    data = os.read(stdout, 65536)
                    if not data:
                        selector.unregister(stdout)
                    elif len(output) < OUTPUT_KEPT * 2:
                        output += data
                    continue
                if not pending:
                    pending = next(chunks, None)
                    if pending is None:
                        selector.unregister(stdin)
                        process.stdin.close()
                        continue
                try:
                    pending = pending[os.write(stdin, pending):]
                except BlockingIOError:
                    pass
                except BrokenPipeError:      # the command stopped reading: that is its right
                    selector.unregister(stdin)
                    process.stdin.close()
            if process.poll() is not None:
                # It ended; what it wrote is in the pipe now (a background child that
                # keeps the pipe open must not hold the delivery up).
                if stdout in _registered(selector):
                    _drain(stdout, output)
                break
    if timed_out:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
    returncode = process.wait()
    for pipe in (process.stdin, process.stdout):
        try:
            pipe.close()
        except OSError:
            pass
    return outcome_of(returncode, command, bytes(output), timed_out)


def _default_signals():
    """In the command, before exec: the signals the delivery process ignores (so that
    a stop never cuts a mailbox write short) act again."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


def _registered(selector):
    return {key.fd for key in selector.get_map().values()}


def _drain(fd, output):
    os.set_blocking(fd, False)
    try:
        while len(output) < OUTPUT_KEPT * 2:
            data = os.read(fd, 65536)
            if not data:
                return
            output += data
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise
