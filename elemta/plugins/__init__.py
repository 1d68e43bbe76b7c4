"""Plugins: the API (api), the manager that runs them (manager), and the built-ins.

Built-ins: spf, dkim, dmarc, arc (email authentication), authres (the
Authentication-Results header), greylist. Each runs in the process that owns its stage
(the smtpd worker for connection..data). See api.py for how to write one, and
tests/plugins/example for a third-party plugin installed through its entry point.
"""
