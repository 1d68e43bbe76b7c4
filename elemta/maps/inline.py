"""inline: a table written in the config itself.

Opened from a table spec (elemta.maps.spec) in three spellings:

    inline:{ key=value, other=value, { key = text, with commas } }   Postfix's, in a string
    {key: value, other: [a@x, b@y]}                                   a YAML/TOML table
    ["key value", "other a@x, b@y"]                                   a list of source lines

In Postfix's form items are separated by commas or whitespace, and an item whose value
holds either is written in braces. Keys are folded as in compiled tables (lower case,
the domain in A-labels: elemta.maps.source.fold), when the table is made and at each
lookup, so the three forms and lmdb: answer alike, and a key written with a UTF-8
domain is found. A value given as a list
stays a list (several values). Lookups are a dict read.
See also: elemta.maps.spec, elemta.maps.source.
"""

from typing import Dict, List, Sequence, Tuple, Union

from elemta.maps.base import LookupTable, Result, TableError
from elemta.maps.source import fold

Value = Union[str, Tuple[str, ...]]


def parse_braces(text: str) -> List[Tuple[str, str]]:
    """[(key, value)] of Postfix's "{ key=value, { key = text } }"; raises TableError."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise TableError("inline:%s: write inline:{ key=value, ... }" % text)
    body, entries, index = text[1:-1], [], 0
    while index < len(body):
        char = body[index]
        if char in " \t\r\n,":
            index += 1
            continue
        if char == "{":
            end = body.find("}", index)
            if end < 0:
                raise TableError("inline:%s: a { without its }" % text)
            item, index = body[index + 1:end], end + 1
        else:
            end = index
            while end < len(body) and body[end] not in " \t\r\n,{}":
                end += 1
            if end < len(body) and body[end] in "{}":
                raise TableError("inline:%s: a brace inside an item (braces go round a "
                                 "whole item: { key = text })" % text)
            item, index = body[index:end], end
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise TableError("inline:%s: %r is not key=value" % (text, item.strip()))
        entries.append((key.strip(), value.strip()))
    return entries


class InlineTable(LookupTable):
    def __init__(self, entries: Sequence[Tuple[str, Value]], spec: str = "inline") -> None:
        self.spec = spec
        self._table: Dict[str, Value] = {}
        for key, value in entries:
            self._table.setdefault(fold(key), value)

    def lookup(self, key: str) -> Result:
        value = self._table.get(fold(key))
        return list(value) if isinstance(value, tuple) else value
