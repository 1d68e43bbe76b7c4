"""Editing a config file in place: the admin's comments, order and layout stay as they were.

Owned by no process: elemtactl config set (elemta.cli.configcmd) and the .deb's debconf
helper (debian/elemta-debconf-config.py, which runs with the package's venv) both edit
through here. The edit is a round trip through the parser that keeps what it read:
ruamel.yaml's round-trip mode (comments, key order, quoting, flow or block style) and
tomlkit (which re-writes untouched parts byte for byte). Only the keys set change, and
a key that is new goes after the last key of its table, before the comments that
introduce the next section; a new section goes at the end of the file, after the
comments that end it (they belong to the section before them). replace_file writes the result as start-up will read it:
a temp file in the same directory, fsync'd, renamed over the old one, with its mode
and owner.

A YAML file is written back with the indentation found in it (2 spaces by default);
a file indented unevenly comes back evenly indented, its content unchanged. Either
format keeps its line ends (LF or CRLF) and its UTF-8 BOM, if it has one.
See also: elemta.config.sources (reading), elemta.config.loader.load_text (checking the
result before it is written), man/elemtactl.8 (config set).
"""

import contextlib
import fcntl
import io
import os
import re
import stat
import tempfile
from typing import Any, Sequence, Tuple

import tomlkit
import tomlkit.container
import tomlkit.items
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString
from ruamel.yaml.tokens import CommentToken

from elemta.config.errors import KeyPath, format_key
from elemta.config.sources import FORMATS

BOM = "\ufeff"
# What a TOML document holds between its keys and tables: blank lines and comments.
_TRIVIA = (tomlkit.items.Whitespace, tomlkit.items.Comment)


class EditError(ValueError):
    """An edit that cannot be made (a list entry that does not exist, a value where a
    table is); str() says which key and why."""


# ---------------------------------------------------------------- YAML

def round_trip_yaml(text: str = "") -> YAML:
    """A ruamel.yaml round-trip instance that writes `text` back as it was: its
    indentation, its quotes, and no line folded."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 1 << 16
    mapping, offset = _yaml_indentation(text)
    yaml.indent(mapping=mapping, sequence=offset + 2, offset=offset)
    if re.match(r"(\s*#.*\n|\s*\n)*---", text):
        yaml.explicit_start = True
    return yaml


_KEY_LINE = re.compile(r"^( *)(- +)?([^\s#'\"-][^:#]*|\"[^\"]*\"|'[^']*'):(\s*(#.*)?)?$")
_ITEM_LINE = re.compile(r"^( *)- ")


def _yaml_indentation(text: str) -> Tuple[int, int]:
    """(mapping indent, dash offset of block sequences) used in `text`: the step from a
    `key:` line that opens a block to its first line."""
    mapping = offset = None
    opener = None       # column of the key of the last line that opened a block
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if opener is not None and indent >= opener:
            item = _ITEM_LINE.match(line)
            if item and offset is None:
                offset = indent - opener
            elif not item and mapping is None and indent > opener:
                mapping = indent - opener
        key = _KEY_LINE.match(line)
        opener = None
        if key:
            opener = len(key.group(1)) + len(key.group(2) or "")
        if mapping is not None and offset is not None:
            break
    return mapping or 2, offset if offset is not None else 2


def _yaml_value(value: Any, old: Any = None) -> Any:
    """A plain value as ruamel.yaml should write it, in the style of the value it
    replaces: a string quoted as that one was; a list or table in block style if
    that one was (its entries styled as its first entry, and the comment above them
    kept), else in flow style with its strings double-quoted, as the example
    configuration writes them."""
    if isinstance(value, str):
        if isinstance(old, SingleQuotedScalarString):
            return SingleQuotedScalarString(value)
        if isinstance(old, DoubleQuotedScalarString) or old is _IN_FLOW:
            return DoubleQuotedScalarString(value)
        return value
    if isinstance(value, (list, tuple)):
        block = isinstance(old, CommentedSeq) and _is_block(old)
        sample = old[0] if block else _IN_FLOW
        seq = CommentedSeq(_yaml_value(item, sample) for item in value)
        if block:
            seq.ca.comment = old.ca.comment
        else:
            seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        block = isinstance(old, CommentedMap) and _is_block(old)
        table = CommentedMap((key, _yaml_value(item, old.get(key) if isinstance(
            old, dict) else _IN_FLOW)) for key, item in value.items())
        if not block:
            table.fa.set_flow_style()
        return table
    return value


_IN_FLOW = object()


def _set_yaml(document: Any, path: KeyPath, value: Any) -> None:
    node = document
    for depth, part in enumerate(path[:-1]):
        child = _child(node, path, depth)
        if child is None:
            child = CommentedMap()
            _add_key(node, part, child, at_end=node is document)
        node = child
    last = path[-1]
    if isinstance(node, list):
        _child(node, path, len(path) - 1)
    elif last not in node:
        _add_key(node, last, _yaml_value(value), at_end=node is document)
        return
    old = node[last]
    trailing = _trailing_comment(old) if _is_block(old) else None
    node[last] = _yaml_value(value, old)
    if trailing is not None:        # it introduces what follows: it stays before it
        _put_trailing(node, last, trailing)


def _is_block(value: Any) -> bool:
    """A non-empty block-style mapping or sequence (whose last line ends deeper down)."""
    return isinstance(value, (dict, list)) and bool(len(value)) and not value.fa.flow_style()


def _put_trailing(parent: Any, key: Any, token: Any) -> None:
    """Attach the comment token after the last line of parent[key]."""
    owner, where = (_comment_owner(parent[key]) if _is_block(parent[key]) else
                    (parent, key))
    slot = 0 if isinstance(owner, list) else 2
    owner.ca.items.setdefault(where, [None] * 4)[slot] = token


def _child(node: Any, path: KeyPath, depth: int) -> Any:
    """node's entry path[depth], or None when a table lacks it; EditError for what
    cannot be walked into."""
    part = path[depth]
    if isinstance(part, int):
        if not isinstance(node, list):
            raise EditError("%s is not a list" % format_key(path[:depth]))
        if not 0 <= part < len(node):
            raise EditError(
                "%s has no entry %d (it has %d); to add one, set the whole list: %s=[...]"
                % (format_key(path[:depth]), part, len(node), format_key(path[:depth])))
        return node[part]
    if not isinstance(node, dict):
        raise EditError("%s is not a table, so it has no key %s"
                        % (format_key(path[:depth]), part))
    child = node.get(part)
    if child is not None and not isinstance(child, (dict, list)) and depth < len(path) - 1:
        raise EditError("%s is %r, not a table" % (format_key(path[:depth + 1]), child))
    return child


def _add_key(table: CommentedMap, key: str, value: Any, at_end: bool = False) -> None:
    """Add key after the table's last key, and move the comment lines that followed
    that key (those introducing what comes next in the file) after the new one.
    at_end: the table is the document, so those lines end the file and belong to the
    section before them; they stay, and a blank line parts them from the new one."""
    if at_end:
        if _is_block(table):
            _blank_line_after(table)
        table[key] = value
        return
    trailing = _trailing_comment(table) if _is_block(table) else None
    table[key] = value
    if trailing is not None:
        _put_trailing(table, key, trailing)


def _blank_line_after(table: Any) -> None:
    """End the comment lines after the block collection's last line with a blank line,
    if they do not end with one; nothing if there are none."""
    node = table
    while True:
        end = getattr(node.ca, "end", None)
        if end:
            if end[-1].value.startswith("#"):
                end.append(CommentToken("\n", end[-1].start_mark, None))
            return
        last = len(node) - 1 if isinstance(node, list) else list(node)[-1]
        if not _is_block(node[last]):
            break
        node = node[last]
    owner, where = _comment_owner(table)
    entry = owner.ca.items.get(where)
    slot = 0 if isinstance(owner, list) else 2
    token = entry[slot] if entry and len(entry) > slot else None
    # "\n# note\n" or "# same line\n# note\n": comment lines; "# same line\n": none.
    if isinstance(token, CommentToken) and "\n" in token.value.rstrip("\n") \
            and not token.value.endswith("\n\n"):
        token.value += "\n"


def _comment_owner(node: Any) -> Tuple[Any, Any]:
    """(table or list, key or index) whose comment token follows node's last line."""
    while True:
        last = len(node) - 1 if isinstance(node, list) else list(node)[-1]
        value = node[last]
        if _is_block(value):
            node = value
            continue
        return node, last


def _trailing_comment(table: Any) -> Any:
    """Take the comment lines after the block collection's last line off their owner
    and return them as one token to put after a value (_put_trailing), leaving a
    comment on that last line where it was; None if none."""
    node = table
    while True:
        # After a sequence of flow tables, ruamel keeps them as the sequence's end.
        end = getattr(node.ca, "end", None)
        if end:
            node.ca.end = []
            # Each of these knows its column; one token after a value does not.
            return CommentToken("\n" + "".join(
                " " * token.column + token.value if token.value.startswith("#")
                else token.value for token in end), end[0].start_mark, None)
        last = len(node) - 1 if isinstance(node, list) else list(node)[-1]
        if not _is_block(node[last]):
            break
        node = node[last]
    owner, where = _comment_owner(table)
    entry = owner.ca.items.get(where)
    slot = 0 if isinstance(owner, list) else 2
    token = entry[slot] if entry and len(entry) > slot else None
    if not isinstance(token, CommentToken):
        return None
    text = token.value
    if text.startswith("#"):            # `key: value  # note` keeps its note
        same_line, newline, rest = text.partition("\n")
        if not rest:
            return None
        token.value = same_line + newline
        # A token after a value starts with the newline that ends the value's line.
        return CommentToken(newline + rest, token.start_mark, None)
    entry[slot] = None
    return token


def _edit_yaml(text: str, changes: Sequence[Tuple[KeyPath, Any]]) -> str:
    yaml = round_trip_yaml(text)
    document = yaml.load(text)
    kept = ""
    if document is None:
        # Only comments (the example commented out): ruamel would drop them all; they
        # stay as they were, a blank line before the sections set.
        document = CommentedMap()
        yaml.explicit_start = False
        kept = "" if not text.strip() else text if text.endswith("\n\n") else \
            text.rstrip("\n") + "\n\n"
    if not isinstance(document, dict):
        raise EditError("the file is not a mapping of option sections")
    for path, value in changes:
        _set_yaml(document, path, value)
    out = io.StringIO()
    yaml.dump(document, out)
    return kept + out.getvalue()


# ---------------------------------------------------------------- TOML

def _set_toml(document: Any, path: KeyPath, value: Any) -> None:
    """Set path to value; None (unset), which TOML cannot write, removes the key."""
    node = document
    for depth, part in enumerate(path[:-1]):
        child = _child(node, path, depth)
        if child is None and value is None:
            return
        if child is None:
            child = tomlkit.table()
            _add_toml_key(node, part, child)
        node = child
    last = path[-1]
    if isinstance(node, list):
        _child(node, path, len(path) - 1)
        node[last] = value
    elif value is None:
        if last in node:
            del node[last]
    elif last in node:
        trailing = _take_toml_trailing(node[last])
        node[last] = value
        for item in trailing:       # what introduced the next table stays before it
            _last_toml_table(node[last]).add(item)
    else:
        _add_toml_key(node, last, value)


def _last_toml_table(item: Any) -> Any:
    """The table whose body ends where item's text ends (None: item is a value)."""
    if isinstance(item, tomlkit.items.AoT):
        return item.body[-1] if item.body else None
    if isinstance(item, tomlkit.items.Table) and not item.is_super_table():
        return item
    return None


def _take_toml_trailing(item: Any) -> list:
    """The blank lines and comments ending a [table] or [[array]] that is about to be
    replaced, taken off it: they introduce whatever follows in the file."""
    table = _last_toml_table(item)
    if table is None:
        return []
    return _take_end_trivia(table)


def _take_end_trivia(table: Any) -> list:
    """The blank lines and comments that end table's text, taken off it: its own, or
    those of the last of its sub-tables when it ends with them."""
    while True:
        last = table.value.body[-1][1] if table.value.body else None
        if isinstance(last, tomlkit.items.AoT) and last.body:
            table = last.body[-1]
        elif isinstance(last, tomlkit.items.Table):
            table = last
        else:
            break
    body = table.value.body
    position = len(body)
    while position and body[position - 1][0] is None and isinstance(body[position - 1][1],
                                                                    _TRIVIA):
        position -= 1
    trailing = [entry for _, entry in body[position:]]
    del body[position:]
    return trailing


def _add_toml_key(table: Any, key: str, value: Any) -> None:
    """Add key after the table's last key-value line, before the blank lines and
    comments that follow it (they introduce the next table)."""
    container = table.value if isinstance(table, tomlkit.items.Table) else table
    tables = isinstance(value, (dict, tomlkit.items.Table)) or (
        isinstance(value, list) and value and all(isinstance(v, dict) for v in value))
    if tables and isinstance(table, tomlkit.items.Table):
        # A [table] or [[array]] can only go after the table's keys and sub-tables; the
        # comments that end the table's text introduce the next one, and stay before it.
        trailing = _take_end_trivia(table)
        table[key] = value
        for item in trailing:
            _last_toml_table(table[key]).add(item)
        return
    if not isinstance(container, tomlkit.container.Container) or tables or isinstance(
            table, tomlkit.items.InlineTable):
        table[key] = value     # a table goes last anyway, an inline one has no comments
        return
    body = container.body
    position = len(body)
    while position and body[position - 1][0] is None and isinstance(
            body[position - 1][1], _TRIVIA):
        position -= 1
    first_table = next((i for i, (_, item) in enumerate(body)
                        if isinstance(item, (tomlkit.items.Table, tomlkit.items.AoT))), None)
    if first_table is not None:     # the document's own keys go before its first [table]
        position = min(position, first_table)
        while position and body[position - 1][0] is None and isinstance(
                body[position - 1][1], _TRIVIA):
            position -= 1
    if position == len(body):
        table[key] = value
    else:
        # tomlkit has no public "insert before": _insert_at is what its own insert-in-
        # order code uses (tomlkit is pinned in constraints/tested.txt; the tests of
        # config set would see it change).
        container._insert_at(position, key, value)


def _edit_toml(text: str, changes: Sequence[Tuple[KeyPath, Any]]) -> str:
    document = tomlkit.parse(text)
    for path, value in changes:
        _set_toml(document, path, value)
    return tomlkit.dumps(document)


# ---------------------------------------------------------------- both

def edit_text(file: str, text: str, changes: Sequence[Tuple[KeyPath, Any]]) -> str:
    """`text` of config file `file` with each (key path, plain value) of `changes` set:
    a key that is missing is added, with the tables above it. Raises EditError; the
    text must be one the loader parsed (syntax errors are its to report)."""
    format_name = FORMATS.get(os.path.splitext(file)[1].lower())
    if format_name not in ("YAML", "TOML"):
        raise EditError("%s: unknown config file format: name it *.yaml, *.yml or *.toml"
                        % file)
    # The file is edited with LF line ends and without its BOM, and written back with
    # them: a file kept with CRLF (edited on Windows) stays so.
    bom = BOM if text.startswith(BOM) else ""
    body = text[len(bom):]
    first_line = body.partition("\n")[0] + "\n"
    newline = "\r\n" if first_line.endswith("\r\n") else "\n"
    body = body.replace("\r\n", "\n")
    edited = (_edit_yaml if format_name == "YAML" else _edit_toml)(body, changes)
    return bom + edited.replace("\n", newline)


@contextlib.contextmanager
def edit_lock(path: str):
    """Held from reading the config file to replacing it: two editors at once (two
    `elemtactl config set`, or one and the package's debconf helper) would otherwise both
    read the old file and the second rename would undo the first one's change. The lock
    is on the directory (flock), as the file itself is replaced by a new one."""
    directory = os.path.dirname(os.path.realpath(path)) or "."
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)            # closing drops the lock


def replace_file(path: str, text: str, new_mode: int = 0o644) -> None:
    """Put `text` in place of the file at `path` so that a reader sees the old file or
    the new one, never a part: a temp file beside it, the old file's mode and owner
    (new_mode for a new file), fsync, rename, fsync of the directory. A link is
    followed: the file it names is the one replaced."""
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, temp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            if old is None:
                os.fchmod(stream.fileno(), new_mode)
            else:
                os.fchmod(stream.fileno(), stat.S_IMODE(old.st_mode))
                mine = os.fstat(stream.fileno())
                if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
                    os.fchown(stream.fileno(), old.st_uid, old.st_gid)
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
