"""The plugin system: manager, settings, verdicts, failures, header edits, and
Authentication-Results exactly as RFC 8601 spells it.

Covers elemta.plugins.api, elemta.plugins.manager and elemta.plugins.authres. The
documented example plugin (tests/plugins/example) is pip-installed into the running venv
and found through its `elemta.plugins` entry point by a fresh Python process.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Tuple

import gevent
import pytest

from elemta.plugins.api import (Context, Message, MethodResult, Plugin, PluginConfigError,
                                Result)
from elemta.plugins.authres import (authserv_id_of, forged_headers, format_header_value,
                                    format_value)
from elemta.config.schema import PluginSettings
from elemta.plugins.manager import PluginManager, apply_header_edits
from elemta.plugins.registry import BUILTINS, load_class
from elemta.plugins.settings import DKIMSettings

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "plugins", "example")


# ---- small plugins for the manager to call --------------------------------------------

@dataclass(frozen=True)
class VerdictSettings:
    action: str = "continue"
    header: str = ""
    fail: str = ""          # "raise", "sleep", "junk"


class Verdict(Plugin):
    Settings = VerdictSettings
    calls = []

    def on_rcpt(self, ctx):
        Verdict.calls.append(self.name)
        if self.settings.fail == "raise":
            raise ValueError("the plugin is broken")
        if self.settings.fail == "sleep":
            gevent.sleep(30)
        if self.settings.fail == "junk":
            return "yes please"
        headers = [("X-" + self.name, self.settings.header)] if self.settings.header else []
        if self.settings.action == "reject":
            return Result.reject(554, "5.7.1", "%s says no" % self.name)
        if self.settings.action == "bare-reject":
            return Result(action="reject")
        if self.settings.action == "tempfail":
            return Result.tempfail()
        if self.settings.action == "quarantine":
            return Result.quarantine("suspicious", headers=headers)
        if self.settings.action == "discard":
            return Result.discard()
        if self.settings.action == "accept":
            return Result.accept(headers=headers)
        return Result.proceed(headers=headers) if headers else None


class First(Verdict):
    order = 1


class Second(Verdict):
    order = 2


class Third(Verdict):
    order = 3


class BadInit(Plugin):
    failures_left = 0

    def init(self, settings):
        if BadInit.failures_left:
            BadInit.failures_left -= 1
            raise OSError("cannot open /var/lib/nothing")

    def on_rcpt(self, ctx):
        return Result.reject(550, "5.7.1", "badinit is up and says no")


class BadClose(Plugin):
    def on_helo(self, ctx):
        return None

    def close(self):
        raise RuntimeError("already closed")


KNOWN = {"first": First, "second": Second, "third": Third, "badinit": BadInit,
         "badclose": BadClose}


def manager(config):
    Verdict.calls = []
    return PluginManager.from_mapping(config, known=KNOWN).start()


def rcpt(mgr, **kw):
    ctx = Context(client_address="192.0.2.7", queue_id="Q1", **kw)
    ctx.recipient = "rcpt@example.test"
    return mgr.run("rcpt", ctx)


# ---- verdicts ----------------------------------------------------------------------------

def test_plugins_run_in_order_and_a_reject_stops_the_chain():
    mgr = manager({"third": {}, "second": {"action": "reject"}, "first": {"header": "1"}})
    outcome = rcpt(mgr)
    assert Verdict.calls == ["first", "second"]
    assert outcome.reply == (554, "5.7.1", "second says no")
    assert outcome.decided_by == "second" and outcome.refused
    assert outcome.headers == [("X-first", "1")]


def test_no_opinion_is_default_behaviour():
    outcome = rcpt(manager({"first": {}, "second": {}}))
    assert (outcome.action, outcome.reply, outcome.headers) == ("continue", None, [])
    assert Verdict.calls == ["first", "second"]


def test_the_core_fills_in_replies_a_plugin_left_out():
    assert rcpt(manager({"first": {"action": "bare-reject"}})).reply == (
        550, "5.7.1", "Rejected by policy")
    assert rcpt(manager({"first": {"action": "tempfail"}})).reply == (
        451, "4.7.1", "Try again later")


def test_quarantine_is_remembered_and_the_chain_goes_on():
    outcome = rcpt(manager({"first": {"action": "quarantine", "header": "q"},
                            "second": {"action": "reject"}}))
    assert outcome.quarantine == "suspicious" and outcome.quarantined_by == "first"
    assert outcome.reply[0] == 554
    outcome = rcpt(manager({"first": {"action": "quarantine"}, "second": {}}))
    assert (outcome.quarantine, outcome.reply, outcome.action) == ("suspicious", None,
                                                                  "continue")


def test_accept_and_discard_end_the_stage():
    outcome = rcpt(manager({"first": {"action": "accept", "header": "a"}, "second": {}}))
    assert (outcome.action, outcome.headers, Verdict.calls) == (
        "accept", [("X-first", "a")], ["first"])
    outcome = rcpt(manager({"first": {"action": "discard"}, "second": {}}))
    assert outcome.discard and outcome.reply is None and Verdict.calls == ["first"]


def test_results_are_checked_when_made():
    with pytest.raises(ValueError):
        Result.reject(450, "4.7.1", "a 4xx is no reject")
    with pytest.raises(ValueError):
        Result.tempfail(451, "5.7.1", "status and code disagree")
    with pytest.raises(ValueError):
        Result.proceed(headers=[("Bad Name", "x")])
    with pytest.raises(ValueError):
        Result.proceed(headers=[("X-Inject", "a\r\nBcc: victim@example.test")])
    with pytest.raises(ValueError):
        Result(action="maybe")


# ---- failures ---------------------------------------------------------------------------

@pytest.mark.parametrize("fail, words", [
    ("raise", "ValueError: the plugin is broken (at test_plugins.py:"),
    ("junk", "TypeError: returned 'yes please', not a Result or None"),
])
def test_a_failing_plugin_gives_451_430_and_one_log_line(caplog, fail, words):
    caplog.set_level("INFO", logger="elemta")
    outcome = rcpt(manager({"first": {"fail": fail}, "second": {}}))
    assert outcome.reply == (451, "4.3.0", "Temporary local problem, please try again later")
    assert Verdict.calls == ["first"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "elemta.plugins"]
    assert line.startswith("Q1: plugin first failed at rcpt stage for client [192.0.2.7]: ")
    assert words in line and line.endswith("; answering 451 4.3.0")
    assert "Traceback" not in caplog.text


def test_fail_open_passes_over_the_failure(caplog):
    caplog.set_level("INFO", logger="elemta")
    outcome = rcpt(manager({"first": {"fail": "raise", "fail_open": True},
                            "second": {"header": "2"}}))
    assert outcome.reply is None and outcome.headers == [("X-second", "2")]
    assert Verdict.calls == ["first", "second"]
    assert "continuing (fail_open)" in caplog.text


def test_a_slow_plugin_times_out_without_blocking_others(caplog):
    mgr = manager({"first": {"fail": "sleep", "timeout": 0.2}})
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(10)])
    started = time.monotonic()
    outcome = rcpt(mgr)
    elapsed = time.monotonic() - started
    ticker.join()
    assert outcome.reply[:2] == (451, "4.3.0")
    assert 0.2 <= elapsed < 1.0
    assert len(ticks) == 10          # the other greenlet ran while the plugin waited
    assert "plugin first failed at rcpt stage for client [192.0.2.7]: timed out after " \
           "0.2s" in caplog.text


def test_an_outer_timeout_is_not_swallowed():
    mgr = manager({"first": {"fail": "sleep"}})
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.1):
            rcpt(mgr)


def test_a_plugin_that_cannot_start_answers_451_then_starts_when_it_can(caplog,
                                                                         monkeypatch):
    from elemta.plugins import manager as manager_module
    BadInit.failures_left = 2
    monkeypatch.setattr(manager_module, "INIT_RETRY", 0.0)   # retry at the next call
    caplog.set_level("INFO", logger="elemta")
    mgr = manager({"first": {}, "badinit": {}})             # no exception: the worker lives
    assert list(mgr.broken) == ["badinit"] and mgr.wants("rcpt")
    outcome = rcpt(mgr)
    assert (outcome.reply, outcome.decided_by) == (
        (451, "4.3.0", "Temporary local problem, please try again later"), "badinit")
    assert Verdict.calls == ["first"]
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("elemta")]
    assert lines[0].startswith("plugin badinit failed to start: OSError: cannot open "
                               "/var/lib/nothing (at test_plugins.py:")
    assert lines[0].endswith("; its stages (rcpt) answer 451 4.3.0 until it starts")
    assert lines[1].startswith("Q1: plugin badinit failed at rcpt stage for client "
                               "[192.0.2.7]: not started: OSError: cannot open")
    # The second init() (at this call) fails no more: the plugin runs.
    assert rcpt(mgr).reply == (550, "5.7.1", "badinit is up and says no")
    assert mgr.broken == {} and "plugin badinit started after all" in caplog.text
    mgr.close()


def test_a_plugin_that_cannot_start_is_left_out_when_fail_open(caplog):
    BadInit.failures_left = 1
    mgr = manager({"badinit": {"fail_open": True}})
    assert not mgr.wants("rcpt") and rcpt(mgr).reply is None
    assert ("plugin badinit failed to start: OSError: cannot open /var/lib/nothing"
            in caplog.text and "running without it (fail_open)" in caplog.text)


def test_strict_start_raises_naming_the_plugin():
    BadInit.failures_left = 1
    with pytest.raises(PluginConfigError) as error:
        PluginManager.from_mapping({"first": {}, "badinit": {}}, known=KNOWN).start(strict=True)
    assert str(error.value).startswith("plugins.badinit: cannot start: OSError: "
                                       "cannot open /var/lib/nothing (at test_plugins.py:")


def test_close_failures_are_logged():
    mgr = manager({"badclose": {}})
    assert mgr.wants("helo") and not mgr.wants("data")
    mgr.close()                       # logged, not raised
    assert not mgr.wants("helo")


# ---- settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"nosuch": {}}, "plugins.nosuch: no such plugin (available: "),
    ({"first": {"action": 3}}, "plugins.first.action: expected a string, not an integer "
                               "(3)"),
    ({"first": {"enabled": "no"}}, "plugins.first.enabled: expected a boolean (true or "
                                   "false), not a string ('no')"),
    ({"first": {"timeout": -1}}, "plugins.first.timeout: must be 0 (the plugin's own "
                                 "default) or more seconds, not -1"),
    ({"first": {"colour": "red"}}, "plugins.first.colour: unknown key; known keys here: "
                                   "action, enabled, fail, fail_open, header, order, timeout"),
    ({"first": ["action"]}, "plugins.first: expected a table of settings, not a list"),
    ({"badinit": {"x": 1}}, "plugins.badinit.x: unknown key; known keys here: enabled, "
                            "fail_open, order, timeout"),
])
def test_settings_errors_name_the_key_path(config, message):
    with pytest.raises(PluginConfigError) as error:
        PluginManager.from_mapping(config, known=KNOWN)
    assert str(error.value).startswith(message)


def test_disabled_plugins_are_not_loaded_and_authres_comes_with_auth_methods():
    assert PluginManager.from_mapping({"first": {"enabled": False}, "second": None},
                         known=KNOWN).names == ["second"]
    assert PluginManager.from_mapping({"spf": {}}).names == ["spf", "authres"]
    assert PluginManager.from_mapping({"spf": {}, "authres": {"enabled": False}}).names == ["spf"]
    assert PluginManager.from_mapping({"spf": {"enabled": False}}).names == []
    assert PluginManager.from_mapping({"greylist": {"enabled": False, "delay": 5}}).names == []


def test_the_config_tables_are_the_plugins_own_settings():
    """The config's typed plugin tables are the very Settings each plugin takes, and
    reach it as they are, with no conversion on the way."""
    for name in BUILTINS:
        assert type(getattr(PluginSettings(), name)) is load_class(name, BUILTINS[name]).Settings
    plugins = PluginSettings(dkim=DKIMSettings(enabled=True, max_headers=20))
    mgr = PluginManager(plugins.to_run()).start()
    assert mgr.names == ["dkim", "authres"]
    assert [loaded.settings for loaded in mgr.plugins] == [plugins.dkim, plugins.authres]
    assert mgr.plugins[0].settings is plugins.dkim
    mgr.close()


def test_loading_a_config_imports_no_plugin_code(tmp_path):
    """Config loading (every process, every tool) costs no plugin library: the plugins'
    settings live in a light module of their own."""
    config = tmp_path / "elemta.yaml"
    config.write_text("plugins:\n  dkim: {enabled: true, max_headers: 20}\n"
                      "  greylist: {enabled: true}\n")
    script = ("import sys; from elemta.config import load_config; "
              "c = load_config(sys.argv[1]); assert c.plugins.dkim.max_headers == 20; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('dkim', 'spf', 'lmdb', 'checkdmarc', 'gevent') or m.startswith("
              "'elemta.plugins.')))")
    done = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["['elemta.plugins.api',", "'elemta.plugins.settings']"]


@dataclass(frozen=True)
class Nested:
    name: str
    weight: int = 1


@dataclass(frozen=True)
class Outer:
    items: Tuple[Nested, ...] = ()
    ratio: float = 0.5


class Nesting(Plugin):
    Settings = Outer


def nested_settings(table):
    """plugins.x typed by the config loader, as a third-party plugin's table is."""
    from elemta.config.loader import plugins_from_mapping
    return plugins_from_mapping({"x": table}, known={"x": Nesting}).other[0].settings


def test_nested_settings():
    parsed = nested_settings({"items": [{"name": "a"}, {"name": "b", "weight": 2}],
                              "ratio": 1})
    assert parsed == Outer((Nested("a"), Nested("b", 2)), 1.0)
    with pytest.raises(PluginConfigError) as error:
        nested_settings({"items": [{"name": "a"}, {"name": "b", "weight": True}]})
    assert str(error.value) == "plugins.x.items[1].weight: expected an integer, not a " \
                               "boolean (true)"
    with pytest.raises(PluginConfigError) as error:
        nested_settings({"items": "a"})
    assert str(error.value) == "plugins.x.items: expected a list of tables, not a " \
                               "string ('a')"
    with pytest.raises(PluginConfigError) as error:
        nested_settings({"items": [{"weight": 2}]})
    assert str(error.value) == "plugins.x.items[0].name: is missing: this setting has " \
                               "no default"


# ---- messages and header edits -----------------------------------------------------------

RAW = (b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
       b"Authentication-Results: mx.elemta.test; spf=pass\r\n"
       b"Subject: =?utf-8?q?caf=C3=A9?= \xff\r\n"
       b"From: a@example.test\r\n"
       b"\r\n"
       b"Body line\r\nFrom: not a header\r\n")


def test_message_headers_and_body():
    message = Message(RAW)
    assert [name for name, _ in message.headers] == [
        "Received", "Authentication-Results", "Subject", "From"]
    assert message.get("received") == " from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000"
    assert message.body == b"Body line\r\nFrom: not a header\r\n"
    assert Message(b"no colon here\r\nbody").headers == []
    assert Message(b"A: 1\nB: 2\n\nbody\n").get("b") == " 2"


def test_header_edits_keep_the_rest_byte_for_byte():
    forged = Message(RAW).headers[1]
    edited = apply_header_edits(RAW, [("Authentication-Results", " mx.elemta.test; none"),
                                      ("X-Two", "2")], [forged])
    assert edited == (b"Authentication-Results: mx.elemta.test; none\r\nX-Two: 2\r\n"
                      + RAW.replace(b"Authentication-Results: mx.elemta.test; spf=pass\r\n",
                                    b""))
    assert apply_header_edits(RAW) == RAW


# ---- Authentication-Results (RFC 8601) ------------------------------------------------------

RESULTS = [
    MethodResult("spf", "pass", properties=(("smtp.mailfrom", "alice@example.com"),)),
    MethodResult("dkim", "pass", properties=(
        ("header.d", "example.com"), ("header.i", "@example.com"), ("header.s", "sel"),
        ("header.a", "rsa-sha256"), ("header.b", "Kx/9a+Bc=Yz1"))),
    MethodResult("dkim", "fail", "signature did not verify",
                 (("header.d", "example.org"),)),
    MethodResult("dmarc", "pass", properties=(("header.from", "example.com"),)),
]


def test_authentication_results_as_rfc8601_spells_it():
    value = format_header_value("mx.elemta.test", RESULTS)
    assert "Authentication-Results:" + value + "\r\n" == (
        "Authentication-Results: mx.elemta.test;\r\n"
        "\tspf=pass smtp.mailfrom=alice@example.com;\r\n"
        "\tdkim=pass header.d=example.com header.i=@example.com header.s=sel\r\n"
        '\t  header.a=rsa-sha256 header.b="Kx/9a+Bc=Yz1";\r\n'
        '\tdkim=fail reason="signature did not verify" header.d=example.org;\r\n'
        "\tdmarc=pass header.from=example.com\r\n")
    assert format_header_value("mx.elemta.test", []) == " mx.elemta.test; none"


def test_an_independent_parser_reads_our_header():
    authres = pytest.importorskip("authres", reason="authres comes with dkimpy[arc]")
    value = format_header_value("mx.elemta.test", RESULTS)
    parsed = authres.AuthenticationResultsHeader.parse(
        "Authentication-Results:" + value.replace("\r\n", ""))
    assert parsed.authserv_id == "mx.elemta.test"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("dmarc", "pass")]
    assert [(p.type, p.name, p.value) for p in parsed.results[1].properties][:3] == [
        ("header", "d", "example.com"), ("header", "i", "@example.com"),
        ("header", "s", "sel")]
    assert parsed.results[0].properties[0].value == "alice@example.com"
    assert parsed.results[2].reason == "signature did not verify"
    none = authres.AuthenticationResultsHeader.parse(
        "Authentication-Results:" + format_header_value("mx.elemta.test", []))
    assert none.results == []


@pytest.mark.parametrize("value, expected", [
    ("example.com", "example.com"),
    ("user@example.com", "user@example.com"),
    ("@example.com", "@example.com"),
    ('we"ird user@example.com', '"we\\"ird user@example.com"'),
    ("two words", '"two words"'),
    ("caf\u00e9", '"caf?"'),
    ("", '""'),
])
def test_values_are_tokens_addresses_or_quoted(value, expected):
    assert format_value(value) == expected


def test_forged_results_claiming_our_id_are_removed():
    headers = [
        ("Authentication-Results", " mx.elemta.test; dkim=pass header.d=bank.example"),
        ("Authentication-Results", " (comment (nested)) MX.Elemta.Test.; spf=pass"),
        ("authentication-results", ' "mx.elemta.test" 1; none'),
        ("Authentication-Results", " other.example; spf=pass"),
        ("ARC-Authentication-Results", " i=1; mx.elemta.test; spf=pass"),
        ("Authentication-Results", " mx.elemta.test.evil.example; spf=pass"),
    ]
    assert forged_headers(headers, ["mx.elemta.test"]) == headers[:3]
    assert authserv_id_of(" (unclosed comment") is None
    assert authserv_id_of(" example.net;\r\n\tspf=pass") == "example.net"


def test_authres_plugin_adds_once_and_removes_forged():
    mgr = PluginManager.from_mapping({"authres": {}}).start()
    ctx = Context(hostname="mx.elemta.test", message=Message(RAW))
    ctx.auth_results = [RESULTS[3], RESULTS[0]]
    outcome = mgr.run("data", ctx)
    edited = apply_header_edits(RAW, outcome.headers, outcome.remove)
    assert edited.count(b"Authentication-Results:") == 1
    assert edited.startswith(b"Authentication-Results: mx.elemta.test;\r\n\tspf=pass "
                             b"smtp.mailfrom=alice@example.com;\r\n\tdmarc=pass")
    with pytest.raises(PluginConfigError) as error:
        PluginManager.from_mapping({"authres": {"authserv_id": "two words"}})
    assert str(error.value).startswith("plugins.authres.authserv_id: 'two words' is not")


# ---- the documented example, installed through its entry point ---------------------------

@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    # Built from a copy: a build leaves build/ and *.egg-info behind in its source tree.
    source = str(tmp_path_factory.mktemp("example") / "example")
    shutil.copytree(EXAMPLE, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    done = subprocess.run(pip + ["install", "--no-deps", source], capture_output=True,
                          timeout=300)
    if done.returncode != 0:
        pytest.skip("cannot pip install the example plugin: %s" % done.stderr.decode()[-300:])
    yield
    subprocess.run(pip + ["uninstall", "-y", "elemta-example-plugin"], capture_output=True,
                   timeout=120)


def test_example_plugin_runs_through_its_entry_point(installed_example, tmp_path):
    script = textwrap.dedent("""
        from elemta.plugins.api import Context, Message
        from elemta.plugins.manager import PluginManager, available_plugins
        print(type(available_plugins()["example"]).__name__)
        mgr = PluginManager.from_mapping({"example": {
            "blocked_senders": ["Spam@Bad.Example"], "blocked_networks": ["192.0.2.0/24"],
            "routes": ["partner.example=smtp:[10.0.0.5]:2525"]}}).start(strict=True)
        print(mgr.run("connection", Context(client_address="192.0.2.1")).reply)
        ctx = Context(client_address="198.51.100.1")
        print(mgr.run("connection", ctx).reply)
        ctx.sender = "spam@bad.example"
        print(mgr.run("mail", ctx).reply)
        ctx.sender = "friend@good.example"
        print(mgr.run("mail", ctx).reply)
        ctx.message = Message(b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
        print(mgr.run("data", ctx).headers)
        ctx.recipient = "someone@Partner.Example"
        print(mgr.run("routing", ctx).nexthop)
        for bad in ({"blocked_sender": []}, {"routes": ["partner.example"]}):
            try:
                PluginManager.from_mapping({"example": bad})
            except Exception as error:
                print(error)
        # In a config file: checked by the loader against ExampleSettings, with its line.
        from elemta.config import ConfigError, load_config
        with open("elemta.yaml", "w") as config:
            config.write("plugins:\\n  example:\\n    enabled: true\\n"
                         "    blocked_networks: [192.0.2.0/24]\\n    tag_header: 7\\n")
        try:
            load_config("elemta.yaml")
        except ConfigError as error:
            print(error)
        with open("elemta.yaml", "w") as config:
            config.write("plugins:\\n  example:\\n    enabled: true\\n"
                         "    tag_header: X-Ours\\n")
        print(load_config("elemta.yaml").plugins.to_run())
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                          env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [
        "EntryPoint",
        "(554, '5.7.1', 'Client host rejected: blocked network')",
        "None",
        "(550, '5.7.1', 'Sender <spam@bad.example> is not welcome here')",
        "None",
        "[('X-Example-Plugin', 'message 1 seen by example')]",
        "smtp:[10.0.0.5]:2525",
        "plugins.example.blocked_sender: unknown key; did you mean "
        "plugins.example.blocked_senders?",
        "plugins.example.routes[0]: 'partner.example' is not domain=nexthop",
        "elemta.yaml:5: plugins.example.tag_header: expected a string, not an integer (7)",
        "(ConfiguredPlugin(name='example', common=PluginCommon(enabled=True, timeout=0.0, "
        "fail_open=False, order=0), settings=ExampleSettings(blocked_networks=(), "
        "blocked_senders=(), tag_header='X-Ours', routes=())),)",
    ]
