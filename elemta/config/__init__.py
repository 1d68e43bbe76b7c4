"""Elemta's configuration: one YAML or TOML file, loaded into a checked, frozen Config.

Owned by no process: every process calls load_config (or default_config, when run with
no file) once at start and passes the typed Config on; code never reads raw dicts.
See also: elemta.config.schema (every option), elemta.config.loader, man/elemta.conf.5.
"""

from elemta.config.errors import ConfigError, Problem
from elemta.config.loader import default_config, load_config
from elemta.config.schema import Config

__all__ = ["Config", "ConfigError", "Problem", "default_config", "load_config"]
