"""Configuration errors: each problem found in a file, and the exception that carries them all.

Owned by no process: raised by elemta.config.loader while any process loads its config.
The loader collects every problem in a file before raising, so an administrator fixes them
in one pass. str(ConfigError) is one line per problem, FILE:LINE: KEY.PATH: message, the
layout compilers use, so editors can jump to each line.
See also: elemta.config.loader, man/elemta.conf.5 (DESCRIPTION, "Errors").
"""

from typing import Optional, Sequence, Tuple, Union

KeyPath = Tuple[Union[str, int], ...]


def format_key(path: KeyPath) -> str:
    """('listeners', 1, 'port') -> 'listeners[1].port'."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += "[%d]" % part
        else:
            text += ("." if text else "") + str(part)
    return text


class Problem:
    """One thing wrong in a config file: where it is and what is wrong."""

    __slots__ = ("file", "line", "key", "message")

    def __init__(self, file: str, line: Optional[int], key: str, message: str) -> None:
        self.file = file        # the config file's path, as given to load_config
        self.line = line        # 1-based line number, or None when not known
        self.key = key          # key path such as 'listeners[1].port', or '' for the file
        self.message = message  # what is wrong, in one line

    def __str__(self):
        where = self.file if self.line is None else "%s:%d" % (self.file, self.line)
        if self.key:
            where += ": " + self.key
        return "%s: %s" % (where, self.message)

    def __repr__(self):
        return "Problem(%r, %r, %r, %r)" % (self.file, self.line, self.key, self.message)

    def __eq__(self, other):
        if not isinstance(other, Problem):
            return NotImplemented
        return ((self.file, self.line, self.key, self.message)
                == (other.file, other.line, other.key, other.message))

    def __hash__(self):
        return hash((self.file, self.line, self.key, self.message))


class ConfigError(Exception):
    """A config file that cannot be used; .problems lists everything wrong with it."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))

    @classmethod
    def about_file(cls, file, message, line=None):
        """An error about the file as a whole (unreadable, bad syntax, unknown format)."""
        return cls([Problem(file, line, "", message)])
