"""The config type of a header or body check table: a lookup table spec whose results
are checked as actions when the config is checked.

Owned by no process: elemta.config.schema types content.header_checks and the others
with it. A table spec alone is checked for its form and, for a file, its syntax
(elemta.maps.spec); a check table's results must also be actions (elemta.content.
actions), or every match would be ignored with a warning at run time. So a regexp
table's results are read as actions when the config is checked (elemta --check-config,
start, reload, elemtactl config check): "REJCT text" is an error naming the table's
file:line, as a bad pattern is. Only when files are checked (the config loader's
check_files: never by the tools every user runs), and results whose action word comes
from the pattern ($1) are left to run time.
See also: elemta.maps.spec.TableSpec, elemta.config.loader (check_tables).
"""

from typing import Any, Optional

from elemta.content.actions import BadAction, parse_action
from elemta.maps.base import TableError
from elemta.maps.spec import TableSpec


class ActionTableSpec(TableSpec):
    """A TableSpec whose check() also reads a regexp table's results as actions."""

    @classmethod
    def from_config(cls, value: Any) -> "ActionTableSpec":
        spec = TableSpec.from_config(value)
        return cls(spec.type, spec.name, spec.entries)

    def check(self) -> Optional[str]:
        problem = super().check()
        if problem is not None or self.type != "regexp":
            return problem
        from elemta.maps.regexp import RegexpTable      # gevent: only when checking
        try:
            results = RegexpTable(self.name, str(self)).results()
        except TableError as error:
            return str(error)
        for number, result in results:
            if "$" in result.split(None, 1)[0]:
                continue
            try:
                parse_action(result)
            except BadAction as error:
                return "%s:%d: %s" % (self.name, number, error)
        return None
