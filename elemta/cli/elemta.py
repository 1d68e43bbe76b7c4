"""`elemta`: the daemon's entry point.

Loads and checks the configuration, binds the listeners, reconciles the queue with its
spool files and serves SMTP in the foreground, logging to stderr. For now it runs one
smtpd worker in this process; the master issue turns this into the pre-forking master.

    elemta [--config FILE | -config FILE] [--check-config] [--version]

Exit status: 0 after a clean stop, 1 for a configuration error or a listener that
cannot be bound. See also: man/elemta.8, elemta.conf(5).
"""

import argparse
import logging
import os
import socket
import sys

from elemta import __version__

log = logging.getLogger("elemta")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="elemta", description="Elemta mail transfer agent: receive mail over SMTP.")
    # "-config" is the spelling of the original Elemta; --config is the usual one.
    parser.add_argument("-config", "--config", metavar="FILE",
                        help="configuration file, .yaml/.yml or .toml "
                             "(default: built-in development settings)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration, report problems and exit")
    parser.add_argument("--version", action="version", version="elemta " + __version__)
    return parser.parse_args(argv)


def load(path):
    from elemta.config import ConfigError, default_config, load_config
    if path is None:
        return default_config()
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)


def setup_logging(config):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(name)s[%(process)d]: %(levelname)s: %(message)s",
        datefmt="%b %d %H:%M:%S"))
    root = logging.getLogger("elemta")
    root.handlers[:] = [handler]
    root.setLevel(config.logging.level.upper())
    root.propagate = False


def bind(listener):
    """A listening socket for one listener; exits with a clear message if it cannot."""
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.address, listener.port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        print("elemta: cannot listen on %s port %d: %s"
              % (listener.address, listener.port, exc.strerror or exc), file=sys.stderr)
        sys.exit(1)
    sock.setblocking(False)
    return sock


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = load(args.config)
    if args.check_config:
        print("elemta: configuration OK: %s" % (config.source or "built-in defaults"))
        return 0
    setup_logging(config)
    listening = [(listener, bind(listener)) for listener in config.listeners]

    from elemta.queue.queue import Queue
    with Queue(config.queue.spool_dir, sync_method=config.queue.sync_method,
               map_size=config.queue.index_map_size) as queue:
        log.info("queue reconciled: %s", queue.reconcile())

    from elemta.smtpd.worker import STOP_GRACE, run_worker
    workers = config.smtpd.workers or os.cpu_count() or 1
    log.info("elemta %s starting %d smtpd worker(s): %s; spool %s", __version__, workers,
             ", ".join("%s %s:%d" % (l.mode, l.address, l.port) for l in config.listeners),
             config.queue.spool_dir)
    if workers == 1:
        status = run_worker(config, listening)
    else:
        from elemta.master import Master
        from elemta.smtpd.clientcount import ClientCounts
        counts = ClientCounts(workers)

        def worker(master_pid, slot):
            counts.use_row(slot)
            return run_worker(config, listening, counts, master_pid)

        status = Master(workers, worker, STOP_GRACE, slot_freed=counts.clear_row).run()
    log.info("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
