"""The aliases file in /etc/aliases format: parse it, name its errors by file and line,
and look names up, reading the file again whenever it changes (no compile step).

Part of the addressing layer every process shares. Used by the local agent
(elemta.local.expand), by the one recipient lookup of the smtpd's RCPT check and
sendmail -bv (elemta.addressing.recipients) and by newaliases(1) (elemta.cli.newaliases). The right-hand
side grammar (parse_members) is also that of .forward and :include: files.

The format, as Postfix's aliases(5) and sendmail's:

    # comment                          (a line whose first non-blank character is #)
    name: value, value, ...            (name is a local part, matched without case)
        value, ...                     (a line starting with blanks continues the entry)
    "name with space": value

A value is an address (user, user@domain, \\user: that user's mailbox, no .forward),
/path/file (append as mbox; a path ending in / is a Maildir), |command or "|command with
args" (run by /bin/sh -c), or :include:/path (more values, read from that file).
See also: man/newaliases.1, elemta.local.expand.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ADDRESS = "address"
FILE = "file"
COMMAND = "command"
INCLUDE = "include"

INCLUDE_PREFIX = ":include:"


@dataclass(frozen=True)
class Member:
    """One destination on the right-hand side of an alias (or in a .forward file)."""
    kind: str        # ADDRESS, FILE, COMMAND or INCLUDE
    value: str       # the address, path, command text or include path


@dataclass(frozen=True)
class AliasProblem:
    """A mistake in a file, named the way compilers and Postfix name them."""
    path: str
    line: int
    message: str

    def __str__(self):
        return "%s:%d: %s" % (self.path, self.line, self.message)


def logical_lines(text, path, problems):
    """(line number, text) of each logical line: comments and blank lines skipped, lines
    starting with blanks joined to the entry above (Postfix's readlline)."""
    entry, first = None, 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if entry is None:
                problems.append(AliasProblem(path, number, "a continuation line (starting "
                                             "with blanks) with no entry above it"))
                continue
            entry += " " + stripped
            continue
        if entry is not None:
            yield first, entry
        entry, first = stripped, number
    if entry is not None:
        yield first, entry


def split_items(text):
    """Split on commas outside double quotes; raises ValueError for an open quote."""
    items, current, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            current.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if quoted:
        raise ValueError("a double quote is not closed")
    items.append("".join(current).strip())
    return [item for item in items if item]


def unquote(text):
    """The inside of a "quoted string", backslash escapes undone."""
    out, escaped = [], False
    for ch in text[1:-1]:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def _is_quoted(text):
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"'


def parse_member(item):
    """One value -> Member; raises ValueError saying what is wrong with it."""
    if _is_quoted(item) and '"' not in item[1:-1].replace('\\"', ""):
        inner = unquote(item)
        if inner[:1] in ("|", "/") or inner[:len(INCLUDE_PREFIX)].lower() == INCLUDE_PREFIX:
            item = inner
    if item.startswith("|"):
        command = item[1:].strip()
        if _is_quoted(command):                 # sendmail's |"command args"
            command = unquote(command).strip()
        if not command:
            raise ValueError("an empty |command")
        return Member(COMMAND, command)
    if item.startswith("/"):
        return Member(FILE, item)
    if item[:len(INCLUDE_PREFIX)].lower() == INCLUDE_PREFIX:
        path = item[len(INCLUDE_PREFIX):].strip()
        if _is_quoted(path):
            path = unquote(path)
        if not path.startswith("/"):
            raise ValueError(":include: needs an absolute path, not %r" % path)
        return Member(INCLUDE, path)
    if "<" in item and item.endswith(">"):       # Full Name <user@domain>
        item = item[item.rindex("<") + 1:-1].strip()
    address = item
    plain = address[1:] if address.startswith("\\") else address
    local = plain.rpartition("@")[0] if "@" in plain else plain
    if not plain or not local:
        raise ValueError("%r is not an address" % item)
    if not _is_quoted(local) and any(ch in local for ch in ' \t"<>()[],;:'):
        raise ValueError("%r is not an address (quote a command or file that has "
                         "blanks: \"|command args\")" % item)
    return Member(ADDRESS, address)


def parse_members(text, path, line, problems):
    """The Members of a right-hand side (or of a .forward line); mistakes go to problems."""
    try:
        items = split_items(text)
    except ValueError as error:
        problems.append(AliasProblem(path, line, str(error)))
        return []
    members = []
    for item in items:
        try:
            members.append(parse_member(item))
        except ValueError as error:
            problems.append(AliasProblem(path, line, str(error)))
    return members


def parse_destinations(text, path):
    """A .forward or :include: file: values separated by commas or new lines.
    Returns (members, problems)."""
    problems = []          # type: List[AliasProblem]
    members = []           # type: List[Member]
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            members += parse_members(stripped, path, number, problems)
    return members, problems


def _split_name(entry):
    """(name, rest) of "name: values"; raises ValueError."""
    if entry.startswith('"'):
        end = 1
        while end < len(entry) and entry[end] != '"':
            end += 2 if entry[end] == "\\" else 1
        if end >= len(entry):
            raise ValueError("the quoted name is not closed")
        name, rest = unquote(entry[:end + 1]), entry[end + 1:].lstrip()
        if not rest.startswith(":"):
            raise ValueError("a colon must follow the name")
        return name, rest[1:]
    name, colon, rest = entry.partition(":")
    if not colon:
        raise ValueError("no colon: write \"name: destination, ...\"")
    name = name.strip()
    if not name or any(ch in name for ch in " \t"):
        raise ValueError("%r is not an alias name (quote a name that has blanks)" % name)
    return name, rest


def parse_aliases(text, path):
    """Parse an aliases file's text. Returns ({name: (members, line)}, problems); a
    name is kept in lower case, and its first entry wins."""
    problems = []          # type: List[AliasProblem]
    table = {}             # type: Dict[str, Tuple[List[Member], int]]
    for line, entry in logical_lines(text, path, problems):
        try:
            name, rest = _split_name(entry)
        except ValueError as error:
            problems.append(AliasProblem(path, line, str(error)))
            continue
        if "@" in name:
            problems.append(AliasProblem(path, line, "%r: an alias name is a local part, "
                                                     "without @domain" % name))
            continue
        key = name.lower()
        before = len(problems)
        members = parse_members(rest, path, line, problems)
        if not members:
            if len(problems) == before:
                problems.append(AliasProblem(path, line, "%r has no destination" % name))
            continue
        if key in table:
            problems.append(AliasProblem(path, line, "duplicate entry %r (the one on line "
                                                     "%d is used)" % (name, table[key][1])))
            continue
        table[key] = (members, line)
    return table, problems


def check_file(path):
    """newaliases: (number of aliases, problems) of the file at path; an unreadable file
    is one problem at line 0."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as error:
        return 0, [AliasProblem(path, 0, "cannot read: %s" % (error.strerror or error))]
    table, problems = parse_aliases(text, path)
    return len(table), problems


class AliasTable:
    """The aliases of one file, read again whenever its mtime, size or inode changes.
    A missing file means no aliases; an unreadable one keeps what was read before."""

    def __init__(self, path):
        self.path = path
        self.owner = 0                 # uid of the file: commands and files run as it
        self.problems = []             # type: List[AliasProblem]
        self.error = None              # why the file could not be read, if it could not
        self._table = {}               # type: Dict[str, Tuple[List[Member], int]]
        self._stamp = None

    def refresh(self):
        """Read the file again if it changed since the last look. Returns True if read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp != "missing":
                self._table, self.problems, self.error = {}, [], None
                self._stamp = "missing"
            return False
        except OSError as error:
            self.error = "%s: %s" % (self.path, error.strerror or error)
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        if stamp == self._stamp:
            return False
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError as error:
            self.error = "%s: %s" % (self.path, error.strerror or error)
            return False
        self._table, self.problems = parse_aliases(text, self.path)
        self.owner, self._stamp, self.error = st.st_uid, stamp, None
        return True

    def lookup(self, name):
        # type: (str) -> Optional[List[Member]]
        """The members of alias `name` (any case), or None. Does not refresh."""
        entry = self._table.get(name.lower())
        return entry[0] if entry else None

    def __contains__(self, name):
        return name.lower() in self._table

    def __len__(self):
        return len(self._table)
