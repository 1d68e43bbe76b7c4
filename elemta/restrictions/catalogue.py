"""Which check runs when: the one ordered list of restrictions per SMTP stage.

Owned by no process: the smtpd names its refusals after these checks (log line and the
elemta_smtpd_restriction_refusals metric), `elemtactl restrictions` prints the plan for a
config, and elemta.config.manpage renders CORE_CHECKS into elemta.conf(5). A Postfix
admin reads smtpd_client_restrictions .. smtpd_end_of_data_restrictions to learn this;
here the order is fixed where security needs it (the relay guard always comes before any
check that could accept a recipient), and the plugins of a stage - the built-in
restrictions among them - follow the core checks of that stage in their `order`
(plugins.NAME.order moves one). The milters (config `milters`, the smtp ones) come last
at every stage, in their configured order, as Postfix asks its smtpd_milters after its
smtpd restrictions.

Stages, as the issue and Postfix name them: connect (before the greeting), helo, auth,
mail, rcpt, data (the DATA or first BDAT command) and end_of_data (the whole message).
"""

from dataclasses import dataclass
from typing import Callable, List, Tuple

from elemta.plugins.api import served_stages

STAGES = ("connect", "helo", "auth", "mail", "rcpt", "data", "end_of_data")

# A plugin stage -> the restriction stage it runs in (queue, routing and delivery refuse
# nothing a client hears).
PLUGIN_STAGES = {
    "accept": "connect", "connection": "connect", "helo": "helo", "auth": "auth", "mail": "mail",
    "rcpt": "rcpt", "data_command": "data", "data": "end_of_data", "storage": "end_of_data",
}


# A restriction stage -> the milter stages asked in it (elemta.milter.chain); none at
# AUTH (the milter protocol has no such stage: {auth_authen} comes with MAIL).
MILTER_STAGES = {"connect": "connect", "helo": "helo", "mail": "mail", "rcpt": "rcpt",
                 "data": "data", "end_of_data": "header, eoh, body, eom"}

# The protocol core's own refusals (metrics.rejection_reason) -> the check they are.
CORE_REFUSALS = {"size": "message_size_limit", "recipients": "recipient_limit",
                 "auth": "submission_auth"}

_STAGE_OF_COMMAND = {"CONNECT": "connect", "HELO": "helo", "EHLO": "helo", "AUTH": "auth",
                     "MAIL": "mail", "RCPT": "rcpt"}


def stage_of_command(command):
    """The stage a refusal of the SMTP command belongs to: end_of_data for the content
    (DATA, BDAT, END-OF-MESSAGE), as the core's refusals that name DATA (a size limit,
    the pipelining test) are about the content; the checks of the DATA command itself
    (plugins, milters) give their stage, data, to the session."""
    return _STAGE_OF_COMMAND.get(command, "end_of_data")


@dataclass(frozen=True)
class CoreCheck:
    """A check built into the smtpd (not a plugin).

    name: as logged ("(restriction NAME)") and as the metric's restriction label;
    postfix: the Postfix restriction or parameter it stands for;
    option: the config key that tunes it ("" when it is always on);
    refuses: the reply it gives, in a few words;
    active: config -> whether it runs with that config;
    last: it runs after the stage's plugins and milters, not before them."""
    name: str
    stage: str
    postfix: str
    option: str
    refuses: str
    active: Callable = lambda config: True
    last: bool = False


# What a header or body check table refuses with (elemta.content.checks).
_CHECK_REPLIES = ("550 5.7.1 for REJECT (DISCARD, HOLD, REDIRECT: 250); 451 4.3.0 when "
                  "the table cannot answer")

CORE_CHECKS = (
    CoreCheck("draining", "connect", "none (stopping the smtpd service in master.cf)", "",
              "421 4.3.2 while elemtactl drain has the node take no new mail"),
    CoreCheck("cluster_peer_networks", "connect", "mynetworks and "
              "smtpd_client_restrictions = permit_mynetworks, reject on a master.cf "
              "smtpd of its own", "cluster.peer_networks",
              "421 4.7.1 on a handover listener to a client outside cluster.peer_networks",
              lambda config: any(l.mode == "handover" for l in config.listeners)),
    CoreCheck("worker_connection_limit", "connect", "default_process_limit",
              "limits.connections_per_worker", "421 4.7.0 too many connections"),
    CoreCheck("client_connection_limit", "connect", "smtpd_client_connection_count_limit",
              "limits.connections_per_client", "421 4.7.0 too many connections from you"),
    CoreCheck("pregreet", "connect", "postscreen_greet_action", "protocol_tests.greet_wait",
              "talking before the greeting: logged; drop: 521 5.5.1 and hang up "
              "(enforce refuses at RCPT)",
              lambda config: config.protocol_tests.greet_wait > 0),
    CoreCheck("pipelining", "connect", "postscreen_pipelining_action",
              "protocol_tests.pipelining_enable",
              "commands sent ahead without PIPELINING, at any command: logged; drop: 521 "
              "5.5.1 and hang up (enforce refuses at RCPT and at the end of data)",
              lambda config: config.protocol_tests.pipelining_enable),
    CoreCheck("auth_failure_delay", "auth", "smtpd_error_sleep_time", "auth.failure_delay",
              "535 after a delay that grows with the client's recent failures"),
    CoreCheck("message_size_limit", "mail", "message_size_limit", "limits.message_size",
              "552 5.3.4 for a SIZE= over the limit"),
    CoreCheck("queue_minfree", "mail", "queue_minfree", "queue.min_free_space",
              "452 4.3.1 insufficient system storage"),
    CoreCheck("reject_sender_login_mismatch", "mail", "reject_sender_login_mismatch",
              "smtpd.reject_sender_login_mismatch", "553 5.7.1 sender not owned by user",
              lambda config: config.smtpd.sender_login_maps is not None
              and config.smtpd.reject_sender_login_mismatch != "none"),
    CoreCheck("canonical_maps", "mail", "canonical_maps", "rewrite.sender_canonical_maps",
              "451 4.3.0 when a canonical table cannot answer",
              lambda config: _rewriting(config)),
    CoreCheck("submission_auth", "mail", "smtpd_sender_restrictions = "
              "permit_sasl_authenticated, reject (master.cf submission)",
              "listeners[].mode", "530 5.7.0 authentication required, on a submission or "
              "smtps listener"),
    CoreCheck("pregreet", "rcpt", "postscreen_greet_action", "protocol_tests.greet_action",
              "550 5.5.1 Protocol error to every RCPT of a client that failed the pregreet "
              "test (enforce)",
              lambda config: config.protocol_tests.greet_wait > 0
              and config.protocol_tests.greet_action == "enforce"),
    CoreCheck("pipelining", "rcpt", "postscreen_pipelining_action",
              "protocol_tests.pipelining_action",
              "550 5.5.1 Protocol error to every RCPT of a client that failed the "
              "pipelining test (enforce)",
              lambda config: config.protocol_tests.pipelining_enable
              and config.protocol_tests.pipelining_action == "enforce"),
    CoreCheck("recipient_limit", "rcpt", "smtpd_recipient_limit", "limits.recipients",
              "452 4.5.3 too many recipients"),
    CoreCheck("reject_unauth_destination", "rcpt", "reject_unauth_destination",
              "relay.mynetworks", "554 5.7.1 relay access denied"),
    CoreCheck("reject_unlisted_recipient", "rcpt", "reject_unlisted_recipient",
              "virtual.mailbox_maps", "550 5.1.1 user unknown; 451 4.3.0 when a table "
              "cannot answer"),
    CoreCheck("canonical_maps", "rcpt", "canonical_maps", "rewrite.recipient_canonical_maps",
              "451 4.3.0 when a canonical table cannot answer",
              lambda config: _rewriting(config)),
    # Last at DATA: the queue file is made only for a message the checks let in, and
    # with the header fields they gave (PREPEND) above the Received header.
    CoreCheck("queue_storage", "data", "queue_minfree", "queue.spool_dir",
              "452 4.3.1 when no queue file can be made, 451 4.3.0 on other errors",
              last=True),
    CoreCheck("message_size_limit", "end_of_data", "message_size_limit",
              "limits.message_size", "552 5.3.4 message too big"),
    CoreCheck("pipelining", "end_of_data", "postscreen_pipelining_action",
              "protocol_tests.pipelining_action",
              "550 5.5.1 Protocol error to a message whose DATA came with its content "
              "(enforce)",
              lambda config: config.protocol_tests.pipelining_enable
              and config.protocol_tests.pipelining_action == "enforce"),
    # Applied while the content streams in (elemta.content), given at the end of DATA.
    CoreCheck("hopcount_limit", "end_of_data", "hopcount_limit", "content.hopcount_limit",
              "554 5.4.6 too many hops (Received: headers)"),
    CoreCheck("header_checks", "end_of_data", "header_checks", "content.header_checks",
              _CHECK_REPLIES, lambda config: config.content.header_checks is not None),
    CoreCheck("mime_header_checks", "end_of_data", "mime_header_checks",
              "content.mime_header_checks", _CHECK_REPLIES,
              lambda config: (config.content.mime_header_checks
                              or config.content.header_checks) is not None),
    CoreCheck("nested_header_checks", "end_of_data", "nested_header_checks",
              "content.nested_header_checks", _CHECK_REPLIES,
              lambda config: (config.content.nested_header_checks
                              or config.content.header_checks) is not None),
    CoreCheck("body_checks", "end_of_data", "body_checks", "content.body_checks",
              _CHECK_REPLIES, lambda config: config.content.body_checks is not None),
    CoreCheck("canonical_maps", "end_of_data", "canonical_maps", "rewrite.canonical_maps",
              "451 4.3.0 when a table cannot answer while the headers of a local client's "
              "message are rewritten",
              lambda config: _rewriting(config)),
    CoreCheck("queue_storage", "end_of_data", "queue_minfree", "queue.spool_dir",
              "452 4.3.1 when the spool is full, 451 4.3.0 when it cannot be written"),
)


def _rewriting(config):
    rewrite = config.rewrite
    return any(getattr(rewrite, key, None) for key in (
        "canonical_maps", "sender_canonical_maps", "recipient_canonical_maps"))


@dataclass(frozen=True)
class PlannedCheck:
    """One line of the plan: a core check or a plugin, in calling order."""
    name: str
    kind: str           # "core", "plugin" or "milter"
    postfix: str        # core: the Postfix equivalent; plugin: "" (its own doc says)
    detail: str         # core: option and reply; plugin: its order and plugin stages


def plan(config) -> List[Tuple[str, List[PlannedCheck]]]:
    """[(stage, [PlannedCheck, ...])] for every stage, in the order the smtpd applies
    them with this config: the plugins that run before the core checks
    (Plugin.before_core_checks), its active core checks, then the other enabled plugins
    serving the stage, each group by order, then the smtp milters, then the core checks
    that come last (CoreCheck.last); at end_of_data the plugins that serve only the
    storage stage come after all that, as they sign what the milters left. A plugin is
    listed where its stages() says it is called with its settings (one that skips a
    stage its settings leave idle is not listed there). Raises PluginConfigError when a
    plugin cannot be loaded."""
    from elemta.plugins.manager import choose     # gevent: not for the man page's sake
    early = {stage: [] for stage in STAGES}
    core = {stage: [] for stage in STAGES}
    core_last = {stage: [] for stage in STAGES}
    late = {stage: [] for stage in STAGES}
    storage_only = {stage: [] for stage in STAGES}
    for check in CORE_CHECKS:
        if check.active(config):
            (core_last if check.last else core)[check.stage].append(PlannedCheck(
                check.name, "core", check.postfix,
                "%s%s" % (check.refuses, "; set by " + check.option if check.option else "")))
    for name, plugin_class, common, settings in choose(config.plugins.to_run()):
        served = {}
        for plugin_stage in _stages_with(plugin_class, settings):
            stage = PLUGIN_STAGES.get(plugin_stage)
            if stage is not None:
                served.setdefault(stage, []).append(plugin_stage)
        before = getattr(plugin_class, "before_core_checks", False)
        for stage, plugin_stages in served.items():
            # The milters run between the data and storage plugins at the end of data.
            group = early if before else storage_only if plugin_stages == ["storage"] \
                else late
            group[stage].append(PlannedCheck(
                name, "plugin", "", "order %d%s, plugin stage %s" % (
                    common.order or getattr(plugin_class, "order", 50),
                    ", before the core checks" if before else "",
                    ", ".join(plugin_stages))))
    milters = {stage: [PlannedCheck(
        "milter " + (entry.name or entry.socket), "milter", "smtpd_milters",
        "%s, milter stage %s" % (entry.socket, MILTER_STAGES[stage]))
        for entry in config.milters if entry.smtp and stage in MILTER_STAGES]
        for stage in STAGES}
    return [(stage, early[stage] + core[stage] + late[stage] + milters[stage]
             + core_last[stage] + storage_only[stage]) for stage in STAGES]


def _stages_with(plugin_class, settings):
    """The stages a plugin serves with these settings: its stages(), on an instance
    given the settings but not started (no database opened, nothing connected)."""
    plugin = plugin_class()
    plugin.settings = settings
    try:
        return plugin.stages()
    except Exception:                  # a stages() that needs init(): the class's own
        return served_stages(plugin_class)
