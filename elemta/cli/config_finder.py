"""Which configuration file a program reads: one search order for every installed program.

elemta (the daemon), elemtactl, sendmail, mailq and newaliases all ask config_path(), so
without --config they read the same file and look at the same spool. The order:

1. the file named on the command line (--config; sendmail's -C), or elemta.yaml, else
   elemta.toml, inside it when it names a directory;
2. $ELEMTA_CONFIG, the same way; ignored when the process runs set-user-ID or
   set-group-ID, so the caller's environment never chooses a privileged program's
   configuration (none of Elemta's programs is installed so; this keeps it safe if one
   ever is);
3. /etc/elemta/elemta.yaml, then /etc/elemta/elemta.toml: the first that exists;
4. none: the built-in development defaults (SMTP on 127.0.0.1:2525, spool ./spool),
   which `make run` relies on.

read_config() loads the file found for the programs that use no secret (sendmail runs as
any local user): the files only the daemon reads are neither opened nor checked.
See also: elemta.config (loading, checking), elemta.cli.failure, man/elemta.8 (FILES).
"""

import os
from typing import Mapping, Optional, Sequence

from elemta.cli.failure import Failure

ENVIRONMENT_VARIABLE = "ELEMTA_CONFIG"
STANDARD_FILES = ("/etc/elemta/elemta.yaml", "/etc/elemta/elemta.toml")
NAMES_IN_DIRECTORY = ("elemta.yaml", "elemta.toml")


def config_path(given: Optional[str] = None,
                standard_files: Sequence[str] = STANDARD_FILES,
                environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The configuration file to read, or None for the built-in defaults; raises Failure
    (EX_CONFIG) for a named directory holding no configuration."""
    environ = os.environ if environ is None else environ
    if not given and not _set_id():
        given = environ.get(ENVIRONMENT_VARIABLE) or None
    if given:
        return _file_in(given)
    return next((path for path in standard_files if os.path.exists(path)), None)


def _set_id() -> bool:
    """Running with another user's or group's rights than the caller's (as secure_getenv)."""
    return os.getuid() != os.geteuid() or os.getgid() != os.getegid()


def _file_in(path: str) -> str:
    """path itself, or the configuration file inside the directory it names."""
    if not os.path.isdir(path):
        return path
    for name in NAMES_IN_DIRECTORY:
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    raise Failure(os.EX_CONFIG, "%s: no %s there" % (path, " or ".join(NAMES_IN_DIRECTORY)))


def read_config(path: Optional[str]):
    """The typed Config in path (None: the built-in defaults), without opening the files
    it names; raises Failure: EX_NOINPUT if it cannot be read, EX_CONFIG if it is wrong
    (the first problem, and how to see the others)."""
    from elemta.config import ConfigError, default_config, load_config
    if path is not None:
        try:
            os.close(os.open(path, os.O_RDONLY))
        except OSError as exc:
            raise Failure(os.EX_NOINPUT, "%s: %s" % (path, exc.strerror or exc))
    try:
        if path is None:
            return default_config()        # it reads /etc/mailname, which may be bad
        return load_config(path, check_files=False)
    except ConfigError as exc:
        problems = [str(p) for p in exc.problems] or [str(exc)]
        more = "" if len(problems) == 1 else \
            " (and %d more: elemtactl config check --config %s)" % (len(problems) - 1, path)
        raise Failure(os.EX_CONFIG, problems[0] + more)


def find_config(given: Optional[str] = None):
    """read_config(config_path(given)): what the programs without secrets run on."""
    return read_config(config_path(given))
