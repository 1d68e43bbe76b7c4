"""Small helpers every Elemta process may use: no process owns them.

util sits at the bottom of the import order (design.md rule 9): it imports
nothing else from elemta, and everything else may import it.
See also: elemta.util.credentials (the SMTP AUTH credentials file).
"""
