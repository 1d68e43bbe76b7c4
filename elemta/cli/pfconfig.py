"""`elemtactl import-postfix [DIR]`: write the Elemta config Postfix's main.cf and master.cf
stand for, and name every setting that could not be translated.

Run once by the administrator replacing Postfix (owned by no daemon). Postfix's settings
are read by postconf (elemta.migrate.postfix_settings), translated
(elemta.migrate.translate) and written as YAML, or TOML when the output's name ends in
.toml (elemta.migrate.emit). The text is checked by Elemta's own loader before anything
is written: a config that would not load is not written, and the loader's file:line:key
messages say why. The report goes to stderr: the settings not translated, each with its
value and why; the translated ones to check (a socket inside Postfix's queue directory);
the lmdb tables to compile (done with --compile).

Exit status: 0 written (even with settings not translated: they are listed), 64 usage,
66 no Postfix configuration or postconf, 65 a table source file with an error
(--compile), 73 the output exists (--force replaces it) or cannot be written, 78 the
translated config does not load.
See also: man/elemtactl.8, elemta.cli.pfimport (the queued mail).
"""

import os
import sys
from os import EX_CANTCREAT, EX_CONFIG, EX_NOINPUT, EX_OK

from elemta.cli.failure import Failure
from elemta.cli.mapcmd import compile_sources
from elemta.util.text import printable

PROG = "elemtactl"


def cmd_import_postfix(args) -> int:
    """import-postfix: write the Elemta configuration equivalent to Postfix's main.cf
    and master.cf, naming each setting not translated"""
    from elemta.config import ConfigError
    from elemta.config.loader import load_text
    from elemta.migrate.emit import render
    from elemta.migrate.postfix_settings import (DEFAULT_CONFIG_DIR, PostfixConfigError,
                                                 read_postfix)
    from elemta.migrate.translate import translate

    config_dir = args.dir or DEFAULT_CONFIG_DIR
    output = args.output
    if output and os.path.exists(output) and not args.force:
        raise Failure(EX_CANTCREAT, "%s exists: it is never overwritten without --force"
                      % output)
    toml = bool(output) and output.lower().endswith(".toml")
    name = output or "<standard output>.yaml"
    if output and os.path.splitext(output)[1].lower() not in (".yaml", ".yml", ".toml"):
        raise Failure(os.EX_USAGE, "%s: name the output *.yaml, *.yml or *.toml" % output)
    try:
        postfix = read_postfix(config_dir, args.postconf)
    except PostfixConfigError as error:
        raise Failure(EX_NOINPUT, str(error))
    translation = translate(postfix)
    text = render(translation.settings, os.path.abspath(config_dir), toml)
    try:
        load_text(name, text)
    except ConfigError as error:
        problems = "; ".join(_from_postfix(problem, translation.settings)
                             for problem in error.problems) or str(error)
        raise Failure(EX_CONFIG, "the translated configuration does not load, so it was "
                      "not written: %s" % problems)
    if args.compile:
        compile_sources(translation.to_compile)
    if output:
        from elemta.config.editor import replace_file
        try:
            replace_file(output, text)
        except OSError as error:
            raise Failure(EX_CANTCREAT, "%s: %s" % (error.filename or output,
                                                    error.strerror or error))
    else:
        sys.stdout.write(text)
    _report(translation, output, config_dir, args.compile)
    return EX_OK


def _from_postfix(problem, settings) -> str:
    """A loader's problem told by the Elemta key and the Postfix setting behind it (the
    text it has a line of was never written)."""
    import re
    sources = {".".join(str(part) for part in setting.path): setting.source
               for setting in settings}
    key = problem.key
    while key and key not in sources:
        key = re.sub(r"(\[\d+\]|\.?[^.\[]*)$", "", key)
    where = problem.key or problem.file
    if key:
        where += " (from %s)" % sources[key]
    return "%s: %s" % (where, problem.message)


def _report(translation, output, config_dir, compiled) -> None:
    lines = ["%s: import-postfix: %d settings from %s written to %s" % (
        PROG, len(translation.settings), config_dir, output or "standard output")]
    if translation.untranslated:
        lines.append("not translated (%d):" % len(translation.untranslated))
        for item in translation.untranslated:
            lines.append("  %s = %s" % (item.name, item.value))
            lines.append("      %s" % item.reason)
    if translation.notes:
        lines.append("translated, but check:")
        lines += ["  %s" % note for note in translation.notes]
    if translation.to_compile:
        files = " ".join(translation.to_compile)
        lines.append("lmdb tables compiled: %s" % files if compiled else
                     "compile the lmdb tables before Elemta starts: %s map compile %s"
                     % (PROG, files))
    if translation.not_needed:
        lines.append("not needed by Elemta: %s" % ", ".join(translation.not_needed))
    if output:
        # Loaded here as the caller (root); the workers read the files as master.user.
        lines.append("check it as Elemta's workers will read it: %s config check "
                     "--config %s" % (PROG, output))
    for line in lines:
        print(printable(line), file=sys.stderr)


def add_command(commands, parser_class, parents):
    doc = cmd_import_postfix.__doc__.split(": ", 1)[1].replace("\n    ", " ")
    sub = commands.add_parser("import-postfix", parents=parents, help=doc,
                              description=doc)
    sub.add_argument("dir", metavar="DIR", nargs="?",
                     help="Postfix's configuration directory (default: /etc/postfix)")
    sub.add_argument("-o", "--output", metavar="FILE",
                     help="write the configuration here (*.yaml, *.yml or *.toml) instead "
                          "of standard output")
    sub.add_argument("--force", action="store_true",
                     help="replace the output file if it exists")
    sub.add_argument("--compile", action="store_true",
                     help="compile the lmdb tables the configuration names (elemtactl map "
                          "compile of each hash: table's source file)")
    sub.add_argument("--postconf", metavar="PROGRAM",
                     help="Postfix's postconf program (default: the one on PATH or "
                          "/usr/sbin/postconf)")
    sub.set_defaults(handler=cmd_import_postfix)
