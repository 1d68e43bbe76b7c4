"""Warnings about a configuration that loads but probably does not do what its admin
wants: each names the key, and mail still flows.

Asked by the loader (elemta.config.loader.load_text) once a file has no errors; the
warnings ride on the Config (Config.warnings, each a Problem naming file:line:key) to
whoever shows them: the daemon logs them at start and at every reload, `elemtactl
config check` and `elemta --check-config` print them after "OK" (exit 0). Like
Postfix's "postfix check" warnings, they never stop a start.

    virtual.mailbox_domains without virtual.mailbox_maps
        every recipient of those domains is accepted at RCPT, so mail to a user who
        does not exist is taken and bounced later (backscatter), or lost in a catch-all
        of the delivery agent: Postfix's VIRTUAL_README requires the table.

See also: elemta.config.errors (Problem), man/elemta.conf.5.
"""

from typing import Any, List, Tuple

from elemta.config.errors import KeyPath


def advice(config: Any) -> List[Tuple[KeyPath, str]]:
    """(key path, message) of each warning the Config deserves, in schema order."""
    found: List[Tuple[KeyPath, str]] = []
    virtual = config.virtual
    if virtual.mailbox_domains and virtual.mailbox_maps is None:
        found.append((("virtual", "mailbox_domains"),
                      "no virtual.mailbox_maps is set, so every recipient in these "
                      "domains is accepted at RCPT and mail for unknown users bounces "
                      "later: set virtual.mailbox_maps to the table of the users "
                      "(Postfix's virtual_mailbox_maps)"))
    return found
