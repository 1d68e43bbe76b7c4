"""Migration from Postfix: reading its configuration and saying it in Elemta's terms.

Owned by no process: elemtactl import-postfix (elemta.cli.pfconfig) runs it once, when
Elemta replaces Postfix. postfix_settings reads main.cf and master.cf as Postfix does;
translate maps them onto elemta.config.schema; emit writes the result as YAML or TOML.
See also: elemta.queue.postfix_import (the queued mail), man/elemtactl.8.
"""
