"""`elemtactl completion bash|zsh`: the shell completion script, made from the live parser.

Runs in elemtactl's own short-lived process. The script is generated from the argparse
parser elemtactl runs with (elemta.cli.elemtactl.build_parser), so a new command or
option completes the moment it exists; a hand-written script would drift from it. The
packages install what this prints at build time (debian/rules, rpm/elemta.spec) into
the shells' completion directories; anyone else can `source <(elemtactl completion bash)`.

The scripts are written by shtab, a small, well-kept library that knows each shell's
completion system (bash's `complete -F`, zsh's `_arguments`), nested subcommands
included: ours would be two hand-made shell generators to keep right.
See also: man/elemtactl.8 (COMPLETION), tests/test_completion.py.
"""

import argparse
from os import EX_UNAVAILABLE

from elemta.cli.failure import Failure

SHELLS = ("bash", "zsh")
# What an option's value completes to, by its metavar: shtab's FILE and DIRECTORY
# (written out, so building the parser does not need shtab).
FILES = {"bash": "_shtab_compgen_files", "zsh": "_files"}
DIRECTORIES = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"}
BY_METAVAR = {"FILE": FILES, "DIR": DIRECTORIES}


def add_command(commands, parser_class, top: argparse.ArgumentParser) -> None:
    """Register `completion SHELL` on elemtactl's subcommands; top is the whole parser."""
    doc = "print the %s completion script for elemtactl" % " or ".join(SHELLS)
    sub = commands.add_parser("completion", help=doc, description=doc + (
        ". The packages install it; elsewhere: source <(elemtactl completion bash)"))
    sub.add_argument("shell", choices=SHELLS, help="the shell")
    sub.set_defaults(handler=lambda args: cmd_completion(args, top))


def cmd_completion(args, top: argparse.ArgumentParser) -> int:
    """completion: print the script for args.shell."""
    try:
        import shtab
    except ImportError:
        raise Failure(EX_UNAVAILABLE, "completion: the Python package shtab is not "
                                      "installed (pip install shtab)")
    mark_paths(top)
    print(shtab.complete(top, shell=args.shell), end="")
    return 0


def mark_paths(parser: argparse.ArgumentParser) -> None:
    """Let every option whose value is a FILE or a DIR complete to paths, in parser and
    all its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                mark_paths(sub)
        elif action.metavar in BY_METAVAR:
            action.complete = BY_METAVAR[action.metavar]
