"""Which plugins exist: the built-ins and those installed through an entry point.

Owned by no process: the plugin manager loads the classes of the plugins it runs from
here, and the config loader the class of each third-party plugin table, to check the
table against the plugin's Settings. Light: a built-in's module (and its libraries) is
imported only when its class is asked for.
See also: elemta.plugins.manager, elemta.config.loader (check of third-party tables).
"""

import logging
from typing import Dict

from elemta.plugins.api import Plugin, PluginConfigError

log = logging.getLogger("elemta.plugins")

ENTRY_POINT_GROUP = "elemta.plugins"

# name -> "module:Class". Looked up lazily: a disabled built-in costs no import.
BUILTINS = {
    "spf": "elemta.plugins.spf:SPFPlugin",
    "dkim": "elemta.plugins.dkim:DKIMPlugin",
    "dmarc": "elemta.plugins.dmarc:DMARCPlugin",
    "arc": "elemta.plugins.arc:ARCPlugin",
    "authres": "elemta.plugins.authres:AuthResultsPlugin",
    "greylist": "elemta.plugins.greylist:GreylistPlugin",
    "ratelimit": "elemta.restrictions.ratelimit:RateLimitPlugin",
    "dnsbl": "elemta.restrictions.dnsbl:DNSBLPlugin",
    "rhsbl": "elemta.restrictions.rhsbl:RHSBLPlugin",
    "helo_hostname": "elemta.restrictions.helohostname:HeloHostnamePlugin",
    "client_hostname": "elemta.restrictions.clienthost:ClientHostnamePlugin",
    "non_fqdn": "elemta.restrictions.nonfqdn:NonFQDNPlugin",
    "unknown_sender_domain": "elemta.restrictions.senderdomain:SenderDomainPlugin",
    "clamav": "elemta.plugins.clamav:ClamAVPlugin",
    "rspamd": "elemta.plugins.rspamd:RspamdPlugin",
    "policy_service": "elemta.restrictions.policy_service:PolicyServicePlugin",
}


def available_plugins():
    # type: () -> Dict[str, object]
    """name -> "module:Class" (built-in) or an importlib.metadata entry point. A built-in
    name cannot be taken over by a third-party package."""
    found = {}  # type: Dict[str, object]
    for entry in _entry_points():
        if entry.name in BUILTINS:
            log.warning("plugin %s from %s ignored: that name belongs to a built-in",
                        entry.name, entry.value)
            continue
        found[entry.name] = entry
    found.update(BUILTINS)
    return found


def _entry_points():
    from importlib import metadata
    points = metadata.entry_points()
    if hasattr(points, "select"):
        return list(points.select(group=ENTRY_POINT_GROUP))
    return list(points.get(ENTRY_POINT_GROUP, ()))   # Python 3.9


def load_class(name, where):
    """The Plugin class `where` names: a class, "module:Class" or an entry point; raises
    PluginConfigError naming plugins.NAME when it cannot be loaded."""
    try:
        if isinstance(where, type):
            plugin_class = where
        elif isinstance(where, str):
            module_name, _, class_name = where.partition(":")
            module = __import__(module_name, fromlist=[class_name])
            plugin_class = getattr(module, class_name)
        else:
            plugin_class = where.load()
    except Exception as error:
        raise PluginConfigError("plugins.%s: the plugin cannot be loaded (%s: %s)"
                                % (name, type(error).__name__, error)) from None
    if not (isinstance(plugin_class, type) and issubclass(plugin_class, Plugin)):
        raise PluginConfigError("plugins.%s: %r is not an elemta.plugins.api.Plugin"
                                % (name, plugin_class))
    return plugin_class
