"""Postfix's main.cf and master.cf, read as Postfix itself reads them: through postconf.

Used by elemtactl import-postfix (elemta.migrate.translate). postconf(1) is Postfix's own
reader, so what it prints is what Postfix runs with: $name and ${name} expanded, its
defaults for this version and compatibility_level, mynetworks computed from the host's
interfaces, continuation lines joined, master.cf's -o overrides split out. Four calls:

    postconf -c DIR -n     the parameters main.cf sets (each is translated or reported)
    postconf -c DIR -x     every parameter's effective value, expanded
    postconf -c DIR -M     the master.cf services (name type ... command)
    postconf -c DIR -P     their -o overrides (service/type/name = value)

postconf is required: re-implementing Postfix's defaults and expansion here would be
wrong exactly where a migration must be right (compatibility_level defaults, mynetworks,
$name chains). It comes with the postfix package; when Elemta's install removed Postfix
(both provide mail-transport-agent), /etc/postfix stays, and `apt-get install
postfix-` is not needed: `apt-get download postfix && dpkg-deb -x postfix_*.deb DIR`
gives DIR/usr/sbin/postconf, named with --postconf.
See also: postconf(1), postconf(5), master(5).
"""

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional

DEFAULT_CONFIG_DIR = "/etc/postfix"
POSTCONF_PLACES = ("/usr/sbin/postconf",)


class PostfixConfigError(Exception):
    """Postfix's configuration cannot be read; str() says why."""


@dataclass(frozen=True)
class MasterService:
    """One master.cf service: `name type private unpriv chroot wakeup maxproc command`."""
    name: str
    type: str
    command: str
    overrides: Dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "%s/%s" % (self.name, self.type)


@dataclass
class PostfixSettings:
    """What Postfix runs with: `explicit` the raw values main.cf sets, `effective` every
    parameter's expanded value (defaults included), `services` master.cf's."""
    config_dir: str
    explicit: Dict[str, str]
    effective: Dict[str, str]
    services: List[MasterService]

    def value(self, name: str) -> str:
        """The effective value of a parameter, "" when Postfix has none."""
        return self.effective.get(name, "").strip()

    def is_set(self, name: str) -> bool:
        return name in self.explicit


def find_postconf(given: Optional[str] = None) -> str:
    """The postconf program to run; PostfixConfigError says how to get one."""
    if given:
        if not os.access(given, os.X_OK):
            raise PostfixConfigError("%s: not an executable postconf" % given)
        return given
    found = shutil.which("postconf") or next(
        (path for path in POSTCONF_PLACES if os.access(path, os.X_OK)), None)
    if found is None:
        raise PostfixConfigError(
            "postconf is not installed: Postfix's configuration is read with Postfix's "
            "own reader. Install postfix, or unpack it without installing (apt-get "
            "download postfix; dpkg-deb -x postfix_*.deb DIR) and give --postconf "
            "DIR/usr/sbin/postconf")
    return found


def _postconf(postconf: str, config_dir: str, *args: str) -> str:
    argv = [postconf, "-c", config_dir] + list(args)
    env = dict(os.environ)
    # An unpacked postconf finds its libraries beside it (postfix's shlib_directory).
    libraries = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(postconf)))), "usr", "lib", "postfix")
    if os.path.isdir(libraries) and not postconf.startswith("/usr/sbin/"):
        env["LD_LIBRARY_PATH"] = libraries
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PostfixConfigError("%s: %s" % (" ".join(argv), error))
    if done.returncode != 0:
        problem = done.stderr.strip().splitlines()
        raise PostfixConfigError("%s failed: %s" % (
            " ".join(argv), problem[-1] if problem else "exit %d" % done.returncode))
    return done.stdout


def _assignments(text: str) -> Dict[str, str]:
    """{name: value} of postconf's "name = value" lines."""
    found = {}
    for line in text.splitlines():
        name, equals, value = line.partition(" =")
        if equals:
            found[name.strip()] = value.strip()
    return found


def read_postfix(config_dir: str = DEFAULT_CONFIG_DIR,
                 postconf: Optional[str] = None) -> PostfixSettings:
    """Postfix's settings in config_dir (main.cf, master.cf); raises PostfixConfigError."""
    if not os.path.isfile(os.path.join(config_dir, "main.cf")):
        raise PostfixConfigError("%s: no main.cf there (name Postfix's configuration "
                                 "directory, /etc/postfix by default)" % config_dir)
    program = find_postconf(postconf)
    explicit = _assignments(_postconf(program, config_dir, "-n"))
    explicit.pop("config_directory", None)      # postconf -c says so, not main.cf
    effective = _assignments(_postconf(program, config_dir, "-x"))
    overrides: Dict[str, Dict[str, str]] = {}
    for key, value in _assignments(_postconf(program, config_dir, "-P")).items():
        where, _, name = key.rpartition("/")
        overrides.setdefault(where, {})[name] = value
    services = []
    for line in _postconf(program, config_dir, "-M").splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        label = "%s/%s" % (fields[0], fields[1])
        services.append(MasterService(fields[0], fields[1], fields[7],
                                overrides.get(label, {})))
    return PostfixSettings(config_dir, explicit, effective, services)
