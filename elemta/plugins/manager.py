"""The plugin manager: loads the plugins the config runs and calls them stage by stage.

Owned by every process that runs plugins; each builds its own PluginManager after fork
from the typed `plugins` section of its Config (the settings were checked and built by
the config loader; the manager converts nothing):

    manager = PluginManager(config.plugins.to_run())   # raises PluginConfigError when
                                                       # a plugin cannot be loaded
    manager.start()                                # plugin.init(settings), once per process
    outcome = manager.run("rcpt", ctx)             # an Outcome; never raises
    if outcome.reply: ... answer with it ...
    manager.close()

Plugins come from the built-ins and from the entry-point group `elemta.plugins` (a
third-party package declares `myplugin = mypackage.module:MyPlugin`), listed by
elemta.plugins.registry. A built-in name cannot be taken over by a third-party package.

A plugin whose init() fails when a process starts (a key file the unprivileged worker
cannot read, a database it cannot open) does not stop the process: it is logged by name
and then, with `fail_open: true`, left out; otherwise every call to it answers 451 4.3.0
(logged each time), and init() is tried again at most every INIT_RETRY seconds, so fixing
the file brings it back without a restart.

Every plugin call runs under a gevent.Timeout (the plugin's `timeout`, seconds). A plugin
that raises or overruns is logged by name, in one line, without a traceback, and gives
451 4.3.0 - or, with `fail_open: true`, is passed over as if it had no opinion. Nothing a
plugin does ends the session or the worker. A plugin that computes without yielding cannot
be interrupted by the timeout and stalls every session of the worker meanwhile: plugins
must do their waiting through gevent (the DNS resolver in elemta.plugins.resolver does)
and their heavy computing through elemta.util.offload (a helper process; the dkim and arc
built-ins do), where the timeout interrupts the wait and the helper is killed.

See also: elemta.plugins.api (what plugins see and return), elemta.plugins.settings (the
built-ins' settings and the Authentication-Results rule), tests/test_plugins.py.
"""

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import gevent

from elemta.plugins.api import (CONTINUE, DISCARD, QUARANTINE, QUEUE, REJECT, STAGES,
                                TEMPFAIL, PluginConfigError, Result, served_stages)
from elemta.plugins.registry import BUILTINS, available_plugins, load_class

log = logging.getLogger("elemta.plugins")

# The reply when a plugin fails and is not fail-open (RFC 3463 4.3.0: other or undefined
# mail system status).
PLUGIN_FAILURE = (451, "4.3.0", "Temporary local problem, please try again later")
# Seconds between attempts to start a plugin whose init() failed.
INIT_RETRY = 30.0
DEFAULT_REPLIES = {
    REJECT: (550, "5.7.1", "Rejected by policy"),
    TEMPFAIL: (451, "4.7.1", "Try again later"),
}


@dataclass
class Outcome:
    """What the plugins of one stage decided, merged.

    action: the deciding plugin's action (CONTINUE when nobody objected).
    reply:  (code, status, text) for REJECT and TEMPFAIL, else None.
    quarantine: the reason, when a plugin asked for the message to be held.
    headers / remove: header fields to prepend / delete (see apply_header_edits).
    nexthop: the next hop a routing plugin chose (Result.route), else None.
    reason: the deciding plugin's reason (discard), for the log.
    """
    action: str = CONTINUE
    reply: Optional[Tuple[int, str, str]] = None
    decided_by: Optional[str] = None
    nexthop: Optional[str] = None
    reason: str = ""
    quarantine: Optional[str] = None
    quarantined_by: Optional[str] = None
    discard: bool = False
    headers: List[Tuple[str, str]] = field(default_factory=list)
    remove: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def refused(self):
        return self.action in (REJECT, TEMPFAIL)


class LoadedPlugin:
    def __init__(self, name, plugin, common, settings):
        self.name = name
        self.plugin = plugin
        self.common = common
        self.settings = settings
        self.order = common.order or getattr(plugin, "order", 50)
        self.early = getattr(plugin, "before_core_checks", False)
        self.broken = None          # why init() failed, while it has not succeeded
        self.next_init = 0.0        # time.monotonic() of the next init() attempt


def choose(plugins, known=None):
    """[(name, plugin class, PluginCommon with the timeout in force, plugin settings)]
    for the ConfiguredPlugin entries given, in calling order. Raises PluginConfigError
    naming plugins.<name> when a plugin's class cannot be loaded."""
    chosen = []
    for configured in plugins:
        name, common = configured.name, configured.common
        where = BUILTINS.get(name) or (known if known is not None
                                       else available_plugins()).get(name)
        if where is None:
            raise PluginConfigError("plugins.%s: no such plugin" % name)
        plugin_class = load_class(name, where)
        if common.timeout <= 0:
            common = dataclasses.replace(common, timeout=float(plugin_class.default_timeout))
        chosen.append((name, plugin_class, common, configured.settings))
    chosen.sort(key=lambda item: item[2].order or getattr(item[1], "order", 50))
    return chosen


class PluginManager:
    """The enabled plugins of one process and the calls into them.

    stages: when given, only the plugins serving one of these stages are loaded (the
    delivery worker has no use for an smtpd-only plugin and its databases).
    scanners_only: only the content scanners (Plugin.scans_content), for a rescan."""

    def __init__(self, plugins=(), known=None, stages=None, scanners_only=False):
        """plugins: the ConfiguredPlugin entries to run, as the config's
        Plugins.to_run() gives them; known: name -> plugin class, in place of the
        installed third-party plugins (tests)."""
        self._chosen = choose(plugins, known)
        if stages is not None:
            self._chosen = [chosen for chosen in self._chosen
                            if set(served_stages(chosen[1])) & set(stages)]
        if scanners_only:
            self._chosen = [chosen for chosen in self._chosen
                            if getattr(chosen[1], "scans_content", False)]
        self.plugins = []  # type: List[LoadedPlugin]
        self._by_stage = {stage: [] for stage in STAGES}  # type: Dict[str, List[LoadedPlugin]]

    @classmethod
    def from_mapping(cls, mapping, known=None, stages=None):
        """A manager for the plugins a mapping names, {name: settings table}, each on
        unless its table says enabled: false (scripts and tests). The tables are checked
        and typed by the config loader, as a config file's would be; raises
        PluginConfigError naming plugins.NAME.KEY."""
        from elemta.config.loader import plugins_from_mapping
        return cls(plugins_from_mapping(mapping, known).to_run(), known, stages)

    @property
    def names(self):
        return [name for name, _, _, _ in self._chosen]

    def start(self, strict=False):
        """Instantiate and init() every enabled plugin. A plugin whose init() fails does
        not stop the others: see the module docstring (fail_open leaves it out, otherwise
        it answers 451 4.3.0 until a later init() succeeds). strict=True instead closes
        what started and raises PluginConfigError naming the plugin (for checks and
        tests, not for workers)."""
        for name, plugin_class, common, settings in self._chosen:
            plugin = plugin_class()
            plugin.name = name
            loaded = LoadedPlugin(name, plugin, common, settings)
            self._init(loaded)
            if loaded.broken is not None and strict:
                self.close()
                raise PluginConfigError(loaded.broken if loaded.broken.startswith(
                    "plugins.") else "plugins.%s: cannot start: %s" % (name, loaded.broken))
            if loaded.broken is not None and common.fail_open:
                log.error("plugin %s failed to start: %s; running without it (fail_open)",
                          name, loaded.broken)
                continue
            if loaded.broken is not None:
                log.error("plugin %s failed to start: %s; its stages (%s) answer %d %s "
                          "until it starts", name, loaded.broken,
                          ", ".join(plugin.stages()), PLUGIN_FAILURE[0], PLUGIN_FAILURE[1])
            self.plugins.append(loaded)
            for stage in plugin.stages():
                self._by_stage[stage].append(loaded)
        return self

    def _init(self, loaded):
        """plugin.init(settings); on failure, remember why and when to try again."""
        try:
            loaded.plugin.init(loaded.settings)
        except Exception as error:
            loaded.broken = (str(error) if isinstance(error, PluginConfigError)
                             else _describe_error(error))
            loaded.next_init = time.monotonic() + INIT_RETRY
            return
        if loaded.broken is not None:
            log.info("plugin %s started after all", loaded.name)
        loaded.broken = None

    @property
    def broken(self):
        """{name: why} of the plugins whose init() has not succeeded."""
        return {loaded.name: loaded.broken for loaded in self.plugins
                if loaded.broken is not None}

    def wants(self, stage, early=None):
        """True when some plugin serves the stage (skip building the context if not);
        early: as in run()."""
        return any(early is None or loaded.early == early
                   for loaded in self._by_stage.get(stage, ()))

    def run(self, stage, ctx, early=None):
        # type: (str, object, Optional[bool]) -> Outcome
        """Call every plugin serving `stage` in order and merge their verdicts.

        A REJECT, TEMPFAIL, DISCARD or ACCEPT stops the chain; QUARANTINE is remembered
        and the chain goes on (a later plugin may still refuse). early: True calls only
        the plugins that run before the stage's core checks (Plugin.before_core_checks),
        False only the others, None all. Never raises."""
        if stage not in self._by_stage:
            raise ValueError("unknown stage %r" % (stage,))
        ctx.stage = stage
        outcome = Outcome()
        for loaded in self._by_stage[stage]:
            if early is not None and loaded.early != early:
                continue
            result = self._call(loaded, stage, ctx)
            if result is None:
                continue
            outcome.headers.extend(result.headers)
            outcome.remove.extend(result.remove)
            if result.action == CONTINUE:
                continue
            if result.action == QUARANTINE:
                if outcome.quarantine is None:
                    outcome.quarantine = result.reason or "held by %s" % loaded.name
                    outcome.quarantined_by = loaded.name
                continue
            outcome.action = result.action
            outcome.decided_by = loaded.name
            outcome.nexthop = result.nexthop
            outcome.reason = result.reason
            if result.action in (REJECT, TEMPFAIL):
                default = DEFAULT_REPLIES[result.action]
                outcome.reply = (result.code or default[0], result.status or default[1],
                                 result.text or default[2])
            outcome.discard = result.action == DISCARD
            break
        return outcome

    def _call(self, loaded, stage, ctx):
        """The plugin's Result, None for no opinion, or the failure Result."""
        if loaded.broken is not None:
            if time.monotonic() >= loaded.next_init:
                self._init(loaded)
            if loaded.broken is not None:
                return self._failed(loaded, stage, ctx, "not started: %s" % loaded.broken)
        timeout = gevent.Timeout(loaded.common.timeout)
        timeout.start()
        try:
            result = getattr(loaded.plugin, "on_" + stage)(ctx)
            if result is not None and not isinstance(result, Result):
                raise TypeError("returned %r, not a Result or None" % (result,))
            return result
        except gevent.Timeout as error:
            if error is not timeout:
                raise                      # someone else's deadline: not ours to eat
            problem = "timed out after %gs" % loaded.common.timeout
        except Exception as error:
            problem = _describe_error(error)
        finally:
            timeout.close()
        return self._failed(loaded, stage, ctx, problem)

    def _failed(self, loaded, stage, ctx, problem):
        where = getattr(ctx, "queue_id", None) or "NOQUEUE"
        client = getattr(ctx, "client_address", "") or "local"
        if loaded.common.fail_open or stage == QUEUE:
            log.error("%s: plugin %s failed at %s stage for client [%s]: %s; continuing "
                      "(%s)", where, loaded.name, stage, client, problem,
                      "fail_open" if stage != QUEUE else "the queue stage is a notification")
            return None
        log.error("%s: plugin %s failed at %s stage for client [%s]: %s; answering %d %s",
                  where, loaded.name, stage, client, problem, PLUGIN_FAILURE[0],
                  PLUGIN_FAILURE[1])
        return Result.tempfail(*PLUGIN_FAILURE)

    def close(self):
        for loaded in reversed(self.plugins):
            if loaded.broken is not None:
                continue                  # never started: nothing to close
            try:
                loaded.plugin.close()
            except Exception as error:
                log.error("plugin %s failed to close: %s", loaded.name,
                          _describe_error(error))
        self.plugins = []
        self._by_stage = {stage: [] for stage in STAGES}


def _describe_error(error):
    """'ValueError: bad thing (at plugin.py:42)' - the innermost frame, not a traceback."""
    text = "%s: %s" % (type(error).__name__, error) if str(error) else type(error).__name__
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        text += " (at %s:%d)" % (os.path.basename(tb.tb_frame.f_code.co_filename),
                                 tb.tb_lineno)
    return text


def header_block(headers) -> bytes:
    """(name, value) pairs as header field lines, in order, each ending in CRLF."""
    return b"".join(("%s: %s\r\n" % (name, value.lstrip(" "))).encode("utf-8")
                    for name, value in headers)


def apply_header_edits(raw, headers=(), remove=()):
    # type: (bytes, object, object) -> bytes
    """The message with `headers` prepended (in order) and the header fields listed in
    `remove` (name, raw value) deleted: what the smtpd writes after the data stage."""
    from elemta.plugins.api import Message
    message = Message(raw)
    doomed = {}
    for name, value in remove:
        key = (name.lower(), value)
        doomed[key] = doomed.get(key, 0) + 1
    out = [header_block(headers)]
    # Walk the original header section line by line so kept fields stay byte-identical.
    pos = 0
    for name, value in message.headers:
        encoded = value.encode("utf-8", "surrogateescape")
        start = raw.index(name.encode("ascii", "replace") + b":", pos)
        end = start + len(name) + 1 + len(encoded)
        # Include the line ending that closes the field.
        if raw[end:end + 2] == b"\r\n":
            end += 2
        elif raw[end:end + 1] == b"\n":
            end += 1
        key = (name.lower(), value)
        if doomed.get(key):
            doomed[key] -= 1
        else:
            out.append(raw[start:end])
        pos = end
    out.append(raw[pos:])
    return b"".join(out)

