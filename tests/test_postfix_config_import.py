"""`elemtactl import-postfix`: Postfix's main.cf and master.cf, read by the real postconf,
become an Elemta config that Elemta's loader accepts, and every setting left behind is
named with its reason.

Configurations: the one tests/peers/postfix.py writes for its private Postfix (written
only: no Postfix is started), a Dovecot-style virtual hosting setup, and Debian's stock
main.cf. Needs the postfix package (postconf); runs as any user.
See also: elemta/cli/pfconfig.py, elemta/migrate/.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from elemta.config import load_config
from elemta.maps import open_table
from tests.harness import REPO, free_port
from tests.peers.postfix import PostfixInstance
from tests.peers.sink import make_test_pki

POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
pytestmark = pytest.mark.skipif(not os.path.exists(POSTCONF),
                                reason="postconf is not installed (apt-get install postfix)")
MASTER_CF = "/usr/share/postfix/master.cf.dist"


def elemtactl(*args):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args),
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)


def postconf(config_dir, *args):
    subprocess.run([POSTCONF, "-c", config_dir] + list(args), check=True)


def reported(stderr):
    """{name: "value / reason"} of the "not translated" lines of the report."""
    found, lines = {}, stderr.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("  ") and not line.startswith("      ") and " = " in line \
                and index + 1 < len(lines) and lines[index + 1].startswith("      "):
            name, _, value = line.strip().partition(" = ")
            found[name] = value + " / " + lines[index + 1].strip()
    return found


@pytest.fixture(scope="module")
def workdir():
    # PostfixInstance checks that the postfix user could enter it (pytest's is root-only).
    path = tempfile.mkdtemp(prefix="elemta-pfconfig-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- the test peer's config

@pytest.fixture(scope="module")
def peer_config(workdir):
    """The main.cf and master.cf PostfixInstance runs with: a relay to a sink, every
    message held, and a second listener with its own -o override."""
    instance = PostfixInstance(os.path.join(workdir, "peer"), free_port(), relayhost=2599,
                               hold_only=True, extra_listeners={
                                   2526: {"smtpd_tls_security_level": "none"}})
    instance._write_config()
    return instance


def test_the_peers_config_becomes_an_elemta_config_that_loads(peer_config, workdir):
    output = os.path.join(workdir, "peer.yaml")
    result = elemtactl("import-postfix", peer_config.config_dir, "-o", output)
    assert result.returncode == 0, result.stderr
    config = load_config(output)
    assert config.smtpd.hostname == "postfix.peer.test"
    assert config.smtpd.origin == "postfix.peer.test"          # myorigin = $myhostname
    assert config.relay.local_domains == ()                   # mydestination =
    assert config.relay.mynetworks == ("127.0.0.0/8",)
    assert config.delivery.relayhost == "[127.0.0.1]:2599"
    assert config.local.aliases_file is None                  # alias_maps =
    assert config.limits.message_size == 10240000             # Postfix's default
    assert config.smtpd.peername_lookup is False              # smtpd_peername_lookup = no
    assert [(l.address, l.port, l.mode) for l in config.listeners] == [
        ("127.0.0.1", peer_config.smtpd_port, "smtp"), ("127.0.0.1", 2526, "smtp")]
    # The output replaces the packaged config: the system MTA's user and spool stay.
    assert (config.master.user, config.queue.spool_dir) == ("elemta", "/var/spool/elemta")
    # Every value says where it came from.
    text = open(output).read()
    assert "# from relayhost = [127.0.0.1]:2599\n" in text
    assert "# from myhostname = postfix.peer.test\n" in text


def test_the_peers_settings_without_an_equivalent_are_named_with_why(peer_config):
    result = elemtactl("import-postfix", peer_config.config_dir)
    assert result.returncode == 0, result.stderr
    report = reported(result.stderr)
    # smtpd_relay_restrictions = permit_mynetworks, reject: the final reject refuses
    # outsiders even for local domains, which Elemta's relay guard does not.
    assert report["smtpd_relay_restrictions"].endswith("; reject not translated")
    assert "check_client_access static:HOLD not translated" in \
        report["smtpd_end_of_data_restrictions"]
    assert report["local_transport"].startswith("error:5.1.1 local delivery is off")
    assert report["smtp_dns_support_level"] == "disabled / no Elemta equivalent"
    assert report["master.cf 127.0.0.1:2526/inet -o smtpd_tls_security_level"] == \
        "none / Elemta's listeners have no settings of their own beyond the mode"
    # Postfix's own directories are not translation failures, but are still named.
    assert "not needed by Elemta: " in result.stderr
    assert "queue_directory" in result.stderr.split("not needed by Elemta: ")[1]
    assert "queue_directory" not in report
    assert "mydestination is empty: Elemta still takes mail for its host name" \
        in result.stderr
    # The YAML went to standard output and loads.
    assert result.stdout.startswith("# Elemta configuration translated from Postfix's")


def test_the_peers_tls_and_dovecot_auth_config(workdir):
    """The relay host of tests/test_relay_auth.py: STARTTLS, Dovecot AUTH at an absolute
    socket path, and two more listeners with -o overrides."""
    _, cert, key = make_test_pki(os.path.join(workdir, "pki"), "relay.test")
    plain_port, login_port = free_port(), free_port()
    instance = PostfixInstance(
        os.path.join(workdir, "relay"), free_port(), hold_only=True, extra_main_cf={
            "smtpd_tls_cert_file": cert, "smtpd_tls_key_file": key,
            "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "1",
            "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": "/run/dovecot/auth-client",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject"},
        extra_listeners={plain_port: {"smtpd_tls_security_level": "none"},
                         login_port: {"smtpd_sasl_mechanism_filter": "login"}})
    instance._write_config()
    output = os.path.join(workdir, "relay.yaml")
    result = elemtactl("import-postfix", instance.config_dir, "-o", output)
    assert result.returncode == 0, result.stderr
    config = load_config(output)
    assert (config.tls.cert_file, config.tls.key_file) == (cert, key)
    assert (config.auth.backend, config.auth.dovecot_socket) == (
        "dovecot", "/run/dovecot/auth-client")
    assert [(l.port, l.mode) for l in config.listeners] == [
        (instance.smtpd_port, "smtp"), (plain_port, "smtp"), (login_port, "smtp")]
    report = reported(result.stderr)
    assert report["smtpd_relay_restrictions"].endswith("; reject not translated")
    assert report["smtpd_tls_loglevel"] == "1 / no Elemta equivalent"
    assert report["master.cf 127.0.0.1:%d/inet -o smtpd_sasl_mechanism_filter" % login_port]
    assert "inside Postfix's queue directory" not in result.stderr    # /run/dovecot


# ---------------------------------------------------------------- a Dovecot-style setup

MAIN_CF = """\
compatibility_level = 3.6
myhostname = mx.example.org
mydomain = example.org
myorigin = $mydomain
mydestination = $myhostname, localhost.$mydomain, localhost
mynetworks = 127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128 192.0.2.0/24
  mail-gw.example.org
inet_interfaces = 127.0.0.1, 127.0.0.2
inet_protocols = ipv4
smtpd_banner = $myhostname ESMTP $mail_name (Debian/GNU)
alias_maps = hash:/etc/aliases
alias_database = hash:/etc/aliases
recipient_delimiter = +
message_size_limit = 52428800
smtpd_tls_cert_file = {d}/cert.pem
smtpd_tls_key_file = {d}/key.pem
smtpd_tls_security_level = may
virtual_mailbox_domains = example.com, example.net
virtual_mailbox_maps = hash:{d}/vmailbox
virtual_alias_maps = hash:{d}/virtual
virtual_transport = lmtp:unix:private/dovecot-lmtp
relay_domains = pcre:{d}/relay.pcre
relay_recipient_maps = pcre:{d}/bad.pcre
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
smtpd_sasl_auth_enable = yes
smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated defer_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated,
  reject_unauth_destination, check_policy_service unix:private/policyd-spf
smtpd_sender_login_maps = hash:{d}/senders
transport_maps = hash:{d}/transport
maximal_queue_lifetime = 2d
"""


@pytest.fixture(scope="module")
def dovecot_setup(workdir):
    d = os.path.join(workdir, "dovecot")
    os.makedirs(d)
    with open(os.path.join(d, "main.cf"), "w") as stream:
        stream.write(MAIN_CF.replace("{d}", d))
    shutil.copyfile(MASTER_CF, os.path.join(d, "master.cf"))
    postconf(d, "-Me", "submission/inet = submission inet n - y - - smtpd "
                       "-o syslog_name=postfix/submission -o smtpd_tls_security_level=encrypt "
                       "-o smtpd_sasl_auth_enable=yes "
                       "-o smtpd_client_restrictions=permit_sasl_authenticated,reject "
                       "-o smtpd_helo_required=yes")
    postconf(d, "-Me", "policyd-spf/unix = policyd-spf unix - n n - 0 spawn "
                       "user=policyd-spf argv=/usr/bin/policyd-spf")
    files = {
        "vmailbox": "anne@example.com  example.com/anne/\nbob@example.net  x\n",
        "virtual": "info@example.com  anne@example.com\n@example.net  bob@example.net\n",
        "transport": textwrap.dedent("""\
            # comments and continuation lines as postmap reads them
            example.org        smtp:[relay.example.org]:587
            .internal.example  lmtp:inet:127.0.0.1:24
            legacy.example     smtp:
            user@example.net   error:nope
            old.example        discard:
            """),
        "relay.pcre": "/^backup\\.example$/  OK\n",
        "bad.pcre": "/^Subject: \\Kspam/  REJECT\n",
        "senders": "anne@example.com  anne\n",
    }
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as stream:
            stream.write(text)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", os.path.join(d, "key.pem"), "-out", os.path.join(d, "cert.pem"),
                    "-subj", "/CN=mx.example.org"], check=True, capture_output=True)
    output = os.path.join(workdir, "dovecot.toml")
    result = elemtactl("import-postfix", d, "--output", output, "--compile")
    assert result.returncode == 0, result.stderr
    return d, load_config(output), result.stderr


def test_a_dovecot_virtual_setup_is_translated_to_toml(dovecot_setup):
    d, config, _ = dovecot_setup
    assert config.source.endswith(".toml")
    assert config.smtpd.hostname == "mx.example.org"
    assert config.smtpd.origin == "example.org"
    assert config.relay.local_domains == ("localhost.example.org", "localhost")
    assert str(config.virtual.mailbox_domains.plain()) == str(("example.com", "example.net"))
    assert str(config.virtual.mailbox_maps) == "lmdb:%s/vmailbox" % d
    assert str(config.virtual.alias_maps) == "lmdb:%s/virtual" % d
    # Postfix's path is relative to its queue directory.
    assert config.virtual.transport == "lmtp:unix:/var/spool/postfix/private/dovecot-lmtp"
    assert config.auth.backend == "dovecot"
    assert config.auth.dovecot_socket == "/var/spool/postfix/private/auth"
    assert (config.tls.cert_file, config.tls.key_file) == (d + "/cert.pem", d + "/key.pem")
    assert config.limits.message_size == 52428800
    assert config.delivery.queue_lifetime == 2 * 86400
    assert config.local.recipient_delimiter == "+"
    assert str(config.smtpd.sender_login_maps) == "lmdb:%s/senders" % d
    # No restriction names the table: Postfix enforced nothing, and neither does Elemta.
    assert config.smtpd.reject_sender_login_mismatch == "none"
    # Postfix's default keeps the login name out of the Received header; Elemta's not.
    assert config.smtpd.sasl_authenticated_header is False
    # pcre with Python-compatible patterns is a regexp table.
    assert config.relay.relay_domains.plain() == "regexp:%s/relay.pcre" % d
    # The network Elemta cannot read is left out: it may not relay.
    assert config.relay.mynetworks == ("127.0.0.0/8", "::ffff:7f00:0/104", "::1/128",
                                       "192.0.2.0/24")
    assert [(l.address, l.port, l.mode) for l in config.listeners] == [
        ("127.0.0.1", 25, "smtp"), ("127.0.0.2", 25, "smtp"),
        ("127.0.0.1", 587, "submission"), ("127.0.0.2", 587, "submission")]
    # The transport map's source file, entry by entry; "smtp:" alone is the domain's MX.
    assert [(e.domain, e.nexthop) for e in config.delivery.transport] == [
        ("example.org", "smtp:[relay.example.org]:587"),
        (".internal.example", "lmtp:[127.0.0.1]:24"),
        ("legacy.example", "smtp:legacy.example")]


def test_the_dovecot_setups_leftovers_are_reported(dovecot_setup):
    d, _, stderr = dovecot_setup
    report = reported(stderr)
    assert report["mynetworks"].startswith("mail-gw.example.org / ")
    assert "check_policy_service unix:private/policyd-spf not translated" in \
        report["smtpd_recipient_restrictions"]
    assert "smtpd_relay_restrictions" not in report        # all of it is covered
    assert "smtpd_sender_login_maps" not in report          # smtpd.sender_login_maps
    assert report["transport_maps entry user@example.net"].startswith("error:nope / ")
    assert "no discard transport" in report["transport_maps entry old.example"]
    assert "Elemta's regexp tables cannot read" in report["relay_recipient_maps"]
    assert "bad.pcre:1" in report["relay_recipient_maps"]
    assert report["master.cf submission/inet -o smtpd_helo_required"].startswith("yes / ")
    assert report["master.cf policyd-spf/unix"].startswith("spawn / ")
    assert report["smtpd_banner"].startswith("mx.example.org ESMTP Postfix")
    # Covered by the submission mode, so not reported.
    assert not any(name.startswith("master.cf submission/inet -o smtpd_tls_security")
                   for name in report)
    assert "auth.dovecot_socket: /var/spool/postfix/private/auth is inside Postfix's " \
           "queue directory" in stderr
    assert "lmdb tables compiled: %s/virtual %s/vmailbox" % (d, d) in stderr
    assert "relay.relay_domains: Postfix also took subdomains" in stderr


def test_compile_builds_the_tables_the_config_names(dovecot_setup):
    _, config, _ = dovecot_setup
    table = open_table(config.virtual.alias_maps)
    try:
        assert table.lookup("info@example.com") == "anne@example.com"
    finally:
        table.close()


# ---------------------------------------------------------------- rewriting, sender login

REWRITING_MAIN_CF = """\
compatibility_level = 3.6
myhostname = mx.example.org
mydomain = example.org
mydestination = $myhostname, localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
sender_canonical_maps = hash:{d}/sender_canonical
recipient_canonical_maps = regexp:{d}/recipient_canonical
canonical_maps = inline:{{ root=admin@example.org }}
masquerade_domains = !dept.$mydomain, $mydomain
masquerade_exceptions = root, mailer-daemon
masquerade_classes = envelope_sender, header_sender
smtpd_sender_login_maps = hash:{d}/senders
smtpd_sender_restrictions = permit_mynetworks, reject_sender_login_mismatch
smtpd_sasl_authenticated_header = yes
"""
REWRITING_FILES = {"recipient_canonical": "/^(.*)@old\\.example$/  $1@example.org\n"}


def import_postfix(directory, main_cf, *services, files=None):
    """(config, report, stderr) of import-postfix on main_cf and Debian's master.cf with
    the services added (postconf -Me); REWRITING_FILES and files are written beside
    main.cf first."""
    os.makedirs(directory)
    with open(os.path.join(directory, "main.cf"), "w") as stream:
        stream.write(main_cf.format(d=directory))
    shutil.copyfile(MASTER_CF, os.path.join(directory, "master.cf"))
    for service in services:
        postconf(directory, "-Me", service)
    for name, text in dict(REWRITING_FILES, **(files or {})).items():
        with open(os.path.join(directory, name), "w") as stream:
            stream.write(text)
    output = os.path.join(directory, "elemta.yaml")
    result = elemtactl("import-postfix", directory, "-o", output)
    assert result.returncode == 0, result.stderr
    return load_config(output), reported(result.stderr), result.stderr


def test_canonical_maps_masquerading_and_sender_login_are_translated(workdir):
    d = os.path.join(workdir, "rewriting")
    config, report, _ = import_postfix(d, REWRITING_MAIN_CF)
    assert str(config.rewrite.sender_canonical_maps) == "lmdb:%s/sender_canonical" % d
    assert str(config.rewrite.recipient_canonical_maps) == "regexp:%s/recipient_canonical" % d
    assert open_table(config.rewrite.canonical_maps).lookup("root") == "admin@example.org"
    assert config.rewrite.masquerade_domains == ("!dept.example.org", "example.org")
    assert config.rewrite.masquerade_exceptions == ("root", "mailer-daemon")
    assert config.rewrite.masquerade_classes == ("envelope_sender", "header_sender")
    assert str(config.smtpd.sender_login_maps) == "lmdb:%s/senders" % d
    assert config.smtpd.reject_sender_login_mismatch == "all"
    assert config.smtpd.sasl_authenticated_header is True
    assert report == {}, report         # every setting has its Elemta equivalent
    text = open(os.path.join(d, "elemta.yaml")).read()
    assert "# from smtpd_sender_restrictions: reject_sender_login_mismatch\n" in text


def test_what_the_rewriting_and_login_options_cannot_say_is_reported(workdir):
    main_cf = REWRITING_MAIN_CF.replace(
        "masquerade_exceptions = root, mailer-daemon",
        "masquerade_exceptions = hash:{d}/masquerade_exceptions").replace(
        "smtpd_sender_restrictions = permit_mynetworks, reject_sender_login_mismatch",
        "smtpd_sender_restrictions = reject_unauthenticated_sender_login_mismatch") + \
        "sender_canonical_classes = envelope_sender\n"
    config, report, _ = import_postfix(os.path.join(workdir, "rewriting-left"), main_cf)
    assert config.smtpd.reject_sender_login_mismatch == "none"
    assert report == {
        "smtpd_sender_restrictions entry reject_unauthenticated_sender_login_mismatch":
            "reject_unauthenticated_sender_login_mismatch / Elemta binds the senders of "
            "clients that did not log in only together with those of clients that did "
            "(smtpd.reject_sender_login_mismatch: all)",
        "masquerade_exceptions": "hash:%s/masquerade_exceptions / Elemta's "
                                 "masquerade_exceptions is a list of user names (no files "
                                 "or tables)" % os.path.join(workdir, "rewriting-left"),
        "sender_canonical_classes": "envelope_sender / Elemta's canonical maps rewrite the "
                                    "envelope and the headers alike (envelope_sender, "
                                    "header_sender)"}
    assert config.rewrite.masquerade_exceptions == ()


def test_a_login_check_on_the_submission_service_binds_logged_in_clients(workdir):
    """The Dovecot guides' way: reject_sender_login_mismatch on submission only, where
    every client has logged in; Elemta's "authenticated" says the same there."""
    main_cf = REWRITING_MAIN_CF.replace(
        "smtpd_sender_restrictions = permit_mynetworks, reject_sender_login_mismatch\n",
        "smtpd_sasl_auth_enable = yes\nsmtpd_sasl_type = dovecot\n"
        "smtpd_sasl_path = inet:127.0.0.1:12345\n")
    config, report, stderr = import_postfix(
        os.path.join(workdir, "submission-login"), main_cf,
        "submission/inet = submission inet n - y - - smtpd -o smtpd_sasl_auth_enable=yes "
        "-o smtpd_sender_restrictions=reject_sender_login_mismatch,permit_sasl_authenticated"
        ",reject")
    assert [l.mode for l in config.listeners] == ["smtp", "submission"]
    assert config.smtpd.reject_sender_login_mismatch == "authenticated"
    assert not any("smtpd_sender_restrictions" in name for name in report), report
    assert "smtpd.reject_sender_login_mismatch: Postfix checked the senders of logged-in " \
           "clients on submission/inet only; Elemta checks them on every listener" in stderr


# ---------------------------------------------------------------- Debian's stock main.cf

def test_debians_main_cf_as_its_postinst_writes_it(workdir):
    d = os.path.join(workdir, "debian")
    os.makedirs(d)
    shutil.copyfile("/usr/share/postfix/main.cf.debian", os.path.join(d, "main.cf"))
    shutil.copyfile(MASTER_CF, os.path.join(d, "master.cf"))
    # What Debian's postinst adds for an "Internet Site".
    postconf(d, "-e", "myhostname = host.example.org", "myorigin = /etc/mailname",
             "alias_maps = hash:/etc/aliases", "mydestination = $myhostname, localhost",
             "relayhost =", "mynetworks = 127.0.0.0/8 [::1]/128",
             "mailbox_size_limit = 0", "inet_interfaces = loopback-only",
             "inet_protocols = ipv4", "relay_domains = example.net",
             "smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated "
             "defer_unauth_destination")
    result = elemtactl("import-postfix", d, "-o", os.path.join(d, "elemta.yml"))
    assert result.returncode == 0, result.stderr
    config = load_config(os.path.join(d, "elemta.yml"))
    assert config.smtpd.mailname_file == "/etc/mailname" and config.smtpd.origin == ""
    assert config.smtpd.hostname == "host.example.org"
    assert config.relay.local_domains == ("localhost",)
    assert config.local.aliases_file == "/etc/aliases"
    assert config.delivery.relayhost is None
    # Postfix's relay_domains takes subdomains too (parent_domain_matches_subdomains).
    assert config.relay.relay_domains.plain() == ("example.net", ".example.net")
    assert [(l.address, l.port) for l in config.listeners] == [("127.0.0.1", 25)]
    assert set(reported(result.stderr)) == {"smtpd_banner"}


def test_debians_local_only_keeps_remote_mail_from_going_out(workdir):
    """Debian's postinst sets default_transport = error (and relay_transport = error)
    for "Local only": dropped, the Elemta host would send remote mail out by MX."""
    d = os.path.join(workdir, "local-only")
    os.makedirs(d)
    shutil.copyfile("/usr/share/postfix/main.cf.debian", os.path.join(d, "main.cf"))
    shutil.copyfile(MASTER_CF, os.path.join(d, "master.cf"))
    postconf(d, "-e", "myhostname = host.example.org", "mydestination = $myhostname, "
             "localhost", "inet_interfaces = loopback-only", "default_transport = error",
             "relay_transport = error")
    result = elemtactl("import-postfix", d, "-o", os.path.join(d, "elemta.yml"))
    assert result.returncode == 0, result.stderr
    config = load_config(os.path.join(d, "elemta.yml"))
    assert config.delivery.default_transport == "error"
    assert config.relay.relay_transport is None     # no relay domain: nothing goes there
    assert "# from default_transport = error\n" in open(os.path.join(d, "elemta.yml")).read()
    assert set(reported(result.stderr)) == {"smtpd_banner"}
    # error:text keeps its text; a transport Elemta has not is named with why.
    postconf(d, "-e", "default_transport = error:5.7.1 this host sends no mail out")
    result = elemtactl("import-postfix", d, "-o", os.path.join(d, "text.yml"))
    assert result.returncode == 0, result.stderr
    assert load_config(os.path.join(d, "text.yml")).delivery.default_transport == \
        "error:5.7.1 this host sends no mail out"
    postconf(d, "-e", "default_transport = uucp")
    result = elemtactl("import-postfix", d, "-o", os.path.join(d, "uucp.yml"))
    assert "no uucp transport" in reported(result.stderr)["default_transport"]


# ---------------------------------------------------------------- refusals

def test_an_existing_output_is_kept_without_force(peer_config, workdir):
    output = os.path.join(workdir, "kept.yaml")
    with open(output, "w") as stream:
        stream.write("# mine\n")
    result = elemtactl("import-postfix", peer_config.config_dir, "-o", output)
    assert result.returncode == 73
    assert "kept.yaml exists: it is never overwritten without --force" in result.stderr
    assert open(output).read() == "# mine\n"
    result = elemtactl("import-postfix", peer_config.config_dir, "-o", output, "--force")
    assert result.returncode == 0, result.stderr
    assert load_config(output).smtpd.hostname == "postfix.peer.test"


def test_a_translation_that_would_not_load_is_not_written(workdir):
    d = os.path.join(workdir, "clash")
    os.makedirs(d)
    with open(os.path.join(d, "main.cf"), "w") as stream:
        # Postfix only warns of a domain in two address classes; Elemta refuses it.
        stream.write("compatibility_level = 3.6\nmyhostname = mx.example.org\n"
                     "mydestination = example.com\nvirtual_mailbox_domains = example.com\n"
                     "virtual_transport = lmtp:unix:/run/dovecot/lmtp\n")
    shutil.copyfile(MASTER_CF, os.path.join(d, "master.cf"))
    output = os.path.join(d, "elemta.yaml")
    result = elemtactl("import-postfix", d, "-o", output)
    assert result.returncode == 78
    assert "the translated configuration does not load, so it was not written" in result.stderr
    # Told by the Elemta key and the Postfix setting it came from (the text was never
    # written, so its line numbers would point nowhere).
    assert "virtual.mailbox_domains[0] (from virtual_mailbox_domains = example.com): " \
           "example.com is already in relay.local_domains" in result.stderr
    assert not os.path.exists(output)
    assert "Traceback" not in result.stderr


def test_a_directory_without_main_cf_is_named(workdir):
    result = elemtactl("import-postfix", workdir)
    assert result.returncode == 66
    assert "%s: no main.cf there" % workdir in result.stderr


def test_a_postconf_that_cannot_run_is_named(peer_config, workdir):
    result = elemtactl("import-postfix", peer_config.config_dir, "--postconf",
                       os.path.join(workdir, "no-postconf"))
    assert result.returncode == 66
    assert "no-postconf: not an executable postconf" in result.stderr


def test_postscreen_sasl_on_the_submission_service_and_excluded_networks(workdir):
    d = os.path.join(workdir, "postscreen")
    os.makedirs(d)
    with open(os.path.join(d, "main.cf"), "w") as stream:
        stream.write("compatibility_level = 3.6\nmyhostname = mx.example.org\n"
                     "inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n"
                     "mynetworks = 127.0.0.0/8 !127.0.0.5 10.0.0.0/8\n"
                     # Any readable files: loading opens them, the handshake is not tried.
                     "smtpd_tls_cert_file = /etc/ssl/certs/ca-certificates.crt\n"
                     "smtpd_tls_key_file = /etc/ssl/certs/ca-certificates.crt\n"
                     "smtpd_tls_security_level = may\n"
                     # Inline tables: braces keep an item's commas and spaces.
                     "virtual_alias_maps = inline:{ { info@example.org = a@example.org, "
                     "b@example.org } }\n"
                     "transport_maps = inline:{ example.org=lmtp:unix:/run/dovecot/lmtp, "
                     "{ example.net = smtp:[10.1.1.1]:2525 } }\n")
    shutil.copyfile(MASTER_CF, os.path.join(d, "master.cf"))
    postconf(d, "-Me", "smtp/inet = smtp inet n - y - 1 postscreen")
    postconf(d, "-Me", "smtpd/pass = smtpd pass - - y - - smtpd")
    postconf(d, "-Me", "submission/inet = submission inet n - y - - smtpd "
                       "-o smtpd_sasl_auth_enable=yes -o smtpd_sasl_type=dovecot "
                       "-o smtpd_sasl_path=inet:127.0.0.1:12345")
    result = elemtactl("import-postfix", d, "-o", os.path.join(d, "elemta.yaml"))
    assert result.returncode == 0, result.stderr
    config = load_config(os.path.join(d, "elemta.yaml"))
    assert [(l.port, l.mode) for l in config.listeners] == [(25, "smtp"), (587, "submission")]
    assert (config.auth.backend, config.auth.dovecot_socket) == ("dovecot",
                                                                 "inet:127.0.0.1:12345")
    # Postfix trusted 127.0.0.0/8 but not 127.0.0.5; Elemta cannot say "but": the
    # wider network is left out rather than trusting 127.0.0.5.
    assert config.relay.mynetworks == ("10.0.0.0/8",)
    table = open_table(config.virtual.alias_maps)
    assert table.lookup("info@example.org") == "a@example.org, b@example.org"
    table.close()
    assert [(e.domain, e.nexthop) for e in config.delivery.transport] == [
        ("example.org", "lmtp:unix:/run/dovecot/lmtp"), ("example.net", "smtp:[10.1.1.1]:2525")]
    report = reported(result.stderr)
    assert report["mynetworks"].startswith("127.0.0.0/8 / Elemta's mynetworks has no "
                                           "!exclusions (!127.0.0.5/32)")
    assert "postscreen's checks" in report["master.cf smtp/inet"]
    assert "smtpd_sasl_type" not in report
    assert "check it as Elemta's workers will read it: elemtactl config check --config" \
        in result.stderr


def test_header_and_body_checks_and_the_hop_count_are_translated(workdir):
    """header_checks (a pcre table Elemta's regexp reads), body_checks, their size limit
    and hopcount_limit land in content.*; an empty nested_header_checks (Postfix: off)
    is reported, since Elemta's unset means header_checks."""
    d = os.path.join(workdir, "checks")
    os.makedirs(d)
    for name, text in (("header_checks", "/^Subject:.*viagra/ REJECT no pills\n"),
                       ("body_checks", "/^buy now$/ DISCARD\n")):
        with open(os.path.join(d, name), "w") as stream:
            stream.write(text)
    with open(os.path.join(d, "main.cf"), "w") as stream:
        stream.write("compatibility_level = 3.6\nmyhostname = mx.example.org\n"
                     "inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n"
                     "header_checks = pcre:%s/header_checks\n"
                     "body_checks = regexp:%s/body_checks\n"
                     "nested_header_checks =\n"
                     "body_checks_size_limit = 10240\nhopcount_limit = 30\n" % (d, d))
    shutil.copyfile(MASTER_CF, os.path.join(d, "master.cf"))
    result = elemtactl("import-postfix", d, "-o", os.path.join(d, "elemta.yaml"))
    assert result.returncode == 0, result.stderr
    config = load_config(os.path.join(d, "elemta.yaml"))
    content = config.content
    assert str(content.header_checks) == "regexp:%s/header_checks" % d
    assert str(content.body_checks) == "regexp:%s/body_checks" % d
    assert (content.body_checks_size_limit, content.hopcount_limit) == (10240, 30)
    assert content.mime_header_checks is None and content.nested_header_checks is None
    report = reported(result.stderr)
    [empty] = [why for name, why in report.items() if name.startswith("nested_header_checks")]
    assert "Elemta's unset means header_checks" in empty
    assert "header_checks" not in report
    assert "body_checks_size_limit" not in report and "hopcount_limit" not in report
