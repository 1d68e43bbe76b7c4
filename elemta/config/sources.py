"""Reading a config file: YAML or TOML text to plain data plus a key path -> line map.

Owned by no process: used by elemta.config.loader in every process that loads a config.
The file's extension picks the parser: .yaml and .yml go to ruamel.yaml (round-trip
loader, which records where each key is), .toml goes to tomlkit (which does not, so
elemta.config.toml_lines finds the lines). Both give the loader the same thing: plain
dicts, lists and scalars, and the line of each key path, so checking the values is one
piece of code for both formats. Syntax errors become a ConfigError with file and line.
See also: elemta.config.loader, elemta.config.toml_lines.
"""

import re
from typing import Any, Dict, NamedTuple

import tomlkit
import tomlkit.exceptions
import tomlkit.items
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from elemta.config.errors import ConfigError, KeyPath
from elemta.config.toml_lines import first_redefinition, key_lines

FORMATS = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML"}


class Source(NamedTuple):
    """A parsed config file, before its values are checked."""
    data: Dict[str, Any]          # plain dicts, lists, str, int, float, bool, None
    lines: Dict[KeyPath, int]     # key path -> 1-based line
    table_word: str               # what this format calls a table: "mapping" or "table"


def parse(file: str, text: str, format_name: str) -> Source:
    """Parse `text` (from `file`) as YAML or TOML; raise ConfigError on bad syntax."""
    if format_name == "YAML":
        return _parse_yaml(file, text)
    return _parse_toml(file, text)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _parse_yaml(file: str, text: str) -> Source:
    try:
        document = YAML(typ="rt").load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = error.problem or error.context or "cannot parse"
        if error.context and error.problem:
            context = error.context
            if error.context_mark and error.context_mark.line != mark.line:
                context += " that starts on line %d" % (error.context_mark.line + 1)
            message = "%s (%s)" % (error.problem, context)
        raise ConfigError.about_file(file, "YAML syntax error: " + _one_line(message),
                                     mark.line + 1 if mark else None) from None
    except YAMLError as error:
        raise ConfigError.about_file(file, "YAML syntax error: " + _one_line(str(error))) \
            from None
    if document is None:                # an empty file, or only comments
        return Source({}, {}, "mapping")
    if not isinstance(document, dict):
        raise ConfigError.about_file(
            file, "the file must be a mapping of option sections (smtpd:, listeners:, ...), "
                  "not %s" % ("a list" if isinstance(document, list) else "a single value"), 1)
    lines: Dict[KeyPath, int] = {}
    return Source(_plain_yaml(document, (), lines), lines, "mapping")


def _plain_yaml(node: Any, path: KeyPath, lines: Dict[KeyPath, int]) -> Any:
    """ruamel's round-trip objects to plain Python values, noting each key's line."""
    if isinstance(node, dict):
        plain = {}
        for key, value in node.items():
            name = key if isinstance(key, str) else str(key)
            try:
                lines[path + (name,)] = node.lc.key(key)[0] + 1
            except (AttributeError, KeyError, TypeError):
                pass    # a key merged in from an anchor (<<: *x): the parent's line will do
            plain[name] = _plain_yaml(value, path + (name,), lines)
        return plain
    if isinstance(node, list):
        plain_list = []
        for index, item in enumerate(node):
            try:
                lines[path + (index,)] = node.lc.item(index)[0] + 1
            except (AttributeError, KeyError, TypeError):
                pass
            plain_list.append(_plain_yaml(item, path + (index,), lines))
        return plain_list
    if isinstance(node, (bool, ScalarBoolean)):   # ScalarBoolean is an int, not a bool
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node     # None, dates, tagged scalars: the loader names their type in errors


_TOMLKIT_POSITION = re.compile(r"\s+at line \d+ col \d+$")


def _parse_toml(file: str, text: str) -> Source:
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as error:
        message = _TOMLKIT_POSITION.sub("", str(error))
        raise ConfigError.about_file(file, "TOML syntax error: " + _one_line(message),
                                     error.line) from None
    except tomlkit.exceptions.TOMLKitError as error:
        # Raised without a position, as for a key given twice inside one [table].
        raise ConfigError.about_file(file, "TOML syntax error: " + _one_line(str(error)),
                                     first_redefinition(text)) from None
    return Source(plain_toml(document), key_lines(text), "table")


def plain_toml(node: Any) -> Any:
    """tomlkit's items to plain Python values (its own unwrap() mangles strings in 0.11.0)."""
    if isinstance(node, tomlkit.items.Bool):
        return bool(node.value)
    if isinstance(node, dict):
        return {str.__str__(key): plain_toml(value) for key, value in node.items()}
    if isinstance(node, list):
        return [plain_toml(item) for item in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str.__str__(node)
    return node     # dates and times: the loader names their type in errors
