"""pgsql: tables against a real PostgreSQL (Debian's, a private cluster started once per
session by the postgres fixture): Postfix's % expansions as bound parameters, and a
server that is down, refuses the password or never answers giving TableUnavailable
with a readable reason within a bounded time, never a hang or a traceback."""

import os
import socket
import subprocess
import sys
import time

import gevent
import pytest

from elemta.maps import TableError, TableUnavailable, lookup_address, open_table, values
from elemta.smtp.replies import lookup_failure
from tests.harness import REPO, free_port

QUERY = "SELECT goto FROM alias WHERE address = '%s' AND active"


@pytest.fixture(scope="module")
def tables(postgres):
    postgres.execute("""
        CREATE TABLE alias (address text, goto text, active boolean);
        INSERT INTO alias VALUES ('joe@example.org', 'joe@mail.example.org', true),
            ('sales@example.org', 'anne@example.org', true),
            ('sales@example.org', 'bob@example.org', true),
            ('gone@example.org', 'x@example.org', false);
        CREATE TABLE mailbox (local text, domain text, maildir text);
        INSERT INTO mailbox VALUES ('joe', 'example.org', 'example.org/joe/');
        CREATE TABLE uid (id integer, name text);
        INSERT INTO uid VALUES (42, 'joe');
    """)
    return postgres


def cf(tmp_path, postgres, query=QUERY, **settings):
    lines = {"hosts": "127.0.0.1:%d" % postgres.port, "user": postgres.user,
             "password": postgres.password, "dbname": postgres.dbname, "query": query,
             "timeout": "3"}
    lines.update(settings)
    path = tmp_path / "virtual-pgsql.cf"
    path.write_text("# as Postfix's pgsql_table(5)\n" + "".join(
        "%s = %s\n" % item for item in lines.items() if item[1] is not None))
    return str(path)


def test_lookups_bind_the_key_and_its_parts(tmp_path, tables):
    table = open_table("pgsql:" + cf(tmp_path, tables))
    assert table.lookup("Joe@Example.ORG") == "joe@mail.example.org"
    assert values(table.lookup("sales@example.org")) == ["anne@example.org",
                                                         "bob@example.org"]
    assert table.lookup("gone@example.org") is None
    assert table.lookup("nobody@example.org") is None
    assert table.lookup("' OR '1'='1") is None
    assert table.lookup("x' OR true; DROP TABLE alias; --@example.org") is None
    assert table.lookup("joe@example.org") == "joe@mail.example.org"     # still there
    parts = open_table("pgsql:" + cf(
        tmp_path, tables, "SELECT maildir FROM mailbox WHERE local='%u' AND domain='%d'",
        result_format="/var/mail/vhosts/%s"))
    assert parts.lookup("joe@example.org") == "/var/mail/vhosts/example.org/joe/"
    assert parts.lookup("joe") is None          # no domain: the query is not run
    numbers = open_table("pgsql:" + cf(tmp_path, tables, "SELECT name FROM uid WHERE "
                                       "id = '%s'"))
    assert numbers.lookup("42") == "joe"        # '%s' is typed as the column, as in Postfix
    with pytest.raises(TableUnavailable, match='invalid input syntax for type integer'):
        numbers.lookup("x' OR '1'='1")


def test_rows_with_international_domains_are_found_in_either_spelling(tmp_path, tables):
    """The key with its domain in A-labels (as every lookup spells it), then, when it has
    A-labels, in UTF-8: a row holding either spelling is found, whichever the client
    used, through the server's UTF8 client encoding."""
    tables.execute("""
        CREATE TABLE idn_alias (address text, goto text);
        INSERT INTO idn_alias VALUES ('alice@bücher.example', 'utf8 row'),
            ('bob@xn--bcher-kva.example', 'ascii row'), ('@münchen.example', 'catch-all');
        CREATE TABLE idn_domain (name text);
        INSERT INTO idn_domain VALUES ('bücher.example');
    """)
    table = open_table("pgsql:" + cf(tmp_path, tables,
                                     "SELECT goto FROM idn_alias WHERE address = '%s'"))
    for spelling in ("alice@bücher.example", "alice@xn--bcher-kva.example",
                     "Alice@BÜCHER.Example."):
        assert lookup_address(table, spelling).value == "utf8 row", spelling
        assert table.lookup(spelling) == "utf8 row", spelling
    for spelling in ("bob@bücher.example", "bob@xn--bcher-kva.example"):
        assert lookup_address(table, spelling).value == "ascii row", spelling
    assert lookup_address(table, "dan@münchen.example") == (
        "@xn--mnchen-3ya.example", "catch-all")
    assert lookup_address(table, "dan@bücher.example") is None
    domains = open_table("pgsql:" + cf(tmp_path, tables, "SELECT 'ok' FROM idn_domain "
                                                         "WHERE name = '%d'"))
    assert lookup_address(domains, "anyone@xn--bcher-kva.example").value == "ok"


def test_the_unix_socket_directory_works_as_a_host(tmp_path, tables):
    socket_file = "%s/.s.PGSQL.%d" % (tables.socket_dir, tables.port)
    table = open_table("pgsql:" + cf(tmp_path, tables, hosts="unix:" + socket_file,
                                     password=None))
    assert table.lookup("joe@example.org") == "joe@mail.example.org"


def test_a_postgresql_uri_works_as_a_host(tmp_path, tables):
    uri = "postgresql://%s:%s@127.0.0.1:%d/%s" % (tables.user, tables.password,
                                                  tables.port, tables.dbname)
    table = open_table("pgsql:" + cf(tmp_path, tables, hosts=uri, user=None,
                                     password=None, dbname=None))
    assert table.lookup("joe@example.org") == "joe@mail.example.org"


def test_a_second_host_is_tried_when_the_first_refuses(tmp_path, tables):
    hosts = "127.0.0.1:%d inet:127.0.0.1:%d" % (free_port(), tables.port)
    table = open_table("pgsql:" + cf(tmp_path, tables, hosts=hosts))
    assert table.lookup("joe@example.org") == "joe@mail.example.org"


def test_unknown_keys_in_the_cf_file_name_file_line_and_key(tmp_path, tables):
    path = cf(tmp_path, tables, hostname="127.0.0.1")
    with pytest.raises(TableError, match=r"virtual-pgsql.cf:8: hostname: unknown key"):
        open_table("pgsql:" + path)


def assert_unavailable(table, reason, within):
    started = time.monotonic()
    with pytest.raises(TableUnavailable) as error:
        table.lookup("joe@example.org")
    took = time.monotonic() - started
    assert reason in str(error.value), str(error.value)
    assert str(error.value).startswith(table.spec + ": ")
    assert "\n" not in str(error.value)
    assert took < within, "took %.1f s" % took


def test_a_wrong_password_is_unavailable_with_the_reason(tmp_path, tables):
    table = open_table("pgsql:" + cf(tmp_path, tables, password="wrong"))
    assert_unavailable(table, 'password authentication failed for user "elemta"', 5)


def test_a_server_that_never_answers_is_unavailable_in_bounded_time(tmp_path, tables):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)                # connections complete, nothing is ever said
    try:
        table = open_table("pgsql:" + cf(tmp_path, tables, timeout="1",
                                         hosts="127.0.0.1:%d" % silent.getsockname()[1]))
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05))
                                       for _ in range(100)])
        assert_unavailable(table, "no answer within 1 seconds", 3)
        ticker.kill()
        assert len(ticks) >= 10     # the event loop ran while the lookup waited
    finally:
        silent.close()


def rcpt_reply(table, address):
    """What a consumer at RCPT answers: the shape every map's consumer follows."""
    try:
        found = lookup_address(table, address)
    except TableUnavailable:
        return lookup_failure(address).encode()
    return b"250 2.1.5 Ok\r\n" if found else b"550 5.1.1 unknown\r\n"


def test_a_stopped_server_is_unavailable_then_found_again(tmp_path, tables):
    table = open_table("pgsql:" + cf(tmp_path, tables))
    lookups = [gevent.spawn(table.lookup, "joe@example.org") for _ in range(8)]
    gevent.joinall(lookups, timeout=30, raise_error=True)   # several connections kept
    assert [lookup.value for lookup in lookups] == ["joe@mail.example.org"] * 8
    tables.stop()
    try:
        assert_unavailable(table, "Connection refused", 5)
        assert rcpt_reply(table, "joe@example.org") == (
            b"451 4.3.0 <joe@example.org>: Temporary lookup failure\r\n")
        assert rcpt_reply(table, "nobody@example.org").startswith(b"451 ")   # never 550
        result = subprocess.run(
            [sys.executable, "-m", "elemta.cli.elemtactl", "map", "query",
             table.spec, "joe@example.org"], capture_output=True, text=True,
            env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
        assert result.returncode == os.EX_TEMPFAIL
        assert result.stdout == "" and result.stderr.count("\n") == 1
        assert result.stderr.startswith("elemtactl: %s: cannot connect:" % table.spec)
    finally:
        tables.start()
    assert table.lookup("joe@example.org") == "joe@mail.example.org"   # reconnected
    assert rcpt_reply(table, "nobody@example.org") == b"550 5.1.1 unknown\r\n"


# ---------------------------------------------------------------- encodings

@pytest.fixture(scope="module")
def latin1(tables):
    """A LATIN1 database beside the UTF8 one (old installations made under a Latin-1
    locale have them), holding one address with a Latin-1 letter."""
    tables.execute_in("postgres", "DROP DATABASE IF EXISTS maps_latin1")
    tables.execute_in("postgres", "CREATE DATABASE maps_latin1 ENCODING 'LATIN1' "
                      "TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    tables.execute_in("maps_latin1", """
        CREATE TABLE alias (address text, goto text, active boolean);
        INSERT INTO alias VALUES ('j\u00f6e@example.org', 'joe@mail.example.org', true);
    """)
    return tables


def connections_to(postgres, dbname):
    """How many sessions the server has open in dbname."""
    import psycopg
    with psycopg.connect(host=postgres.socket_dir, port=postgres.port, user=postgres.user,
                         dbname="postgres", autocommit=True) as connection:
        return connection.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                  "%s", [dbname]).fetchone()[0]


@pytest.mark.parametrize("encoding, reason", [
    # The default client encoding: the server cannot convert the key.
    (None, 'query failed: character with byte sequence 0xe2 0x82 0xac in encoding "UTF8" '
           'has no equivalent in encoding "LATIN1"'),
    # The client encoding itself lacks the character: nothing is sent.
    ("LATIN1", "the key has a character (\\u20ac) that the client encoding LATIN1 cannot "
               "carry: not looked up"),
])
def test_a_key_the_encodings_cannot_carry_is_unavailable_and_the_connection_kept(
        tmp_path, latin1, encoding, reason):
    table = open_table("pgsql:" + cf(tmp_path, latin1, dbname="maps_latin1",
                                     encoding=encoding))
    try:
        assert table.lookup("J\u00f6e@example.org") == "joe@mail.example.org"  # in Latin-1
        assert connections_to(latin1, "maps_latin1") == 1
        with pytest.raises(TableUnavailable) as caught:
            table.lookup("j\u20ace@example.org")
        assert str(caught.value).startswith("%s: %s" % (table.spec, reason))
        assert "\n" not in str(caught.value)
        assert table.lookup("joe@example.org") is None
        assert connections_to(latin1, "maps_latin1") == 1   # the one kept, none leaked
    finally:
        table.close()


def test_at_rcpt_a_key_the_client_encoding_cannot_carry_is_451_and_logged(
        tmp_path, latin1, elemta_server):
    import smtplib
    path = cf(tmp_path, latin1, dbname="maps_latin1", encoding="LATIN1",
              query="SELECT 'ok' FROM alias WHERE address = '%s'")
    server = elemta_server(relay={"mynetworks": ["127.0.0.2/32"],
                                  "relay_domains": ["example.org"],
                                  "relay_recipient_maps": "pgsql:" + path})
    replies = []
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.command_encoding = "utf-8"
        smtp.ehlo("client.test")
        assert smtp.docmd("MAIL FROM:<someone@client.test> SMTPUTF8")[0] == 250
        for address in ("j\u00f6e@example.org", "j\u20ace@example.org", "nobody@example.org"):
            code, text = smtp.docmd("RCPT TO:<%s>" % address)
            replies.append("%d %s" % (code, text.decode("utf-8")))
    assert replies == [
        "250 2.1.5 Ok",
        "451 4.3.0 <j?e@example.org>: Temporary lookup failure",    # replies are ASCII
        "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in relay "
        "recipient table"]
    assert "lookup failed: pgsql:%s: the key has a character (\\u20ac) that the client " \
           "encoding LATIN1 cannot carry" % path in server.log()


@pytest.mark.parametrize("encoding", [None, "LATIN1"])
def test_an_ascii_key_whose_utf8_spelling_latin1_cannot_hold_is_found_or_not_never_451(
        tmp_path, latin1, elemta_server, encoding):
    """An A-label domain (xn--r8jz45g.jp is 例え.jp) is asked for as written, then in UTF-8
    (elemta.maps.sqlconf.key_spellings). A LATIN1 database cannot hold that second
    spelling, which Elemta made up: no row can have it, so it is "not found" there. It
    was a 451 for every unknown user of such a domain, and for every known one when
    the query is by domain. A server that is down stays 451."""
    import smtplib
    latin1.execute_in("maps_latin1", "CREATE TABLE IF NOT EXISTS relay_rcpt (address text);"
                      "DELETE FROM relay_rcpt;"
                      "INSERT INTO relay_rcpt VALUES ('known@xn--r8jz45g.jp');")
    path = cf(tmp_path, latin1, dbname="maps_latin1", encoding=encoding,
              query="SELECT 'ok' FROM relay_rcpt WHERE address = '%s'")
    server = elemta_server(relay={"mynetworks": ["127.0.0.2/32"],
                                  "relay_domains": ["xn--r8jz45g.jp"],
                                  "relay_recipient_maps": "pgsql:" + path})

    def rcpt(address):
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("someone@client.test")
            code, text = smtp.docmd("RCPT TO:<%s>" % address)
            return "%d %s" % (code, text.decode())
    assert rcpt("known@xn--r8jz45g.jp") == "250 2.1.5 Ok"
    assert rcpt("Other@XN--R8JZ45G.jp.") == (
        "550 5.1.1 <Other@XN--R8JZ45G.jp.>: Recipient address rejected: User unknown in "
        "relay recipient table")
    assert "lookup failed" not in server.log()
    latin1.stop()
    try:
        assert rcpt("other@xn--r8jz45g.jp") == \
            "451 4.3.0 <other@xn--r8jz45g.jp>: Temporary lookup failure"
    finally:
        latin1.start()
    assert rcpt("known@xn--r8jz45g.jp") == "250 2.1.5 Ok"


def test_a_list_of_tables_is_one_map_the_first_that_has_the_key_answers(
        tmp_path, tables, elemta_server):
    """virtual.alias_maps = "lmdb:FILE, pgsql:CF", as Postfix's virtual_alias_maps lists
    tables: each key is asked of the tables in order; a more specific key in the second
    wins over a catch-all in the first (the search order comes first). While the
    database is down every recipient is 451: the lmdb table's catch-all must not answer
    for db@alias.test, which the database could not be asked for, and even an entry
    the lmdb table has leads to an address looked up again in both."""
    import smtplib
    from elemta.maps.lmdbtable import compile_source
    tables.execute("CREATE TABLE list_alias (address text, goto text);"
                   "INSERT INTO list_alias VALUES ('both@alias.test', 'from-pgsql@remote.test'),"
                   "('db@alias.test', 'db-user@remote.test');")
    source = tmp_path / "virtual"
    source.write_text("both@alias.test from-lmdb@remote.test\n"
                      "file@alias.test file-user@remote.test\n"
                      "@alias.test catch-all@remote.test\n")
    compile_source(str(source))
    path = cf(tmp_path, tables, query="SELECT goto FROM list_alias WHERE address = '%s'")
    server = elemta_server(virtual={"alias_domains": ["alias.test"],
                                    "alias_maps": "lmdb:%s, pgsql:%s" % (source, path)})

    def send(recipients):
        before = set(server.queued_ids())
        with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.1", 0)) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("someone@client.test")
            replies = ["%d %s" % (code, text.decode()) for code, text in
                       (smtp.docmd("RCPT TO:<%s>" % r) for r in recipients)]
            if any(reply.startswith("250") for reply in replies):
                smtp.data(b"Subject: list\r\n\r\nto a list of tables\r\n")
        new = set(server.queued_ids()) - before
        queued = [r.address for r in server.message(new.pop())[0].recipients] if new else []
        return replies, queued
    replies, queued = send(["both@alias.test", "file@alias.test", "db@alias.test",
                            "other@alias.test"])
    assert replies == ["250 2.1.5 Ok"] * 4
    assert queued == ["from-lmdb@remote.test", "file-user@remote.test",
                      "db-user@remote.test", "catch-all@remote.test"]
    tables.stop()
    try:
        replies, queued = send(["file@alias.test", "db@alias.test"])
    finally:
        tables.start()
    assert replies == ["451 4.3.0 <file@alias.test>: Temporary lookup failure",
                       "451 4.3.0 <db@alias.test>: Temporary lookup failure"]
    assert queued == []
    assert "<db@alias.test>: lookup failed: pgsql:%s: " % path in server.log()
