"""Tests for the configuration loader, the example files and elemta.conf(5).

Each test writes a real file, loads it the way every Elemta process does, and checks
what an administrator would see: the Config, or the FILE:LINE: KEY.PATH: message lines.
Error cases run against YAML and TOML alike.
See also: elemta/config/loader.py, etc/elemta.*.example, man/elemta.conf.5.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import typing

import pytest
import tomlkit
from ruamel.yaml import YAML

from elemta.config import Config, ConfigError, default_config, load_config
from elemta.config import manpage
from elemta.config.schema import Listener, MasterSettings, QueueSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML_EXAMPLE = os.path.join(ROOT, "etc", "elemta.yaml.example")
TOML_EXAMPLE = os.path.join(ROOT, "etc", "elemta.toml.example")
MAN_PAGE = os.path.join(ROOT, "man", "elemta.conf.5")


def write(directory, name, text):
    path = os.path.join(str(directory), name)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
    return path


def load_error(path):
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value


def uncomment(text):
    """Enable the example settings: '#' directly followed by a setting (not prose)."""
    return re.sub(r"(?m)^(\s*)#(?=[^\s#])", r"\1", text)


def read(path):
    with open(path, encoding="utf-8") as stream:
        return stream.read()


# -- defaults and successful loads

def test_default_config_is_the_development_setup():
    config = default_config()
    assert [(l.address, l.port, l.mode) for l in config.listeners] == [
        ("127.0.0.1", 2525, "smtp")]
    assert config.queue.spool_dir == "./spool"
    assert config.source is None


@pytest.mark.parametrize("name", ["empty.yaml", "empty.yml", "empty.toml"])
def test_an_empty_file_gives_the_defaults(tmp_path, name):
    path = write(tmp_path, name, "# nothing set\n")
    config = load_config(path)
    assert config == default_config()
    assert config.source == path


@pytest.mark.parametrize("name,text", [
    ("c.yaml", "limits:\n  message_size: 1000\ntimeouts:\n  command: 60\n"
               "relay:\n  local_domains: [example.org, example.net]\n"),
    ("c.toml", "[limits]\nmessage_size = 1000\n[timeouts]\ncommand = 60\n"
               "[relay]\nlocal_domains = ['example.org', 'example.net']\n"),
])
def test_values_are_typed_frozen_and_missing_keys_take_defaults(tmp_path, name, text):
    config = load_config(write(tmp_path, name, text))
    assert config.limits.message_size == 1000
    assert config.limits.recipients == 1000                 # not in the file
    assert config.timeouts.command == 60.0 and isinstance(config.timeouts.command, float)
    assert config.relay.local_domains == ("example.org", "example.net")
    assert isinstance(config.listeners, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.message_size = 5


def test_toml_listeners_as_inline_tables_and_dotted_keys(tmp_path):
    path = write(tmp_path, "c.toml",
                 'limits.errors = 5\n'
                 'listeners = [{address = "::1", port = 2526}, '
                 '{address = "127.0.0.1", port = 2527, mode = "smtp"}]\n')
    config = load_config(path)
    assert config.limits.errors == 5
    assert config.listeners == (Listener("::1", 2526, "smtp"),
                                Listener("127.0.0.1", 2527, "smtp"))


def test_a_yaml_section_with_every_option_commented_out_takes_its_defaults(tmp_path):
    config = load_config(write(tmp_path, "c.yaml", "tls:\n  #cert_file: x\nlimits:\n"))
    assert config == default_config()


# -- the example files

def copy_example(tmp_path, example, name, transform=lambda text: text):
    return write(tmp_path, name, transform(read(example)))


def test_examples_load_to_the_same_packaged_config(tmp_path):
    from_yaml = load_config(copy_example(tmp_path, YAML_EXAMPLE, "elemta.yaml"))
    from_toml = load_config(copy_example(tmp_path, TOML_EXAMPLE, "elemta.toml"))
    assert from_yaml == from_toml
    # Everything at its default but the packaged listener, spool and workers' user.
    assert from_yaml == dataclasses.replace(
        default_config(), listeners=(Listener("127.0.0.1", 25, "smtp"),),
        queue=QueueSettings(spool_dir="/var/spool/elemta"),
        master=MasterSettings(user="elemta", group="elemta"))


def test_examples_with_every_setting_enabled_agree(tmp_path):
    """The commented-out listeners, TLS and AUTH settings are valid, and the same."""
    etc = tmp_path / "etc-elemta"
    (etc / "tls").mkdir(parents=True)
    for name in ("tls/cert.pem", "tls/key.pem", "credentials", "acme-ca.pem", "api.crt",
                 "api.key", "cluster-ca.pem"):
        (etc / name).write_text("placeholder\n")
    for name in ("header_checks", "mime_header_checks", "nested_header_checks",
                 "body_checks"):
        (etc / name).write_text("/^Subject: spam/ REJECT\n")

    def enable(text):
        return uncomment(text).replace("/etc/elemta/", str(etc) + "/")
    from_yaml = load_config(copy_example(tmp_path, YAML_EXAMPLE, "all.yaml", enable))
    from_toml = load_config(copy_example(tmp_path, TOML_EXAMPLE, "all.toml", enable))
    assert from_yaml == from_toml
    assert [(l.port, l.mode) for l in from_yaml.listeners] == [
        (25, "smtp"), (587, "submission"), (465, "smtps")]
    assert from_yaml.tls.cert_file == str(etc / "tls/cert.pem")
    assert from_yaml.auth.credentials_file == str(etc / "credentials")


def schema_key_paths(cls=Config, prefix=""):
    """Every option's key path, from the dataclasses: smtpd.hostname, listeners[].port, ..."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("internal"):
            continue
        kind = hints[field.name]
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            yield from schema_key_paths(kind, prefix + field.name + ".")
        elif args and dataclasses.is_dataclass(args[0]) and \
                not hasattr(args[0], "from_config"):     # a lookup table is one value
            yield prefix + field.name, field
            yield from schema_key_paths(args[0], prefix + field.name + "[].")
        else:
            yield prefix + field.name, field


def key_paths_in(data, prefix=""):
    found = set()
    for key, value in data.items():
        found.add(prefix + key)
        if isinstance(value, dict):
            found |= key_paths_in(value, prefix + key + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                found |= key_paths_in(item, prefix + key + "[].")
    return found


def test_examples_show_every_option():
    yaml_data = YAML(typ="safe").load(uncomment(read(YAML_EXAMPLE)))
    toml_data = tomlkit.parse(uncomment(read(TOML_EXAMPLE))).unwrap()
    for data in (yaml_data, toml_data):
        missing = {key for key, _ in schema_key_paths()} - key_paths_in(data)
        assert not missing


# -- errors, each for YAML and TOML: (yaml text, line, toml text, line, key, message part)

ERROR_CASES = {
    "a domain class name that is no label value": (
        "delivery:\n  domain_classes:\n    - name: Big Mail\n      domains: [gmail.com]\n",
        3, '[[delivery.domain_classes]]\nname = "Big Mail"\ndomains = ["gmail.com"]\n', 2,
        "delivery.domain_classes[0].name", "must be a short name of lower-case letters"),
    "a domain class twice": (
        "delivery:\n  domain_classes:\n    - {name: big, domains: [a.test]}\n"
        "    - {name: big, domains: [b.test]}\n", 2,
        '[delivery]\ndomain_classes = [{name = "big", domains = ["a.test"]}, '
        '{name = "big", domains = ["b.test"]}]\n', 2,
        "delivery.domain_classes", "class big is named twice"),
    "a journal socket that is not a path": (
        "logging:\n  target: journal\n  journal_socket: journal.sock\n", 3,
        '[logging]\ntarget = "journal"\njournal_socket = "journal.sock"\n', 3,
        "logging.journal_socket", "absolute"),
    "unknown top-level key": (
        "smtpd:\n  banner: hi\nsmtp:\n  banner: x\n", 3,
        '[smtpd]\nbanner = "hi"\n[smtp]\nbanner = "x"\n', 3,
        "smtp", "unknown key; did you mean smtpd?"),
    "unknown nested key": (
        "limits:\n  errors: 3\n  mesage_size: 5\n", 3,
        "[limits]\nerrors = 3\nmesage_size = 5\n", 3,
        "limits.mesage_size", "did you mean limits.message_size?"),
    "unknown key without a close match": (
        "queue:\n  zzz: 1\n", 2, "[queue]\nzzz = 1\n", 2,
        "queue.zzz", "known keys here: index_map_size, min_free_space, priority_rules, "
                     "spool_dir, sync_method"),
    "string for an integer": (
        "limits:\n  recipients: '10'\n", 2, '[limits]\nrecipients = "10"\n', 2,
        "limits.recipients", "expected an integer, not a string ('10')"),
    "boolean is not an integer": (
        "limits:\n  errors: true\n", 2, "[limits]\nerrors = true\n", 2,
        "limits.errors", "expected an integer, not a boolean (true)"),
    "integer is not a boolean": (
        "auth:\n  allow_plaintext: 1\n", 2, "[auth]\nallow_plaintext = 1\n", 2,
        "auth.allow_plaintext", "expected a boolean (true or false), not an integer (1)"),
    "string where a list is expected": (
        "relay:\n  local_domains: example.org\n", 2,
        '[relay]\nlocal_domains = "example.org"\n', 2,
        "relay.local_domains", "expected a list of strings, not a string ('example.org')"),
    "scalar where a section is expected": (
        "limits: 5\n", 1, "limits = 5\n", 1,
        "limits", "expected a "),
    "bad value": (
        "logging:\n  level: loud\n", 2, '[logging]\nlevel = "loud"\n', 2,
        "logging.level", "must be one of debug, info, warning, error, not 'loud'"),
    "zero message size": (
        "limits:\n  message_size: 0\n", 2, "[limits]\nmessage_size = 0\n", 2,
        "limits.message_size", "must be greater than 0"),
    "bad listener mode": (
        "listeners:\n  - port: 2525\n  - port: 2526\n    mode: lmtp\n", 4,
        '[[listeners]]\nport = 2525\n[[listeners]]\nport = 2526\nmode = "lmtp"\n', 5,
        "listeners[1].mode", "must be one of smtp, submission, smtps, handover, not 'lmtp'"),
    "port 70000": (
        "listeners:\n  - address: 0.0.0.0\n    port: 70000\n", 3,
        '[[listeners]]\naddress = "0.0.0.0"\nport = 70000\n', 3,
        "listeners[0].port", "must be a TCP port between 1 and 65535, not 70000"),
    "bad listener address": (
        "listeners:\n  - address: localhost\n", 2, '[[listeners]]\naddress = "localhost"\n', 2,
        "listeners[0].address", "must be an IPv4 or IPv6 address"),
    "listener that is not a table": (
        "listeners:\n  - 25\n", 2, "listeners = [\n  25,\n]\n", 2,
        "listeners[0]", "expected a "),
    "bad network": (
        "relay:\n  mynetworks:\n    - 10.0.0.0/8\n    - 10.0.0.300/8\n", 4,
        '[relay]\nmynetworks = [\n  "10.0.0.0/8",\n  "10.0.0.300/8",\n]\n', 4,
        "relay.mynetworks[1]", "'10.0.0.300/8' is not an IP network"),
    "smtps without certificates": (
        "auth: {credentials_file: CERT}\n"
        "listeners:\n  - port: 2525\n  - port: 4650\n    mode: smtps\n", 5,
        '[[listeners]]\nport = 2525\n[[listeners]]\nport = 4650\nmode = "smtps"\n'
        '[auth]\ncredentials_file = "CERT"\n', 5,
        "listeners[1].mode", "smtps (implicit TLS) needs a certificate"),
    "submission without credentials": (
        "listeners:\n  - port: 5870\n    mode: submission\n", 3,
        '[[listeners]]\nport = 5870\nmode = "submission"\n', 3,
        "listeners[0].mode", "submission requires AUTH before MAIL: set auth.credentials_file"),
    "dovecot backend without its socket": (
        "auth:\n  backend: dovecot\n", 2, '[auth]\nbackend = "dovecot"\n', 2,
        "auth.backend", "dovecot needs auth.dovecot_socket"),
    "dovecot socket neither a path nor inet:host:port": (
        "auth:\n  backend: dovecot\n  dovecot_socket: private/auth\n", 3,
        '[auth]\nbackend = "dovecot"\ndovecot_socket = "private/auth"\n', 3,
        "auth.dovecot_socket", "write the absolute path of Dovecot's auth socket or "
                               "inet:host:port"),
    "certificate without key": (
        "tls:\n  min_version: TLSv1.3\n  cert_file: CERT\n", 3,
        '[tls]\nmin_version = "TLSv1.3"\ncert_file = "CERT"\n', 3,
        "tls.cert_file", "is set but tls.key_file is not: set both or neither"),
    "api certificate without key (the token would go over plain http)": (
        "api:\n  port: 8025\n  cert_file: CERT\n", 3,
        '[api]\nport = 8025\ncert_file = "CERT"\n', 3,
        "api.cert_file", "is set but api.key_file is not: set both or neither"),
    "unreadable credentials file": (
        "auth:\n  credentials_file: /nonexistent/credentials\n", 2,
        '[auth]\ncredentials_file = "/nonexistent/credentials"\n', 2,
        "auth.credentials_file", "cannot read /nonexistent/credentials: No such file"),
    "two listeners on one address and port": (
        "listeners:\n  - {address: '::', port: 2525}\n  - {address: '0::0', port: 2525}\n", 3,
        '[[listeners]]\naddress = "::"\nport = 2525\n[[listeners]]\naddress = "0::0"\n'
        'port = 2525\n', 4,
        "listeners[1]", "0::0 port 2525 is already used by listeners[0]"),
    "cluster node name with a space": (
        "cluster:\n  node_name: mx 1\n", 2, '[cluster]\nnode_name = "mx 1"\n', 2,
        "cluster.node_name", "must be 1 to 63 letters, digits, dots, hyphens or "
                             "underscores"),
    "cluster api_url with a path": (
        "cluster:\n  api_url: http://10.0.0.2:8025/api/v1\n", 2,
        '[cluster]\napi_url = "http://10.0.0.2:8025/api/v1"\n', 2,
        "cluster.api_url", "must name only the api's scheme, host and port (no path)"),
    "cluster sentinel URL without the monitored name": (
        "cluster:\n  store: redis+sentinel://10.0.0.2,10.0.0.3:26380\n", 2,
        '[cluster]\nstore = "redis+sentinel://10.0.0.2,10.0.0.3:26380"\n', 2,
        "cluster.store", "must end in /service or /service/db"),
    "cluster hand-over address with a bad port": (
        "cluster:\n  handover_address: 10.0.0.2:smtp\n", 2,
        '[cluster]\nhandover_address = "10.0.0.2:smtp"\n', 2,
        "cluster.handover_address", "the port in '10.0.0.2:smtp' is not a number"),
    "cluster peer network that is none": (
        "cluster:\n  peer_networks: [10.0.0.300/24]\n", 2,
        '[cluster]\npeer_networks = ["10.0.0.300/24"]\n', 2,
        "cluster.peer_networks[0]", "'10.0.0.300/24' is not an IP network"),
    # A live node would drop out of the cluster view between two of its heartbeats.
    "cluster registration shorter than its heartbeat": (
        "cluster:\n  heartbeat_interval: 10\n  node_ttl: 5\n", 3,
        "[cluster]\nheartbeat_interval = 10\nnode_ttl = 5\n", 3,
        "cluster.node_ttl", "must be longer than cluster.heartbeat_interval (10)"),
    "no listeners": (
        "listeners: []\n", 1, "listeners = []\n", 1,
        "listeners", "at least one listener is needed"),
    # The banner goes into the 220 greeting: a line break would forge a reply line.
    "line break in a string": (
        'smtpd:\n  banner: "ESMTP\\r\\n250 forged"\n', 2,
        '[smtpd]\nbanner = "ESMTP\\r\\n250 forged"\n', 2,
        "smtpd.banner", "must not contain control characters (found '\\r')"),
    "not a number": (
        "timeouts:\n  command: .nan\n", 2, "[timeouts]\ncommand = nan\n", 2,
        "timeouts.command", "must be a finite number"),
    # The built-in plugins' tables are their own Settings: checked by the same loader.
    "plugin option of the wrong type": (
        "plugins:\n  spf:\n    enforce: 'yes'\n", 3, '[plugins.spf]\nenforce = "yes"\n', 2,
        "plugins.spf.enforce", "expected a boolean (true or false), not a string ('yes')"),
    "unknown plugin option": (
        "plugins:\n  dmarc:\n    enforc: true\n", 3, "[plugins.dmarc]\nenforc = true\n", 2,
        "plugins.dmarc.enforc", "unknown key; did you mean plugins.dmarc.enforce?"),
    "plugin option out of range": (
        "plugins:\n  greylist:\n    enabled: true\n    ipv4_prefix: 40\n", 4,
        "[plugins.greylist]\nenabled = true\nipv4_prefix = 40\n", 3,
        "plugins.greylist.ipv4_prefix", "must be between 8 and 32, not 40"),
    "bad value in a plugin's list of tables": (
        "plugins:\n  dkim:\n    keys:\n      - {domain: a.test, selector: s, key_file: /k}\n"
        "      - {domain: a.test, selector: s, key_file: /k, algorithm: rsa}\n", 5,
        '[[plugins.dkim.keys]]\ndomain = "a.test"\nselector = "s"\nkey_file = "/k"\n'
        '[[plugins.dkim.keys]]\ndomain = "a.test"\nselector = "s"\nkey_file = "/k"\n'
        'algorithm = "rsa"\n', 9,
        "plugins.dkim.keys[1].algorithm", "must be one of rsa-sha256, ed25519-sha256"),
    "plugin check across options": (
        "plugins:\n  greylist:\n    enabled: true\n    delay: 600\n    retry_window: 300\n",
        5, "[plugins.greylist]\nenabled = true\ndelay = 600\nretry_window = 300\n", 4,
        "plugins.greylist.retry_window", "shorter than delay (600 s)"),
    "plugin check across options, naming a key the file does not have": (
        "plugins:\n  dkim:\n    enabled: true\n    sign: true\n", 2,
        "[plugins.dkim]\nenabled = true\nsign = true\n", 1,
        "plugins.dkim.key_file", "sign is true but no key is configured"),
    "table of a plugin that is not installed": (
        "plugins:\n  nosuch:\n    enabled: true\n", 2, "[plugins.nosuch]\nenabled = true\n", 1,
        "plugins.nosuch", "no such plugin (available: arc, authres, "),
}


def assert_reports(error, path, line, key, message_part):
    """`error` has a line 'PATH:LINE: KEY: ...message_part...'."""
    prefix = "%s:%d: %s: " % (path, line, key)
    lines = str(error).splitlines()
    assert any(l.startswith(prefix) and message_part in l for l in lines), \
        "no %r ... %r in:\n%s" % (prefix, message_part, error)


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_each_error_names_file_line_and_key(tmp_path, case, fmt):
    yaml_text, yaml_line, toml_text, toml_line, key, message_part = ERROR_CASES[case]
    text, line = (yaml_text, yaml_line) if fmt == "yaml" else (toml_text, toml_line)
    cert = write(tmp_path, "cert.pem", "placeholder\n")
    path = write(tmp_path, "elemta." + fmt, text.replace("CERT", cert))
    error = load_error(path)
    assert len(error.problems) == 1, str(error)
    problem = error.problems[0]
    assert (problem.file, problem.line, problem.key) == (path, line, key)
    assert_reports(error, path, line, key, message_part)


@pytest.mark.parametrize("name,text,line,message_part", [
    ("bad.yaml", "limits:\n  errors: 3\n  recipients: [1,\nlogging: {}\n", 5,
     "YAML syntax error: expected ',' or ']', but got '<stream end>' "
     "(while parsing a flow sequence that starts on line 3)"),
    ("tab.yaml", "limits:\n  errors: 3\n\trecipients: 4\n", 3, "YAML syntax error"),
    ("dup.yaml", "limits:\n  errors: 3\n  errors: 4\n", 3, 'duplicate key "errors"'),
    ("bad.toml", "[limits]\nerrors = 3\nrecipients = \n", 3, "TOML syntax error"),
    ("dup.toml", "[limits]\nerrors = 3\n\nerrors = 4\n", 4, 'Key "errors" already exists'),
    ("duptable.toml", "[limits]\nerrors = 3\n[tls]\n[limits]\n", 4, 'TOML syntax error'),
    ("list.yaml", "- 1\n- 2\n", 1, "must be a mapping of option sections"),
    ("header.toml", "[limits\nerrors = 3\n", 1, 'TOML syntax error'),
])
def test_syntax_errors_name_file_and_line(tmp_path, name, text, line, message_part):
    path = write(tmp_path, name, text)
    error = load_error(path)
    assert [(p.file, p.line) for p in error.problems] == [(path, line)]
    assert str(error).startswith("%s:%d: " % (path, line)) and message_part in str(error)


def test_missing_file_is_named(tmp_path):
    path = str(tmp_path / "absent.toml")
    error = load_error(path)
    assert str(error) == "%s: cannot read the file: No such file or directory" % path


def test_unknown_extension_is_refused(tmp_path):
    path = write(tmp_path, "elemta.conf", "limits:\n  errors: 3\n")
    error = load_error(path)
    assert str(error).startswith(path + ": unknown config file format")


def test_not_utf8_names_the_line(tmp_path):
    path = str(tmp_path / "latin1.yaml")
    with open(path, "wb") as stream:
        stream.write(b"smtpd:\n  banner: caf\xe9\n")
    assert str(load_error(path)).startswith(path + ":2: the file is not UTF-8 text")


MANY_ERRORS = {
    "yaml": """\
smtpd:
  banner: 5
  hostnme: mx.example.org
listeners:
  - address: 0.0.0.0
    port: 70000
  - address: 0.0.0.0
    port: 465
    mode: smtps
relay:
  mynetworks: 10.0.0.0/8
limits:
  recipients: 0
""",
    "toml": """\
[smtpd]
banner = 5
hostnme = "mx.example.org"

[[listeners]]
address = "0.0.0.0"
port = 70000

[[listeners]]
address = "0.0.0.0"
port = 465
mode = "smtps"

[relay]
mynetworks = "10.0.0.0/8"

[limits]
recipients = 0
""",
}
MANY_EXPECTED = {
    "yaml": [(2, "smtpd.banner"), (3, "smtpd.hostnme"), (6, "listeners[0].port"),
             (9, "listeners[1].mode"), (9, "listeners[1].mode"), (11, "relay.mynetworks"),
             (13, "limits.recipients")],
    "toml": [(2, "smtpd.banner"), (3, "smtpd.hostnme"), (7, "listeners[0].port"),
             (12, "listeners[1].mode"), (12, "listeners[1].mode"), (15, "relay.mynetworks"),
             (18, "limits.recipients")],
}


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_every_problem_in_a_file_is_reported_in_file_order(tmp_path, fmt):
    path = write(tmp_path, "elemta." + fmt, MANY_ERRORS[fmt])
    error = load_error(path)
    assert [(p.line, p.key) for p in error.problems] == MANY_EXPECTED[fmt]
    assert len(str(error).splitlines()) == len(MANY_EXPECTED[fmt])
    assert all(l.startswith(path + ":") for l in str(error).splitlines())


def test_toml_lines_survive_strings_comments_and_quoted_keys(tmp_path):
    text = '''\
# [limits] in a comment, and errors = 1 too
[smtpd]
banner = """
[limits]
errors = "not a table header"
"""
"hostname" = 'mx.example.org' # a quoted key
[ "limits" ]
recipients = [ # a list where an integer belongs
  1,
]
errors = 'x'
[[listeners]]
port = 2525
[[listeners]]
port = 2526
[listeners.extra]
'''
    path = write(tmp_path, "elemta.toml", text)
    error = load_error(path)
    # The multi-line banner is refused too (no line breaks in settings), on its own line.
    assert [(p.line, p.key) for p in error.problems] == [
        (3, "smtpd.banner"), (9, "limits.recipients"), (12, "limits.errors"),
        (17, "listeners[1].extra")]


# -- the man page

def man_text_of_entry(page, key):
    """The roff lines of one option's entry, roff escapes removed."""
    match = re.search(r"^\\fB%s\\fR (.*(?:\n(?!\.TP|\.SS|\.SH).*)*)" % re.escape(key), page,
                      re.MULTILINE)
    assert match, "%s has no entry in elemta.conf(5)" % key
    return match.group(1).replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")


def literal(value):
    """A default as the page writes it, worked out here on its own."""
    if value is None:
        return "unset"
    if hasattr(type(value), "plain"):        # a domain list: its list or its table
        return literal(value.plain())
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"%s"' % value
    if isinstance(value, tuple):
        return "[%s]" % ", ".join(literal(v) for v in value)
    if dataclasses.is_dataclass(value):
        return "{%s}" % ", ".join("%s = %s" % (f.name, literal(getattr(value, f.name)))
                                  for f in dataclasses.fields(value))
    return str(value)


def test_man_page_documents_every_option_with_its_default():
    page = read(MAN_PAGE)
    for key, field in schema_key_paths():
        entry = man_text_of_entry(page, key)
        assert "default: %s)" % literal(field.default) in entry, key
        assert field.metadata["doc"].split(" (")[0] in entry, key
    assert ".BR elemta (8)" in page


def test_man_page_is_what_the_schema_generates():
    assert read(MAN_PAGE) == manpage.render(), \
        "regenerate: python -m elemta.config.manpage > man/elemta.conf.5"


@pytest.mark.skipif(not shutil.which("mandoc"), reason="mandoc is not installed")
def test_man_page_is_lint_clean():
    result = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", MAN_PAGE],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)
    assert result.stdout == ""


def test_the_default_host_name_is_qualified_as_postfix_myhostname_is():
    """The system's name, always with a dot (tests/test_mailname.py has each fallback); a
    configured smtpd.hostname wins."""
    from elemta.config.schema import SMTPDSettings
    assert "." in Config().hostname
    configured = dataclasses.replace(Config(), smtpd=SMTPDSettings(hostname="mx.example.org"))
    assert configured.hostname == "mx.example.org"
