"""Built-in restrictions (issue #15), each a plugin (elemta.plugins.api) registered in
elemta.plugins.registry BUILTINS, its settings at the end of elemta.plugins.settings, and
placed among the plugins of its stage by its `order`: what Postfix's smtpd_*_restrictions
do, one module (or a few) per restriction."""
