"""Plugins: the API (api), the manager that runs them (manager), which plugins exist
(registry), the built-ins' settings (settings, embedded in the config schema), the
content stages every mail entry shares (content), and the built-ins.

Built-ins: spf, dkim, dmarc, arc (email authentication), authres (the
Authentication-Results header), greylist. Each process asks the plugins of its own stages:
the smtpd worker connection .. storage and queue, pickup data, storage and queue, the
delivery worker routing and delivery (elemta.delivery.stages). See api.py for the stages
and how to write a plugin, and tests/plugins/example for a third-party plugin installed
through its entry point.
"""
