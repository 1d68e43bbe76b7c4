"""The system's mail name: the first line of /etc/mailname (smtpd.mailname_file), as Debian
keeps it for whichever mailer is installed, read once with the configuration.

Owned by no process: elemta.config.loader reads it into Config.mailname while any process
loads its configuration, so the daemon, sendmail and mailq agree on the name. It is the
default of smtpd.origin (Postfix's myorigin, which Debian's main.cf sets to /etc/mailname).
The name is checked as a domain in the addressing layer's normal form
(elemta.addressing.normal): a file that says something else is a configuration error
naming the file, never a name half-used.
See also: elemta.config.schema (Config.origin, Config.hostname), debian/elemta.postinst
(which writes the file from the debconf answer).
"""

from typing import Optional

from elemta.addressing.normal import normal_domain
from elemta.config.errors import ConfigError
from elemta.config.options import domains

# A mail name is a domain (at most 253 characters): a longer first line is not one.
MAX_LINE = 1024


def read_mailname(path: Optional[str], named_by: str = "smtpd.mailname_file"
                  ) -> Optional[str]:
    """The mail name in the first line of path, normalised; None when path is None or
    the file does not exist. Raises ConfigError naming the file and line."""
    if not path:
        return None
    try:
        with open(path, "rb") as stream:
            first = stream.readline(MAX_LINE)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError.about_file(path, "cannot read the mail name (%s): %s"
                                     % (named_by, error.strerror or error)) from None

    def refuse(why):
        return ConfigError.about_file(path, "%s; write this system's mail name, a domain "
                                            "such as example.org, on the first line (%s)"
                                      % (why, named_by), 1)

    try:
        text = first.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise refuse("the first line is not UTF-8 text") from None
    if not text:
        raise refuse("the first line is empty")
    name = normal_domain(text)
    problem = domains([name]) if not name.startswith("[") else "%r is an address " \
        "literal, not a domain name" % text
    if problem:
        raise refuse(problem.replace(repr(name), repr(text)))
    return name
