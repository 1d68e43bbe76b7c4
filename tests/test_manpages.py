"""The manual pages in man/: each passes mandoc's lint, elemta-sendmail(1) documents
every option letter elemta.cli.sendmail accepts, and the pages of elemta, elemtactl, mailq
and newaliases document every option (each of its spellings) and every subcommand their
argparse parsers accept, found by walking the parsers, so a new option or command without
documentation fails here.

Runs the real mandoc(1) (skipped where it is not installed) and the real option parsers.
See also: man/, tests/test_sendmail.py (what the options do).
"""

import argparse
import os
import re
import shutil
import string
import subprocess

import pytest

from elemta.cli import elemta as elemta_cli
from elemta.cli import elemtactl, newaliases, queuecmd, sendmail

MAN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "man")
PAGES = sorted(os.listdir(MAN_DIR))


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc is not installed")
@pytest.mark.parametrize("page", PAGES)
def test_page_passes_mandoc_lint(page):
    result = subprocess.run(["mandoc", "-T", "lint", "-W", "warning",
                             os.path.join(MAN_DIR, page)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert result.stdout.decode() == ""
    assert result.returncode == 0


def accepted_option_letters():
    """Every letter the parser takes as an option, asked of the parser itself: a letter
    it does not know is refused with "invalid option"; any other outcome (success, or a
    complaint about the argument) means it is an option."""
    letters = set()
    for letter in string.ascii_letters:
        try:
            sendmail.parse_args(["-" + letter, "value"])
        except sendmail.Failure as failure:
            if "invalid option" in str(failure):
                continue
        letters.add(letter)
    return letters


def test_parser_probe_tells_options_from_non_options():
    letters = accepted_option_letters()
    assert {"t", "i", "f", "b", "q", "o", "C"} <= letters
    assert "a" not in letters and "Z" not in letters


def test_sendmail_page_documents_every_accepted_option():
    with open(os.path.join(MAN_DIR, "elemta-sendmail.1")) as page:
        source = page.read()
    # Each .Fl word, e.g. "t" from ".Fl t", "bs" from ".Fl bs", "oi" from ".Fl oi".
    flags = set(re.findall(r"\bFl ([A-Za-z][A-Za-z0-9]*)", source))
    undocumented = sorted(letter for letter in accepted_option_letters()
                          if not any(flag.startswith(letter) for flag in flags))
    assert undocumented == []
    # And the modes it runs, each by name.
    assert {"bm", "bs", "bp", "bv", "q", "oi"} <= flags


# ---------------------------------------------------------------- argparse-based commands

class _ParserCaught(Exception):
    pass


def parser_used_by(parse_args, monkeypatch):
    """The ArgumentParser a parse_args(argv) function builds, caught as it parses."""
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _ParserCaught()

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_ParserCaught):
        parse_args([])
    monkeypatch.undo()
    return caught[0]


def walk(parser, path=()):
    """(command words, option strings) for parser and every subcommand below it, and
    the subcommand paths themselves; --help is argparse's own and left out."""
    options, commands = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                commands.append(path + (name,))
                sub_options, sub_commands = walk(subparser, path + (name,))
                options += sub_options
                commands += sub_commands
            continue
        for option in action.option_strings:
            options.append((path, option))
    return options, commands


def parsers(monkeypatch):
    """Each argparse command and its page."""
    return {
        "elemta.8": parser_used_by(elemta_cli.parse_args, monkeypatch),
        "elemtactl.8": elemtactl.build_parser(),
        "mailq.1": queuecmd.mailq_parser(),
        "newaliases.1": parser_used_by(newaliases.parse_args, monkeypatch),
    }


def page_source(page):
    with open(os.path.join(MAN_DIR, page)) as f:
        return f.read()


def documented_flags(source):
    """Each option an mdoc page shows, as typed: ".Fl -config" is "--config", ".Fl d" is "-d"."""
    return {"-" + word for word in re.findall(r"\bFl (-?[A-Za-z][A-Za-z0-9-]*)", source)}


def documented_commands(source):
    """Each word a page marks up as a command modifier (.Cm), e.g. "keygen"."""
    return {word for line in re.findall(r"\bCm ([^\n]*)", source)
            for word in re.findall(r"[a-z][a-z0-9-]*", line)}


def test_walk_finds_options_of_nested_subcommands():
    options, commands = walk(elemtactl.build_parser())
    assert (("dkim", "keygen"), "--key-file") in options
    assert (("queue", "list"), "--older-than") in options
    assert (("user", "add"), "--password-stdin") in options
    assert ("queue", "reindex") in commands
    assert not any(option in ("-h", "--help") for _, option in options)


def test_flag_reader_tells_documented_from_undocumented():
    source = ".It Fl c Ar file , Fl -config Ar file\n.Op Fl -json\n.Cm dkim keygen\n"
    assert documented_flags(source) == {"-c", "--config", "--json"}
    assert {"dkim", "keygen"} <= documented_commands(source)


@pytest.mark.parametrize("page", ["elemta.8", "elemtactl.8", "mailq.1", "newaliases.1"])
def test_page_documents_every_option_and_command(page, monkeypatch):
    options, commands = walk(parsers(monkeypatch)[page])
    assert options, "no options found: the parser walk is broken"
    source = page_source(page)
    flags = documented_flags(source)
    undocumented = sorted(set("%s %s" % (" ".join(path) or "(top level)", option)
                              for path, option in options if option not in flags))
    assert undocumented == []
    words = documented_commands(source)
    assert sorted(" ".join(path) for path in commands
                  if not set(path) <= words) == []


def documented_options(cls, prefix=""):
    """(key path, doc) of each option elemta.conf(5) lists for the schema dataclass cls,
    walked as elemta.config.manpage walks it: every key of every section, of every
    plugin's table (plugins.spf.enabled...) and of every list of tables
    (listeners[].port), the list itself included."""
    import dataclasses
    import typing
    from elemta.config.loader import schema_options, sequence_item
    options = []
    hints = typing.get_type_hints(cls)
    for field in schema_options(cls):
        kind = hints[field.name]
        item = sequence_item(kind)
        if dataclasses.is_dataclass(kind):
            options += documented_options(kind, prefix + field.name + ".")
            continue
        options.append((prefix + field.name, field.metadata["doc"]))
        if item is not None and dataclasses.is_dataclass(item):
            options += documented_options(item, prefix + field.name + "[].")
    return options


def silent_about_postfix(cls):
    return [key for key, doc in documented_options(cls) if "Postfix" not in doc]


def test_option_walk_reaches_nested_tables_and_finds_a_silent_option():
    import dataclasses
    from typing import Tuple
    from elemta.config.options import opt
    from elemta.config.schema import Config

    @dataclasses.dataclass(frozen=True)
    class Entry:
        said: int = opt(0, "Postfix's said.")
        silent: int = opt(0, "Says nothing of the other mailer.")

    @dataclasses.dataclass(frozen=True)
    class Section:
        entries: Tuple[Entry, ...] = opt((), "Entries. Postfix has no equivalent.")

    @dataclasses.dataclass(frozen=True)
    class Top:
        section: Section = opt(Section(), "A section.")

    assert silent_about_postfix(Top) == ["section.entries[].silent"]
    keys = {key for key, _ in documented_options(Config)}
    assert {"smtpd.banner", "listeners", "listeners[].port", "plugins.spf.enabled",
            "plugins.dkim.keys[].selector", "delivery.transport[].nexthop",
            "milters[].protocol", "plugins.policy_service.servers[].address"} <= keys
    assert not keys & {"source", "mailname", "warnings"}


def test_every_option_names_its_postfix_equivalent_or_that_there_is_none():
    """elemta.conf(5) is read by admins coming from Postfix (postconf(5) is the model):
    each option, in every section and every built-in plugin's table, says which Postfix
    parameter it replaces, or that Postfix has none (and what a Postfix site uses)."""
    from elemta.config.schema import Config
    assert len(documented_options(Config)) > 300
    silent = silent_about_postfix(Config)
    assert silent == [], "options without a Postfix equivalent: %s" % silent
