"""`elemta`: the daemon's entry point; this process becomes the master.

Loads and checks the configuration, takes the spool's master lock (one master per
spool), binds the listeners (as root for ports below 1024), reconciles the queue with
its spool files as the configured user, and hands over to elemta.master.Master, which
forks the children of the service table (elemta.services). Foreground by default
(systemd Type=notify); --daemon detaches and writes a pid file.

    elemta [--config FILE | -config FILE] [--check-config] [--daemon] [--version]

Without --config it reads the file elemta.cli.config_finder finds ($ELEMTA_CONFIG, then
/etc/elemta/elemta.yaml or .toml), as elemtactl, sendmail and mailq do, else runs on the
built-in development defaults (what `make run` starts).
Exit status: 0 after a clean stop, 1 for a configuration error, a listener that cannot
be bound, or another master on the same spool. See also: man/elemta.8, elemta.conf(5).
"""

import argparse
import fcntl
import logging
import os
import resource
import signal
import socket
import sys

# Ctrl-C reaches the whole foreground group at any moment. Until the master installs its
# own SIGINT handler (an orderly stop), a Ctrl-C ends this process as it would a C
# program: no KeyboardInterrupt traceback from whatever start-up step it hit (reading the
# queue is crash-safe; children already forked end with their parent).
signal.signal(signal.SIGINT, signal.SIG_DFL)

from elemta import __version__  # noqa: E402 (after the signal, so imports are covered)
from elemta.cli.config_finder import config_path  # noqa: E402
from elemta.cli.failure import EX_FAILED, Failure  # noqa: E402

log = logging.getLogger("elemta.master")

DEFAULT_DAEMON_PID_FILE = "/run/elemta.pid"
LOCK_NAME = "master.lock"
# The lock file's second line, "config PATH", says this for no file (PATH is absolute).
BUILT_IN_DEFAULTS = "(built-in defaults)"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="elemta", description="Elemta mail transfer agent: receive mail over SMTP, "
                                   "queue it and deliver it.")
    # "-config" is the spelling of the original Elemta; --config is the usual one.
    parser.add_argument("-config", "--config", metavar="FILE",
                        help="configuration file, .yaml/.yml or .toml (default: "
                             "$ELEMTA_CONFIG, else /etc/elemta/elemta.yaml or .toml if "
                             "present, else built-in development settings)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration, report problems and exit")
    parser.add_argument("--daemon", action="store_true",
                        help="detach from the terminal and write a pid file")
    parser.add_argument("--version", action="version", version="elemta " + __version__)
    return parser.parse_args(argv)


def load(path):
    """The Config from path (or the built-in defaults); raises ConfigError."""
    from elemta.config import default_config, load_config
    return default_config() if path is None else load_config(path)


def load_and_warn(path):
    """load(path), its warnings logged (elemta.config.advice): a reload's config."""
    return log_warnings(load(path))


def log_warnings(config):
    """Log each warning of config (FILE:LINE: KEY: message); returns config."""
    for warning in config.warnings:
        log.warning("config: %s", warning)
    return config


def fail(message):
    """Give up starting: main() prints the message and exits 1."""
    raise Failure(EX_FAILED, message)


def bind(listener):
    """A listening socket for one listener (or an elemta.services.Endpoint); raises
    OSError."""
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.address, listener.port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def take_master_lock(spool_dir, uid, gid):
    """Hold spool/master.lock for the master's life; refuse if another master has it.

    The spool belongs to the children's user, who could plant a link or a hard link
    under that name: root opens it without following links and refuses anything but a
    plain file of its own or of that user (elemta.util.eugid)."""
    from elemta.util.eugid import UnsafePath, open_nofollow
    os.makedirs(spool_dir, exist_ok=True)
    spool_fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.getuid() == 0 and (uid, gid) != (0, 0):
            os.fchown(spool_fd, uid, gid)          # the children write here as that user
        try:
            fd = open_nofollow(LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644, dir_fd=spool_fd,
                               owners={os.geteuid(), uid},
                               shown=os.path.join(spool_dir, LOCK_NAME))
        except UnsafePath as exc:
            fail(str(exc))
    finally:
        os.close(spool_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").split("\n")[0].strip() or \
            "unknown"
        fail("another master (pid %s) is running on spool %s" % (holder, spool_dir))
    os.set_inheritable(fd, False)
    return fd


def note_pid(lock_fd, path):
    """Write our pid and the file we read (a reload re-reads it) in the lock file, for
    elemtactl: config set --reload tells us only of an edit of that file."""
    config = os.fsencode(os.path.abspath(path)) if path else BUILT_IN_DEFAULTS.encode()
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, b"%d\nconfig %s\n" % (os.getpid(), config), 0)


def write_pid_file(path):
    with open(path, "w") as f:
        f.write("%d\n" % os.getpid())


def raise_fd_limit():
    """Each SMTP session is a descriptor: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def reconcile_queue(config):
    """Make the index agree with the spool files, as the workers' user, before serving;
    end a drain a previous run left (elemta.queue.draining says why), and its store
    outage (elemta.sharedstate.outage)."""
    from elemta.master import drop_privileges
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            drop_privileges(config.master)
            from elemta.queue.queue import Queue
            with Queue.from_config(config.queue) as queue:
                log.info("queue reconciled: %s", queue.reconcile())
            from elemta.queue import draining
            if draining.end(config.queue.spool_dir) is not None:
                log.info("the drain of the previous run ended with it: taking mail again")
            from elemta.sharedstate import outage
            outage.clear(config.queue.spool_dir)    # the next outage is logged anew
            status = 0
        except Exception as exc:
            log.error("cannot open the queue in %s: %s", config.queue.spool_dir, exc)
        finally:
            logging.shutdown()
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        fail("the queue in %s cannot be opened (see the log)" % config.queue.spool_dir)


def lease_holder_ended(master, uid, gid):
    """A Master.child_exited callback: when a child that holds leases (SERVICES) has been
    reaped, the delivery workers left are told at once (elemta.queue.wakeup CHILD_ENDED),
    so they free the messages a dead worker had claimed within moments rather than at
    their next regular look. The master never opens the queue itself; it sends acting as
    master.user into that user's run directory."""
    from elemta.queue import wakeup
    from elemta.util.eugid import acting_as

    def child_exited(pid):
        child = master.children.get(pid)       # not yet forgotten when callbacks run
        if child is not None and not child.service.holds_leases:
            return
        with acting_as(uid, gid):
            wakeup.notify(master.config.queue.spool_dir, wakeup.CHILD_ENDED)
    return child_exited


def check_config(path):
    """--check-config: the configuration's problems, and every file the workers read
    opened as master.user (root, who runs this, can read anything); 0 or 1."""
    from elemta.cli.filecheck import master_user_check
    from elemta.config import ConfigError, default_config, load_config
    from elemta.master import resolve_user
    try:
        if path is None:
            config = default_config()
        else:
            config = load_config(path, check_files=master_user_check("elemta"))
        resolve_user(config.master)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_FAILED
    except KeyError as exc:
        print("elemta: %s" % exc.args[0], file=sys.stderr)
        return EX_FAILED
    print("elemta: configuration OK: %s" % (config.source or "built-in defaults"))
    for warning in config.warnings:
        print("elemta: warning: %s" % warning, file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        try:
            path = config_path(args.config)
        except Failure as failure:          # a directory with no configuration in it
            fail(str(failure))
        if args.check_config:
            return check_config(path)
        return serve(path, args.daemon)
    except Failure as failure:
        print("elemta: %s" % failure, file=sys.stderr)
        return failure.code


def serve(path, detach):
    """Start the master on the configuration in path (None: the built-in defaults) and
    run it until it stops; its exit status."""
    from elemta.config import ConfigError
    try:
        config = load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_FAILED

    from elemta.master import Master, resolve_user
    from elemta.services import SERVICES, smtpd_workers
    from elemta.util import logs
    from elemta.util.eugid import UnsafePath
    try:
        uid, gid = resolve_user(config.master)
    except KeyError as exc:
        fail(exc.args[0])
    try:
        logs.setup(config.logging)
    except OSError as exc:
        fail("logging.target %s: %s" % (config.logging.target, exc.strerror or exc))
    log_warnings(config)
    lock_fd = take_master_lock(config.queue.spool_dir, uid, gid)
    from elemta.queue import maildrop
    try:
        # sendmail's drop box, usable by every local user (see elemta.queue.maildrop).
        maildrop.prepare(config.queue.spool_dir, uid, gid)
    except UnsafePath as exc:
        fail("cannot prepare the maildrop: %s" % exc)
    except OSError as exc:
        fail("cannot prepare the maildrop in %s: %s" % (config.queue.spool_dir,
                                                        exc.strerror or exc))
    # After the lock: a second master must not wipe the running one's metric files.
    from elemta import metrics
    metrics_dir = os.path.join(config.queue.spool_dir, "metrics")
    try:
        metrics.setup(metrics_dir, uid, gid)
    except UnsafePath as exc:
        fail("cannot prepare the metrics directory: %s" % exc)
    except OSError as exc:
        fail("cannot prepare the metrics directory %s: %s" % (metrics_dir,
                                                              exc.strerror or exc))
    listening = []
    for listener in config.listeners:
        try:
            listening.append((listener, bind(listener)))
        except OSError as exc:
            fail("cannot listen on %s port %d: %s" % (listener.address, listener.port,
                                                    exc.strerror or exc))
    own_sockets = {}
    for service in SERVICES:
        endpoint = service.binds(config) if service.binds else None
        if endpoint is not None:
            try:
                own_sockets[service.kind] = (endpoint, bind(endpoint))
            except OSError as exc:
                fail("%s: cannot listen on %s port %d: %s" % (
                    service.kind, endpoint.address, endpoint.port, exc.strerror or exc))
    if config.acme.enabled:
        from elemta.certs.store import StoreError, prepare
        try:
            prepare(config.acme.state_directory, uid, gid)
        except StoreError as exc:
            fail(str(exc))
    raise_fd_limit()
    pid_file = config.master.pid_file
    if detach:
        import daemon
        keep = [lock_fd] + [sock.fileno() for _, sock in listening] + logs.streams()
        keep += [sock.fileno() for _, sock in own_sockets.values()]
        daemon.DaemonContext(working_directory=os.getcwd(), umask=0o022,
                             files_preserve=keep, prevent_core=False).open()
        pid_file = pid_file or DEFAULT_DAEMON_PID_FILE
    note_pid(lock_fd, path)
    if pid_file:
        write_pid_file(pid_file)
    reconcile_queue(config)

    log.info("elemta %s starting %d smtpd worker(s): %s; spool %s", __version__,
             smtpd_workers(config),
             ", ".join("%s %s:%d" % (l.mode, l.address, l.port) for l in config.listeners),
             config.queue.spool_dir)
    # A reload re-reads the file found at start, even if another appears in the search.
    master = Master(config, listening, lambda: load_and_warn(path), bind,
                    own_sockets=own_sockets)
    master.child_exited.append(metrics.worker_exited)
    master.child_exited.append(lease_holder_ended(master, uid, gid))
    master.close_in_child.append(lock_fd)
    try:
        return master.run()
    finally:
        if pid_file:
            try:
                os.unlink(pid_file)
            except OSError:
                pass
        log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
