"""elemtactl config show / get / set (Elemta's postconf), run as the admin runs it:
the real program on real YAML and TOML files, and set --reload on a running elemta whose
EHLO must then announce the new value."""

import difflib
import os
import shutil
import smtplib
import subprocess
import sys

import pytest

from tests.harness import REPO, wait_for

EXAMPLES = {"yaml": os.path.join(REPO, "etc", "elemta.yaml.example"),
            "toml": os.path.join(REPO, "etc", "elemta.toml.example")}


def elemtactl(*args, env=None):
    environ = dict(os.environ, PYTHONPATH=REPO)
    environ.pop("ELEMTA_CONFIG", None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args),
                          capture_output=True, text=True, timeout=60, env=environ)


def check_config(path):
    """What `elemta --check-config` (start-up's checks) says of the file."""
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemta", "--check-config",
                           "--config", str(path)], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=REPO))


@pytest.fixture(params=["yaml", "toml"])
def example(request, tmp_path):
    """The shipped example configuration, as /etc/elemta/elemta.{yaml,toml} would be."""
    path = tmp_path / ("elemta." + request.param)
    shutil.copyfile(EXAMPLES[request.param], path)
    return path


SMALL = {
    "yaml": '# Our mail server.\n'
            'smtpd:\n'
            '  hostname: mx.example.org   # the name in DNS\n'
            '\n'
            '# Where mail comes in.\n'
            'listeners:\n'
            '  - {address: "127.0.0.1", port: 2525, mode: smtp}\n'
            '  - {address: "127.0.0.2", port: 2525, mode: smtp}\n'
            '\n'
            '# The spool.\n'
            'queue:\n'
            '  spool_dir: SPOOL\n',
    "toml": '# Our mail server.\n'
            '[smtpd]\n'
            'hostname = "mx.example.org"   # the name in DNS\n'
            '\n'
            '# Where mail comes in.\n'
            '[[listeners]]\n'
            'address = "127.0.0.1"\n'
            'port = 2525\n'
            'mode = "smtp"\n'
            '\n'
            '[[listeners]]\n'
            'address = "127.0.0.2"\n'
            'port = 2525\n'
            'mode = "smtp"\n'
            '\n'
            '# The spool.\n'
            '[queue]\n'
            'spool_dir = "SPOOL"\n',
}


@pytest.fixture(params=["yaml", "toml"])
def small(request, tmp_path):
    path = tmp_path / ("elemta." + request.param)
    path.write_text(SMALL[request.param].replace("SPOOL", str(tmp_path / "spool")))
    return path


def changed_lines(before, after):
    """(lines removed, lines added) between two texts."""
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return ([line[2:] for line in diff if line.startswith("- ")],
            [line[2:] for line in diff if line.startswith("+ ")])


# ---------------------------------------------------------------- show and get

def test_show_prints_every_setting_of_both_formats_alike(example):
    result = elemtactl("--config", str(example), "config", "show")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for line in ('smtpd.hostname = ""', 'smtpd.banner = "ESMTP Elemta"',
                 'listeners[0].address = "127.0.0.1"', "listeners[0].port = 25",
                 'relay.mynetworks = ["127.0.0.0/8", "::1/128"]', "tls.cert_file = unset",
                 "limits.message_size = 31457280", "auth.allow_plaintext = false",
                 "delivery.transport = []", "plugins.spf.enabled = false",
                 'plugins.dkim.algorithm = "rsa-sha256"', "plugins.dkim.keys = []"):
        assert line in lines
    # Every default has its line: the example has one listener, as the defaults do.
    defaults = elemtactl("config", "show", "-d").stdout.splitlines()
    assert [l.split(" = ")[0] for l in lines] == [l.split(" = ")[0] for l in defaults]
    other = example.with_suffix(".toml" if example.suffix == ".yaml" else ".yaml")
    shutil.copyfile(EXAMPLES[other.suffix[1:]], other)
    assert elemtactl("--config", str(other), "config", "show").stdout == result.stdout


def test_show_n_prints_only_what_differs_from_the_default(small, tmp_path):
    result = elemtactl("--config", str(small), "config", "show", "-n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        'smtpd.hostname = "mx.example.org"\n'
        'listeners[0].address = "127.0.0.1"\n'
        'listeners[0].port = 2525\n'
        'listeners[0].mode = "smtp"\n'
        'listeners[1].address = "127.0.0.2"\n'
        'listeners[1].port = 2525\n'
        'listeners[1].mode = "smtp"\n'
        'queue.spool_dir = "%s"\n' % (tmp_path / "spool"))


def test_show_d_prints_the_defaults_whatever_the_file_says(small):
    result = elemtactl("--config", str(small), "config", "show", "-d")
    lines = result.stdout.splitlines()
    assert 'smtpd.hostname = ""' in lines and 'queue.spool_dir = "./spool"' in lines
    assert "listeners[0].port = 2525" in lines and not any(
        line.startswith("listeners[1]") for line in lines)


def test_get_prints_the_keys_named(small):
    result = elemtactl("--config", str(small), "config", "get", "smtpd.hostname",
                       "limits.message_size", "listeners[1]")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ('smtpd.hostname = "mx.example.org"\n'
                             'limits.message_size = 31457280\n'
                             'listeners[1].address = "127.0.0.2"\n'
                             'listeners[1].port = 2525\n'
                             'listeners[1].mode = "smtp"\n')
    values = elemtactl("--config", str(small), "config", "get", "--values-only",
                       "smtpd.hostname", "relay.local_domains")
    assert values.stdout == '"mx.example.org"\n["localhost"]\n'
    default = elemtactl("--config", str(small), "config", "get", "-d", "smtpd.hostname")
    assert default.stdout == 'smtpd.hostname = ""\n'


def test_get_of_an_unknown_key_names_it_and_the_close_ones(small):
    result = elemtactl("--config", str(small), "config", "get", "smtpd.hostnme")
    assert (result.returncode, result.stdout) == (64, "")
    assert result.stderr == ("elemtactl: config get: unknown key smtpd.hostnme; did you "
                             "mean smtpd.hostname?\n")
    result = elemtactl("--config", str(small), "config", "get", "listeners[2].port")
    assert result.returncode == 64 and "unknown key listeners[2].port" in result.stderr


def test_get_prints_the_keys_that_exist_when_another_does_not(small):
    """As postconf: the good keys' lines, an error for the bad one, a failing status."""
    result = elemtactl("--config", str(small), "config", "get", "smtpd.hostname",
                       "smtpd.hostnme", "limits.message_size")
    assert result.returncode == 64
    assert result.stdout == ('smtpd.hostname = "mx.example.org"\n'
                             'limits.message_size = 31457280\n')
    assert result.stderr == ("elemtactl: config get: unknown key smtpd.hostnme; did you "
                             "mean smtpd.hostname?\n")


# ---------------------------------------------------------------- set

def test_set_changes_only_the_lines_of_the_keys_set(example):
    before = example.read_text()
    result = elemtactl("--config", str(example), "config", "set",
                       "smtpd.hostname=mail.example.org", "limits.message_size=52428800",
                       "relay.mynetworks=[10.0.0.0/8, 127.0.0.0/8]",
                       "plugins.spf.enabled=true", "listeners[0].port=2526")
    assert result.returncode == 0, result.stderr
    removed, added = changed_lines(before, example.read_text())
    if example.suffix == ".yaml":
        assert removed == ['  hostname: ""', '  - {address: "127.0.0.1", port: 25, mode: smtp}',
                           '  mynetworks: ["127.0.0.0/8", "::1/128"]',
                           "  message_size: 31457280", "    enabled: false"]
        assert added == ['  hostname: "mail.example.org"',
                         '  - {address: "127.0.0.1", port: 2526, mode: smtp}',
                         '  mynetworks: ["10.0.0.0/8", "127.0.0.0/8"]',
                         "  message_size: 52428800", "    enabled: true"]
    else:
        assert removed == ['hostname = ""', "port = 25",
                           'mynetworks = ["127.0.0.0/8", "::1/128"]',
                           "message_size = 31457280", "enabled = false"]
        assert added == ['hostname = "mail.example.org"', "port = 2526",
                         'mynetworks = ["10.0.0.0/8", "127.0.0.0/8"]',
                         "message_size = 52428800", "enabled = true"]
    assert result.stdout.splitlines()[:2] == [
        '%s: smtpd.hostname = "mail.example.org" (was "")' % example,
        "%s: limits.message_size = 52428800 (was 31457280)" % example]
    assert result.stdout.splitlines()[-1] == (
        "elemtactl: a reload applies it; not done (no --reload): run `elemtactl reload` "
        "or `systemctl reload elemta`")
    shown = elemtactl("--config", str(example), "config", "get", "--values-only",
                      "smtpd.hostname", "relay.mynetworks", "plugins.spf.enabled")
    assert shown.stdout == '"mail.example.org"\n["10.0.0.0/8", "127.0.0.0/8"]\ntrue\n'


def test_set_adds_a_missing_key_and_its_section(small):
    yaml = small.suffix == ".yaml"
    before = small.read_text().splitlines(True)
    result = elemtactl("--config", str(small), "config", "set", "smtpd.banner=ESMTP here",
                       "plugins.spf.enabled=true")
    assert result.returncode == 0, result.stderr
    # The new key goes after the last one of its table, before the comment and blank
    # line that introduce the next; the new section goes at the end.
    banner = "  banner: ESMTP here\n" if yaml else 'banner = "ESMTP here"\n'
    tail = "plugins:\n  spf:\n    enabled: true\n" if yaml else \
        "\n[plugins.spf]\nenabled = true\n"
    assert small.read_text() == "".join(before[:3] + [banner] + before[3:]) + tail
    assert "plugins.spf.enabled = true (was false)" in result.stdout
    assert elemtactl("--config", str(small), "config", "get", "smtpd.banner").stdout == \
        'smtpd.banner = "ESMTP here"\n'


def test_a_refused_value_leaves_the_file_as_it_was_with_start_ups_message(small):
    before = small.read_bytes()
    result = elemtactl("--config", str(small), "config", "set", "listeners[1].port=70000")
    assert result.returncode == 1
    port_line = [n for n, line in enumerate(small.read_text().splitlines(), 1)
                 if "port" in line][-1]
    message = ("%s:%d: listeners[1].port: must be a TCP port between 1 and 65535, not "
               "70000" % (small, port_line))
    assert result.stderr.splitlines() == [
        message, "elemtactl: config set: refused, %s unchanged" % small]
    assert small.read_bytes() == before
    # Start-up says the same of the file with that value written in by hand.
    edited = small.read_text().splitlines(True)
    edited[port_line - 1] = edited[port_line - 1].replace("2525", "70000")
    small.write_text("".join(edited))
    assert check_config(small).stderr.splitlines() == [message]


def test_a_value_of_the_wrong_type_is_refused_as_start_up_refuses_it(small):
    before = small.read_bytes()
    result = elemtactl("--config", str(small), "config", "set", "limits.message_size=big",
                       "smtpd.hostname=mail.example.org")
    assert result.returncode == 1
    lines = sum(1 for _ in small.read_text().splitlines())
    # limits is a new section: the key's line is the one it would have been written on.
    first = result.stderr.splitlines()[0]
    assert first.startswith("%s:" % small)
    assert first.endswith(": limits.message_size: expected an integer, not a string "
                          "('big')")
    assert int(first.split(":")[1]) > lines
    assert small.read_bytes() == before


def test_unknown_keys_and_missing_files_are_refused(small, tmp_path):
    before = small.read_bytes()
    result = elemtactl("--config", str(small), "config", "set", "smtpd.hostnme=x")
    assert result.returncode == 64
    assert result.stderr == ("elemtactl: config set: unknown key smtpd.hostnme; did you "
                             "mean smtpd.hostname?\n")
    result = elemtactl("--config", str(small), "config", "set", "smtpd=x")
    assert result.returncode == 64 and "smtpd is a section" in result.stderr
    result = elemtactl("--config", str(small), "config", "set", "listeners[5].port=25")
    assert result.returncode == 65 and "listeners has no entry 5 (it has 2)" in result.stderr
    assert small.read_bytes() == before
    missing = tmp_path / "nothing" / "elemta.yaml"
    result = elemtactl("--config", str(missing), "config", "set", "smtpd.banner=x")
    assert (result.returncode, result.stderr) == (
        66, "elemtactl: config set: %s: no such file\n" % missing)


@pytest.mark.skipif(os.path.exists("/etc/elemta"), reason="this host has /etc/elemta")
def test_set_without_any_configuration_file_says_where_it_looked(tmp_path):
    result = elemtactl("config", "set", "smtpd.banner=x")
    assert result.returncode == 66
    assert "/etc/elemta/elemta.yaml" in result.stderr
    assert "/etc/elemta/elemta.toml" in result.stderr and "ELEMTA_CONFIG" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the file away needs root")
def test_set_replaces_the_file_atomically_keeping_mode_and_owner(small):
    os.chmod(small, 0o640)
    os.chown(small, 65534, 65534)
    inode = os.stat(small).st_ino
    result = elemtactl("--config", str(small), "config", "set", "smtpd.banner=x")
    assert result.returncode == 0, result.stderr
    info = os.stat(small)
    assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o640, 65534, 65534)
    assert info.st_ino != inode                 # a new file renamed over the old one
    assert sorted(os.listdir(small.parent)) == [small.name]     # no temp file left


def test_set_through_a_link_edits_the_file_it_names(small, tmp_path):
    link = tmp_path / ("link" + small.suffix)
    os.symlink(small, link)
    assert elemtactl("--config", str(link), "config", "set",
                     "smtpd.banner=x").returncode == 0
    assert os.path.islink(link)
    assert 'banner' in small.read_text()


def test_set_says_which_settings_need_a_restart(small, tmp_path):
    result = elemtactl("--config", str(small), "config", "set", "--reload",
                       "queue.spool_dir=%s" % (tmp_path / "other"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "elemtactl: queue.spool_dir needs a restart, not a reload (the master locks the "
        "spool and prepares its maildrop and metrics directories at start): systemctl "
        "restart elemta")


def test_set_with_reload_and_no_elemta_running_says_so(small, tmp_path):
    result = elemtactl("--config", str(small), "config", "set", "--reload",
                       "smtpd.banner=x")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "elemtactl: not reloaded: no master has run on spool %s (the change applies when "
        "it starts)" % (tmp_path / "spool"))


def ehlo_size(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        return int(smtp.esmtp_features["size"]), smtp.ehlo_resp.decode().split("\n")[0]


def test_set_reload_tells_the_running_daemon(elemta_server):
    server = elemta_server()
    assert ehlo_size(server.port) == (31457280, "mx.test")
    result = elemtactl("--config", server.config_path, "config", "set",
                       "limits.message_size=1048576", "smtpd.hostname=mail.example.org")
    assert result.returncode == 0, result.stderr
    assert "not done (no --reload)" in result.stdout
    assert ehlo_size(server.port) == (31457280, "mx.test")     # nobody told it

    result = elemtactl("--config", server.config_path, "config", "set", "--reload",
                       "limits.message_size=2097152")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "elemtactl: told the running master (pid %d) to reload its configuration (SIGHUP)"
        % server.process.pid)
    # The new workers serve with both changes; the old ones finish and go.
    wait_for(lambda: ehlo_size(server.port) == (2097152, "mail.example.org"), timeout=30)


def test_set_reload_tells_only_a_master_that_reads_the_file_edited(elemta_server, tmp_path):
    """Two config files on one spool: the master reads one; an edit of the other must
    not make it reload (it would re-read its own file, not the edit)."""
    server = elemta_server()
    other = tmp_path / "other.yaml"
    shutil.copyfile(server.config_path, other)
    result = elemtactl("--config", str(other), "config", "set", "--reload",
                       "smtpd.hostname=other.example.org")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "elemtactl: the master running on %s (pid %d) reads %s, not %s: not told"
        % (server.spool, server.process.pid, server.config_path, other))

    link = tmp_path / "link.yaml"             # the same file by another name: told
    link.symlink_to(server.config_path)
    result = elemtactl("--config", str(link), "config", "set", "--reload",
                       "smtpd.hostname=mail.example.org")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "elemtactl: told the running master (pid %d) to reload its configuration (SIGHUP)"
        % server.process.pid)
    wait_for(lambda: ehlo_size(server.port)[1] == "mail.example.org", timeout=30)
    assert server.log().count("reloading the configuration") == 1


def test_third_party_plugin_tables_are_shown_and_set(tmp_path):
    """The documented example plugin, found through its entry point as pip would have
    registered it (a dist-info on the path: the shared venv stays as it is)."""
    dist = tmp_path / "site" / "elemta_example_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: elemta-example-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text("[elemta.plugins]\n"
                                           "example = elemta_example:ExamplePlugin\n")
    path = os.pathsep.join([REPO, str(tmp_path / "site"),
                            os.path.join(REPO, "tests", "plugins", "example")])
    config = tmp_path / "elemta.yaml"
    config.write_text("plugins:\n  example:\n    enabled: true\n    tag_header: X-Ours\n")
    env = {"PYTHONPATH": path}
    shown = elemtactl("--config", str(config), "config", "show", "-n", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == ('plugins.example.enabled = true\n'
                            'plugins.example.tag_header = "X-Ours"\n')
    assert "plugins.example.blocked_senders = []" in elemtactl(
        "--config", str(config), "config", "show", env=env).stdout.splitlines()

    changed = elemtactl("--config", str(config), "config", "set",
                        "plugins.example.blocked_senders=[spam@bad.example]", env=env)
    assert changed.returncode == 0, changed.stderr
    assert elemtactl("--config", str(config), "config", "get",
                     "plugins.example.blocked_senders", env=env).stdout == \
        'plugins.example.blocked_senders = ["spam@bad.example"]\n'
    before = config.read_bytes()
    refused = elemtactl("--config", str(config), "config", "set",
                        "plugins.example.tag_header=7", env=env)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[0] == (
        "%s:4: plugins.example.tag_header: expected a string, not an integer (7)" % config)
    assert config.read_bytes() == before


def test_set_can_fix_a_file_start_up_refuses_but_not_one_it_cannot_parse(small):
    text = small.read_text()
    small.write_text(text + ("limits:\n  message_size: -1\n" if small.suffix == ".yaml"
                             else "[limits]\nmessage_size = -1\n"))
    assert check_config(small).returncode == 1
    fixed = elemtactl("--config", str(small), "config", "set", "limits.message_size=1000")
    assert fixed.returncode == 0, fixed.stderr
    assert check_config(small).returncode == 0
    small.write_text(text + "smtpd: [\n")
    before = small.read_bytes()
    broken = elemtactl("--config", str(small), "config", "set", "limits.message_size=5")
    assert broken.returncode == 65
    assert broken.stderr.startswith("elemtactl: config set: cannot edit a file that cannot "
                                    "be read: %s:" % small)
    assert small.read_bytes() == before


def test_set_refuses_a_user_or_group_that_does_not_exist(small):
    before = small.read_bytes()
    result = elemtactl("--config", str(small), "config", "set",
                       "master.user=no-such-user-here")
    assert result.returncode == 1
    line = len(small.read_text().splitlines()) + (2 if small.suffix == ".yaml" else 3)
    assert result.stderr.splitlines()[0] == (
        "%s:%d: master.user: no such user: no-such-user-here" % (small, line))
    assert small.read_bytes() == before


def test_set_says_when_a_reload_cannot_start_all_the_workers_asked(small):
    most = 2 * (os.cpu_count() or 1)        # the smtpd slots of a master started so
    result = elemtactl("--config", str(small), "config", "set",
                       "smtpd.workers=%d" % (most + 1))
    assert result.returncode == 0, result.stderr
    assert ("elemtactl: a reload starts at most %d smtpd children (the master sizes its "
            "table at start), not %d: systemctl restart elemta to have them all"
            % (most, most + 1)) in result.stdout.splitlines()
    within = elemtactl("--config", str(small), "config", "set", "smtpd.workers=%d" % most)
    assert "reload starts at most" not in within.stdout


def test_set_of_a_whole_list_of_tables_keeps_what_introduces_the_next_table(small):
    text = small.read_text()
    result = elemtactl("--config", str(small), "config", "set",
                       'listeners=[{address = "127.0.0.3", port = 2526}]')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:5] == [
        '%s: listeners[0].address = "127.0.0.3" (was "127.0.0.1")' % small,
        "%s: listeners[0].port = 2526 (was 2525)" % small,
        '%s: listeners[1].address removed (was "127.0.0.2")' % small,
        "%s: listeners[1].port removed (was 2525)" % small,
        '%s: listeners[1].mode removed (was "smtp")' % small]
    after = small.read_text()
    assert after.endswith(text[text.index("\n# The spool.\n"):])
    assert after.startswith(text[:text.index("# Where mail comes in.\n")])
    assert elemtactl("--config", str(small), "config", "get", "listeners").stdout == (
        'listeners[0].address = "127.0.0.3"\nlisteners[0].port = 2526\n'
        'listeners[0].mode = "smtp"\n')


def test_set_of_the_whole_listeners_list_of_the_example_changes_only_its_lines(example):
    before = example.read_text()
    result = elemtactl("--config", str(example), "config", "set",
                       'listeners=[{address = "127.0.0.3", port = 2526}, '
                       '{address = "127.0.0.4", port = 2526}]')
    assert result.returncode == 0, result.stderr
    removed, added = changed_lines(before, example.read_text())
    if example.suffix == ".yaml":
        assert removed == ['  - {address: "127.0.0.1", port: 25, mode: smtp}']
        assert added == ['  - {address: "127.0.0.3", port: 2526}',
                         '  - {address: "127.0.0.4", port: 2526}']
    else:
        assert removed == ['address = "127.0.0.1"', "port = 25", 'mode = "smtp"']
        assert added == ['address = "127.0.0.3"', "port = 2526", "", "[[listeners]]",
                         'address = "127.0.0.4"', "port = 2526"]


def test_set_on_a_yaml_file_of_only_comments_keeps_them(tmp_path):
    """The example commented out: ruamel.yaml reads no document and kept no comment."""
    path = tmp_path / "elemta.yaml"
    text = ("# Elemta configuration\n# see man elemta.conf\n\n"
            "# smtpd:\n#   hostname: mx.example.org\n")
    path.write_text(text)
    result = elemtactl("--config", str(path), "config", "set", "smtpd.banner=hi")
    assert result.returncode == 0, result.stderr
    assert path.read_text() == text + "\nsmtpd:\n  banner: hi\n"


def test_a_new_yaml_section_goes_after_the_comment_that_ends_the_file(tmp_path):
    """The comment at the end belongs to the section before it; the new one follows."""
    path = tmp_path / "elemta.yaml"
    path.write_text("api:\n  port: 8625\n# trailing\n")
    result = elemtactl("--config", str(path), "config", "set",
                       "relay.mynetworks=[10.0.0.0/8]", "api.address=127.0.0.2")
    assert result.returncode == 0, result.stderr
    assert path.read_text() == ('api:\n  port: 8625\n  address: 127.0.0.2\n# trailing\n\n'
                                'relay:\n  mynetworks: ["10.0.0.0/8"]\n')


def test_a_new_toml_array_of_tables_goes_before_the_comment_introducing_the_next(tmp_path):
    """[[queue.priority_rules]] goes after [queue]'s keys; "# REST API" and the blank
    line before it stay with [api]."""
    path = tmp_path / "elemta.toml"
    path.write_text('[queue]\nspool_dir = "/x"\n\n# REST API\n[api]\nport = 8625\n')
    result = elemtactl("--config", str(path), "config", "set",
                       "queue.priority_rules=[{sender: a@b.c, priority: 5}]")
    assert result.returncode == 0, result.stderr
    assert path.read_text() == ('[queue]\nspool_dir = "/x"\n\n[[queue.priority_rules]]\n'
                                'sender = "a@b.c"\npriority = 5\n\n'
                                '# REST API\n[api]\nport = 8625\n')


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["crlf", "bom-crlf"])
def test_set_keeps_crlf_line_ends_and_a_bom(small, tmp_path, bom):
    """A file edited on Windows: the same edit as on the LF copy, in its own line ends."""
    windows = tmp_path / ("windows" + small.suffix)
    windows.write_bytes(bom + small.read_bytes().replace(b"\n", b"\r\n"))
    for path in (small, windows):
        result = elemtactl("--config", str(path), "config", "set", "smtpd.banner=hi",
                           "queue.priority_rules=[{sender: a@b.c, priority: 5}]")
        assert result.returncode == 0, result.stderr
    assert b"banner" in small.read_bytes()
    assert windows.read_bytes() == bom + small.read_bytes().replace(b"\n", b"\r\n")


def test_set_run_several_times_at_once_loses_no_change(tmp_path):
    """Six admins (or scripts) setting different keys at the same moment: each read-change-
    replace waits for the one before, so every change is in the file afterwards (found
    by the issue 21 review: without the lock only two of six survived)."""
    import concurrent.futures
    path = tmp_path / "elemta.yaml"
    path.write_text("# ours\nsmtpd:\n  banner: ESMTP\n")
    settings = {"limits.errors": "5", "limits.recipients": "50", "auth.failure_delay": "3.0",
                "delivery.mx_port": "26", "tls.handshake_timeout": "5.0",
                "timeouts.command": "60.0"}
    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
        results = list(pool.map(lambda item: elemtactl("--config", str(path), "config",
                                                       "set", "%s=%s" % item),
                                settings.items()))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    shown = elemtactl("--config", str(path), "config", "get", *settings).stdout
    assert dict(line.split(" = ") for line in shown.splitlines()) == settings
    assert path.read_text().startswith("# ours\n")
