"""Command-line entry points: one module per installed program.

elemta (the daemon), elemtactl (the admin tool), elemta-sendmail (installed as
/usr/sbin/sendmail by the packages), mailq and newaliases. Each module's main() is named
in setup.cfg's console_scripts; none is imported by a running server process. They share
config_finder (which configuration file, in one order) and failure (Failure and the exit
statuses). See also: setup.cfg, man/.
"""
