"""Built-in restrictions (issue #15), each a plugin, and the catalogue that orders them
with the smtpd's core checks per stage (elemta.restrictions.catalogue)."""
