r"""regexp: Postfix regexp_table(5) files, read into Python regular expressions.

Opened by any process that looks up (header checks, address rewriting...). The syntax,
as Postfix's:

    # comments, blank lines; a line starting with whitespace continues the one before
    /pattern/flags        result     first match wins; $1..$9 (or ${1}, $(1)) put the
                                     pattern's groups into the result, $$ is one $
    !/pattern/flags       result     matches when the pattern does not ($n not allowed)
    /pat1/!/pat2/         result     pat1 matches and pat2 does not
    if /pattern/flags                the lines up to the matching endif are tried only
    ...                              when the pattern matches (if !/pattern/: when not);
    endif                            if/endif nest

The delimiter is any character but a letter, a digit or whitespace (usually /); inside
the pattern a backslash escapes it. Flags toggle, as Postfix's do:
    i   case: patterns ignore case unless i is given (matching is case-insensitive
        by default)
    m   multi-line mode (^ and $ at each line; off by default)
    x   extended syntax (on by default): x turns it off, and the pattern is POSIX basic
        syntax, \( \) \{ \} grouping and ( ) { } + ? | literal characters

Patterns are Python regular expressions, which agree with POSIX extended syntax on what
tables use (classes, anchors, groups, alternation, repetition); a pattern Python cannot
compile is an error naming file:line. Every error in the file is a TableError naming
file:line, when the table is opened (so the config check shows it). The file is read
again when it changes (inode or mtime), so an edit needs no reload; if the edited file
has an error, lookups raise TableUnavailable naming it (mail waits) until it is fixed.

The key is matched whole, as given (not folded). The search orders ask a regexp table
for the whole address (or domain) only, never for user, user+ext or @domain
(partial_keys is False, elemta.maps.base), as Postfix does. Matching is CPU work whose time an
attacker's key can make exponential for some patterns (/^(\w+\s?)+$/ on a long header),
so it never runs in the event loop: each lookup is one call to a compute helper
(elemta.util.offload, about 50 microseconds), which keeps the tables it has read (and
reads a changed file again). Past MATCH_TIMEOUT seconds the helper is killed and the
lookup is TableUnavailable; the sessions of the process go on meanwhile. Keys longer
than MAX_KEY bytes match nothing.
See also: regexp_table(5), elemta.maps.base, elemta.util.offload.
"""

import os
import re
from typing import Dict, List, Optional, Tuple

import gevent

from elemta.maps.base import LookupTable, Result, TableError, TableUnavailable
from elemta.maps.source import logical_lines
from elemta.util import offload

# Seconds one lookup may spend matching before it fails (temporarily).
MATCH_TIMEOUT = 2.0

# Header lines and addresses are far shorter (RFC 5322 line limit: 998 octets).
MAX_KEY = 4096
_DOLLAR = re.compile(r"\$(?:(\$)|([1-9])|\{([1-9])\}|\(([1-9])\))")


class _Pattern:
    """One /pattern/flags, maybe negated, with an optional /pat2/ that must not match."""

    def __init__(self, regex, negated, exclude):
        self.regex = regex          # compiled
        self.negated = negated      # !/pattern/
        self.exclude = exclude      # compiled /pat2/ of /pat1/!/pat2/, or None
        # Groups the result may use: a negated pattern matched nothing to take from.
        self.groups = 0 if negated else regex.groups

    def match(self, key):
        """The re match object (or True for a negated match); None when no match."""
        found = self.regex.search(key)
        if self.negated:
            return None if found else True
        if found and self.exclude is not None and self.exclude.search(key):
            return None
        return found


class _Rule:
    """A pattern and its result, or an if/endif block of rules."""

    def __init__(self, pattern, result=None, block=None, number=0):
        self.pattern = pattern
        self.result = result        # the result text, $n unexpanded
        self.block = block          # [rules] of an if, else None
        self.number = number        # its line in the file


def _basic_to_extended(pattern: str) -> str:
    r"""A POSIX basic pattern (flag x) in extended form: \( \) \{ \} \| become
    operators, ( ) { } + ? | literals."""
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            following = pattern[index + 1]
            out.append(following if following in "(){}|" else "\\" + following)
            index += 2
            continue
        out.append("\\" + char if char in "(){}+?|" else char)
        index += 1
    return "".join(out)


class _LineReader:
    """Reads one logical line's patterns; each error names where:line."""

    def __init__(self, where: str, number: int, text: str) -> None:
        self.where, self.number, self.text, self.pos = where, number, text, 0

    def error(self, message: str) -> TableError:
        return TableError("%s:%d: %s" % (self.where, self.number, message))

    def pattern(self) -> _Pattern:
        negated = self.text.startswith("!", self.pos)
        if negated:
            self.pos += 1
        regex = self.one()
        exclude = None
        if not negated and self.text.startswith("!", self.pos) and \
                self.pos + 1 < len(self.text) and not self.text[self.pos + 1].isspace():
            self.pos += 1
            exclude = self.one()
        return _Pattern(regex, negated, exclude)

    def one(self) -> "re.Pattern":
        """One delimited pattern and its flags, compiled."""
        text = self.text
        if self.pos >= len(text):
            raise self.error("a pattern is missing")
        delimiter = text[self.pos]
        if delimiter.isalnum() or delimiter.isspace() or delimiter == "\\":
            raise self.error("%r cannot delimit a pattern: write /pattern/" % delimiter)
        index = self.pos + 1
        while index < len(text) and text[index] != delimiter:
            index += 2 if text[index] == "\\" else 1
        if index >= len(text):
            raise self.error("the pattern has no closing %s" % delimiter)
        body = text[self.pos + 1:index]
        index += 1
        flags_start = index
        while index < len(text) and not text[index].isspace() and text[index] != "!":
            index += 1
        ignore_case, multiline, extended = True, False, True
        for flag in text[flags_start:index]:
            if flag == "i":
                ignore_case = not ignore_case
            elif flag == "m":
                multiline = not multiline
            elif flag == "x":
                extended = not extended
            else:
                raise self.error("unknown flag %r after the pattern (flags are i, m, x)"
                                 % flag)
        self.pos = index
        if not extended:
            body = _basic_to_extended(body)
        try:
            regex = re.compile(body, (re.IGNORECASE if ignore_case else 0)
                               | (re.MULTILINE if multiline else 0))
        except re.error as error:
            raise self.error("bad pattern %s%s%s: %s" % (delimiter, body, delimiter, error))
        return regex

    def rest(self) -> str:
        return self.text[self.pos:].strip()


def parse_rules(lines, where: str) -> List[_Rule]:
    """The rules of a regexp table's lines; raises TableError("where:line: ...")."""
    top: List[_Rule] = []
    stack = [(top, 0)]          # (rules being filled, line of its if)
    for number, text in logical_lines(lines, where):
        word = text.split(None, 1)[0]
        if word == "endif":
            if len(stack) == 1:
                raise TableError("%s:%d: endif without a matching if" % (where, number))
            if text != "endif":
                raise TableError("%s:%d: text after endif" % (where, number))
            stack.pop()
            continue
        if word == "if":
            parser = _LineReader(where, number, text[2:].lstrip())
            pattern = parser.pattern()
            if parser.rest():
                raise parser.error("text after the if pattern: %r" % parser.rest())
            rule = _Rule(pattern, block=[])
            stack[-1][0].append(rule)
            stack.append((rule.block, number))
            continue
        parser = _LineReader(where, number, text)
        pattern = parser.pattern()
        result = parser.rest()
        if not result:
            raise parser.error("the pattern has no result: expected \"/pattern/ result\"")
        for match in _DOLLAR.finditer(result):
            index = next((g for g in match.groups()[1:] if g), None)
            if index is not None and int(index) > pattern.groups:
                raise parser.error("$%s in the result, but the pattern has %s" % (
                    index, "no groups" if pattern.groups == 0 else
                    "%d group%s" % (pattern.groups, "s" if pattern.groups > 1 else "")))
        stray = _DOLLAR.sub("", result)
        if "$" in stray:
            raise parser.error("a $ that is neither $1..$9, ${n}, $(n) nor $$ in the result "
                               "(write $$ for a dollar sign)")
        stack[-1][0].append(_Rule(pattern, result=result, number=number))
    if len(stack) > 1:
        raise TableError("%s:%d: if without endif" % (where, stack[-1][1]))
    return top


def _expand(result: str, match) -> str:
    def one(found):
        if found.group(1):
            return "$"
        index = int(next(g for g in found.groups()[1:] if g))
        return match.group(index) or ""
    return _DOLLAR.sub(one, result)


def _first(rules: List[_Rule], key: str) -> Optional[str]:
    for rule in rules:
        found = rule.pattern.match(key)
        if found is None:
            continue
        if rule.block is not None:
            value = _first(rule.block, key)
            if value is not None:
                return value
            continue
        return rule.result if found is True else _expand(rule.result, found)
    return None


class RegexpTable(LookupTable):
    """A regexp_table(5) file, read again when it changes."""

    partial_keys = False

    def __init__(self, path: str, spec: str = "") -> None:
        self.path = path
        self.spec = spec or "regexp:" + path
        self._identity = None
        self._rules: List[_Rule] = []
        self._broken: Optional[str] = None
        self._load(strict=True)

    def _load(self, strict: bool) -> None:
        """Read the file if it changed. strict (at open): errors are TableError; later
        they are kept and raised as TableUnavailable by lookups."""
        try:
            stat = os.stat(self.path)
            identity = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if identity == self._identity:
                return
            with open(self.path, encoding="utf-8", errors="surrogateescape") as lines:
                rules = parse_rules(lines, self.path)
        except (OSError, TableError) as error:
            reason = ("%s: %s" % (self.path, error.strerror)
                      if isinstance(error, OSError) else str(error))
            if strict:
                raise TableError(reason)
            self._broken, self._identity = reason, None
            return
        self._rules, self._identity, self._broken = rules, identity, None

    def lookup(self, key: str) -> Result:
        if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY:
            return None
        try:
            with gevent.Timeout(MATCH_TIMEOUT):
                return offload.call(_match_in_helper, self.path, self.spec, key)
        except gevent.Timeout:
            raise TableUnavailable("%s: matching took over %g seconds (a pattern that "
                                   "backtracks?)" % (self.spec, MATCH_TIMEOUT))
        except offload.OffloadError as error:
            raise TableUnavailable("%s: %s" % (self.spec, error))

    def results(self) -> List[Tuple[int, str]]:
        """(line, result as written) of every rule, in file order: for consumers that
        check what their results say when the config is checked (elemta.content's
        actions)."""
        found: List[Tuple[int, str]] = []

        def walk(rules):
            for rule in rules:
                if rule.block is not None:
                    walk(rule.block)
                else:
                    found.append((rule.number, rule.result))
        walk(self._rules)
        return found

    def lookup_many(self, keys: List[str]) -> List[Result]:
        """Every key's lookup in one call to the helper (header and body checks ask
        about each line of a chunk together); MATCH_TIMEOUT bounds the whole call."""
        long = [len(key.encode("utf-8", "surrogateescape")) > MAX_KEY for key in keys]
        try:
            with gevent.Timeout(MATCH_TIMEOUT):
                found = offload.call(_match_many_in_helper, self.path, self.spec,
                                     [key for key, skip in zip(keys, long) if not skip])
        except gevent.Timeout:
            raise TableUnavailable("%s: matching took over %g seconds (a pattern that "
                                   "backtracks?)" % (self.spec, MATCH_TIMEOUT))
        except offload.OffloadError as error:
            raise TableUnavailable("%s: %s" % (self.spec, error))
        answers = iter(found)
        return [None if skip else next(answers) for skip in long]

    def match(self, key: str) -> Result:
        """The lookup itself, in this process (the helper's side of lookup)."""
        self._load(strict=False)
        if self._broken:
            raise TableUnavailable("%s: %s" % (self.spec, self._broken))
        return _first(self._rules, key)


# The helper's tables, by file: read once, then again when the file changes.
_helper_tables: Dict[str, RegexpTable] = {}


def _match_in_helper(path: str, spec: str, key: str) -> Result:
    """Runs in a compute helper (elemta.util.offload): the lookup, with the table the
    helper keeps for path."""
    return _helper_table(path, spec).match(key)


def _match_many_in_helper(path: str, spec: str, keys: List[str]) -> List[Result]:
    """Runs in a compute helper: the lookups of several keys, in order."""
    table = _helper_table(path, spec)
    return [table.match(key) for key in keys]


def _helper_table(path: str, spec: str) -> RegexpTable:
    table = _helper_tables.get(path)
    if table is None:
        try:
            table = RegexpTable(path, spec)
        except TableError as error:
            raise TableUnavailable("%s: %s" % (spec, error))
        _helper_tables[path] = table
    return table
