"""Whom a restriction checks: the listeners it is configured for, and never our own.

Owned by the restrictions (elemta.restrictions.*), each of which asks skip(ctx, settings)
first. Clients in mynetworks (ctx.trusted), those that did AUTH and local submissions
are never checked, as Postfix configurations put permit_mynetworks and
permit_sasl_authenticated before their restrictions. A restriction's `listeners` names
listeners by mode ("smtp", "submission", "smtps") or by address:port ("127.0.0.1:25",
"[::1]:25"); empty means every listener.
See also: elemta.plugins.settings.RestrictionSettings, elemta.plugins.api.Context.listener.
"""


def listener_names(listener):
    """The names a listener answers to: its mode and its address:port."""
    if listener is None:
        return ()
    address = listener.address
    if ":" in address:
        address = "[%s]" % address
    return (listener.mode, "%s:%d" % (address, listener.port))


def skip(ctx, settings):
    """True when the restriction does not apply to this client on this listener."""
    if ctx.checked_elsewhere or not ctx.client_address:
        return True
    wanted = settings.listeners
    return bool(wanted) and not set(wanted) & set(listener_names(ctx.listener))
