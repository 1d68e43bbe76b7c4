"""Built-in restrictions (issue #15), each a plugin: Postfix's smtpd_*_restrictions and
postscreen's checks (DNS block and allow lists, client and HELO name checks, sender and
recipient address checks), one module per restriction, registered in
elemta.plugins.registry and configured under plugins: like any built-in, their settings
in elemta.plugins.settings.
"""
