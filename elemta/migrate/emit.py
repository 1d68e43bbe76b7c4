"""An Elemta config file, YAML or TOML, from translated settings, each value under a
comment naming the Postfix setting it came from.

Used by elemtactl import-postfix. Written by hand rather than through a YAML or TOML
library so every value can carry its comment: strings are JSON strings, which both
YAML (double-quoted) and TOML (basic strings) read the same way; lists of tables
(listeners, delivery.transport) are YAML flow mappings or TOML [[arrays of tables]].
TOML has no null: an unset option is written "" (which Elemta reads as unset).
See also: elemta.migrate.translate, elemta.config.sources (the reader).
"""

import json
from typing import Any, Dict, List, Sequence, Tuple

from elemta.migrate.translate import Translated
from elemta.util.text import printable

HEADER = """Elemta configuration translated from Postfix's (%s) by elemtactl import-postfix.
Each value names the Postfix setting it came from; every option not written here has
Elemta's default (man elemta.conf). Postfix settings that were not translated were
listed when this file was written: check them before Elemta takes over."""


def _scalar(value: Any, toml: bool) -> str:
    if value is None:
        return '""' if toml else "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[%s]" % ", ".join(_scalar(item, toml) for item in value)
    if isinstance(value, dict):
        if toml:
            return "{ %s }" % ", ".join("%s = %s" % (key, _scalar(item, toml))
                                        for key, item in value.items())
        return "{%s}" % ", ".join("%s: %s" % (key, _scalar(item, toml))
                                  for key, item in value.items())
    return json.dumps(str(value), ensure_ascii=False)


def _comment(text: str, indent: str = "") -> List[str]:
    # A control character in a Postfix value must not end the comment early.
    return ["%s# %s" % (indent, printable(line)) if line else indent + "#"
            for line in text.split("\n")]


def _sections(settings: Sequence[Translated]) -> List[Tuple[str, List[Translated]]]:
    """Settings grouped by their top-level table, in elemta.conf's order."""
    from elemta.config.loader import schema_options
    from elemta.config.schema import Config
    position = {option.name: n for n, option in enumerate(schema_options(Config))}
    groups: Dict[str, List[Translated]] = {}
    for setting in settings:
        groups.setdefault(setting.path[0], []).append(setting)
    return [(name, groups[name]) for name in sorted(groups, key=position.__getitem__)]


def render(settings: Sequence[Translated], source: str, toml: bool) -> str:
    """The config file's text."""
    lines = _comment(HEADER % source)
    for section, members in _sections(settings):
        lines.append("")
        if len(members) == 1 and len(members[0].path) == 1:     # listeners
            lines += _table_list(section, members[0], toml, "")
            continue
        if toml:
            lines.append("[%s]" % section)
        else:
            lines.append("%s:" % section)
        indent = "" if toml else "  "
        # Lists of tables last: in TOML a key after [[section.list]] would belong to it.
        members = sorted(members, key=lambda setting: _is_table_list(setting.value))
        for setting in members:
            key = setting.path[-1]
            if _is_table_list(setting.value):
                lines += _table_list(key, setting, toml, indent, section)
                continue
            lines += _comment("from " + setting.source, indent)
            lines.append("%s%s%s %s" % (indent, key, " =" if toml else ":",
                                        _scalar(setting.value, toml)))
    return "\n".join(lines) + "\n"


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _table_list(key: str, setting: Translated, toml: bool, indent: str,
                section: str = "") -> List[str]:
    lines = _comment("from " + setting.source, indent)
    if toml:
        name = "%s.%s" % (section, key) if section else key
        for entry in setting.value:
            lines.append("[[%s]]" % name)
            lines += ["%s = %s" % (k, _scalar(v, True)) for k, v in entry.items()]
        return lines
    lines.append("%s%s:" % (indent, key))
    lines += ["%s  - %s" % (indent, _scalar(entry, False)) for entry in setting.value]
    return lines
