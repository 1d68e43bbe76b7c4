"""elemtactl: the administrator's command for a running or stopped Elemta.

Runs as its own short-lived process (owned by no daemon). It manages the SMTP
AUTH users (`user add/passwd/del/list`), checks, shows and changes the
configuration (`config check`; `config show/get/set`, in elemta.cli.configcmd),
makes DKIM signing keys (`dkim keygen`), lists and changes the queue
(`queue ...`, in elemta.cli.queuecmd; `--cluster queue ...` on every node of a
cluster, in elemta.cli.clustercmd), compiles and queries lookup tables (`map
compile/query`, in elemta.cli.mapcmd) and asks a running master for its status,
a reload or a stop (`status`, `reload`, `stop`, in elemta.cli.control), drains a node
before it is retired (`drain`, `undrain`, in elemta.cli.draincmd), and lists
certificates or forces an ACME renewal (`cert status/renew`, in elemta.cli.certcmd), and
shows or sends the TLS-RPT reports (`tlsrpt show/send`, in elemta.cli.tlsrptcmd).

Errors are one line on stderr and a sysexits(3) exit status, never a traceback.
See also: elemta.util.credentials (the file format), elemta.config,
elemta.cli.queuecmd, man/elemtactl.8.
"""

import argparse
import errno
import logging
import os
import sys
# sysexits(3), as the os module names them (elemta.cli.failure).
from os import (EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_NOINPUT, EX_NOUSER, EX_OK,
                EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE)
from typing import Callable, List, Optional, Tuple

from elemta.cli.config_finder import config_path, read_config
from elemta.cli.failure import EX_FAILED, Failure

# The modules of the other commands, and of the user and key commands' helpers, are
# imported where they are used: `elemtactl queue list` (and mailq) start in a fraction of
# the time, which counts for scripts that run them often (issue #20).

PROG = "elemtactl"
DEFAULT_CREDENTIALS_FILE = "/etc/elemta/credentials"
DEFAULT_DKIM_DIR = "/etc/elemta/dkim"

# Errors that go away by themselves or when the admin frees space: retry later.
TEMPORARY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR, errno.EBUSY}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and EX_USAGE, not exit 2."""

    def error(self, message):
        command = self.prog.partition(" ")[2]
        where = command + ": " if command else ""
        raise Failure(EX_USAGE, "%s%s (see %s --help)" % (where, message, self.prog))


# ---------------------------------------------------------------- configuration

def _config_api():
    """(ConfigError, load_config, default_config), imported only by commands that need them."""
    try:
        from elemta.config import ConfigError, default_config, load_config
    except ImportError as exc:
        raise Failure(EX_SOFTWARE, "cannot load the configuration code: %s" % exc)
    return ConfigError, load_config, default_config


def _config_errors(exc: Exception) -> List[str]:
    """One line per problem a ConfigError carries (FILE:LINE: KEY: message)."""
    return [str(problem) for problem in exc.problems] or [exc.__class__.__name__]


def cmd_config_check(args) -> int:
    """config check: load the configuration; print its errors (exit 1) or "config OK".

    Without --config it checks the file `elemta` would find (elemta.cli.config_finder),
    or the built-in defaults when there is none. Warnings (elemta.config.advice) follow
    "config OK" on stderr, "elemtactl: warning: FILE:LINE: KEY: ..."; they do not change
    the exit status.
    """
    from elemta.cli import filecheck
    ConfigError, load_config, default_config = _config_api()
    path = config_path(args.config)
    try:
        if path:
            # The workers read the keys and credentials as master.user: open them so.
            config = load_config(path, check_files=filecheck.master_user_check(PROG))
            _workers(config)
        else:
            config = default_config()
    except ConfigError as exc:
        for message in _config_errors(exc):
            print(message, file=sys.stderr)
        return EX_FAILED
    except Failure as failure:          # master.user or master.group does not exist
        print("%s: %s" % (PROG, failure), file=sys.stderr)
        return EX_FAILED
    print("config OK: %s" % (path or "built-in defaults (no --config given)"))
    sys.stdout.flush()
    for warning in config.warnings:
        print("%s: warning: %s" % (PROG, warning), file=sys.stderr)
    return EX_OK


# ---------------------------------------------------------------- files for the workers

def _workers(config) -> Optional[Tuple[int, int]]:
    """(uid, gid) the workers run as, or None when master.user and master.group are
    unset (the workers then run as whoever starts elemta)."""
    from elemta.master import resolve_user
    if config is None or (config.master.user is None and config.master.group is None):
        return None
    try:
        return resolve_user(config.master)
    except KeyError as exc:
        raise Failure(EX_CONFIG, exc.args[0])


def _service_config(args):
    """The Config naming master.user: the file config_finder finds, else None.
    Loaded without opening the workers' files: the one being made may not exist yet."""
    path = config_path(getattr(args, "config", None))
    return None if path is None else read_config(path)


def _warn_if_workers_cannot_read(config, path: str) -> None:
    """Open the file just written as master.user; say so if that fails (a directory on
    the way they cannot enter, say): the daemon would refuse AUTH or answer 451."""
    if config is None:
        return
    from elemta.cli import filecheck
    why = filecheck.unreadable_as(config.master, [path], PROG).get(path)
    if why:
        print("%s: warning: %s: the workers cannot read it: %s" % (PROG, path, why),
              file=sys.stderr)


def _ownership(path: str) -> str:
    """'mode 0640, root:nogroup' of a file just written."""
    import grp
    import pwd
    info = os.stat(path)
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return "mode %04o, %s:%s" % (info.st_mode & 0o7777, owner, group)


# ---------------------------------------------------------------- users

def _credentials_path(args) -> str:
    """--file, else the auth.credentials_file of the configuration, else the packaged
    default."""
    return _credentials_target(args, writing=False)[0]


def _credentials_target(args, writing: bool = True):
    """(the credentials file, the Config naming the workers' user or None). Writers
    read the configuration (the one config_finder finds) even with --file: the file
    must be made readable by master.user."""
    config = _service_config(args) if writing or not args.file else None
    if config is not None and config.auth.backend != "file":
        # The users are Dovecot's: a user added here could not log in.
        print("%s: note: auth.backend is %s: the SMTP server does not read this file"
              % (PROG, config.auth.backend), file=sys.stderr)
    if args.file:
        return args.file, config
    if config is not None and config.auth.credentials_file:
        return config.auth.credentials_file, config
    if args.config:
        print("%s: note: %s sets no auth.credentials_file; using %s"
              % (PROG, args.config, DEFAULT_CREDENTIALS_FILE), file=sys.stderr)
    return DEFAULT_CREDENTIALS_FILE, config


def _check_username(username: str) -> None:
    from elemta.util import credentials
    problem = credentials.username_error(username)
    if problem:
        raise Failure(EX_USAGE, "%r: %s" % (username, problem))


def _read_password(args) -> str:
    """The new password: one line of stdin (--password-stdin) or typed twice at the terminal."""
    import getpass
    from elemta.util import credentials
    if args.password_stdin:
        line = sys.stdin.buffer.readline()
        if not line:
            raise Failure(EX_DATAERR, "no password on standard input")
        try:
            password = line.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError:
            raise Failure(EX_DATAERR, "the password on standard input is not valid UTF-8")
    else:
        _require_terminal()
        password = getpass.getpass("New password for %s: " % args.user)
        if getpass.getpass("Retype the password: ") != password:
            raise Failure(EX_DATAERR, "the passwords do not match; nothing changed")
    problem = credentials.password_error(password)
    if problem:
        raise Failure(EX_DATAERR, problem)
    return password


def _require_terminal() -> None:
    """Refuse to prompt without a terminal (getpass would read an echoing stdin instead)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        raise Failure(EX_USAGE, "no terminal to ask for the password; "
                                "give it with --password-stdin")


def _write_failure(exc: OSError, path: str) -> Failure:
    """The Failure for an OSError met while changing the credentials file."""
    where = exc.filename or path
    if isinstance(exc, FileNotFoundError) and where == path:
        return Failure(EX_NOINPUT, "%s: no such file (add a user first)" % path)
    code = EX_TEMPFAIL if exc.errno in TEMPORARY_ERRNOS else EX_CANTCREAT
    return Failure(code, "%s: %s" % (where, exc.strerror or exc))


def _user_exists(path: str, user: str) -> Failure:
    return Failure(EX_CANTCREAT, "%s: user already exists in %s (to change the password: "
                                 "%s user passwd)" % (user, path, PROG))


def _no_such_user(path: str, user: str) -> Failure:
    return Failure(EX_NOUSER, "%s: no such user in %s" % (user, path))


def _existing_users(path: str) -> List[str]:
    """The users in path ([] if it does not exist yet), to refuse before prompting."""
    from elemta.util import credentials
    try:
        return credentials.list_users(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise Failure(EX_NOINPUT, "%s: %s" % (path, exc.strerror or exc))


def _change_users(path: str, user: str, change: Callable[[], bool]) -> bool:
    """Run a credentials change, turning its exceptions into Failures."""
    from elemta.util import credentials
    try:
        return change()
    except credentials.UserExists:
        raise _user_exists(path, user)
    except credentials.NoSuchUser:
        raise _no_such_user(path, user)
    except credentials.CredentialsBusy as exc:
        raise Failure(EX_TEMPFAIL, "%s; try again" % exc)
    except ValueError as exc:
        raise Failure(EX_DATAERR, str(exc))
    except OSError as exc:
        raise _write_failure(exc, path)


def cmd_user_add(args) -> int:
    """user add USER: create a user (fails if it exists)."""
    from elemta.util import credentials
    _check_username(args.user)
    path, config = _credentials_target(args)
    reader = _workers(config)
    if args.user in _existing_users(path):
        raise _user_exists(path, args.user)
    password = _read_password(args)
    _change_users(path, args.user, lambda: credentials.set_user(
        path, args.user, password, replace=False, reader=reader))
    print("user %s added to %s" % (args.user, path))
    _warn_if_workers_cannot_read(config, path)
    return EX_OK


def cmd_user_passwd(args) -> int:
    """user passwd USER: set a new password for an existing user."""
    from elemta.util import credentials
    _check_username(args.user)
    path, config = _credentials_target(args)
    reader = _workers(config)
    if not os.path.exists(path):
        raise Failure(EX_NOINPUT, "%s: no such file (add a user first)" % path)
    if args.user not in _existing_users(path):
        raise _no_such_user(path, args.user)
    password = _read_password(args)
    _change_users(path, args.user, lambda: credentials.set_user(
        path, args.user, password, create=False, reader=reader))
    print("password of %s changed in %s" % (args.user, path))
    _warn_if_workers_cannot_read(config, path)
    return EX_OK


def cmd_user_del(args) -> int:
    """user del USER: remove a user."""
    from elemta.util import credentials
    _check_username(args.user)
    path, config = _credentials_target(args)
    reader = _workers(config)
    if not _change_users(path, args.user,
                         lambda: credentials.delete_user(path, args.user, reader)):
        raise _no_such_user(path, args.user)
    print("user %s deleted from %s" % (args.user, path))
    return EX_OK


def cmd_user_list(args) -> int:
    """user list: print the user names, one per line."""
    from elemta.util import credentials
    path = _credentials_path(args)
    try:
        names = credentials.list_users(path)
    except OSError as exc:
        raise Failure(EX_NOINPUT, "%s: %s" % (path, exc.strerror or exc))
    for name in names:
        print(name)
    return EX_OK


# ---------------------------------------------------------------- dkim

def cmd_dkim_keygen(args) -> int:
    """dkim keygen: write a new signing key and print the DNS TXT record to publish."""
    import subprocess
    from elemta.plugins.dkim import generate_key
    key_file = args.key_file or os.path.join(
        DEFAULT_DKIM_DIR, "%s.%s.%s.pem" % (args.selector, args.domain,
                                           "ed25519" if args.algorithm.startswith("ed")
                                           else "rsa"))
    if os.path.exists(key_file):
        raise Failure(EX_CANTCREAT, "%s: exists; a key is never overwritten (remove it or "
                                    "name another --key-file)" % key_file)
    config = _service_config(args)
    reader = _workers(config)
    try:
        if not args.key_file:
            _make_key_directory(DEFAULT_DKIM_DIR, reader)
        key = generate_key(args.domain, args.selector, key_file, args.algorithm, args.bits,
                           reader=reader)
    except ValueError as exc:
        raise Failure(EX_USAGE, "dkim keygen: %s" % exc)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Failure(EX_CANTCREAT, "%s: %s" % (key_file, getattr(exc, "strerror", None)
                                                or exc))
    whose = ""
    if reader is not None:
        whose = ", readable by master.user %s" % (config.master.user or reader[0])
    print("; private key written to %s (%s%s)" % (key.key_file, _ownership(key.key_file),
                                                  whose))
    print("; publish this record, then add the key to plugins.dkim.keys:")
    print(key.zone_line)
    _warn_if_workers_cannot_read(config, key.key_file)
    return EX_OK


def _make_key_directory(path: str, reader) -> None:
    """The default key directory: 0750, and its group the workers' when made here."""
    try:
        os.makedirs(path, mode=0o750)
    except FileExistsError:
        return                        # the admin's directory: left as it is
    from elemta.util import daemonfiles
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        daemonfiles.let_read(fd, reader)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the parser

def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """elemtactl's parser; with only="queue", the queue commands alone (main's fast path:
    the other commands' modules are then neither imported nor their parsers built)."""
    # --config is accepted before or after the command; SUPPRESS keeps a
    # subcommand's absent option from hiding the top-level one.
    config_option = _Parser(add_help=False)
    config_option.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                               help="Elemta configuration file (YAML or TOML)")
    file_option = _Parser(add_help=False, parents=[config_option])
    file_option.add_argument("--file", metavar="FILE",
                             help="credentials file (default: auth.credentials_file of "
                                  "the configuration, else %s)"
                                  % DEFAULT_CREDENTIALS_FILE)
    password_option = _Parser(add_help=False)
    password_option.add_argument("--password-stdin", action="store_true",
                                 help="read the password from one line of standard input "
                                      "instead of prompting twice")

    parser = _Parser(prog=PROG, description="Administer Elemta.",
                     epilog="Exit status: 0 success, 1 config errors (config check) or key not "
                            "found (map query), "
                            "64 usage, 65 bad password or damaged spool file, 66 no input "
                            "file or queue, 67 no such user or message, 69 (--cluster) "
                            "a node did not answer, 73 cannot create "
                            "(or user or key exists), 74 queue I/O "
                            "error, 75 try again later, 77 permission denied, 78 bad "
                            "configuration.")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="Elemta configuration file (YAML or TOML)")
    parser.add_argument("--cluster", action="store_true",
                        help="queue summary, list, show, hold, release and flush act on "
                             "every live node of the cluster (cluster.store) through "
                             "their REST APIs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    from elemta.cli import queuecmd
    if only == "queue":
        queuecmd.add_queue_commands(commands, _Parser, [config_option])
        return parser
    from elemta.cli import (certcmd, completion, configcmd, control, draincmd, mapcmd,
                            pfconfig, pfimport, reportcmd, restrictionscmd, tlsrptcmd,
                            topcmd)

    user = commands.add_parser("user", help="manage SMTP AUTH users")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION",
                                        parser_class=_Parser)
    user_commands.required = True
    for name, handler, parents, doc in (
            ("add", cmd_user_add, [file_option, password_option], "add a user"),
            ("passwd", cmd_user_passwd, [file_option, password_option], "change a password"),
            ("del", cmd_user_del, [file_option], "delete a user"),
            ("list", cmd_user_list, [file_option], "list the users")):
        sub = user_commands.add_parser(name, parents=parents, help=doc, description=doc)
        if name != "list":
            sub.add_argument("user", metavar="USER", help="user name (case-sensitive)")
        sub.set_defaults(handler=handler)

    config = commands.add_parser("config", help="check, show and change the configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION",
                                            parser_class=_Parser)
    config_commands.required = True
    check = config_commands.add_parser("check", parents=[config_option],
                                       help="load the configuration and report its errors")
    check.set_defaults(handler=cmd_config_check)
    configcmd.add_config_actions(config_commands, [config_option])

    queuecmd.add_queue_commands(commands, _Parser, [config_option])
    pfimport.add_command(commands, _Parser, [config_option])
    pfconfig.add_command(commands, _Parser, [config_option])
    mapcmd.add_commands(commands, _Parser, [config_option])
    restrictionscmd.add_command(commands, _Parser, [config_option])
    reportcmd.add_command(commands, _Parser, [config_option])
    topcmd.add_command(commands, _Parser, [config_option])
    draincmd.add_commands(commands, _Parser, [config_option])
    tlsrptcmd.add_commands(commands, _Parser, [config_option])

    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    dkim_commands = dkim.add_subparsers(dest="dkim_command", metavar="ACTION",
                                        parser_class=_Parser)
    dkim_commands.required = True
    keygen = dkim_commands.add_parser("keygen", parents=[config_option],
                                      help=cmd_dkim_keygen.__doc__.split(": ")[1],
                                      description=cmd_dkim_keygen.__doc__.split(": ")[1])
    keygen.add_argument("--domain", "-d", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", "-s", required=True, help="the selector (s=)")
    keygen.add_argument("--algorithm", "-a", default="rsa-sha256",
                        choices=("rsa-sha256", "ed25519-sha256"))
    keygen.add_argument("--bits", "-b", type=int, default=2048, help="RSA key size")
    keygen.add_argument("--key-file", "-k", metavar="FILE",
                        help="where to write the key (default: %s/SELECTOR.DOMAIN.ALG.pem)"
                             % DEFAULT_DKIM_DIR)
    keygen.set_defaults(handler=cmd_dkim_keygen)

    for name, handler in (("status", control.cmd_status), ("reload", control.cmd_reload),
                          ("stop", control.cmd_stop)):
        doc = handler.__doc__.split(": ", 1)[1]
        sub = commands.add_parser(name, parents=[config_option], help=doc, description=doc)
        sub.add_argument("--spool-dir", metavar="DIR",
                         help="the spool of the elemta to talk to (default: the config's)")
        sub.set_defaults(handler=handler)

    cert = commands.add_parser("cert", help="certificates: status, forced ACME renewal")
    cert_commands = cert.add_subparsers(dest="cert_command", metavar="ACTION",
                                        parser_class=_Parser)
    cert_commands.required = True
    subs = {}
    for name, handler in (("status", certcmd.cmd_status), ("renew", certcmd.cmd_renew)):
        doc = handler.__doc__.split(": ", 1)[1]
        subs[name] = cert_commands.add_parser(name, parents=[config_option], help=doc,
                                              description=doc)
        subs[name].set_defaults(handler=handler)
    subs["status"].add_argument("--json", action="store_true",
                                help="one JSON object per certificate")
    subs["renew"].add_argument("--spool-dir", metavar="DIR",
                               help="the spool of the elemta to talk to (default: the "
                                    "config's)")

    completion.add_command(commands, _Parser, parser)   # last: it completes all the above
    return parser


def _fast_command(argv: List[str]) -> Optional[str]:
    """"queue" when argv runs a queue command (after the top-level --config FILE and
    --cluster only), for build_parser's fast path; else None (the whole parser: its
    help and errors list every command)."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif word != "--cluster" and not word.startswith("--config="):
            return "queue" if word == "queue" else None
    return None


class _OneLineFormatter(logging.Formatter):
    def format(self, record):
        return "%s: %s: %s" % (PROG, record.levelname.lower(), record.getMessage())


def main(argv: Optional[List[str]] = None) -> int:
    """Run one elemtactl command; returns the exit status."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    logging.getLogger("elemta").addHandler(handler)
    logging.getLogger("elemta").setLevel(logging.WARNING)
    try:
        args = build_parser(_fast_command(sys.argv[1:] if argv is None else argv)
                            ).parse_args(argv)
        if args.cluster and args.command != "queue":
            raise Failure(EX_USAGE, "--cluster goes with the queue commands only, not %s"
                          % args.command)
        return args.handler(args)
    except Failure as failure:
        print("%s: %s" % (PROG, failure), file=sys.stderr)
        return failure.code
    except SystemExit as exc:   # --help
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except Exception as exc:    # a bug: still one line, never a traceback
        print("%s: internal error: %s: %s" % (PROG, exc.__class__.__name__, exc),
              file=sys.stderr)
        return EX_SOFTWARE
    finally:
        logging.getLogger("elemta").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
