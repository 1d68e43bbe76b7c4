"""Postfix's table source format (the text postmap reads), and the key folding it applies.

Used by elemta.maps.lmdbtable (compiling FILE into FILE.lmdb) and elemta.maps.inline
(a YAML list of the same lines in the config). As postmap(1) reads it:

    # a comment; blank lines are ignored
    key     value text, up to the end of the line
    other   a long value that goes on
            on the next line (a line starting with whitespace continues the one before)

The key ends at the first whitespace; the value is the rest, stripped. A key with no
value is an error (postmap says "expected format: key whitespace value"). Keys are folded
to lower case, as postmap does without -f, and their domains spelled as lookups spell
them (A-labels, no final dot: fold), and lookups fold theirs the same way, so
User@Example.ORG finds user@example.org and alice@bücher.example is found as
alice@xn--bcher-kva.example. A key repeated later is handled as postmap
does when it compiles a file: a warning naming file:line ("duplicate entry"), and the
first value is kept (a table that worked under Postfix compiles here with the same
answers). In the config's own lists of entries (no compile step to warn at) it is an
error naming both lines.
See also: postmap(1), elemta.maps.lmdbtable, elemta.maps.base.
"""

from typing import Iterable, Iterator, List, Optional, Tuple

from elemta.addressing.normal import normal_domain
from elemta.maps.base import TableError


def fold(key: str) -> str:
    """The form keys are stored and looked up in: lower case (postmap without -f), and
    the domain in the normal form every lookup spells it in (normal_domain: A-labels,
    no final dot), so a key written with an international domain in UTF-8 is found:
    User@Bücher.Example. -> user@xn--bcher-kva.example, .Bücher.Example ->
    .xn--bcher-kva.example. The domain is what follows the last @, or the whole key when
    it has none (a domain table's key). A bare user name (a key without @ in an alias
    map) is spelled the same way, on both sides, so it is found as before; the local
    part before an @ is only lower-cased."""
    local, at, domain = key.rpartition("@")
    if not at:
        return normal_domain(key)
    return local.lower() + at + normal_domain(domain)


def logical_lines(lines: Iterable[str], where: str) -> Iterator[Tuple[int, str]]:
    """(first line number, text) of each logical line: comments and blank lines dropped,
    continuation lines joined with one space. where names the file for errors."""
    current: Optional[List] = None
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if current is None:
                raise TableError("%s:%d: a continuation line (it starts with whitespace) "
                                 "with no line before it" % (where, number))
            current[1] += " " + line.strip()
            continue
        if current is not None:
            yield current[0], current[1]
        current = [number, line.strip()]
    if current is not None:
        yield current[0], current[1]


def parse_entries(lines: Iterable[str], where: str,
                  warnings: Optional[List[str]] = None) -> List[Tuple[str, str]]:
    """[(folded key, value)] of a source file's lines, in file order; raises TableError
    "where:line: ..." for a line without a value. A repeated key: given a warnings list,
    postmap's way (a "where:line: duplicate entry" warning appended, the first value
    kept); without one, a TableError naming both lines."""
    entries = []
    first_seen = {}
    for number, text in logical_lines(lines, where):
        parts = text.split(None, 1)
        key, value = parts[0], parts[1].strip() if len(parts) == 2 else ""
        if not value:
            raise TableError("%s:%d: %r has no value: expected \"key whitespace value\""
                             % (where, number, key))
        key = fold(key)
        if key in first_seen:
            if warnings is None:
                raise TableError("%s:%d: %s is already defined on line %d"
                                 % (where, number, key, first_seen[key]))
            warnings.append("%s:%d: duplicate entry %s: ignored, the one on line %d is "
                            "kept" % (where, number, key, first_seen[key]))
            continue
        first_seen[key] = number
        entries.append((key, value))
    return entries
