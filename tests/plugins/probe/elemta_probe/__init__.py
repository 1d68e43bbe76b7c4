"""A test plugin that serves every stage: it records each call and answers as told.

Installed by tests/test_plugin_stages.py through the `elemta.plugins` entry point and
enabled in a server's config, e.g.

    plugins:
      probe:
        enabled: true
        record: /tmp/x/calls.jsonl          # one JSON line per call, from any process
        stages: [connection, data]          # serve only these (default: all)
        rules:
          - {stage: connection, when: 127.0.0.2, action: reject, text: go away}
          - {stage: data, when: discard-me, action: discard}
          - {stage: routing, when: "@elsewhere.test", action: route,
             value: "smtp:[127.0.0.1]:2525"}
        fail_init: false                    # true: init() raises (a broken plugin)

A rule acts when `when` is empty or appears in the client address, the sender or the
recipient (the recipients at stages without one). Not a model of a good plugin: see
tests/plugins/example for that.
"""

import json
import os
from dataclasses import dataclass
from typing import Tuple

from elemta.plugins.api import STAGES, Plugin, Result


@dataclass(frozen=True)
class Rule:
    stage: str
    action: str = "continue"   # continue accept reject tempfail discard quarantine route
                               # header (value "Name: text") raise
    when: str = ""
    code: int = 0
    status: str = ""
    text: str = ""
    value: str = ""


@dataclass(frozen=True)
class ProbeSettings:
    record: str = ""
    stages: Tuple[str, ...] = ()
    rules: Tuple[Rule, ...] = ()
    fail_init: bool = False


class ProbePlugin(Plugin):
    Settings = ProbeSettings

    def init(self, settings):
        self.settings = settings
        if settings.fail_init:
            raise OSError("cannot open /nonexistent/probe.db")

    def stages(self):
        served = super().stages()
        wanted = self.settings.stages
        return tuple(s for s in served if s in wanted) if wanted else served

    def _act(self, stage, ctx):
        message = ctx.message
        self._record({
            "stage": stage, "pid": os.getpid(), "queue_id": ctx.queue_id,
            "client": ctx.client_address, "helo": ctx.helo, "sender": ctx.sender,
            "recipient": ctx.recipient, "recipients": list(ctx.recipients),
            "local": ctx.local, "trusted": ctx.trusted, "outbound": ctx.outbound,
            "nexthop": ctx.nexthop, "auth_user": ctx.auth_user,
            "headers": [name for name, _ in message.headers] if message else None,
        })
        subject = " ".join([ctx.client_address or "", ctx.sender or "",
                            ctx.recipient or " ".join(ctx.recipients)])
        for rule in self.settings.rules:
            if rule.stage == stage and rule.when in subject:
                return self._result(rule)
        return None

    def _result(self, rule):
        if rule.action == "raise":
            raise RuntimeError(rule.text or "the probe was told to fail")
        if rule.action in ("reject", "tempfail"):
            kwargs = {}
            if rule.code:
                kwargs["code"] = rule.code
            if rule.status:
                kwargs["status"] = rule.status
            if rule.text:
                kwargs["text"] = rule.text
            return getattr(Result, rule.action)(**kwargs)
        if rule.action == "discard":
            return Result.discard(rule.text)
        if rule.action == "quarantine":
            return Result.quarantine(rule.text or "held by the probe")
        if rule.action == "accept":
            return Result.accept()
        if rule.action == "route":
            return Result.route(rule.value)
        if rule.action == "header":
            name, _, text = rule.value.partition(":")
            return Result.proceed(headers=[(name.strip(), text.strip())])
        return None

    def _record(self, call):
        if not self.settings.record:
            return
        line = (json.dumps(call) + "\n").encode("utf-8")
        fd = os.open(self.settings.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _stage_method(stage):
    def method(self, ctx):
        return self._act(stage, ctx)
    method.__name__ = "on_" + stage
    method.__doc__ = "Record the %s-stage call and answer by the rules." % stage
    return method


for _stage in STAGES:
    if _stage == "accept":
        continue               # the tests' stage lists start at connection
    setattr(ProbePlugin, "on_" + _stage, _stage_method(_stage))
