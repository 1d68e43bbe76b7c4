"""Command-line entry points: one module per installed program.

elemta (the daemon), elemtactl (the admin tool), elemta-sendmail (installed as
/usr/sbin/sendmail by the packages) and mailq. Each module's main() is named in
setup.cfg's console_scripts; none is imported by a running server process.
See also: setup.cfg, man/.
"""

# sysexits.h: the exit codes the sendmail family of programs uses.
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
