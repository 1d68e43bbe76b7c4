"""The milter client: Elemta as the MTA side of the Sendmail milter protocol (version 6),
as Postfix's smtpd_milters and non_smtpd_milters.

Owned by no process: the smtpd worker runs the `smtp` milters for each client session and
pickup runs the `non_smtp` ones for each sendmail submission, both through one
interface, elemta.milter.chain.MilterChain. The modules, each with one job:

    protocol   the wire format (packets, negotiation, macros, replies); no I/O
    macros     the macro values Postfix sends ({i}, j, _, {auth_authen}, ...)
    client     one connection to one milter: socket, per-stage timeouts, replies
    edits      applying a milter's modifications to the message (headers, body)
    chain      every milter of one session, stage by stage; failures, logs, metrics

See also: elemta.config.schema (MilterSettings, MilterDefaults), tests/test_milter*.py.
"""
