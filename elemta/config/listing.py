"""A Config as `key = value` lines, as postconf prints main.cf: every setting by its key path.

Owned by no process: elemtactl config show/get/set (elemta.cli.configcmd) print with it,
and the man page generator (elemta.config.manpage) writes defaults with value_text.
A setting is a leaf of the schema: smtpd.hostname, relay.mynetworks (a list of strings,
one line), listeners[0].port (a list of tables gets one line per key of each entry, so
each can be got and set by its path; an empty one is one line, `[]`), and the tables of
third-party plugins, plugins.NAME.KEY. Values are written as TOML values (strings
quoted, so "25" and 25, "" and unset differ), except `unset` for no value at all.
See also: elemta.config.schema, elemta.config.editor, man/elemtactl.8 (config show).
"""

import dataclasses
import difflib
import json
import typing
from typing import Any, Iterator, List, NamedTuple, Optional

import tomlkit
import tomlkit.exceptions
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from elemta.config.errors import KeyPath, format_key
from elemta.config.loader import optional_inner, parse_key_path, schema_options, sequence_item
from elemta.config.schema import Config, PluginSettings
from elemta.config.sources import plain_toml


class Setting(NamedTuple):
    """One line of `elemtactl config show`."""
    key: str                # 'listeners[0].port'
    value: Any
    is_default: bool        # inside a list of tables: the whole list is the default
    restart: Optional[str]  # why a change needs a restart; None: a reload applies it

    def line(self) -> str:
        return "%s = %s" % (self.key, value_text(self.value))


def value_text(value: Any) -> str:
    """A value written as in TOML: "reject", 2525, 30.0, false, ["a", "b"],
    {address = "::", port = 25}; None (no value, which TOML cannot write) is unset."""
    if value is None:
        return "unset"
    if hasattr(type(value), "from_config"):     # a lookup table or a domain list
        return value_text(value.plain() if hasattr(value, "plain") else str(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(value_text(item) for item in value) + "]"
    if dataclasses.is_dataclass(value):
        return "{" + ", ".join("%s = %s" % (f.name, value_text(getattr(value, f.name)))
                               for f in schema_options(type(value))) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join("%s = %s" % (key, value_text(item))
                               for key, item in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)   # a third-party plugin's oddity


def settings(config: Config) -> List[Setting]:
    """Every setting of `config`, in schema order."""
    return list(_walk(config, ""))


def defaults() -> List[Setting]:
    """Every setting at its default (`config show -d`)."""
    return settings(Config())


def _walk(table: Any, prefix: str, in_default: Optional[bool] = None) -> Iterator[Setting]:
    """The settings of a schema table; in_default: the whole list this table is an
    entry of is at its default (None: not in a list)."""
    hints = typing.get_type_hints(type(table))
    for field in schema_options(type(table)):
        value = getattr(table, field.name)
        key = prefix + field.name
        kind = hints[field.name]
        item = sequence_item(kind)
        is_default = in_default if in_default is not None else _is_default(field, value)
        restart = field.metadata.get("restart")
        if dataclasses.is_dataclass(kind) and dataclasses.is_dataclass(value):
            yield from _walk(value, key + ".", in_default)
        elif item is not None and dataclasses.is_dataclass(item):
            if not value:
                yield Setting(key, value, is_default, restart)
            for index, entry in enumerate(value):
                yield from _walk(entry, "%s[%d]." % (key, index), is_default)
        else:
            yield Setting(key, value, is_default, restart)
    if isinstance(table, PluginSettings):
        for plugin in table.other:      # third-party plugins: their own Settings
            yield from _plugin(plugin, "%s%s." % (prefix, plugin.name))


def _plugin(plugin: Any, prefix: str) -> Iterator[Setting]:
    yield from _walk(plugin.common, prefix)
    common = {f.name for f in schema_options(type(plugin.common))}
    if plugin.settings is None or plugin.settings is plugin.common:
        return
    for field in dataclasses.fields(plugin.settings):
        if field.name not in common and not field.metadata.get("internal"):
            value = getattr(plugin.settings, field.name)
            yield Setting(prefix + field.name, value, _is_default(field, value),
                          field.metadata.get("restart"))


def _is_default(field: dataclasses.Field, value: Any) -> bool:
    if field.default is not dataclasses.MISSING:
        return value == field.default
    if field.default_factory is not dataclasses.MISSING:    # type: ignore
        return value == field.default_factory()             # type: ignore
    return False


class UnknownKey(LookupError):
    """A key path no setting has; str() names it and the closest ones."""

    def __init__(self, key: str, known: List[str]) -> None:
        close = difflib.get_close_matches(key, known, n=2, cutoff=0.75)
        hint = "; did you mean %s?" % " or ".join(close) if close else \
            " (elemtactl config show lists them all)"
        super().__init__("unknown key %s%s" % (key, hint))


def select(all_settings: List[Setting], key: str) -> List[Setting]:
    """The settings under `key`: the one it names, or all of a section or list
    (smtpd, listeners, listeners[0]); raises UnknownKey."""
    key = format_key(parse_key(key))
    chosen = [s for s in all_settings if s.key == key or s.key.startswith((key + ".",
                                                                           key + "["))]
    if not chosen:
        raise UnknownKey(key, _all_keys(all_settings))
    return chosen


def _all_keys(all_settings: List[Setting]) -> List[str]:
    """Every setting's key and every section above one, for suggestions."""
    keys = set()
    for setting in all_settings:
        path = parse_key(setting.key)
        for end in range(1, len(path) + 1):
            keys.add(format_key(path[:end]))
    return sorted(keys)


def parse_key(text: str) -> KeyPath:
    """'plugins.dkim.keys[0].domain' -> ('plugins', 'dkim', 'keys', 0, 'domain')."""
    return parse_key_path(text.strip())


def kind_of(path: KeyPath, known: List[Setting]) -> Any:
    """The schema type of the setting at `path` (typing.Any inside the table of a
    third-party plugin, whose own Settings the loader checks); raises UnknownKey, or
    ValueError for a path that names a whole section."""
    kind: Any = Config
    for depth, part in enumerate(path):
        if isinstance(part, int):
            item = sequence_item(kind)
            if item is None or not dataclasses.is_dataclass(item):
                raise ValueError("%s is not a list of tables: set the whole list"
                                 % format_key(path[:depth]))
            kind = item
            continue
        if not dataclasses.is_dataclass(kind):
            raise UnknownKey(format_key(path), _all_keys(known))
        fields = {f.name for f in schema_options(kind)}
        if kind is PluginSettings and part not in fields:
            return Any
        if part not in fields:
            raise UnknownKey(format_key(path), _all_keys(known))
        kind = typing.get_type_hints(kind)[part]
    if dataclasses.is_dataclass(kind) and path and not isinstance(path[-1], int):
        raise ValueError("%s is a section: set its keys one by one (%s.KEY=VALUE)"
                         % (format_key(path), format_key(path)))
    return kind


def parse_value(text: str, kind: Any) -> Any:
    """A command line's VALUE as plain data for a setting of schema type `kind`: written
    as `config show` prints it (a TOML value, or unset for no value), except that a
    string may go unquoted, and a list or table may also be written in YAML's flow
    style ([a, b], {address: x}). What fits no syntax stays a string, for the loader to
    refuse by its type."""
    stripped = text.strip()
    inner = optional_inner(kind)
    if inner is not None and stripped == "unset":
        return None
    base = inner or kind
    if base is str and not stripped.startswith(('"', "'")):
        return text
    try:
        document = tomlkit.parse("value = " + stripped)
        if list(document) == ["value"]:
            return plain_toml(document["value"])
    except tomlkit.exceptions.TOMLKitError:
        pass
    if base is not str and stripped.startswith(("[", "{")):
        try:
            return _plain_yaml_value(YAML(typ="safe", pure=True).load(stripped))
        except YAMLError:
            pass
    return text


def _plain_yaml_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _plain_yaml_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_yaml_value(item) for item in value]
    return value
