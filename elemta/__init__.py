"""Elemta: a mail transfer agent that replaces Postfix as the system MTA.

See ../shared/design.md for the process model; each sub-package's docstring
says which process owns it.
"""

__version__ = "0.1.0"
