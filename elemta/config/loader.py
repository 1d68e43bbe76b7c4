"""The configuration loader: a YAML or TOML file to one checked, frozen Config.

Owned by no process: the master and every child call load_config once at start (and the
master again on reload); nothing else reads config files.

The loader knows no option by name. It walks the dataclasses of elemta.config.schema
(dataclasses.fields, typing.get_type_hints): a nested dataclass is a table, a
Tuple[X, ...] a list, and each field's metadata `check` judges the value once its type
is right; a type of its own (elemta.maps.TableSpec: a lookup table) reads its value
with its from_config classmethod, whose ValueError is the problem reported. A field's
default is always acceptable, even where the check would refuse
it (smtpd.hostname "" means "the system's host name"). The built-in plugins' tables are
their own Settings classes (elemta.plugins.settings) and are read the same way; so is
the table of a third-party plugin, against the Settings class of the installed plugin
of that name, and a plugin table's validate(path) judges it across its fields. Then a
few checks that span fields (AUTH on submission ports, duplicate listeners, the files of
the lookup tables named) run on the result, and the files the workers will read (TLS,
credentials, signing keys; tables' files and Dovecot's auth socket only by elemta
--check-config, which connects to the socket) are opened, unless the caller is a tool every user runs, which needs no secret (load_config's
check_files).
Every problem in the file is collected, with its line and key path, before ConfigError
is raised, so one run shows the administrator everything to fix. A file without
problems may still deserve warnings (elemta.config.advice): they ride on the Config
(Config.warnings), for the daemon to log and the config checks to print.
See also: elemta.config.schema, elemta.config.sources, man/elemta.conf.5.
"""

import collections.abc
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from elemta.addressing.normal import normal_domain
from elemta.config.advice import advice
from elemta.config.errors import ConfigError, KeyPath, Problem, format_key
from elemta.config.mailname import read_mailname
from elemta.config.schema import (BUILTIN_PLUGINS, SENDMAIL_LISTENER, AuthSettings, Config,
                                  PluginSettings, parse_dovecot_socket, parse_listener_name)
from elemta.config.sources import FORMATS, parse
from elemta.plugins.api import PluginConfigError
from elemta.plugins.settings import ConfiguredPlugin, PluginCommon
from elemta.util.apitoken import read_token

# Listener modes on which a client must authenticate before MAIL.
AUTH_REQUIRED_MODES = ("submission", "smtps")

# Judges the files the workers read: given the Config and [(key path, file name)], it
# returns {key path: why that file cannot be read} (see load_config's check_files).
FileCheck = Callable[[Config, Sequence[Tuple[KeyPath, str]]], Dict[KeyPath, str]]

# Read later and failing closed with a log line while unreadable: the api's token file
# (every request refused) and the next hops' SASL passwords (those deliveries deferred,
# as Postfix does on a table lookup error). Loading the config does not insist on them;
# a FileCheck (elemta --check-config) is still asked about them.
_READ_LATER = (("api", "token_file"), ("delivery", "sasl_password_file"))

# The shortest api token a cluster may use: the nodes' hand-over password and the
# registrations' signing key are derived from it, and a pod inside peer_networks may guess.
MIN_CLUSTER_TOKEN = 16

# No setting holds a line break or other control character (TAB is allowed): strings from
# the config reach SMTP replies, headers and log lines (the banner, the host name), where
# a CR or LF would let the file forge protocol lines.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def default_config() -> Config:
    """The built-in development defaults: SMTP on 127.0.0.1:2525, spool under ./spool, and
    the mail name of /etc/mailname if there is one; raises ConfigError if it is bad."""
    config = Config()
    return dataclasses.replace(config, mailname=read_mailname(config.smtpd.mailname_file))


def load_config(path: Union[str, "os.PathLike[str]"],
                check_files: Union[bool, FileCheck] = True) -> Config:
    """Load and check the config file at `path`; raise ConfigError listing every problem.

    check_files says what becomes of the files the workers read (worker_files: TLS key,
    AUTH credentials, DKIM and ARC keys): True opens each as the calling process (the
    daemon); False neither opens nor checks them, for the tools every local user runs
    (sendmail, mailq, newaliases), which need no secret, as Postfix's postdrop needs none;
    a FileCheck judges them another way (elemta --check-config: as master.user).
    """
    file = os.fspath(path)
    format_name = FORMATS.get(os.path.splitext(file)[1].lower())
    if format_name is None:
        raise ConfigError.about_file(
            file, "unknown config file format: name it *.yaml, *.yml (YAML) or *.toml (TOML)")
    try:
        with open(file, "rb") as stream:
            raw = stream.read()
    except OSError as error:
        raise ConfigError.about_file(file, "cannot read the file: %s"
                                     % (error.strerror or error)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError.about_file(
            file, "the file is not UTF-8 text (byte 0x%02x)" % raw[error.start],
            raw[:error.start].count(b"\n") + 1) from None
    return load_text(file, text, check_files)


def load_text(file: str, text: str, check_files: Union[bool, FileCheck] = True) -> Config:
    """Check `text` as the contents of the config file `file` (its name picks the
    format), exactly as load_config does: what elemtactl config set runs on the text it
    is about to write, so a refused edit gets the message start-up would give."""
    format_name = FORMATS.get(os.path.splitext(file)[1].lower())
    if format_name is None:
        raise ConfigError.about_file(
            file, "unknown config file format: name it *.yaml, *.yml (YAML) or *.toml (TOML)")
    source = parse(file, text, format_name)
    checker = _Checker(file, source.lines, source.table_word, check_files)
    config = checker.build(Config, source.data, ())
    if config is _INVALID:      # cannot happen for the top level, which parse() made a dict
        config = Config()
    checker.check_across_fields(config)
    if checker.problems:
        raise ConfigError(checker.sorted_problems())
    mailname = read_mailname(config.smtpd.mailname_file,
                             "smtpd.mailname_file in %s" % file)
    warnings = tuple(Problem(file, checker.line_of(path), format_key(path), message)
                     for path, message in advice(config))
    return dataclasses.replace(config, source=file, mailname=mailname, warnings=warnings)


def plugins_from_mapping(mapping: Any, known: Optional[Dict[str, Any]] = None) -> PluginSettings:
    """The typed plugins section for {name: settings table}, built and checked as a
    config file's `plugins` would be, except that each table is on unless it says
    enabled: false (PluginManager.from_mapping, for scripts and tests). known: name ->
    plugin class, in place of the installed third-party plugins. Raises
    PluginConfigError, one line per problem, each naming plugins.NAME.KEY."""
    if isinstance(mapping, dict):
        mapping = {name: {"enabled": True, **table} if isinstance(table, dict)
                   else {"enabled": True} if table is None else table
                   for name, table in mapping.items()}
    checker = _Checker("<plugins>", {}, "table", check_files=False, known=known)
    plugins = checker.build(PluginSettings, mapping if mapping is not None else {}, ("plugins",))
    if plugins is not _INVALID:
        checker.check_plugins(plugins)
    if checker.problems:
        raise PluginConfigError("\n".join("%s: %s" % (problem.key, problem.message)
                                          for problem in checker.problems))
    return plugins


class _Invalid:
    """Marks a value that was refused (its problem is already recorded)."""

    def __repr__(self):
        return "<invalid>"


_INVALID: Any = _Invalid()


def schema_options(cls: type) -> List[dataclasses.Field]:
    """The fields of a schema dataclass a file may set (not internal ones like source)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def optional_inner(kind: Any) -> Any:
    """Optional[X] -> X; anything else -> None."""
    if typing.get_origin(kind) is Union:
        others = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(others) == 1:
            return others[0]
    return None


def sequence_item(kind: Any) -> Any:
    """Tuple[X, ...] -> X; anything else -> None."""
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def _list_item(kind: Any) -> Any:
    """List[X] or Sequence[X] -> X (read as a tuple, as third-party Settings may say);
    anything else -> None."""
    if typing.get_origin(kind) in (list, collections.abc.Sequence):
        args = typing.get_args(kind)
        return args[0] if args else Any
    return None


def type_name(kind: Any, table_word: str = "table", plural: bool = False) -> str:
    """A schema type in words: 'an integer', 'a list of strings', 'a table'."""
    inner = optional_inner(kind)
    if inner is not None:
        return type_name(inner, table_word, plural)
    item = sequence_item(kind)
    if item is not None:
        words = "list of " + type_name(item, table_word, plural=True)
        return words + "s" if plural else "a " + words
    if hasattr(kind, "type_words"):     # a type of its own (elemta.maps.TableSpec)
        singular, plural_form = kind.type_words
        words = plural_form if plural else singular
    elif dataclasses.is_dataclass(kind):
        words = (table_word + "s") if plural else "a " + table_word
    else:
        singular, plural_form = {
            str: ("a string", "strings"), int: ("an integer", "integers"),
            float: ("a number", "numbers"), bool: ("a boolean (true or false)", "booleans"),
        }[kind]
        words = plural_form if plural else singular
    return words


def _describe(value: Any, table_word: str) -> str:
    """What the file holds, in words: 'a string ("25")', 'a boolean (true)'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean (%s)" % ("true" if value else "false")
    if isinstance(value, int):
        return "an integer (%d)" % value
    if isinstance(value, float):
        return "a number (%r)" % value
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return "a string (%r)" % shown
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a " + table_word
    return "a %s (%s)" % (type(value).__name__, value)


class _Checker:
    """Builds schema dataclasses from plain data, recording each problem with its line."""

    def __init__(self, file: str, lines: Dict[KeyPath, int], table_word: str,
                 check_files: Union[bool, FileCheck] = True,
                 known: Optional[Dict[str, Any]] = None) -> None:
        self.file = file
        self.known = known          # third-party plugins: name -> class (tests)
        self.check_files = check_files
        self.lines = lines
        self.table_word = table_word
        self.problems: List[Problem] = []
        self.refused: List[KeyPath] = []    # paths whose value was refused

    # -- recording problems

    def line_of(self, path: KeyPath) -> Optional[int]:
        """The line of `path`, or of its nearest parent that the file mentions."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def report(self, path: KeyPath, message: str) -> None:
        self.problems.append(Problem(self.file, self.line_of(path), format_key(path), message))

    def refuse(self, path: KeyPath, message: str) -> Any:
        """Report a value that cannot be used; its field keeps its default."""
        self.report(path, message)
        self.refused.append(path)
        return _INVALID

    def sorted_problems(self) -> List[Problem]:
        """In file order; problems with no line (options left at their default) last."""
        return sorted(self.problems, key=lambda p: (p.line is None, p.line or 0))

    # -- types and values

    def build(self, cls: type, value: Any, path: KeyPath) -> Any:
        """A dataclass from a table; unknown keys, bad types and bad values are refused."""
        if value is None and path:
            value = {}      # a YAML section whose options are all commented out
        if not isinstance(value, dict):
            return self.refuse(path, "expected %s, not %s" % (
                type_name(cls, self.table_word), _describe(value, self.table_word)))
        fields = {f.name: f for f in schema_options(cls)}
        # A table that also takes keys the schema cannot know (third-party plugins) keeps
        # them, each typed by its plugin's Settings, in the field it names.
        other_field = getattr(cls, "other_keys_field", None)
        others = []
        for key in value:
            if key not in fields:
                if other_field is not None:
                    others.append(self.third_party_plugin(key, value[key], path + (key,)))
                else:
                    self.refuse_unknown_key(path, key, sorted(fields))
        hints = typing.get_type_hints(cls)
        settings = {}
        if other_field is not None:
            settings[other_field] = tuple(other for other in others if other is not _INVALID)
        missing = False
        for name, field in fields.items():
            if name in value:
                checked = self.value(value[name], hints[name], field, path + (name,))
                if checked is not _INVALID:
                    settings[name] = checked
            if name not in settings and field.default is dataclasses.MISSING and (
                    field.default_factory is dataclasses.MISSING):  # type: ignore
                missing = True          # a third-party plugin's setting without default
                if name not in value:
                    self.refuse(path + (name,), "is missing: this setting has no default")
        return _INVALID if missing else cls(**settings)

    def third_party_plugin(self, name: str, value: Any, path: KeyPath) -> Any:
        """A ConfiguredPlugin from the table of a plugin the schema does not know: its
        PluginCommon settings and the rest built as the plugin's own Settings class, then
        judged by the Settings' validate(path)."""
        from elemta.plugins.registry import available_plugins, load_class
        known = available_plugins() if self.known is None else self.known
        if name not in known:
            return self.refuse(path, "no such plugin (available: %s)" % ", ".join(
                sorted(set(known) | set(f.name for f in schema_options(PluginSettings)))))
        try:
            plugin_class = load_class(name, known[name])
        except PluginConfigError as error:
            return self.refuse(path, str(error).partition(": ")[2])
        if value is None:
            value = {}      # a YAML table whose settings are all commented out
        if not isinstance(value, dict):
            return self.refuse(path, "expected %s of settings, not %s" % (
                type_name(PluginCommon, self.table_word), _describe(value, self.table_word)))
        common_keys = [f.name for f in schema_options(PluginCommon)]
        own_class = plugin_class.Settings
        own_keys = [f.name for f in dataclasses.fields(own_class)] if own_class else []
        for key in value:
            if key not in common_keys and key not in own_keys:
                self.refuse_unknown_key(path, key, sorted(common_keys + own_keys))
        common = self.build(PluginCommon, {k: v for k, v in value.items()
                                           if k in common_keys}, path)
        settings = None
        if own_class is not None:
            try:
                settings = self.build(own_class, {k: v for k, v in value.items()
                                                  if k in own_keys}, path)
            except (TypeError, ValueError) as error:    # the plugin's, not the file's
                return self.refuse(path, "the plugin's Settings refused this table: %s"
                                   % (error,))
            if settings is not _INVALID:
                self.validate_plugin(settings, path)
        if common is _INVALID or settings is _INVALID:
            return _INVALID
        return ConfiguredPlugin(name, common, settings)

    def validate_plugin(self, settings: Any, path: KeyPath) -> None:
        """A plugin table's own checks across its settings (its validate(path) method):
        its error names plugins.NAME.KEY, which is mapped back onto the file's line."""
        check = getattr(settings, "validate", None)
        if check is None:
            return
        try:
            check(format_key(path))
        except PluginConfigError as error:
            key, _, message = str(error).partition(": ")
            where = parse_key_path(key)
            if where[:len(path)] != path:
                where, message = path, str(error)
            self.refuse_across(where, message)

    def refuse_unknown_key(self, path: KeyPath, key: str, known: Sequence[str]) -> None:
        guess = difflib.get_close_matches(str(key), known, n=1)
        if guess:
            hint = "did you mean %s?" % format_key(path + (guess[0],))
        else:
            hint = "known keys here: %s" % ", ".join(known)
        self.report(path + (key,), "unknown key; %s" % hint)

    def value(self, value: Any, kind: Any, field: dataclasses.Field, path: KeyPath) -> Any:
        """A field's value converted to its schema type, then judged by its check."""
        converted = self.convert(value, kind, path)
        check = field.metadata.get("check")
        if converted is _INVALID or check is None or converted == field.default:
            return converted
        message = check(converted)
        if message is None:
            return converted
        if isinstance(converted, tuple):
            # Point at the list item that is wrong, when the check says so of one alone.
            for index, item in enumerate(converted):
                item_message = check((item,))
                if item_message is not None:
                    return self.refuse(path + (index,), item_message)
        return self.refuse(path, message)

    def convert(self, value: Any, kind: Any, path: KeyPath) -> Any:
        """`value` as schema type `kind` (str, int, float, bool, Optional, Tuple, dataclass,
        or a type with a from_config classmethod such as elemta.maps.TableSpec)."""
        from_config = getattr(kind, "from_config", None)
        if from_config is not None:
            try:
                return from_config(value)
            except ValueError as error:
                return self.refuse(path, str(error))
        if dataclasses.is_dataclass(kind):
            return self.build(kind, value, path)
        inner = optional_inner(kind)
        if inner is not None:
            return None if value is None else self.convert(value, inner, path)
        if kind is Any:
            return value            # a third-party plugin's untyped setting
        item = sequence_item(kind) or _list_item(kind)
        if item is not None:
            if not isinstance(value, list):
                return self.wrong_type(value, kind, path)
            items = tuple(self.convert(v, item, path + (i,)) for i, v in enumerate(value))
            return _INVALID if any(v is _INVALID for v in items) else items
        if kind is bool:
            return value if isinstance(value, bool) else self.wrong_type(value, kind, path)
        if kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return self.wrong_type(value, kind, path)
        if kind is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return self.wrong_type(value, kind, path)
            if not math.isfinite(value):
                return self.refuse(path, "must be a finite number, not %r" % value)
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                return self.wrong_type(value, kind, path)
            control = _CONTROL_CHARACTER.search(value)
            if control:
                return self.refuse(path, "must not contain control characters (found %s)"
                                   % ascii(control.group()))
            return value
        raise TypeError("elemta.config.loader cannot read schema type %r at %s"
                        % (kind, format_key(path)))

    def wrong_type(self, value: Any, kind: Any, path: KeyPath) -> Any:
        return self.refuse(path, "expected %s, not %s" % (
            type_name(kind, self.table_word), _describe(value, self.table_word)))

    # -- checks that span fields

    def check_across_fields(self, config: Config) -> None:
        """TLS and AUTH files, what each listener mode needs, clashing listeners."""
        tls, auth = config.tls, config.auth
        cert, key = ("tls", "cert_file"), ("tls", "key_file")
        # (The api's pair too: half of it would serve the api token over plain http.)
        for section, pair in ((tls, (cert, key)),
                              (config.api, (("api", "cert_file"), ("api", "key_file")))):
            if (section.cert_file is None) != (section.key_file is None):
                given, missing = pair if section.cert_file is not None else pair[::-1]
                self.refuse_across(given, "is set but %s is not: set both or neither"
                                   % format_key(missing), [missing])
        if auth.backend == "dovecot" and auth.dovecot_socket is None:
            self.refuse_across(("auth", "backend"), "dovecot needs auth.dovecot_socket "
                               "(the path of Dovecot's auth socket, or inet:host:port)",
                               [("auth", "dovecot_socket")])
        self.check_worker_files(config)

        if not config.listeners:
            self.refuse_across(("listeners",), "at least one listener is needed")
        has_certificate = tls.cert_file is not None and tls.key_file is not None
        first_on: Dict[Tuple[Any, int], int] = {}
        for index, listener in enumerate(config.listeners):
            mode_path = ("listeners", index, "mode")
            if listener.mode == "smtps" and not has_certificate:
                self.refuse_across(mode_path, "smtps (implicit TLS) needs a certificate: "
                                   "set tls.cert_file and tls.key_file", [cert, key])
            # (The dovecot backend always needs its socket: said once, of auth.backend.)
            if (listener.mode in AUTH_REQUIRED_MODES and auth.backend == "file"
                    and auth.credentials_file is None):
                self.refuse_across(mode_path, "%s requires AUTH before MAIL: set "
                                   "auth.credentials_file" % listener.mode,
                                   [("auth", "credentials_file"), ("auth", "backend")])
            if listener.mode == "handover" and not (config.api.token_file
                                                    or config.api.token):
                self.refuse_across(mode_path, "handover logs the nodes in with the "
                                   "cluster's api token: set api.token_file",
                                   [("api", "token_file")])
            endpoint = (ipaddress.ip_address(listener.address), listener.port)
            if endpoint in first_on:
                other = first_on[endpoint]
                self.refuse_across(("listeners", index), "%s port %d is already used by %s"
                                   % (listener.address, listener.port,
                                      format_key(("listeners", other))),
                                   [("listeners", i, key) for i in (index, other)
                                    for key in ("address", "port")], involves_path=False)
            else:
                first_on[endpoint] = index

        self.check_acme(config)
        self.check_cluster(config)
        self.check_delivery(config)
        self.check_priority_rules(config)
        self.check_address_classes(config)
        self.check_plugins(config.plugins)
        self.check_tables(config)

    def check_cluster(self, config: Config) -> None:
        """A registration must outlive the time to the next one, or a live node would
        keep dropping out of the cluster view."""
        cluster = config.cluster
        if cluster.node_ttl <= cluster.heartbeat_interval:
            self.refuse_across(("cluster", "node_ttl"), "must be longer than "
                               "cluster.heartbeat_interval (%g), or a running node drops "
                               "out of the cluster view between two heartbeats"
                               % cluster.heartbeat_interval,
                               [("cluster", "heartbeat_interval")])
        if cluster.store or any(l.mode == "handover" for l in config.listeners):
            self.check_cluster_token(config.api)

    def check_cluster_token(self, api) -> None:
        """A guessable api token would open the hand-over login and the registry to any
        pod. The token file may be unreadable here (it is read later, as master.user);
        then its length is judged when it is read, by elemta --check-config's file check
        and the node that fails to log in."""
        if api.token_file:
            path = ("api", "token_file")
        elif api.token:
            path = ("api", "token")
        else:
            return              # a handover listener without one is refused on its own
        token, _ = read_token(api)
        if token is not None and len(token) < MIN_CLUSTER_TOKEN:
            self.refuse_across(path, "the cluster's api token is %d bytes, fewer than %d: "
                               "the nodes' hand-over login and signed registrations are "
                               "derived from it (make one with: openssl rand -hex 32)"
                               % (len(token), MIN_CLUSTER_TOKEN))

    def check_priority_rules(self, config: Config) -> None:
        """A rule's listener must be one of the listeners (or sendmail): a typo would
        otherwise never match, silently."""
        endpoints = {(ipaddress.ip_address(listener.address), listener.port)
                     for listener in config.listeners}
        for index, rule in enumerate(config.queue.priority_rules):
            if rule.listener is None or rule.listener == SENDMAIL_LISTENER:
                continue
            if parse_listener_name(rule.listener) not in endpoints:
                self.refuse_across(
                    ("queue", "priority_rules", index, "listener"),
                    "%s is not one of the listeners (write a listener's address:port, "
                    "or sendmail)" % rule.listener, [("listeners",)])

    def check_worker_files(self, config: Config) -> None:
        """Secrets and certificates the workers read at start: say now, not in a
        respawn loop or a 451 on every message (see load_config's check_files)."""
        if self.check_files is False:
            return
        sockets = worker_sockets(config)
        files = worker_files(config) + sockets
        if self.check_files is True:
            later = (set(_READ_LATER) | {path for path, _ in table_files(config)}
                     | {path for path, _ in sockets})
            files = [(path, name) for path, name in files if path not in later]
            reasons = {path: why for path, why in
                       ((path, _unreadable(name)) for path, name in files) if why}
        else:
            reasons = self.check_files(config, files)
        for path, filename in files:
            if path in reasons:
                verb = "connect to" if (path, filename) in sockets else "read"
                self.refuse_across(path, "cannot %s %s: %s" % (verb, filename, reasons[path]))

    def check_tables(self, settings: Any) -> None:
        """The files of the lookup tables named (regexp patterns, SQL .cf settings), read
        now so their errors (file:line) show at load, not as 451s. The tools every user
        runs (check_files False) read none: the .cf files hold database passwords."""
        if self.check_files is False:
            return
        for path, spec in own_typed_values(settings):
            message = spec.check() if hasattr(spec, "check") else None
            if message:
                self.refuse_across(path, message)

    def check_plugins(self, plugins: PluginSettings) -> None:
        """Each built-in plugin that runs, by its table's own checks across settings (a
        DKIM signing key needs a domain...). Third-party tables had theirs when built."""
        for plugin in plugins.to_run():
            if plugin.name in BUILTIN_PLUGINS + ("authres",):
                self.validate_plugin(plugin.settings, ("plugins", plugin.name))

    def check_acme(self, config: Config) -> None:
        """Certificate names unique, each with names; tls.acme names one of them."""
        acme, tls = config.acme, config.tls
        seen: Dict[str, int] = {}
        for index, certificate in enumerate(acme.certificates):
            if not certificate.domains:
                self.refuse_across(("acme", "certificates", index, "domains"),
                                   "a certificate needs at least one name")
            if certificate.name in seen:
                self.refuse_across(("acme", "certificates", index, "name"),
                                   "%r is already the name of %s" % (
                                       certificate.name, format_key(
                                           ("acme", "certificates", seen[certificate.name]))))
            seen.setdefault(certificate.name, index)
        if tls.acme is None:
            return
        if not acme.enabled:
            self.refuse_across(("tls", "acme"), "needs acme.enabled: true",
                               [("acme", "enabled")])
        if tls.acme not in seen:
            self.refuse_across(("tls", "acme"), "%r is not the name of an acme.certificates "
                               "entry (%s)" % (tls.acme, ", ".join(seen) or "there is none"),
                               [("acme", "certificates")])

    def check_delivery(self, config: Config) -> None:
        """Backoff bounds in order; transport entries complete and not repeated."""
        delivery = config.delivery
        if delivery.min_backoff > delivery.max_backoff:
            self.refuse_across(("delivery", "min_backoff"), "is %g, more than "
                               "delivery.max_backoff (%g)" % (delivery.min_backoff,
                                                               delivery.max_backoff),
                               [("delivery", "max_backoff")])
        seen: Dict[str, int] = {}
        for index, entry in enumerate(delivery.transport):
            for key in ("domain", "nexthop"):
                if not getattr(entry, key):
                    self.refuse_across(("delivery", "transport", index, key),
                                       "is missing: each entry needs a domain and a nexthop")
            domain = normal_domain(entry.domain)
            if domain in seen:
                self.refuse_across(("delivery", "transport", index, "domain"),
                                   "%s is already in delivery.transport[%d]"
                                   % (entry.domain, seen[domain]))
            elif domain:
                seen[domain] = index

    def check_address_classes(self, config: Config) -> None:
        """A domain belongs to one address class: local, virtual alias, virtual mailbox
        or relay (Postfix warns of a domain in two; here it is refused, since the
        class decides who may send to it and where its mail goes). Only domains written
        in the file can be compared; a table's keys are looked up, in class order, when
        mail comes."""
        hostname = (config.smtpd.hostname,) if config.smtpd.hostname else ()
        lists = [("local", ("smtpd", "hostname"), hostname),
                 ("local", ("relay", "local_domains"), config.relay.local_domains),
                 ("alias", ("virtual", "alias_domains"), config.virtual.alias_domains.domains),
                 ("mailbox", ("virtual", "mailbox_domains"),
                  config.virtual.mailbox_domains.domains),
                 ("relay", ("relay", "relay_domains"), config.relay.relay_domains.domains)]
        seen: Dict[str, Tuple[str, KeyPath]] = {}
        for address_class, path, domains in lists:
            for index, domain in enumerate(domains):
                name = normal_domain(domain)
                where = path if path == ("smtpd", "hostname") else path + (index,)
                if name in seen and seen[name][0] != address_class:
                    self.refuse_across(where, "%s is already in %s: a domain belongs "
                                       "to one address class" % (
                                           domain, format_key(seen[name][1])),
                                       [seen[name][1]])
                else:
                    seen.setdefault(name, (address_class, where))

    def refuse_across(self, path: KeyPath, message: str,
                      also_involves: Sequence[KeyPath] = (), involves_path: bool = True) -> None:
        """Report a cross-field problem, unless it may only follow from a value already
        refused (a refused value is left at its default, which may not fit the rest)."""
        involved = ((path,) if involves_path else ()) + tuple(also_involves)
        for one in involved:
            for refused in self.refused:
                common = min(len(one), len(refused))
                if one[:common] == refused[:common]:
                    return
        self.report(path, message)


def worker_files(config: Config) -> List[Tuple[KeyPath, str]]:
    """Every file a worker opens as master.user, with the key that names it: the TLS
    certificate and key, the AUTH credentials (backend file), the DKIM and ARC signing keys in use, the
    api's token file, the next hops' SASL passwords, the CAs outbound STARTTLS trusts,
    the ACME server's CA file and the CAs MTA-STS trusts."""
    tls, plugins, api = config.tls, config.plugins, config.api
    files: List[Tuple[KeyPath, Optional[str]]] = [
        (("tls", "cert_file"), tls.cert_file), (("tls", "key_file"), tls.key_file),
        (("auth", "credentials_file"),
         config.auth.credentials_file if config.auth.backend == "file" else None)]
    if plugins.dkim.enabled and plugins.dkim.sign:
        files.append((("plugins", "dkim", "key_file"), plugins.dkim.key_file))
        files += [(("plugins", "dkim", "keys", i, "key_file"), key.key_file)
                  for i, key in enumerate(plugins.dkim.keys)]
    if plugins.arc.enabled and plugins.arc.seal:
        files.append((("plugins", "arc", "key_file"), plugins.arc.key_file))
    if api.enabled:
        files.append((("api", "token_file"), api.token_file))
        files.append((("api", "cert_file"), api.cert_file))
        files.append((("api", "key_file"), api.key_file))
    files.append((("delivery", "sasl_password_file"), config.delivery.sasl_password_file))
    files.append((("delivery", "tls_ca_file"), config.delivery.tls_ca_file))
    files.append((("cluster", "peer_ca_file"), config.cluster.peer_ca_file))
    if config.acme.enabled:
        files.append((("acme", "ca_file"), config.acme.ca_file))
    if config.tlsrpt.enabled:
        files.append((("tlsrpt", "https_ca_file"), config.tlsrpt.https_ca_file))
    if config.delivery.mta_sts or any(entry.level == "mta-sts"
                                      for entry in config.delivery.tls_policy):
        files.append((("delivery", "mta_sts_ca_file"), config.delivery.mta_sts_ca_file))
    files += table_files(config)
    return [(path, name) for path, name in files if name]


def worker_sockets(config: Config) -> List[Tuple[KeyPath, str]]:
    """Every unix socket a worker connects to as master.user, with the key that names it:
    Dovecot's auth socket. Connected to later, by the smtpd (454 4.7.0 to AUTH while it
    cannot be): loading does not insist on it (Dovecot may start after Elemta), elemta
    --check-config connects to it as master.user."""
    auth = config.auth
    if auth.backend != "dovecot" or not auth.dovecot_socket:
        return []
    kind, path, _ = parse_dovecot_socket(auth.dovecot_socket)
    return [(("auth", "dovecot_socket"), path)] if kind == "unix" else []


def auth_configured(auth: AuthSettings) -> bool:
    """True if the AUTH backend chosen has what it needs, so AUTH can be offered."""
    if auth.backend == "dovecot":
        return auth.dovecot_socket is not None
    return auth.credentials_file is not None


def own_typed_values(settings: Any, path: KeyPath = ()) -> List[Tuple[KeyPath, Any]]:
    """(key path, value) of every value of a type of its own (one with from_config, such
    as a lookup table's TableSpec) in a config or a part of it."""
    if hasattr(type(settings), "from_config"):
        return [(path, settings)]
    if isinstance(settings, tuple):
        return [found for index, item in enumerate(settings)
                for found in own_typed_values(item, path + (index,))]
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return [found for field in schema_options(type(settings))
                for found in own_typed_values(getattr(settings, field.name),
                                              path + (field.name,))]
    if isinstance(settings, ConfiguredPlugin):
        return own_typed_values(settings.settings, path)
    return []


def table_files(config: Config) -> List[Tuple[KeyPath, str]]:
    """The file each lookup table in the config reads (FILE.lmdb, a regexp file, an SQL
    .cf file). Read later, by the lookups, which fail temporarily while one cannot be
    read (mail waits): loading does not insist on them, elemta --check-config asks."""
    return [(path, name) for path, spec in own_typed_values(config)
            for name in getattr(spec, "worker_files", ())]


def parse_key_path(text: str) -> KeyPath:
    """'plugins.dkim.keys[0].domain' -> ('plugins', 'dkim', 'keys', 0, 'domain')."""
    path: List[Any] = []
    for part in text.split("."):
        name, _, rest = part.partition("[")
        if name:
            path.append(name)
        for index in rest.split("[") if rest else ():
            index = index.rstrip("]")
            path.append(int(index) if index.isdigit() else index)
    return tuple(path)


def _unreadable(filename: str) -> Optional[str]:
    """Why `filename` cannot be read, or None if it can."""
    try:
        with open(filename, "rb"):
            return None
    except OSError as error:
        return error.strerror or str(error)
