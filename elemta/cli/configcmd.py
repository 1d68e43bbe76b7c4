"""`elemtactl config show / get / set`: Elemta's postconf.

Runs in the admin's own short-lived process. show prints every effective setting as a
`key = value` line (postconf), -n those that differ from their default (postconf -n),
-d the defaults (postconf -d); get prints the settings named (postconf NAME). set edits
the config file in place (postconf -e): the text it would write is checked as start-up
checks a file (elemta.config.loader.load_text), and a refused value leaves the file as
it was, with start-up's FILE:LINE: KEY: message; an accepted one is written atomically
(elemta.config.editor). Like postconf -e it does not reload the daemon unless asked
(--reload); it says whether the change needs a reload or a restart (the schema's
`restart` metadata) and what to run.
See also: elemta.config.listing (the lines), elemta.config.editor, elemta.cli.control
(finding the master), man/elemtactl.8.
"""

import argparse
import os
import signal
import sys
from os import EX_DATAERR, EX_NOINPUT, EX_OK, EX_USAGE
from typing import Any, List, Tuple

from elemta.cli import control, filecheck
from elemta.cli.config_finder import (ENVIRONMENT_VARIABLE, STANDARD_FILES, config_path,
                                      read_config)
from elemta.cli.failure import EX_FAILED, Failure

PROG = "elemtactl"


# ---------------------------------------------------------------- show and get

def _effective(args):
    """The Config the daemon would run on (the built-in defaults without a file);
    the workers' secret files are neither opened nor needed."""
    return read_config(config_path(getattr(args, "config", None)))


def cmd_show(args) -> int:
    """show: every effective setting, one `key = value` line each."""
    from elemta.config import listing
    if args.defaults:
        chosen = listing.defaults()
    else:
        chosen = listing.settings(_effective(args))
        if args.non_default:
            chosen = [setting for setting in chosen if not setting.is_default]
    _print(chosen, args.values_only)
    return EX_OK


def cmd_get(args) -> int:
    """get: the settings named by their key paths (a section or list: all of it)."""
    from elemta.config import listing
    every = listing.defaults() if args.defaults else listing.settings(_effective(args))
    chosen = []
    unknown = []
    for key in args.keys:
        try:
            chosen += listing.select(every, key)
        except listing.UnknownKey as exc:
            unknown.append(str(exc))
    # As postconf: the keys that exist are printed even when another does not.
    _print(chosen, args.values_only)
    for problem in unknown:
        print("%s: config get: %s" % (PROG, problem), file=sys.stderr)
    return EX_USAGE if unknown else EX_OK


def _print(chosen, values_only: bool) -> None:
    """The lines, in UTF-8 whatever the locale (an IDN host name); a closed pipe
    (| head) ends the command quietly."""
    from elemta.config.listing import value_text
    lines = [value_text(s.value) if values_only else s.line() for s in chosen]
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write("".join(line + "\n" for line in lines).encode("utf-8"))
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ---------------------------------------------------------------- set

def cmd_set(args) -> int:
    """set: change settings in the config file, keeping the rest of it as it is."""
    from elemta.config.editor import edit_lock
    path = _file_to_edit(args)
    with edit_lock(path):
        return _set(args, path)


def _set(args, path: str) -> int:
    """cmd_set's work, under the edit lock: read, change, check, replace, report."""
    from elemta.config import ConfigError, listing
    from elemta.config.editor import EditError, edit_text, replace_file
    from elemta.config.errors import format_key
    old_config = _config_as_it_is(path)
    text = _read_text(path)
    known = listing.defaults() + (listing.settings(old_config) if old_config else [])
    changes = [_change(assignment, known) for assignment in args.assignments]
    try:
        new_text = edit_text(path, text, [(key_path, value) for key_path, value in changes])
    except EditError as exc:
        raise Failure(EX_DATAERR, "config set: %s; %s unchanged" % (exc, path))
    try:
        new_config = _check(path, new_text, [key_path for key_path, _ in changes])
    except ConfigError as exc:
        for problem in exc.problems:
            print(str(problem), file=sys.stderr)
        print("%s: config set: refused, %s unchanged" % (PROG, path), file=sys.stderr)
        return EX_FAILED
    if new_text == text:
        print("%s: no change" % path)
        return EX_OK
    try:
        replace_file(path, new_text)
    except OSError as exc:
        raise Failure(os.EX_CANTCREAT, "config set: cannot replace %s (by a new file "
                      "beside it): %s; it is unchanged" % (path, exc.strerror or exc))
    changed = _report(path, [format_key(key_path) for key_path, _ in changes],
                      old_config, new_config)
    _tell_daemon(args, path, old_config or new_config, new_config, changed)
    return EX_OK


def _report(path: str, keys: List[str], old_config, new_config) -> List[Any]:
    """Print each setting under the keys set with its old value (and the list entries
    gone); return the settings that changed."""
    from elemta.config import listing
    old = {s.key: s for s in listing.settings(old_config)} if old_config else {}
    new = listing.settings(new_config)
    new_keys = {s.key for s in new}
    changed = []
    for key in keys:
        for setting in listing.select(new, key):
            before = old.get(setting.key)
            if before is not None and before.value == setting.value and setting.key != key:
                continue        # an entry of a list set whole that stays as it was
            if before is None or before.value != setting.value:
                changed.append(setting)
            was = listing.value_text(before.value) if before else \
                "not set" if old_config else "unknown: the file had errors"
            print("%s: %s (was %s)" % (path, setting.line(), was))
        for before in old.values():
            # An entry a list set whole no longer has (not `KEY = []`, the empty list).
            if before.key.startswith((key + ".", key + "[")) and before.key not in new_keys:
                changed.append(before)
                print("%s: %s removed (was %s)" % (path, before.key,
                                                  listing.value_text(before.value)))
    return changed


def _config_as_it_is(path: str):
    """The file's Config before the edit, or None when it has errors set may fix; a
    file that cannot be parsed at all cannot be edited (Failure, with its errors)."""
    from elemta.config import ConfigError, load_config
    try:
        return load_config(path, check_files=False)
    except ConfigError as exc:
        if any(not problem.key for problem in exc.problems):    # syntax, encoding
            raise Failure(EX_DATAERR, "config set: cannot edit a file that cannot be "
                                      "read: %s" % "; ".join(map(str, exc.problems)))
        return None


def _check(path: str, text: str, paths):
    """The Config of `text` as the file at `path`, checked as start-up checks it (the
    workers' files opened as master.user, as config check does) and, when the edit
    names master.user or master.group, that they exist; raises ConfigError."""
    from elemta.config import ConfigError, Problem
    from elemta.config.loader import load_text
    from elemta.config.sources import FORMATS, parse
    from elemta.master import resolve_user
    text = text[1:] if text.startswith("\ufeff") else text    # as load_config reads it
    config = load_text(path, text, filecheck.master_user_check(PROG))
    if any(key_path[:2] in (("master", "user"), ("master", "group")) for key_path in paths):
        try:
            resolve_user(config.master)
        except KeyError as exc:
            key, _, message = exc.args[0].partition(": ")
            lines = parse(path, text, FORMATS[os.path.splitext(path)[1].lower()]).lines
            line = lines.get(tuple(key.split(".")))
            raise ConfigError([Problem(path, line, key, message)]) from None
    return config


def _file_to_edit(args) -> str:
    """The config file config_finder finds; there must be one (defaults cannot be edited)."""
    given = getattr(args, "config", None)
    path = config_path(given)
    if path is None:
        raise Failure(EX_NOINPUT, "config set: no configuration file to edit: none named "
                                  "with --config or $%s, and neither %s exists (copy "
                                  "/usr/share/doc/elemta/examples or etc/*.example there "
                                  "first)" % (ENVIRONMENT_VARIABLE, " nor ".join(STANDARD_FILES)))
    if not os.path.exists(path):
        raise Failure(EX_NOINPUT, "config set: %s: no such file" % path)
    return path


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as stream:
            return stream.read().decode("utf-8")
    except OSError as exc:
        raise Failure(EX_NOINPUT, "%s: %s" % (path, exc.strerror or exc))
    except UnicodeDecodeError:      # _config_as_it_is has said where; not reached
        raise Failure(EX_DATAERR, "%s: the file is not UTF-8 text" % path)


def _change(assignment: str, known) -> Tuple[Any, Any]:
    """(key path, plain value) for one KEY=VALUE argument."""
    from elemta.config import listing
    key, equals, text = assignment.partition("=")
    key = key.strip()
    if not equals or not key:
        raise Failure(EX_USAGE, "config set: %r: write KEY=VALUE" % assignment)
    try:
        key_path = listing.parse_key(key)
        kind = listing.kind_of(key_path, known)
    except listing.UnknownKey as exc:
        raise Failure(EX_USAGE, "config set: %s" % exc)
    except ValueError as exc:
        raise Failure(EX_USAGE, "config set: %s" % exc)
    return key_path, listing.parse_value(text, kind)


def _tell_daemon(args, path: str, old_config, new_config, changed: List[Any]) -> None:
    """Say what the change needs, and send SIGHUP with --reload to the master that
    reads `path`."""
    if not changed:
        return
    restarts = [s for s in changed if s.restart]
    for setting in restarts:
        print("%s: %s needs a restart, not a reload (%s): systemctl restart elemta"
              % (PROG, setting.key, setting.restart))
    for kind, most, asked in _beyond_slots(old_config, new_config):
        print("%s: a reload starts at most %d %s children (the master sizes its table "
              "at start), not %d: systemctl restart elemta to have them all"
              % (PROG, most, kind, asked))
    if len(restarts) == len(changed):
        return
    if not args.reload:
        print("%s: a reload applies it; not done (no --reload): run `%s reload` or "
              "`systemctl reload elemta`" % (PROG, PROG))
        return
    # The master that runs is the one on the spool of the configuration it started with.
    spool_dir = os.path.abspath(old_config.queue.spool_dir)
    try:
        pid, reads = control.running_master(spool_dir)
    except control.NotRunning as exc:
        print("%s: not reloaded: %s (the change applies when it starts)" % (PROG, exc))
        return
    # A master started on another file with the same spool would reload that file.
    if reads is None:
        print("%s: the master running on %s (pid %d) does not say which file it reads "
              "(an older elemta started it): not told; `%s --config %s reload` if it "
              "reads this one" % (PROG, spool_dir, pid, PROG, path))
        return
    if not _same_file(reads, path):
        print("%s: the master running on %s (pid %d) reads %s, not %s: not told"
              % (PROG, spool_dir, pid, reads, path))
        return
    os.kill(pid, signal.SIGHUP)
    print("%s: told the running master (pid %d) to reload its configuration (SIGHUP)"
          % (PROG, pid))


def _same_file(reads: str, path: str) -> bool:
    """Whether the master's file (BUILT_IN_DEFAULTS: none) is the file at path."""
    try:
        return reads != control.BUILT_IN_DEFAULTS and os.path.samefile(reads, path)
    except OSError:         # gone since the master started, or not ours to see
        return False


def _beyond_slots(old_config, new_config) -> List[Tuple[str, int, int]]:
    """(kind, most, asked) for each kind of child the new configuration asks more of
    than a reload can start: the master's table has the slots (elemta.services) it
    sized for the configuration it started with, which the file before the edit
    stands for here."""
    from elemta.services import SERVICES
    return [(service.kind, service.slots(old_config), service.count(new_config))
            for service in SERVICES
            if old_config is not None and service.count(new_config) > service.slots(old_config)]


# ---------------------------------------------------------------- the parser

def add_config_actions(actions, parents: List[argparse.ArgumentParser]) -> None:
    """Register show, get and set on `elemtactl config`'s action parsers."""
    show = actions.add_parser("show", parents=parents, help=cmd_show.__doc__.split(": ")[1],
                              description=cmd_show.__doc__.split(": ")[1])
    which = show.add_mutually_exclusive_group()
    which.add_argument("-n", dest="non_default", action="store_true",
                       help="only the settings that differ from their default")
    which.add_argument("-d", dest="defaults", action="store_true",
                       help="the defaults, not the file's settings")
    show.add_argument("--values-only", action="store_true",
                      help="values only, without `key = ` (postconf -h)")
    show.set_defaults(handler=cmd_show)

    get = actions.add_parser("get", parents=parents, help=cmd_get.__doc__.split(": ")[1],
                             description=cmd_get.__doc__.split(": ")[1])
    get.add_argument("-d", dest="defaults", action="store_true",
                     help="the default, not the file's setting")
    get.add_argument("--values-only", action="store_true",
                     help="values only, without `key = ` (postconf -h)")
    get.add_argument("keys", nargs="+", metavar="KEY",
                     help="key path: smtpd.hostname, listeners[0].port, or a section")
    get.set_defaults(handler=cmd_get)

    change = actions.add_parser("set", parents=parents,
                                help=cmd_set.__doc__.split(": ")[1],
                                description=cmd_set.__doc__.split(": ")[1])
    change.add_argument("--reload", action="store_true",
                        help="then tell the running master to reload (SIGHUP)")
    change.add_argument("assignments", nargs="+", metavar="KEY=VALUE",
                        help="VALUE as `config show` prints it; a string may go unquoted")
    change.set_defaults(handler=cmd_set)
