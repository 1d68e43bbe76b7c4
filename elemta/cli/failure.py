"""Failure: how every installed program gives up, and the exit statuses that are Elemta's own.

elemta, elemtactl, sendmail, mailq and newaliases raise Failure(status, message) where
they stop; their main() prints "PROG: message" on stderr (one line, never a traceback)
and exits with the status. Statuses are sysexits(3) as the os module names them
(os.EX_USAGE, os.EX_CONFIG, ...) and are never redefined; the few below follow older
conventions than sysexits and are defined here, once.
See also: elemta.cli.config_finder, man/elemta.8, man/elemtactl.8.
"""

# elemta could not start, or a check found mistakes (elemta --check-config, elemtactl
# config check, newaliases), as `postfix check` and newaliases report them.
EX_FAILED = 1
# elemtactl reload/stop: no master runs on the spool.
EX_NOT_RUNNING = 1
# elemtactl status: no master runs; 3 is "program is not running" for LSB init scripts.
EX_STATUS_NOT_RUNNING = 3


class Failure(Exception):
    """Ends the command: str(self) goes to stderr after "PROG: ", code is the exit status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
