"""Fixtures that run the real Elemta server as a subprocess on loopback.

`elemta_server(**config)` starts an ElemtaServer (tests/harness.py: `python -m
elemta.cli.elemta --config FILE` with a YAML config built from the test defaults merged
with the test's sections), waits for its 220 greeting and stops it (SIGTERM) at the end
of the test. Every server's log is checked for Python tracebacks at teardown: client
input must never reach one.
"""

import pytest

from tests.harness import ElemtaServer, make_tls_files


def _server_factory(workdir):
    """(start(**sections) -> started ElemtaServer, stop_all()) for servers under workdir."""
    servers = []

    def start(**sections):
        server = ElemtaServer(workdir / ("server%d" % len(servers)), sections)
        servers.append(server)
        return server.start()

    def stop_all():
        for server in servers:
            orphans = server.stop()
            assert not orphans, "processes left after the master exited: %s" % orphans
            assert "Traceback" not in server.log(), server.log()

    return start, stop_all


@pytest.fixture
def elemta_server(tmp_path):
    """Factory: elemta_server(section=dict, ...) -> a started ElemtaServer."""
    start, stop_all = _server_factory(tmp_path)
    yield start
    stop_all()


@pytest.fixture(scope="module")
def elemta_module_server(tmp_path_factory):
    """elemta_server for a whole test module: many probes against one server (its queue
    and log are shared by the module's tests, so they must not depend on each other's)."""
    start, stop_all = _server_factory(tmp_path_factory.mktemp("module"))
    yield start
    stop_all()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key for mx.test."""
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def credentials(tmp_path_factory):
    """A credentials file with user 'alice', password 'wonderland'."""
    from elemta.util.credentials import set_user
    path = str(tmp_path_factory.mktemp("auth") / "credentials")
    set_user(path, "alice", "wonderland")
    return path


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL (tests/peers/postgresql.py), started once per session; a
    test that stops it starts it again before it ends."""
    import tempfile
    from tests.peers.postgresql import PostgresInstance, postgres_available
    why = postgres_available()
    if why:
        pytest.skip(why)
    # Not under pytest's tmp_path: its directories are 0700 root, and PostgreSQL runs
    # as the postgres user.
    with PostgresInstance(tempfile.mkdtemp(prefix="elemta-pg-")) as instance:
        yield instance
