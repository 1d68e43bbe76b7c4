"""Built-in restrictions (issue #15), each a plugin of the stage it guards (registered in
elemta.plugins.registry, its settings at the end of elemta.plugins.settings) or, when it
must see the socket or the raw byte stream, a small module the smtpd session calls."""
