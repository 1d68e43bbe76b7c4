"""CPU-bound work in helper processes, so one session's computing never stalls the others.

Used by the plugins whose work is cryptography over a whole message (elemta.plugins.dkim:
verifying and signing; elemta.plugins.arc: verifying and sealing), in whichever process
runs them (the smtpd worker, pickup). A gevent worker serves all its sessions in one
thread: DKIM verification of a 29 MB message once held it for 25 s. A thread would not
do: dkimpy's relaxed canonicalization is regular expressions over the whole body, each
holding the GIL for a second or more. So the work runs in a child process (`python -m
elemta.util.offload`, titled "elemta: compute"); the calling greenlet waits on a pipe,
which yields to the hub, so the other sessions are served meanwhile, and a gevent.Timeout
around the call (the plugin timeout) does interrupt it: the helper is then killed and a
fresh one started by the next call.

    result = offload.call(verify_message, raw, resolver)   # raises what the function raised

The function travels pickled by module and name, so it must be an importable module-level
function, and its arguments and result picklable. Helpers start on first use (a process
that never offloads starts none), at most MAX_HELPERS at a time per process; an idle one is
kept for the next call. A helper exits when its parent does: at the end of its stdin, and
through PR_SET_PDEATHSIG when the parent is killed mid-call.

See also: elemta.util.threads (blocking I/O in the hub's thread pool),
tests/security/test_cpu_exhaustion.py.
"""

import os
import pickle
import signal
import struct
import subprocess
import sys

from gevent.lock import BoundedSemaphore
from gevent.os import nb_read, nb_write

# Helpers per process: calls beyond this wait for one to be free. A call may also wait for
# DNS inside its helper (DKIM key lookups), so more than one; each helper costs a Python
# interpreter's memory, so not many.
MAX_HELPERS = 4
TITLE = "elemta: compute"
_LENGTH = struct.Struct("!Q")
_CHUNK = 1 << 20


class OffloadError(Exception):
    """The helper died, or its answer could not be carried back; str() says which."""


# ---- the parent's side ------------------------------------------------------------------

_idle = []          # helpers waiting for work
_slots = None       # BoundedSemaphore(MAX_HELPERS), made on first use
_owner = None       # the pid the helpers belong to: a forked child starts with none


def call(function, *args):
    """function(*args) in a helper process; returns its result or raises its exception."""
    global _idle, _slots, _owner
    if _owner != os.getpid():
        _idle, _slots, _owner = [], BoundedSemaphore(MAX_HELPERS), os.getpid()
    with _slots:
        helper = _idle.pop() if _idle else _Helper()
        try:
            ok, value = helper.run(function, args)
        except BaseException:
            helper.kill()       # interrupted mid-call (a timeout) or broken: start afresh
            raise
        _idle.append(helper)
    if ok:
        return value
    raise value


def shutdown():
    """End the idle helpers (at process exit; busy ones end with their parent)."""
    global _idle
    if _owner != os.getpid():
        return
    helpers, _idle = _idle, []
    for helper in helpers:
        helper.kill()


class _Helper:
    def __init__(self):
        # The same modules as ours, wherever they were found.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid())], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, close_fds=True, bufsize=0)
        self.to_helper = self.process.stdin.fileno()
        self.from_helper = self.process.stdout.fileno()
        os.set_blocking(self.to_helper, False)
        os.set_blocking(self.from_helper, False)

    def run(self, function, args):
        """(True, result) or (False, exception), waiting cooperatively."""
        try:
            payload = pickle.dumps((function, args), pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            raise OffloadError("cannot hand %s to a helper: %s" % (
                getattr(function, "__name__", function), error)) from None
        try:
            _send(self.to_helper, payload, nb_write)
            answer = _receive(self.from_helper, nb_read)
        except OSError as error:
            raise OffloadError("helper process failed: %s" % error) from None
        if answer is None:
            raise OffloadError("helper process exited (%s)" % _exit_text(self.process))
        return pickle.loads(answer)

    def kill(self):
        if self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass
        self.process.stdin.close()
        self.process.stdout.close()
        self.process.wait()     # at once after SIGKILL; reaps it


def _exit_text(process):
    try:
        code = process.wait(1)
    except subprocess.TimeoutExpired:
        return "no answer"
    if code < 0:
        return "killed by signal %d" % -code
    return "status %d" % code


def _send(fd, payload, write):
    view = memoryview(_LENGTH.pack(len(payload)) + payload)
    while view:
        view = view[write(fd, view[:_CHUNK]):]


def _receive(fd, read):
    """One frame's bytes, or None at the end of the stream."""
    header = _read_exactly(fd, _LENGTH.size, read)
    if header is None:
        return None
    body = _read_exactly(fd, _LENGTH.unpack(header)[0], read)
    return body


def _read_exactly(fd, size, read):
    parts, left = [], size
    while left:
        part = read(fd, min(left, _CHUNK))
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


# ---- the helper's side ------------------------------------------------------------------

def _serve(parent):
    """Answer frames on stdin with frames on stdout until the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # ^C is for the master to handle
    _die_with(parent)
    try:
        from setproctitle import setproctitle
        setproctitle(TITLE)
    except ImportError:
        pass
    requests = sys.stdin.buffer.fileno()
    answers = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())   # stray prints must not corrupt frames
    while True:
        frame = _receive(requests, os.read)
        if frame is None:
            return
        try:
            function, args = pickle.loads(frame)
            outcome = (True, function(*args))
        except Exception as error:
            outcome = (False, error)
        _send(answers, _pickled(outcome), os.write)


def _pickled(outcome):
    try:
        data = pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)      # an exception whose __init__ takes other args cannot
        return data
    except Exception as error:
        what = outcome[1] if not outcome[0] else error
        return pickle.dumps((False, OffloadError("%s: %s" % (type(what).__name__, what))))


def _die_with(parent):
    """SIGKILL when the parent dies (Linux); exit now if it already has."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(0)


if __name__ == "__main__":
    # Through the module's own name, so what is pickled back names elemta.util.offload
    # classes (OffloadError), not __main__'s.
    from elemta.util.offload import _serve as serve
    serve(int(sys.argv[1]))
