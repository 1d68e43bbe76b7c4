"""The .deb's debconf helper (debian/elemta-debconf-config.py): it rewrites only the
settings debconf owns in /etc/elemta/elemta.yaml and keeps the admin's other edits."""

import importlib.util
import os
import shutil

import pytest

from elemta.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "debian", "elemta-debconf-config.py")
EXAMPLE = os.path.join(ROOT, "etc", "elemta.yaml.example")


def helper():
    spec = importlib.util.spec_from_file_location("debconf_config", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "elemta.yaml"
    shutil.copyfile(EXAMPLE, path)
    return path


def run(path, *args, ipv6=True):
    module = helper()
    module.have_ipv6 = lambda: ipv6
    assert module.main(["--config", str(path)] + list(args)) == 0
    return load_config(str(path), check_files=False)


def addresses(config):
    return sorted((l.address, l.port, l.mode) for l in config.listeners)


def test_local_only_listens_on_loopback(conf):
    config = run(conf, "--type", "local")
    assert addresses(config) == [("127.0.0.1", 25, "smtp"), ("::1", 25, "smtp")]
    # The mail name reaches Elemta through /etc/mailname (postinst), its origin; no
    # --fqdn given, the host name is left to the system's name.
    assert config.smtpd.hostname == "" and config.smtpd.origin == ""
    assert config.delivery.relayhost is None


def test_internet_site_listens_everywhere_without_ipv6_when_absent(conf):
    config = run(conf, "--type", "internet", ipv6=False)
    assert addresses(config) == [("0.0.0.0", 25, "smtp")]


def test_satellite_then_reconfigure_keeps_admin_edits(conf):
    run(conf, "--type", "satellite", "--relayhost", "[r.example]:587")
    text = conf.read_text()
    assert "relayhost: '[r.example]:587'" in text or 'relayhost: "[r.example]:587"' in text
    # The admin adds a listener of their own and changes an option debconf does not own.
    text = text.replace('  #- {address: "0.0.0.0", port: 587, mode: submission}',
                        '  - {address: "0.0.0.0", port: 2525, mode: smtp}')
    text = text.replace('banner: "ESMTP Elemta"', 'banner: "ESMTP ours"')
    conf.write_text(text)
    config = run(conf, "--type", "local")
    assert config.delivery.relayhost is None
    assert config.smtpd.banner == "ESMTP ours"
    assert ("0.0.0.0", 2525, "smtp") in addresses(config)
    assert ("127.0.0.1", 25, "smtp") in addresses(config)
    assert "# Relay control: the open-relay guard." in conf.read_text()   # comments kept


def test_missing_config_starts_from_the_template(tmp_path):
    module = helper()
    module.TEMPLATE = EXAMPLE
    module.have_ipv6 = lambda: True
    target = tmp_path / "elemta.yaml"
    assert module.main(["--config", str(target), "--type", "local"]) == 0
    assert oct(os.stat(target).st_mode & 0o777) == "0o644"
    assert load_config(str(target), check_files=False).smtpd.mailname_file == "/etc/mailname"


def test_an_admins_own_indentation_and_ownership_survive(tmp_path):
    """The helper edits through elemta.config.editor, as elemtactl config set does."""
    target = tmp_path / "elemta.yaml"
    target.write_text("# ours\n"
                      "smtpd:\n"
                      "    hostname: old.example   # from the installer\n"
                      "    banner: 'ESMTP ours'\n"
                      "\n"
                      "# where the queue lives\n"
                      "queue:\n"
                      "    spool_dir: /var/spool/elemta\n")
    os.chmod(target, 0o640)
    config = run(target, "--type", "satellite", "--relayhost", "[relay.example]:587")
    assert config.smtpd.hostname == "old.example" and config.smtpd.banner == "ESMTP ours"
    assert config.delivery.relayhost == "[relay.example]:587"
    lines = target.read_text().splitlines()
    assert lines[:8] == ["# ours", "smtpd:", "    hostname: old.example   # from the installer",
                         "    banner: 'ESMTP ours'", "", "# where the queue lives", "queue:",
                         "    spool_dir: /var/spool/elemta"]
    assert oct(os.stat(target).st_mode & 0o777) == "0o640"


def test_the_host_name_is_the_fqdn_once_and_then_the_admins(conf):
    """As Debian's postfix postinst sets myhostname from hostname --fqdn: only into an
    empty smtpd.hostname, and only a name with a dot."""
    assert run(conf, "--type", "local", "--fqdn", "vm").smtpd.hostname == ""
    assert run(conf, "--type", "local", "--fqdn", "localhost.localdomain").smtpd.hostname == ""
    config = run(conf, "--type", "local", "--fqdn", "vm.example.org")
    assert (config.smtpd.hostname, config.smtpd.origin) == ("vm.example.org", "")
    conf.write_text(conf.read_text().replace("vm.example.org", "mx.example.net"))
    assert run(conf, "--type", "internet", "--fqdn", "vm.example.org").smtpd.hostname == \
        "mx.example.net"


def test_local_only_bounces_remote_mail_and_the_other_types_send_it(conf):
    """As Debian's postfix sets default_transport = error for "Local only": remote mail
    is returned to its sender, not sent out by MX; leaving "local" removes it again."""
    assert run(conf, "--type", "local").delivery.default_transport == "error"
    # The admin's other delivery settings survive the switches both ways.
    conf.write_text(conf.read_text().replace("  max_use: 10000", "  max_use: 77"))
    config = run(conf, "--type", "satellite", "--relayhost", "[r.example]:587")
    assert config.delivery.default_transport == "smtp"
    assert "\n  default_transport:" not in conf.read_text()
    assert (config.delivery.relayhost, config.delivery.max_use) == ("[r.example]:587", 77)
    config = run(conf, "--type", "local")
    assert (config.delivery.default_transport, config.delivery.relayhost,
            config.delivery.max_use) == ("error", None, 77)
    config = run(conf, "--type", "internet")
    assert (config.delivery.default_transport, config.delivery.max_use) == ("smtp", 77)
    # The example's documentation of the option stays, commented out.
    assert "  #default_transport: error" in conf.read_text()
