"""`elemtactl restrictions`: which check runs when, for a configuration.

Prints elemta.restrictions.catalogue.plan(config): per stage, in calling order, the
smtpd's core checks that config turns on (with their Postfix equivalent, reply and
option), then the enabled plugins serving the stage (with their order), then the milters
(smtpd_milters) in their configured order. This is the
Postfix admin's smtpd_client_restrictions .. smtpd_end_of_data_restrictions in one view.
"""

from os import EX_CONFIG, EX_OK

from elemta.cli.config_finder import config_path, read_config
from elemta.cli.failure import Failure


def cmd_restrictions(args):
    """elemtactl restrictions: list the checks each SMTP stage runs, in order"""
    from elemta.plugins.api import PluginConfigError
    from elemta.restrictions.catalogue import plan
    config = read_config(config_path(args.config))
    try:
        stages = plan(config)
    except PluginConfigError as error:
        raise Failure(EX_CONFIG, str(error))
    for stage, checks in stages:
        print("%s:" % stage)
        if not checks:
            print("  (nothing)")
        for number, check in enumerate(checks, 1):
            postfix = " [Postfix: %s]" % check.postfix if check.postfix else ""
            print("  %d. %s (%s)%s: %s" % (number, check.name, check.kind, postfix,
                                          check.detail))
    return EX_OK


def add_command(commands, parser_class, parents):
    doc = cmd_restrictions.__doc__.split(": ", 1)[1]
    sub = commands.add_parser("restrictions", parents=parents, help=doc, description=doc)
    sub.set_defaults(handler=cmd_restrictions)
