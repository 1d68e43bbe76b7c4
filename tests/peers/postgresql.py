"""A private PostgreSQL for tests: a throw-away cluster on a loopback port.

Owned by no Elemta process: tests/test_maps_pgsql.py looks up pgsql: tables in it. Made
with Debian's initdb and pg_ctl (/usr/lib/postgresql/VERSION/bin, package postgresql),
never the system cluster: data directory, unix socket and log all live under one temp
directory. PostgreSQL refuses to run as root, so when the tests run as root the server
runs as the postgres user (which the package creates), else as the caller. Built for
speed, not durability: fsync and full_page_writes are off, and initdb does not sync
either (about two seconds to start here). synchronous_commit stays on: stop() is
immediate (a crash), and a commit must be in the WAL by then to survive it.

    with PostgresInstance(tempfile.mkdtemp()) as pg:
        pg.execute("CREATE TABLE ...")          # as the superuser, in pg.dbname
        ...hosts = 127.0.0.1:pg.port, user = pg.user, password = pg.password...
        pg.stop(); ...; pg.start()              # the server down, then back

Local socket connections are trusted (setup); TCP ones need the password (SCRAM), so a
wrong password is a real authentication failure.
See also: tests/peers/dovecot.py (the same life cycle), ../shared/peers.md.
"""

import glob
import importlib
import os
import pwd
import shutil
import subprocess

from tests.harness import free_port


def postgres_bin():
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit()
                   else 0)
    return os.path.dirname(found[-1]) if found else None


def postgres_available():
    """Why a private PostgreSQL cannot run here, or None when it can."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres user to run PostgreSQL as"
    try:
        importlib.import_module("psycopg")
    except ImportError:
        return "psycopg is not installed (pip install -e .)"
    return None


class PostgresError(RuntimeError):
    """PostgreSQL would not start or stop; the message holds its log."""


class PostgresInstance:
    """One private cluster (see the module docstring)."""

    user = "elemta"
    password = "s3cret-for-tests"
    dbname = "maps"

    def __init__(self, directory):
        self.directory = os.path.abspath(directory)
        self.data = os.path.join(self.directory, "data")
        self.socket_dir = os.path.join(self.directory, "run")
        self.log_file = os.path.join(self.directory, "postgres.log")
        self.port = free_port()
        self.bin = postgres_bin()
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    # -- running PostgreSQL's programs as its owner

    def _run(self, program, *args, check=True):
        kwargs = {}
        if self.owner is not None:
            kwargs = {"user": self.owner.pw_uid, "group": self.owner.pw_gid,
                      "extra_groups": []}
        result = subprocess.run([os.path.join(self.bin, program)] + list(args),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=self.directory, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise PostgresError("%s failed (%d): %s\n%s" % (
                program, result.returncode, result.stdout.decode(errors="replace"),
                self.log()))
        return result

    def log(self):
        try:
            with open(self.log_file, errors="replace") as log:
                return log.read()
        except OSError:
            return ""

    # -- life cycle

    def __enter__(self):
        os.makedirs(self.socket_dir, exist_ok=True)
        password_file = os.path.join(self.directory, "pwfile")
        with open(password_file, "w") as stream:
            stream.write(self.password + "\n")
        if self.owner is not None:
            for path in (self.directory, self.socket_dir, password_file):
                os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
            os.chmod(self.directory, 0o700)
        self._run("initdb", "--no-sync", "-D", self.data, "-U", self.user,
                  "--pwfile", password_file, "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C")
        self.start()
        self.execute_in("postgres", "CREATE DATABASE %s" % self.dbname)
        return self

    def start(self):
        options = ("-c listen_addresses=127.0.0.1 -c port=%d -c unix_socket_directories=%s "
                   "-c fsync=off -c full_page_writes=off "
                   "-c shared_buffers=16MB -c max_connections=30"
                   % (self.port, self.socket_dir))
        self._run("pg_ctl", "-D", self.data, "-l", self.log_file, "-w", "-t", "60",
                  "-o", options, "start")

    def stop(self):
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", "60", "stop",
                  check=False)

    def __exit__(self, *exc):
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- setting up tables (as the superuser, over the trusted local socket)

    def execute_in(self, dbname, sql, parameters=None):
        import psycopg
        with psycopg.connect(host=self.socket_dir, port=self.port, user=self.user,
                             dbname=dbname, autocommit=True) as connection:
            connection.execute(sql, parameters)

    def execute(self, sql, parameters=None):
        self.execute_in(self.dbname, sql, parameters)
