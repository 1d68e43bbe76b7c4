"""Where each key of a TOML file is: a map from key path to line number.

Owned by no process: used by elemta.config.sources when a TOML config is loaded.
tomlkit keeps no positions, yet an error message must name the line. This scanner
walks the source text the way a TOML parser does, but only to note where each key
path starts: table headers ([a.b]), arrays of tables ([[listeners]], counted per
parent), key = value lines with dotted and quoted keys, inline tables and arrays
(items get their index), and it skips strings (multi-line too) and comments.
It runs only on text tomlkit has accepted, so it never has to report errors.
See also: elemta.config.sources, elemta.config.errors.
"""

import bisect
import json
import re
from typing import Dict, List, Optional, Set, Tuple, Union

KeyPath = Tuple[Union[str, int], ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}#\r\n]")


def key_lines(text: str) -> Dict[KeyPath, int]:
    """Map each key path defined in TOML `text` to the 1-based line where it appears."""
    return _Scanner(text).run()


def first_redefinition(text: str) -> Optional[int]:
    """The line where a key or table is defined a second time, if any.

    tomlkit reports some duplicate keys (those inside a [table]) without a line."""
    scanner = _Scanner(text)
    scanner.run()
    return min(scanner.redefinitions) if scanner.redefinitions else None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.newlines = [i for i, char in enumerate(text) if char == "\n"]
        self.lines: Dict[KeyPath, int] = {}
        self.array_items: Dict[KeyPath, int] = {}   # array of tables -> its items so far
        self.table: KeyPath = ()                    # the table key = value lines go into
        self.defined: Set[KeyPath] = set()          # keys and [tables] given explicitly
        self.redefinitions: List[int] = []          # lines defining one of them again

    def run(self) -> Dict[KeyPath, int]:
        while True:
            self.skip_blanks(newlines=True)
            if self.pos >= len(self.text):
                return self.lines
            start = self.pos
            if self.text.startswith("[[", self.pos):
                self.array_table_header()
            elif self.text[self.pos] == "[":
                self.table_header()
            else:
                self.key_value(self.table)
            if self.pos == start:   # cannot happen on valid TOML; never loop forever
                self.pos += 1

    # -- positions

    def line_at(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1

    def note(self, path: KeyPath, pos: int) -> None:
        self.lines.setdefault(path, self.line_at(pos))

    def note_with_parents(self, path: KeyPath, pos: int) -> None:
        for end in range(1, len(path) + 1):
            self.note(path[:end], pos)

    def define(self, path: KeyPath, pos: int) -> None:
        self.note_with_parents(path, pos)
        if path in self.defined:
            self.redefinitions.append(self.line_at(pos))
        self.defined.add(path)

    # -- tables

    def resolve(self, keys: List[str]) -> KeyPath:
        """Key names to a path, entering the latest item of each array of tables."""
        path: KeyPath = ()
        for key in keys:
            path += (key,)
            if path in self.array_items:
                path += (self.array_items[path] - 1,)
        return path

    def array_table_header(self) -> None:
        start = self.pos
        self.pos += 2
        keys = self.key()
        array = self.resolve(keys[:-1]) + (keys[-1],)
        index = self.array_items.get(array, 0)
        self.array_items[array] = index + 1
        self.table = array + (index,)
        self.note_with_parents(self.table, start)
        self.skip_to_line_end()

    def table_header(self) -> None:
        start = self.pos
        self.pos += 1
        self.table = self.resolve(self.key())
        self.define(self.table, start)
        self.skip_to_line_end()

    def key_value(self, table: KeyPath) -> None:
        start = self.pos
        path = table + tuple(self.key())
        self.define(path, start)
        self.skip_blanks(newlines=False)
        if self.text.startswith("=", self.pos):
            self.pos += 1
            self.skip_blanks(newlines=False)
            self.value(path)

    # -- keys and values

    def key(self) -> List[str]:
        """Read a possibly dotted, possibly quoted key: a.b, "a b".c, 'x'."""
        keys = []
        while True:
            self.skip_blanks(newlines=False)
            char = self.text[self.pos:self.pos + 1]
            if char == '"':
                raw = self.skip_string()
                try:
                    keys.append(json.loads(raw))
                except ValueError:
                    keys.append(raw[1:-1])
            elif char == "'":
                keys.append(self.skip_string()[1:-1])
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if not match:
                    break
                keys.append(match.group())
                self.pos = match.end()
            self.skip_blanks(newlines=False)
            if not self.text.startswith(".", self.pos):
                break
            self.pos += 1
        return keys

    def value(self, path: KeyPath) -> None:
        char = self.text[self.pos:self.pos + 1]
        if char in ('"', "'"):
            self.skip_string()
        elif char == "[":
            self.array(path)
        elif char == "{":
            self.inline_table(path)
        else:
            match = _SCALAR_END.search(self.text, self.pos)
            self.pos = match.start() if match else len(self.text)

    def array(self, path: KeyPath) -> None:
        self.pos += 1
        index = 0
        while self.pos < len(self.text):
            self.skip_blanks(newlines=True)
            char = self.text[self.pos:self.pos + 1]
            if char == "]":
                self.pos += 1
                return
            if char == ",":
                self.pos += 1
                continue
            start = self.pos
            self.note(path + (index,), start)
            self.value(path + (index,))
            index += 1
            if self.pos == start:
                self.pos += 1

    def inline_table(self, path: KeyPath) -> None:
        self.pos += 1
        while self.pos < len(self.text):
            self.skip_blanks(newlines=True)
            char = self.text[self.pos:self.pos + 1]
            if char == "}":
                self.pos += 1
                return
            if char == ",":
                self.pos += 1
                continue
            start = self.pos
            self.key_value(path)
            if self.pos == start:
                self.pos += 1

    def skip_string(self) -> str:
        """Move past the string at pos (any of the four kinds); return its source text."""
        start = self.pos
        quote = self.text[self.pos]
        delimiter = quote * 3 if self.text.startswith(quote * 3, self.pos) else quote
        self.pos += len(delimiter)
        escapes = quote == '"'
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if escapes and char == "\\":
                self.pos += 2
            elif self.text.startswith(delimiter, self.pos):
                # A multi-line string may end in up to two quotes of its own: """say "hi"""""
                run = len(delimiter)
                while len(delimiter) == 3 and run < 5 and \
                        self.text.startswith(quote, self.pos + run):
                    run += 1
                self.pos += run
                break
            else:
                self.pos += 1
        return self.text[start:self.pos]

    # -- blanks

    def skip_blanks(self, newlines: bool) -> None:
        """Skip spaces, tabs and comments, and line breaks too when `newlines`."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t" or (newlines and char in "\r\n"):
                self.pos += 1
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def skip_to_line_end(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end + 1
