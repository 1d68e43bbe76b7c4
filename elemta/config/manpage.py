"""Writes man/elemta.conf.5 from the schema, so the page lists exactly the real options.

Owned by no process: a build step. Regenerate after changing elemta/config/schema.py:

    python -m elemta.config.manpage > man/elemta.conf.5

tests/test_config.py fails when the committed page differs from what this prints.
The layout follows postconf(5): prose on the file format and errors, then one entry
per option with its key path, type, default and description.
See also: elemta.config.schema, elemta.config.loader.
"""

import dataclasses
import sys
import typing
from typing import Any, List, Optional

from elemta import __version__
from elemta.config.listing import value_text
from elemta.config.loader import schema_options, sequence_item, type_name
from elemta.config.schema import Config

# Changed by hand when the page's prose changes; the page must not depend on the clock.
PAGE_DATE = "2025-06-01"

_HEAD = r""".\" Generated from elemta/config/schema.py by:
.\"     python -m elemta.config.manpage > man/elemta.conf.5
.\" Edit the schema or elemta/config/manpage.py, not this file.
.TH ELEMTA.CONF 5 {date} "Elemta {version}" "File Formats Manual"
.SH NAME
elemta.conf \- Elemta configuration file
.SH SYNOPSIS
.I /etc/elemta/elemta.yaml
.br
.I /etc/elemta/elemta.toml
.SH DESCRIPTION
Every Elemta process reads the same configuration file, checks all of it, and
refuses to start if anything in it is wrong.
Every Elemta program finds it in the same order: the file named with
.B \-\-config
(sendmail's
.BR \-C ),
else the file named by the environment variable
.BR ELEMTA_CONFIG ,
else
.I /etc/elemta/elemta.yaml
or
.I /etc/elemta/elemta.toml
if one exists (see
.BR elemta (8)).
Without a file, the built\-in development defaults apply: SMTP on 127.0.0.1
port 2525 and the queue under
.IR ./spool .
.PP
The file is YAML or TOML, chosen by its name: a name ending in
.B .yaml
or
.B .yml
is read as YAML 1.2, a name ending in
.B .toml
as TOML 1.0.
Any other name is refused.
.PP
Options are grouped in sections, and each is named below by its key path:
.B limits.message_size
is the key
.B message_size
in the section
.BR limits .
.B listeners
is a list of tables, one per listening socket;
.B listeners[].port
is the
.B port
key of each of them.
An option left out takes its default; a section left out takes all its defaults.
In YAML:
.PP
.RS
.nf
limits:
  message_size: 52428800
listeners:
  \- {{address: "0.0.0.0", port: 25, mode: smtp}}
  \- {{address: "::", port: 25, mode: smtp}}
.fi
.RE
.PP
The same in TOML:
.PP
.RS
.nf
[limits]
message_size = 52428800

[[listeners]]
address = "0.0.0.0"
port = 25
mode = "smtp"

[[listeners]]
address = "::"
port = 25
mode = "smtp"
.fi
.RE
.PP
Values must have the type shown for each option: a string must be quoted in
TOML, a boolean is
.B true
or
.BR false ,
and is not an integer; an integer is accepted where a number is expected;
a list of one item is still written as a list.
Strings must be quoted in YAML too when they could be read as something else.
No string may hold a line break or another control character (a tab is
allowed): settings reach SMTP replies, headers and log lines.
File names are used as written; relative ones are relative to the working
directory of the process, so write absolute ones.
.SS Errors
The whole file is checked before any of it is used, and every problem found is
reported, one per line, in the form
.PP
.RS
.I file\fR:\fIline\fR: \fIkey.path\fR: \fImessage
.RE
.PP
for example
.PP
.RS
.nf
/etc/elemta/elemta.toml:12: listeners[1].port: must be a TCP port between 1 and 65535, not 70000
/etc/elemta/elemta.toml:30: limits.mesage_size: unknown key; did you mean limits.message_size?
.fi
.RE
.PP
Problems reported are: syntax errors; unknown keys (with the closest known key,
when there is one); values of the wrong type; values outside what an option
allows; and these checks across options:
.IP \(bu 3
.B tls.cert_file
and
.B tls.key_file
are set both or neither, and the files they name can be read, as can
.B auth.credentials_file
(backend file) and the DKIM and ARC signing keys in use.
The daemon opens them as the user that starts it;
.B elemta \-\-check\-config
opens them (and
.B api.token_file
and
.BR delivery.sasl_password_file ,
and connects to
.B auth.dovecot_socket
when it is a unix socket) as
.BR master.user ,
as the workers will; the tools every user runs (sendmail, mailq, newaliases) do not
open them at all: they need no secret.
.IP \(bu 3
A listener in mode
.B smtps
needs
.B tls.cert_file
and
.BR tls.key_file .
.IP \(bu 3
A listener in mode
.B submission
or
.B smtps
requires AUTH, so it needs
.B auth.credentials_file
(backend file) or
.B auth.dovecot_socket
(backend dovecot, which always needs it).
.IP \(bu 3
No two listeners share an address and port, and there is at least one listener.
.IP \(bu 3
Each enabled plugin's own checks (a DKIM signing key needs a domain, a selector and a
readable key file; greylisting's retry window is not shorter than its delay), and each
table under
.B plugins
that names no built\-in is checked by the installed plugin of that name.
.SS Warnings
A file without errors may still say something its administrator probably does
not mean.
Such a setting gets a warning in the same form, after the
\(lqOK\(rq of
.B elemta \-\-check\-config
and
.BR "elemtactl config check" ,
each line starting with
.IR program :
.BR warning: ,
and in the log at every start and reload; the configuration is used as it
is.
Warned of:
.B virtual.mailbox_domains
without
.B virtual.mailbox_maps
(every recipient in those domains is accepted at RCPT, and mail for a user
who does not exist bounces later).
.SS Lookup tables
An option of type
.I lookup table
takes a table as
.BR elemta\-tables (5)
spells it
.RB ( lmdb:/etc/elemta/virtual ,
.BR pgsql:/etc/elemta/virtual.cf ,
an inline table or list of entries), or several, as Postfix lists them:
.B \(dqlmdb:/etc/elemta/virtual, pgsql:/etc/elemta/virtual.cf\(dq
or a list whose every item is a table.
Each key is asked of the tables in order and the first that has it answers
(Postfix's
.IR "virtual_alias_maps = hash:a, pgsql:b" ).
.SS Reload and restart
A running Elemta reads the file again on
.B elemtactl reload
.RB ( "systemctl reload elemta" ,
SIGHUP): new workers start with the new settings, the old ones finish their
sessions, and no connection is refused.
A reload applies every option except those marked
.B restart
below, which the master uses once, before it starts its workers (the spool it
locks, the user it prepares directories for, its pid file): a change to one of
them waits for
.BR "systemctl restart elemta" .
A reload binds the listeners that are new, since the master keeps the rights it
started with.
It cannot start more workers of a kind than the master made room for at start:
twice
.B smtpd.workers
(at least twice the number of CPUs) and twice
.B delivery.workers
(at least 8); more wait for a restart.
.B elemtactl config set
says which of the two a change needs.
.SS AUTH through Dovecot
With
.B auth.backend
dovecot (Postfix's smtpd_sasl_type = dovecot) the smtpd workers ask Dovecot's auth
service about every AUTH PLAIN and LOGIN, over one connection per worker to
.BR auth.dovecot_socket .
Give Elemta a socket of its own in Dovecot's configuration, writable by
.B master.user
alone:
.PP
.RS
.nf
service auth {{
  unix_listener auth\-elemta {{
    mode = 0600
    user = elemta
  }}
}}
.fi
.RE
.PP
and set
.B auth.dovecot_socket
to /run/dovecot/auth\-elemta.
Elemta offers those of PLAIN and LOGIN that Dovecot offers, tells Dovecot the session
is secured after STARTTLS (or on smtps) and records the login name Dovecot returns
(its canonical user name) in the queue file and the log.
A wrong password gets 535 5.7.8 and counts for
.BR auth.failure_delay ;
while Dovecot cannot be reached, or says the failure is temporary, AUTH gets
454 4.7.0 and nothing is counted.
.SH OPTIONS
Each entry gives the key path, the type and the default, written as in TOML, and
.B restart
when a reload does not apply a change to it.
"""

_TAIL = r""".SH FILES
.TP
.I /etc/elemta/elemta.yaml\fR, \fI/etc/elemta/elemta.toml
The configuration file, when neither
.B \-\-config
nor
.B ELEMTA_CONFIG
names another.
.TP
.I elemta.yaml.example\fR, \fIelemta.toml.example
Annotated examples shipped with Elemta: every option, at its default except the
listeners and the spool directory.
.SH SEE ALSO
.BR elemta (8)
"""


def _roff(text: str) -> str:
    """Plain text as one roff text line: escape backslashes, guard a leading dot."""
    text = text.replace("\\", "\\e")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _entry(key: str, kind: Any, default: Any, doc: str,
           restart: Optional[str] = None) -> List[str]:
    if restart:
        doc += " A change needs a restart, not a reload: %s." % restart
    return [".TP",
            "\\fB%s\\fR (%s;%s default: %s)" % (
                key, _roff(type_name(kind).split(" ", 1)[1].split(" (")[0]),
                " restart;" if restart else "", _roff(value_text(default))),
            _roff(doc)]


def _section(cls: type, prefix: str) -> List[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for field in schema_options(cls):
        kind = hints[field.name]
        item = sequence_item(kind)
        if item is not None and dataclasses.is_dataclass(item):
            # A list of tables inside a section (delivery.transport).
            lines += _entry(prefix + field.name, kind, field.default,
                            "%s Each table in the list has the keys below."
                            % field.metadata["doc"])
            lines += _section(item, prefix + field.name + "[].")
        elif dataclasses.is_dataclass(kind):
            # A table inside a section (plugins.spf): its keys, one entry each.
            lines += [".TP", "\\fB%s\\fR (table)" % (prefix + field.name),
                      _roff(kind.__doc__.strip())]
            lines += _section(kind, prefix + field.name + ".")
        else:
            lines += _entry(prefix + field.name, kind, field.default, field.metadata["doc"],
                            field.metadata.get("restart"))
    return lines


def render() -> str:
    """The whole man page, as roff text."""
    lines = [_HEAD.format(date=PAGE_DATE, version=__version__).rstrip("\n")]
    hints = typing.get_type_hints(Config)
    for field in schema_options(Config):
        kind = hints[field.name]
        item = sequence_item(kind)
        lines.append(".SS %s" % field.name)
        if dataclasses.is_dataclass(kind):
            lines.append(_roff(kind.__doc__.strip()))
            lines += _section(kind, field.name + ".")
        elif item is not None and dataclasses.is_dataclass(item):
            lines += _entry(field.name, kind, field.default,
                            "%s Each table in the list has the keys below."
                            % field.metadata["doc"])
            lines += _section(item, field.name + "[].")
        else:
            lines += _entry(field.name, kind, field.default, field.metadata["doc"],
                            field.metadata.get("restart"))
    return "\n".join(lines + _restrictions()) + "\n" + _TAIL


def _restrictions() -> List[str]:
    """The RESTRICTIONS section: the core checks per stage, in the order they run."""
    from elemta.restrictions.catalogue import CORE_CHECKS, STAGES
    lines = [".SH RESTRICTIONS",
             "What the smtpd checks at each stage, in order, as Postfix's "
             "smtpd_client_restrictions .. smtpd_end_of_data_restrictions say it. First "
             "the core checks below (those a configuration turns on), then the enabled "
             "plugins serving the stage, the built-in restrictions among them, by their "
             "order (plugins.NAME.order), then the milters; a core check that says it "
             "runs last comes after them. A refusal is logged with \\(lqrestriction "
             "NAME\\(rq or \\(lqplugin NAME\\(rq and counted in "
             "elemta_smtpd_restriction_refusals_total{restriction,stage}. "
             "\\fBelemtactl restrictions\\fR prints the whole list for a "
             "configuration."]
    for stage in STAGES:
        checks = [check for check in CORE_CHECKS if check.stage == stage]
        lines.append(".SS %s" % stage)
        if not checks:
            lines.append("No core check; plugins only.")
        for check in checks:
            lines += [".TP", "\\fB%s\\fR (Postfix: %s)" % (check.name, check.postfix),
                      _roff("%s.%s%s" % (check.refuses[0].upper() + check.refuses[1:],
                                         " Set by %s." % check.option if check.option
                                         else "",
                                         " Runs last, after the plugins and milters."
                                         if check.last else ""))]
    return lines


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
