"""Lookup tables (elemta.maps) with real files: inline, lmdb (compiled by `elemtactl map
compile`, replaced under a long-lived reader), regexp (Postfix's syntax), sqlite, the
search orders, table specs in a config file, and `elemtactl map query` as postmap -q.
PostgreSQL is in tests/test_maps_pgsql.py."""

import os
import pwd
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import gevent
import pytest

from elemta.maps import (TableError, TableSpec, TableUnavailable, address_keys, domain_keys,
                         lookup_address, lookup_domain, open_table, parse_spec, values)
from tests.harness import REPO


def elemtactl(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl"] + list(args),
                          input=stdin, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---------------------------------------------------------------- inline

def test_inline_in_postfix_syntax_and_as_yaml_table_and_list():
    postfix = open_table("inline:{ a@example.org=b@x, { c = d@x, e@x }, Big=one }")
    assert postfix.lookup("A@Example.ORG") == "b@x"
    assert values(postfix.lookup("c")) == ["d@x", "e@x"]
    assert postfix.lookup("big") == "one"
    assert postfix.lookup("nothing") is None
    table = open_table({"Sales": ["a@x", "b@x"], "info": "c@x"})
    assert table.lookup("sales") == ["a@x", "b@x"]
    lines = open_table(["# a comment", "info c@x, d@x", "other e@x"])
    assert values(lines.lookup("INFO")) == ["c@x", "d@x"]


@pytest.mark.parametrize("spec, message", [
    ("inline:{ a=b, c }", "'c' is not key=value"),
    ("inline: a=b", "write inline:{ key=value"),
    ("btree:/etc/x", "type one of inline, lmdb"),
    ("lmdb:etc/virtual", "must be absolute"),
    (["key-without-value"], "has no value"),
    (["a x", "A y"], "table list entry:2: a is already defined on line 1"),  # no compile
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(TableError, match=message):
        open_table(spec)


# ---------------------------------------------------------------- lmdb

SOURCE = """\
    # virtual aliases
    Joe@Example.ORG     joe@mail.example.org
    @example.org        catchall@mail.example.org
    sales@example.org   anne@example.org,
                        bob@example.org
    """


def test_compile_then_lookup_with_postmap_source_syntax(tmp_path):
    source = write(tmp_path / "virtual", SOURCE)
    result = elemtactl("map", "compile", source)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(source + ".lmdb")
    table = open_table("lmdb:" + source)
    assert table.lookup("joe@example.org") == "joe@mail.example.org"
    assert table.lookup("JOE@EXAMPLE.ORG") == "joe@mail.example.org"   # keys folded
    assert values(table.lookup("sales@example.org")) == ["anne@example.org",
                                                         "bob@example.org"]
    assert table.lookup("nobody@example.org") is None
    assert open_table("hash:" + source).lookup("@example.org") == "catchall@mail.example.org"


IDN_SOURCE = """\
    # keys with international domains, as an admin writes them
    Alice@Bücher.Example.   alice
    @München.Example        catch-all
    .bücher.example         subdomains
    café.example            cafe
    müller                  bare user
    """


def test_keys_with_international_domains_are_found_as_lookups_spell_them(tmp_path):
    """Lookups spell a domain in A-labels (elemta.maps.search), so a key written with
    the domain in UTF-8 is stored that way too (compiled by elemtactl, or inline): it
    was once only lower-cased, and alice@bücher.example never matched anything."""
    source = write(tmp_path / "vmailbox", IDN_SOURCE)
    result = elemtactl("map", "compile", source)
    assert result.returncode == 0, result.stderr
    lines = [line for line in textwrap.dedent(IDN_SOURCE).splitlines()[1:]]
    for table in (open_table("lmdb:" + source), open_table(lines),
                  open_table({"Alice@Bücher.Example.": "alice", "@München.Example":
                              "catch-all", ".bücher.example": "subdomains",
                              "café.example": "cafe", "müller": "bare user"})):
        for spelling in ("alice@xn--bcher-kva.example", "Alice@BÜCHER.Example.",
                         "alice@bücher.example"):
            match = lookup_address(table, spelling)
            assert (match.key.lower(), match.value) == (
                "alice@xn--bcher-kva.example", "alice"), (table, spelling)
            assert table.lookup(spelling) == "alice"
        assert lookup_address(table, "bob@münchen.example") == (
            "@xn--mnchen-3ya.example", "catch-all")
        assert lookup_domain(table, "mx.xn--bcher-kva.example").value == "subdomains"
        assert lookup_domain(table, "CAFÉ.example.").value == "cafe"
        assert lookup_domain(table, "xn--caf-dma.example").value == "cafe"
        assert lookup_address(table, "müller@mx.test").value == "bare user"
        assert table.lookup("xn--bcher-kva.example") is None
    query = elemtactl("map", "query", "lmdb:" + source, "alice@xn--bcher-kva.example")
    assert (query.returncode, query.stdout) == (0, "alice\n")
    # Two spellings of one key are one key, given twice: postmap's warning, first kept.
    write(tmp_path / "vmailbox", "a@bücher.example  x\nA@XN--BCHER-KVA.example.  y\n")
    result = elemtactl("map", "compile", source)
    assert ("vmailbox:2: duplicate entry a@xn--bcher-kva.example: ignored, the one on "
            "line 1 is kept") in result.stderr
    query = elemtactl("map", "query", "lmdb:" + source, "a@xn--bcher-kva.example")
    assert query.stdout == "x\n"


def test_a_long_lived_reader_sees_the_recompiled_table_at_once(tmp_path):
    source = write(tmp_path / "virtual", "a@example.org  old@x\n")
    assert elemtactl("map", "compile", source).returncode == 0
    os.chmod(source + ".lmdb", 0o640)
    reader = open_table("lmdb:" + source)
    assert reader.lookup("a@example.org") == "old@x"
    before = os.stat(source + ".lmdb")
    write(tmp_path / "virtual", "a@example.org  new@x\nb@example.org  added@x\n")
    assert elemtactl("map", "compile", source).returncode == 0
    after = os.stat(source + ".lmdb")
    assert after.st_ino != before.st_ino                  # replaced, not written over
    assert stat.S_IMODE(after.st_mode) == 0o640            # the admin's mode is kept
    if os.geteuid() == 0:                                  # and, for root, the owner
        nobody = pwd.getpwnam("nobody")
        os.chown(source + ".lmdb", nobody.pw_uid, nobody.pw_gid)
        assert elemtactl("map", "compile", source).returncode == 0
        assert os.stat(source + ".lmdb").st_uid == nobody.pw_uid
    assert reader.lookup("a@example.org") == "new@x"      # no restart, no reopen call
    assert reader.lookup("b@example.org") == "added@x"
    assert sorted(os.listdir(tmp_path)) == ["virtual", "virtual.lmdb"]   # no temp left


def test_a_bad_source_line_is_named_and_the_old_table_stays(tmp_path):
    source = write(tmp_path / "virtual", "a@example.org  old@x\n")
    assert elemtactl("map", "compile", source).returncode == 0
    write(tmp_path / "virtual", "a@example.org  new@x\n\nlonely-key\n")
    result = elemtactl("map", "compile", source)
    assert result.returncode == os.EX_DATAERR
    assert result.stderr == ("elemtactl: %s:3: 'lonely-key' has no value: expected "
                             "\"key whitespace value\"\n" % source)
    assert open_table("lmdb:" + source).lookup("a@example.org") == "old@x"


def test_a_key_listed_twice_is_a_warning_and_the_first_value_is_kept(tmp_path):
    """As postmap: "duplicate entry" naming the line, the first value kept, status 0."""
    source = write(tmp_path / "virtual", "a@example.org  first@x\n  \tcontinued@x\n"
                                         "b@example.org  b@x\nA@Example.ORG  second@x\n")
    result = elemtactl("map", "compile", source)
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == ("elemtactl: warning: %s:4: duplicate entry a@example.org: "
                             "ignored, the one on line 1 is kept\n" % source)
    table = open_table("lmdb:" + source)
    assert table.lookup("a@example.org") == "first@x continued@x"
    assert table.lookup("b@example.org") == "b@x"


def test_a_table_never_compiled_is_unavailable_not_missing(tmp_path):
    table = open_table("lmdb:%s/virtual" % tmp_path)
    with pytest.raises(TableUnavailable, match="run: elemtactl map compile"):
        table.lookup("a@example.org")


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is root's")
def test_root_does_not_compile_in_a_directory_another_user_can_change(tmp_path):
    directory = tmp_path / "nobodys"
    directory.mkdir()
    source = write(directory / "virtual", "a  b\n")
    os.chown(directory, pwd.getpwnam("nobody").pw_uid, -1)
    result = elemtactl("map", "compile", source)
    assert result.returncode == os.EX_CANTCREAT
    assert result.stderr == ("elemtactl: %s: the directory can be changed by a user other "
                             "than root: compile as that user, or keep tables in a "
                             "directory only root can change (such as /etc/elemta)\n"
                             % directory)
    assert os.listdir(directory) == ["virtual"]


def test_compile_of_a_missing_file_says_so(tmp_path):
    result = elemtactl("map", "compile", str(tmp_path / "absent"))
    assert result.returncode == os.EX_NOINPUT
    assert "absent: No such file or directory" in result.stderr


# ---------------------------------------------------------------- regexp

REGEXP = r"""
    # rewrite an old domain, keeping the user
    /^(.+)@old\.example$/           ${1}@new.example
    if /@example\.net$/
    !/^postmaster@/                 REJECT only postmaster here
    endif
    /^price-(\d+)@/                 cost $$$1
    /^[A-Z]+@shout\.example$/i      CASE SENSITIVE
    /^[a-z]+@shout\.example$/       case insensitive
    /^abc/!/^abcd/                  abc but not abcd
    /^b\(x\)\{2\}(y)?$/x            basic $1
    /^multi$/m                      multi
    /^long                          ignored
    """


@pytest.fixture
def regexp_table(tmp_path):
    path = write(tmp_path / "rewrite", REGEXP.replace("    /^long                    "
                                                      "      ignored\n", ""))
    return open_table("regexp:" + path)


@pytest.mark.parametrize("key, result", [
    ("Joe@old.example", "Joe@new.example"),
    ("joe@example.net", "REJECT only postmaster here"),
    ("postmaster@example.net", None),            # inside if: negation did not match
    ("price-42@example.com", "cost $42"),
    ("SHOUT@shout.example", "CASE SENSITIVE"),   # i toggles case-insensitivity off
    ("Shout@shout.example", "case insensitive"),  # default: case-insensitive
    ("abcz", "abc but not abcd"),
    ("abcd", None),
    ("bxx(y)?", "basic x"),                      # x: basic syntax, ( ) ? literal
    ("first\nmulti\nlast", "multi"),
    ("nothing@example.com", None),
])
def test_regexp_table_syntax(regexp_table, key, result):
    assert regexp_table.lookup(key) == result


@pytest.mark.parametrize("text, line, message", [
    ("/ok/ x\n/(unclosed/ y\n", 2, "bad pattern /(unclosed/"),
    ("if /a/\n/b/ c\n", 1, "if without endif"),
    ("/a/ b\nendif\n", 2, "endif without a matching if"),
    ("/(a)/ $2\n", 1, "$2 in the result, but the pattern has 1 group"),
    ("!/(a)/ $1\n", 1, "$1 in the result, but the pattern has no groups"),
    ("/a/q b\n", 1, "unknown flag 'q'"),
    ("/a/\n", 1, "the pattern has no result"),
    ("/a b\n", 1, "the pattern has no closing /"),
    ("/a/ cost $5x\n", 1, "$5 in the result"),
    ("/a/ 5$ each\n", 1, "write $$ for a dollar sign"),
])
def test_regexp_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path / "checks", text)
    with pytest.raises(TableError) as error:
        open_table("regexp:" + path)
    assert str(error.value).startswith("%s:%d: " % (path, line))
    assert message in str(error.value)


def test_an_edited_regexp_table_is_reread_and_a_broken_edit_is_temporary(tmp_path):
    path = write(tmp_path / "checks", "/a/ first\n")
    table = open_table("regexp:" + path)
    assert table.lookup("a") == "first"
    write(tmp_path / "checks", "/a/ second\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert table.lookup("a") == "second"
    write(tmp_path / "checks", "/a/ third\n/(/ broken\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    with pytest.raises(TableUnavailable, match=r"checks:2: bad pattern"):
        table.lookup("a")


def test_a_pattern_that_backtracks_fails_in_bounded_time_and_the_loop_runs(tmp_path):
    path = write(tmp_path / "checks", "/^(a+)+$/ exponential\n/^ok$/ fine\n")
    table = open_table("regexp:" + path)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(100)])
    started = time.monotonic()
    with pytest.raises(TableUnavailable, match="matching took over 2 seconds"):
        table.lookup("a" * 40 + "!")
    ticker.kill()
    assert time.monotonic() - started < 4
    assert len(ticks) >= 20                 # the event loop ran while it matched
    assert table.lookup("ok") == "fine"     # a fresh helper answers the next lookup


# ---------------------------------------------------------------- sqlite

@pytest.fixture
def sqlite_db(tmp_path):
    path = str(tmp_path / "virtual.sqlite")
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE alias (address TEXT, goto TEXT, active INTEGER);
            INSERT INTO alias VALUES ('joe@example.org', 'joe@mail.example.org', 1);
            INSERT INTO alias VALUES ('sales@example.org', 'anne@example.org', 1);
            INSERT INTO alias VALUES ('sales@example.org', 'bob@example.org', 1);
            INSERT INTO alias VALUES ('gone@example.org', 'x@example.org', 0);
            CREATE TABLE mailbox (local TEXT, domain TEXT, maildir TEXT);
            INSERT INTO mailbox VALUES ('joe', 'example.org', 'example.org/joe/');
            INSERT INTO mailbox VALUES ('50%', 'example.org', 'example.org/pct/');
        """)
    return path


def sqlite_table(tmp_path, db, query, extra=""):
    cf = write(tmp_path / "t.cf", "dbpath = %s\nquery = %s\n%s" % (db, query, extra))
    return open_table("sqlite:" + cf)


def test_sqlite_query_with_the_whole_key(tmp_path, sqlite_db):
    table = sqlite_table(tmp_path, sqlite_db,
                         "SELECT goto FROM alias WHERE address='%s' AND active = 1")
    assert table.lookup("Joe@Example.org") == "joe@mail.example.org"   # %s folded
    assert table.lookup("sales@example.org") == ["anne@example.org", "bob@example.org"]
    assert table.lookup("gone@example.org") is None
    assert table.lookup("' OR '1'='1") is None                # an injection is a key
    assert table.lookup("x' OR 1=1 --@example.org") is None


def test_sqlite_local_part_domain_and_literal_percent(tmp_path, sqlite_db):
    table = sqlite_table(tmp_path, sqlite_db,
                         "SELECT maildir FROM mailbox WHERE local = '%u' AND domain = '%d'")
    assert table.lookup("JOE@example.org") == "example.org/joe/"
    assert table.lookup("joe") is None            # no domain: %d cannot be expanded
    assert table.lookup("@example.org") is None   # empty local part: not queried
    assert table.lookup("50%@example.org") == "example.org/pct/"
    concat = sqlite_table(tmp_path, sqlite_db, "SELECT goto FROM alias WHERE address = "
                          "'%u@example.org' AND goto LIKE '%%@mail.%2.%1'")
    assert concat.lookup("joe@example.org") == "joe@mail.example.org"
    assert concat.lookup("joe@example.com") is None       # %2.%1: example.com


def test_sqlite_result_format_expansion_limit_and_domain(tmp_path, sqlite_db):
    query = "SELECT goto FROM alias WHERE address='%s'"
    shaped = sqlite_table(tmp_path, sqlite_db, query,
                          "result_format = smtp:[%d] for %u (%%)\ndomain = example.org\n")
    assert shaped.lookup("joe@example.org") == "smtp:[mail.example.org] for joe (%)"
    assert shaped.lookup("joe") is None               # outside the domain list
    limited = sqlite_table(tmp_path, sqlite_db, query, "expansion_limit = 1\n")
    assert limited.lookup("joe@example.org") == "joe@mail.example.org"
    with pytest.raises(TableUnavailable, match="2 results, more than expansion_limit 1"):
        limited.lookup("sales@example.org")


def test_sqlite_rows_with_international_domains_are_found_in_either_spelling(tmp_path):
    """A key is asked for with its domain in A-labels (as every lookup spells it), then,
    when it has A-labels, in UTF-8: a row holding either is found, however the client
    wrote the address (Postfix asks only for the client's spelling)."""
    path = str(tmp_path / "idn.sqlite")
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE alias (address TEXT, goto TEXT);
            INSERT INTO alias VALUES ('alice@bücher.example', 'utf8 row');
            INSERT INTO alias VALUES ('bob@xn--bcher-kva.example', 'ascii row');
            INSERT INTO alias VALUES ('@münchen.example', 'catch-all');
            CREATE TABLE mailbox (local TEXT, domain TEXT);
            INSERT INTO mailbox VALUES ('carol', 'bücher.example');
            CREATE TABLE domains (name TEXT);
            INSERT INTO domains VALUES ('bücher.example');
        """)
    table = sqlite_table(tmp_path, path, "SELECT goto FROM alias WHERE address = '%s'")
    for spelling in ("alice@bücher.example", "alice@xn--bcher-kva.example",
                     "ALICE@BÜCHER.Example."):
        assert lookup_address(table, spelling).value == "utf8 row", spelling
        assert table.lookup(spelling) == "utf8 row", spelling
    for spelling in ("bob@bücher.example", "bob@xn--bcher-kva.example"):
        assert lookup_address(table, spelling).value == "ascii row", spelling
    assert lookup_address(table, "dan@xn--mnchen-3ya.example") == (
        "@xn--mnchen-3ya.example", "catch-all")
    assert lookup_address(table, "dan@bücher.example") is None
    parts = sqlite_table(tmp_path, path, "SELECT local FROM mailbox WHERE local = '%u' "
                                         "AND domain = '%d'")
    assert lookup_address(parts, "carol@xn--bcher-kva.example").value == "carol"
    domains = sqlite_table(tmp_path, path, "SELECT 'ok' FROM domains WHERE name = '%s'")
    assert lookup_domain(domains, "xn--bcher-kva.example").value == "ok"
    assert lookup_domain(domains, "bücher.example").value == "ok"
    assert lookup_address(table, "müller@bücher.example") is None   # a bare part: as is


@pytest.mark.parametrize("text, message", [
    ("dbpath = /x\nquery = SELECT 1\nhost = x\n", "t.cf:3: host: unknown key"),
    ("dbpath = /x\nquery = SELECT '%s\n", "unclosed ' quote"),
    ("dbpath = /x\nquery = SELECT %z\n", "unknown expansion %z"),
    ("dbpath = /x\n", "query is missing"),
    ("dbpath = /x\nquery = SELECT 1\nexpansion_limit = lots\n", "expansion_limit"),
    ("dbpath = /x\nselect_field = goto\nquery = x\n", "t.cf:2: select_field"),
    ("query = SELECT 1\n", "dbpath is missing"),
    ("dbpath /x\n", "t.cf:1: expected \"key = value\""),
])
def test_sqlite_cf_errors_name_file_line_and_key(tmp_path, text, message):
    cf = write(tmp_path / "t.cf", text)
    with pytest.raises(TableError, match=message.replace("(", r"\(").replace("%", "%")):
        open_table("sqlite:" + cf)


def test_a_missing_sqlite_database_is_unavailable(tmp_path):
    table = sqlite_table(tmp_path, str(tmp_path / "absent.sqlite"), "SELECT '%s'")
    with pytest.raises(TableUnavailable, match="absent.sqlite: unable to open"):
        table.lookup("x")


def test_a_locked_sqlite_lookup_waits_in_a_thread_and_times_out(tmp_path, sqlite_db):
    table = sqlite_table(tmp_path, sqlite_db, "SELECT goto FROM alias WHERE address='%s'",
                         "timeout = 1\n")
    writer = sqlite3.connect(sqlite_db, isolation_level=None)
    writer.execute("PRAGMA journal_mode=DELETE")
    writer.execute("BEGIN EXCLUSIVE")       # readers now wait for the lock
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(200)])
    started = time.monotonic()
    try:
        with pytest.raises(TableUnavailable, match="1 seconds|locked"):
            table.lookup("joe@example.org")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        ticker.kill()
    assert time.monotonic() - started < 5
    assert len(ticks) >= 10                 # the event loop ran while the lookup waited
    assert table.lookup("joe@example.org") == "joe@mail.example.org"


# ---------------------------------------------------------------- search orders

def test_address_search_order_is_postfix_virtual():
    assert list(address_keys('"Joe+tag"@Bücher.Example.', delimiter="+")) == [
        "Joe+tag@xn--bcher-kva.example", "Joe@xn--bcher-kva.example", "Joe+tag", "Joe",
        "@xn--bcher-kva.example"]
    assert list(address_keys("joe@example.org", local_part=False)) == [
        "joe@example.org", "@example.org"]
    assert list(domain_keys("Mail.Example.ORG.")) == [
        "mail.example.org", ".example.org", ".org"]
    assert list(domain_keys("[192.0.2.1]")) == ["[192.0.2.1]"]


def test_lookup_address_and_domain_take_the_most_specific_key():
    table = open_table({"joe@example.org": "exact", "@example.org": "catch-all",
                        "ann": "bare", ".example.net": "subdomains"})
    assert lookup_address(table, "Joe+x@EXAMPLE.org", delimiter="+") == (
        "Joe@example.org", "exact")         # the key as asked; the table folds it
    assert lookup_address(table, "ann@example.org").value == "bare"
    assert lookup_address(table, "ann@example.org", local_part=False).value == "catch-all"
    assert lookup_address(table, "x@example.com") is None
    assert lookup_domain(table, "a.b.example.net") == (".example.net", "subdomains")
    assert lookup_domain(table, "example.net") is None


def test_a_regexp_table_is_asked_for_the_whole_address_only(tmp_path):
    """regexp_table(5): Postfix asks a pattern table for the whole address, never for
    user, user+ext or @domain; a table of exact keys still gets every key."""
    path = write(tmp_path / "vmailbox", r"!/^blocked(\+.*)?@example\.org$/  ok" "\n")
    patterns = open_table("regexp:" + path)
    assert patterns.lookup("@example.org") == "ok"      # what a partial key would find
    assert lookup_address(patterns, "blocked+x@example.org", delimiter="+") is None
    assert lookup_address(patterns, "blocked@example.org", local_part=False) is None
    assert lookup_address(patterns, "anne@example.org") == ("anne@example.org", "ok")
    assert lookup_domain(open_table("regexp:" + write(tmp_path / "d", "/^example/ ok\n")),
                         "mail.example.org") is None   # no .example.org asked either


def test_a_negated_regexp_rule_refuses_its_address_at_rcpt(tmp_path, elemta_server):
    """virtual.mailbox_maps as a regexp table whose negated rule names every user but
    one: that user is unknown (550), with or without an extension, though the partial
    keys (blocked, @virt.test) do not match the pattern and so match the rule."""
    import smtplib
    path = write(tmp_path / "vmailbox", r"!/^blocked(\+.*)?@virt\.test$/  ok" "\n")
    server = elemta_server(virtual={"mailbox_domains": ["virt.test"],
                                    "mailbox_maps": "regexp:" + path})
    replies = []
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("someone@client.test")
        for address in ("anne@virt.test", "blocked@virt.test", "Blocked+tag@virt.test"):
            code, text = smtp.docmd("RCPT TO:<%s>" % address)
            replies.append("%d %s" % (code, text.decode()))
    assert replies == [
        "250 2.1.5 Ok",
        "550 5.1.1 <blocked@virt.test>: Recipient address rejected: User unknown in "
        "virtual mailbox table",
        "550 5.1.1 <Blocked+tag@virt.test>: Recipient address rejected: User unknown in "
        "virtual mailbox table"]


def test_a_table_that_cannot_answer_stops_the_search(tmp_path):
    table = open_table("lmdb:%s/absent" % tmp_path)
    with pytest.raises(TableUnavailable):
        lookup_address(table, "a@example.org")


# ---------------------------------------------------------------- specs in the config

@dataclass(frozen=True)
class _MapSettings:
    """A stand-in for the schema sections that will hold tables (virtual_alias_maps...)."""
    virtual: Optional[TableSpec] = None
    checks: Tuple[TableSpec, ...] = ()


def _load(tmp_path, text, fmt="yaml"):
    from elemta.config.loader import _Checker
    from elemta.config.sources import parse
    path = str(tmp_path / ("elemta." + fmt))
    source = parse(path, textwrap.dedent(text), fmt.upper())
    checker = _Checker(path, source.lines, source.table_word, check_files=True)
    settings = checker.build(_MapSettings, source.data, ())
    checker.check_tables(settings)
    return settings, checker.problems


def test_config_values_become_table_specs(tmp_path):
    settings, problems = _load(tmp_path, "virtual: lmdb:/etc/elemta/virtual\n")
    assert problems == [] and str(settings.virtual) == "lmdb:/etc/elemta/virtual"
    settings, problems = _load(tmp_path, "virtual:\n  sales: [a@x, b@x]\n  info: c@x\n")
    assert problems == []
    assert open_table(settings.virtual).lookup("SALES") == ["a@x", "b@x"]
    settings, problems = _load(tmp_path, 'virtual = ["info c@x"]\n', "toml")
    assert problems == [] and open_table(settings.virtual).lookup("info") == "c@x"


def test_a_bad_table_spec_in_the_config_names_file_line_and_key(tmp_path):
    _, problems = _load(tmp_path, "# maps\n\nvirtual: btree:/etc/x\n")
    assert [str(p) for p in problems] == [
        "%s:3: virtual: 'btree:/etc/x' is not a table spec: write type:name with type "
        "one of inline, lmdb, hash, regexp, sqlite, pgsql" % (tmp_path / "elemta.yaml")]
    _, problems = _load(tmp_path, "virtual:\n  sales: {nested: x}\n")
    assert "virtual: the value of sales must be a string or a list" in str(problems[0])


# ---------------------------------------------------------------- elemtactl map query

def test_map_query_answers_like_postmap_q(tmp_path):
    source = write(tmp_path / "virtual", SOURCE)
    assert elemtactl("map", "compile", source).returncode == 0
    found = elemtactl("map", "query", "lmdb:" + source, "Joe@Example.ORG")
    assert (found.returncode, found.stdout, found.stderr) == (0, "joe@mail.example.org\n", "")
    missing = elemtactl("map", "query", "lmdb:" + source, "nobody@example.org")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "")
    several = elemtactl("map", "query", "lmdb:" + source, "-",
                        stdin="joe@example.org\nnobody\n@example.org\n")
    assert several.stdout == ("joe@example.org\tjoe@mail.example.org\n"
                              "@example.org\tcatchall@mail.example.org\n")
    regexp = write(tmp_path / "re", r"/^(.*)@old\.example$/  $1@new.example" "\n")
    rewritten = elemtactl("map", "query", "regexp:" + regexp, "ann@old.example")
    assert rewritten.stdout == "ann@new.example\n"
    inline = elemtactl("map", "query", "inline:{ a=b, { c = d, e } }", "c")
    assert inline.stdout == "d, e\n"


def test_map_query_errors_are_one_line_with_a_status(tmp_path):
    bad_spec = elemtactl("map", "query", "btree:/etc/aliases", "x")
    assert bad_spec.returncode == os.EX_USAGE
    assert bad_spec.stderr.startswith("elemtactl: 'btree:/etc/aliases' is not a table spec")
    regexp = write(tmp_path / "re", "/(/ x\n")
    bad_file = elemtactl("map", "query", "regexp:" + regexp, "x")
    assert (bad_file.returncode, bad_file.stderr.count("\n")) == (os.EX_DATAERR, 1)
    assert "%s:1: bad pattern" % regexp in bad_file.stderr
    down = elemtactl("map", "query", "lmdb:%s/never" % tmp_path, "x")
    assert down.returncode == os.EX_TEMPFAIL
    assert "Traceback" not in down.stderr + bad_file.stderr + bad_spec.stderr


def test_the_files_of_tables_are_read_at_load_and_named_for_the_file_check(tmp_path):
    from elemta.config.loader import own_typed_values
    good = write(tmp_path / "good", "/a/ b\n")
    bad = write(tmp_path / "bad", "/a/ b\n/(/ c\n")
    settings, problems = _load(tmp_path, """\
        virtual: lmdb:/etc/elemta/not-compiled-yet
        checks:
          - regexp:%s
          - regexp:%s
        """ % (good, bad))
    assert [str(p) for p in problems] == [
        "%s:4: checks[1]: %s:2: bad pattern /(/: missing ), unterminated subpattern at "
        "position 0" % (tmp_path / "elemta.yaml", bad)]
    assert [(path, spec.worker_file) for path, spec in own_typed_values(settings)] == [
        (("virtual",), "/etc/elemta/not-compiled-yet.lmdb"), (("checks", 0), good),
        (("checks", 1), bad)]


def test_a_lazy_table_reads_nothing_until_its_first_lookup(tmp_path):
    """What sendmail builds for the domain tables: no file is read (a user may not read
    a .cf file with a password), and a table that cannot be opened fails for now."""
    from elemta.maps.spec import LazyTable
    cf = tmp_path / "missing-sqlite.cf"
    table = LazyTable("sqlite:%s" % cf)
    with pytest.raises(TableUnavailable) as caught:
        table.lookup("example.org")
    assert str(caught.value).startswith("sqlite:%s: cannot open: " % cf)
    cf.write_text("dbpath = %s\nquery = SELECT 'x' WHERE '%%s' = 'example.org'\n"
                  % (tmp_path / "db.sqlite"))
    import sqlite3
    sqlite3.connect(str(tmp_path / "db.sqlite")).close()
    assert table.lookup("example.org") == "x"


def test_a_list_of_tables_reads_each_file_names_its_line_and_asks_patterns_whole(tmp_path):
    """"lmdb:A, regexp:B" or a YAML list of tables: each file is checked at load (a
    problem names file:line:key), each is one the workers must read, and a regexp table
    in the list is asked for the whole address only, as Postfix asks it: its negated
    rule must not match the partial key "@example.org"."""
    from elemta.config.loader import table_files
    patterns = write(tmp_path / "patterns", "!/^blocked@/ ok\n")
    bad = write(tmp_path / "bad", "/(/ c\n")
    settings, problems = _load(tmp_path, """\
        virtual: lmdb:/etc/elemta/virtual, regexp:%s
        checks:
          - lmdb:/etc/elemta/a lmdb:/etc/elemta/b regexp:%s
        """ % (patterns, bad))
    assert [str(p) for p in problems] == [
        "%s:3: checks[0]: %s:1: bad pattern /(/: missing ), unterminated subpattern at "
        "position 0" % (tmp_path / "elemta.yaml", bad)]
    assert settings.virtual.worker_files == ("/etc/elemta/virtual.lmdb", patterns)
    assert table_files(settings) == [
        (("virtual",), "/etc/elemta/virtual.lmdb"), (("virtual",), patterns),
        (("checks", 0), "/etc/elemta/a.lmdb"), (("checks", 0), "/etc/elemta/b.lmdb"),
        (("checks", 0), bad)]
    table = open_table("regexp:%s, inline:{ @example.org=domain }" % patterns)
    assert lookup_address(table, "blocked@example.org") == ("@example.org", "domain")
    assert lookup_address(table, "alice@example.org") == ("alice@example.org", "ok")
    assert str(parse_spec(["inline:{ a=b }", {"c": "d"}])) == \
        "inline:{ { a = b } }, inline:{ { c = d } }"
    assert parse_spec(["a b", "c d"]).type == "inline"     # entries, one table
