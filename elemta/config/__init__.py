"""Elemta's configuration: one YAML or TOML file, loaded into a checked, frozen Config.

Owned by no process: every process calls load_config (or default_config, when run with
no file) once at start and passes the typed Config on; code never reads raw dicts.
See also: elemta.config.schema (every option), elemta.config.loader, man/elemta.conf.5.

The names below are imported when first asked for: the built-in plugins' settings
(elemta.plugins.settings) import elemta.config.options, and the schema imports them, so
importing this package must not import the schema first.
"""

import importlib

_WHERE = {"Config": "elemta.config.schema", "ConfigError": "elemta.config.errors",
          "Problem": "elemta.config.errors", "default_config": "elemta.config.loader",
          "load_config": "elemta.config.loader"}

__all__ = ["Config", "ConfigError", "Problem", "default_config", "load_config"]


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError("module 'elemta.config' has no attribute %r" % (name,))
    return getattr(importlib.import_module(_WHERE[name]), name)
