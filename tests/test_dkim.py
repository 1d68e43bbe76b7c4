"""DKIM: Elemta against the RFC examples and OpenDKIM, with keys served by a real NSD.

Covers elemta.plugins.dkim: the RFC 6376 A.2 and RFC 8463 A.3 examples verify; signatures
Elemta makes (rsa-sha256 and ed25519-sha256, keys from `generate_key`) verify with
OpenDKIM's opendkim-testmsg; messages OpenDKIM signs verify in Elemta; tampering fails;
malformed signatures, missing, revoked, short and garbage keys, DNS timeouts, enormous
headers and broken MIME give permerror/temperror/fail with one log line, no traceback; the
plugin signs our users' mail and verifies the rest through the plugin manager.

OpenDKIM reads /etc/resolv.conf and cannot be told a port, so NSD listens on
127.0.0.153:53 and each OpenDKIM run gets a private mount namespace (`unshare -m`) in
which /etc/resolv.conf names that address. Rspamd runs as a private daemon (tests/peers/rspamd.py:
Debian's configuration, with our own local.d: its DNS pointed at our NSD, one normal
worker, no controller, proxy or fuzzy) and checks our signatures too.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from elemta.plugins.api import Context, Message, PluginConfigError
from elemta.plugins.dkim import (DKIMResult, Signer, SigningKey, generate_key,
                                 verify_message)
from elemta.plugins.manager import PluginManager, apply_header_edits
from elemta.plugins.resolver import Resolver
from tests.peers.nsd import NSDError, NSDInstance, nsd_available
from tests.peers.rspamd import RSPAMC, RspamdError, RspamdInstance, rspamd_available

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dkim")
NS_ADDRESS = "127.0.0.153"
OPENDKIM = "/usr/sbin/opendkim"
OPENDKIM_TESTMSG = "/usr/sbin/opendkim-testmsg"
OPENDKIM_GENKEY = "/usr/sbin/opendkim-genkey"

# RFC 8463 A.2 and RFC 6376 A.3 public keys.
RFC_ZONE = """
brisbane._domainkey.football TXT "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
test._domainkey.football TXT ( "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB" )
brisbane._domainkey TXT ( "v=DKIM1; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDwIRP/UC3SBsEmGqZ9ZJW3/DkMoGeLnQg1fWn7/zYtIxN2SnFCjxOCKG9v3b4jYfcTNh5ijSsq631uBItLa7od+v/RtdC2UzJ1lWT947qR+Rcac2gbto/NMqJ0fzfVjH4OuKhitdY9tf6mcwGjaNBcWToIMmPSPDdQPNUYckcQ2QIDAQAB" )
"""

MESSAGE = (b"From: Alice <alice@elemta.test>\r\n"
           b"To: Bob <bob@od.test>\r\n"
           b"Subject: Lunch?\r\n"
           b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
           b"Message-ID: <lunch.1@elemta.test>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n"
           b"\r\n"
           b"Shall we meet at noon?\r\n"
           b"\r\n"
           b"Alice\r\n")

pytestmark = pytest.mark.skipif(nsd_available() is not None, reason=str(nsd_available()))

try:
    import nacl.signing  # noqa: F401  (dkimpy's Ed25519 support: dkimpy[ed25519])
    NACL = None
except ImportError:
    NACL = "pynacl is missing: Ed25519 needs dkimpy[ed25519]"


def safe_directory():
    """A fresh directory OpenDKIM accepts: no component of its path writable by others
    (so not under /tmp). None when there is no such place."""
    home = os.path.expanduser("~")
    path = home
    while True:
        mode = os.stat(path).st_mode
        if mode & 0o022 and not os.path.islink(path):
            return None
        if path == "/":
            break
        path = os.path.dirname(path)
    return tempfile.mkdtemp(prefix=".elemta-opendkim-", dir=home)


@pytest.fixture(scope="module")
def keys():
    """Keys made by Elemta's keygen and by OpenDKIM's opendkim-genkey, in a directory
    OpenDKIM will read from."""
    workdir = safe_directory() or tempfile.mkdtemp(prefix="elemta-dkim-")
    made = {
        "rsa": generate_key("elemta.test", "rsa2048", os.path.join(workdir, "rsa.key")),
        "other": generate_key("elemta.test", "other", os.path.join(workdir, "other.key")),
    }
    if NACL is None:
        made["ed"] = generate_key("elemta.test", "ed1", os.path.join(workdir, "ed.key"),
                                  "ed25519-sha256")
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                    "rsa_keygen_bits:512", "-out", os.path.join(workdir, "short.key")],
                   check=True, capture_output=True)
    short_public = subprocess.run(
        ["openssl", "pkey", "-in", os.path.join(workdir, "short.key"), "-pubout",
         "-outform", "DER"], check=True, capture_output=True).stdout
    import base64
    made["short_txt"] = "v=DKIM1; k=rsa; p=" + base64.b64encode(short_public).decode()
    if os.path.exists(OPENDKIM_GENKEY):
        subprocess.run([OPENDKIM_GENKEY, "-b", "2048", "-d", "od.test", "-s", "odsel",
                        "-D", workdir], check=True)
        with open(os.path.join(workdir, "odsel.txt")) as f:
            made["opendkim_zone"] = f.read()
    made["dir"] = workdir
    yield made
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def nsd(keys):
    zones = {
        "example.com": RFC_ZONE,
        "elemta.test": "\n".join([
            keys["rsa"].zone_line, keys["ed"].zone_line if "ed" in keys else "",
            'revoked._domainkey TXT "v=DKIM1; k=rsa; p="',
            'garbage._domainkey TXT "v=DKIM1; k=rsa; p=bm90IGEga2V5IGF0IGFsbA=="',
            'badalg._domainkey TXT "v=DKIM1; k=dsa; p=AAAA"',
            'short._domainkey TXT "%s"' % keys["short_txt"],
            # "other" is published with the rsa2048 key's value: a key mismatch.
            'other._domainkey TXT ( %s )' % keys["rsa"].zone_line.split("( ", 1)[1]
            .rsplit(" )", 1)[0],
        ]) + "\n",
        "od.test": keys.get("opendkim_zone", ""),
    }
    workdir = tempfile.mkdtemp(prefix="elemta-nsd-dkim-")
    server = NSDInstance(workdir, zones, port=53, address=NS_ADDRESS)
    try:
        server.start()
        server.opendkim_ready = True
    except NSDError:
        # Port 53 is taken: go on with a free port; only OpenDKIM's checks need 53.
        server = NSDInstance(workdir, zones, address="127.0.0.1")
        server.start()
        server.opendkim_ready = False
    yield server
    server.stop()
    server.remove()


@pytest.fixture
def resolver(nsd):
    return Resolver(nameservers=[nsd.address], port=nsd.port, timeout=2.0)


def read(name):
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


def signer(keys, *names):
    if "ed" in names and NACL:
        pytest.skip(NACL)
    specs = {"rsa": ("rsa2048", "rsa-sha256"), "ed": ("ed1", "ed25519-sha256"),
             "other": ("other", "rsa-sha256")}
    return Signer([SigningKey("elemta.test", specs[n][0], keys[n].key_file, specs[n][1])
                   for n in names])


def signed(sign_with, message=MESSAGE):
    return apply_header_edits(message, sign_with.sign(message, "elemta.test"))


# ---- the RFC examples ----------------------------------------------------------------

@pytest.mark.skipif(NACL is not None, reason=str(NACL))
def test_rfc8463_example_both_signatures_verify(resolver):
    results = verify_message(read("rfc8463-a3.eml"), resolver)
    assert [(r.result, r.algorithm, r.selector) for r in results] == [
        ("pass", "ed25519-sha256", "brisbane"), ("pass", "rsa-sha256", "test")]
    assert results[0].domain == "football.example.com"


def test_rfc6376_example_verifies(resolver):
    # As corrected by errata 3192 (one space in "game. Are") and 4926 (the signature's
    # continuation lines indented as signed, six spaces).
    results = verify_message(read("rfc6376-a2.eml"), resolver)
    assert [(r.result, r.domain, r.identity) for r in results] == [
        ("pass", "example.com", "joe@football.example.com")]


def test_rfc8463_example_tampered_fails(resolver):
    tampered = read("rfc8463-a3.eml").replace(b"Is dinner ready?", b"Is lunch ready?")
    assert [r.result for r in verify_message(tampered, resolver)] == ["fail", "fail"]


# ---- Elemta and OpenDKIM -------------------------------------------------------------

def opendkim_verify(nsd, message):
    """(exit status, stderr) of opendkim-testmsg verifying `message` against our NSD."""
    if not os.path.exists(OPENDKIM_TESTMSG):
        pytest.skip("opendkim-testmsg is not installed (apt-get install opendkim-tools)")
    if not nsd.opendkim_ready:
        pytest.skip("port 53 on %s is taken; OpenDKIM cannot reach our NSD" % NS_ADDRESS)
    with tempfile.NamedTemporaryFile("w", suffix=".resolv.conf") as conf:
        conf.write("nameserver %s\noptions timeout:2 attempts:1\n" % NS_ADDRESS)
        conf.flush()
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c",
             'mount --bind "$0" /etc/resolv.conf && exec "$@"', conf.name,
             OPENDKIM_TESTMSG], input=message, capture_output=True, timeout=30)
    return done.returncode, done.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("key", ["rsa", "ed"])
def test_elemta_signature_verifies_in_opendkim(nsd, keys, resolver, key):
    message = signed(signer(keys, key))
    status, errors = opendkim_verify(nsd, message)
    assert (status, errors) == (0, "")
    assert [r.result for r in verify_message(message, resolver)] == ["pass"]


def test_opendkim_rejects_a_tampered_elemta_signature(nsd, keys):
    message = signed(signer(keys, "rsa")).replace(b"noon", b"one")
    status, errors = opendkim_verify(nsd, message)
    assert status != 0 and "Bad signature" in errors


def test_dual_signature_rsa_and_ed25519(nsd, keys, resolver):
    message = signed(signer(keys, "rsa", "ed"))
    assert [(r.result, r.algorithm) for r in verify_message(message, resolver)] == [
        ("pass", "rsa-sha256"), ("pass", "ed25519-sha256")]
    assert opendkim_verify(nsd, message) == (0, "")


def test_opendkim_signature_verifies_in_elemta(keys, resolver):
    if not os.path.exists(OPENDKIM) or "opendkim_zone" not in keys:
        pytest.skip("opendkim is not installed (apt-get install opendkim opendkim-tools)")
    workdir = keys["dir"]
    if workdir.startswith("/tmp"):
        pytest.skip("no directory OpenDKIM accepts for its configuration")
    message = MESSAGE.replace(b"alice@elemta.test", b"bob@od.test")
    conf, msgfile = os.path.join(workdir, "opendkim.conf"), os.path.join(workdir, "m.eml")
    with open(conf, "w") as f:
        f.write("Mode s\nDomain od.test\nSelector odsel\nKeyFile %s\nSyslog no\n"
                "Canonicalization relaxed/simple\nSignatureAlgorithm rsa-sha256\n"
                % os.path.join(workdir, "odsel.private"))
    with open(msgfile, "wb") as f:
        f.write(message)
    # Test mode runs the milter on a file and prints the header it would insert.
    done = subprocess.run([OPENDKIM, "-x", conf, "-t", msgfile, "-vvv"],
                          capture_output=True, timeout=30)
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr
    value = out.split("hvalue='", 1)[1].rsplit("'", 1)[0].replace("\n", "\r\n")
    opendkim_signed = b"DKIM-Signature: " + value.encode() + b"\r\n" + message
    results = verify_message(opendkim_signed, resolver)
    assert [(r.result, r.domain, r.algorithm) for r in results] == [
        ("pass", "od.test", "rsa-sha256")]
    tampered = opendkim_signed.replace(b"Lunch?", b"Dinner?")
    assert [r.result for r in verify_message(tampered, resolver)] == ["fail"]


@pytest.fixture(scope="module")
def rspamd(nsd, tmp_path_factory):
    """A private Rspamd on a free port, its DNS pointed at our NSD; its address."""
    if rspamd_available() is not None:
        pytest.skip(rspamd_available())
    from tests.harness import free_port
    instance = RspamdInstance(tmp_path_factory.mktemp("rspamd"), free_port(),
                              "%s:%d" % (nsd.address, nsd.port))
    try:
        instance.start()
    except RspamdError as error:
        pytest.fail(str(error))
    yield instance.address
    instance.stop()


def rspamd_dkim_symbols(address, message):
    done = subprocess.run([RSPAMC, "-h", address, "-i", "192.0.2.1", "symbols"],
                          input=message, capture_output=True, timeout=60)
    return sorted(line.split("Symbol: ", 1)[1] for line in done.stdout.decode().splitlines()
                  if line.startswith("Symbol: R_DKIM"))


def test_elemta_signatures_verify_in_rspamd(rspamd, keys):
    assert rspamd_dkim_symbols(rspamd, signed(signer(keys, "rsa"))) == [
        "R_DKIM_ALLOW (-0.20)[elemta.test:s=rsa2048]"]
    if NACL is None:
        assert rspamd_dkim_symbols(rspamd, signed(signer(keys, "rsa", "ed"))) == [
            "R_DKIM_ALLOW (-0.20)[elemta.test:s=rsa2048, elemta.test:s=ed1]"]
    tampered = signed(signer(keys, "rsa")).replace(b"noon", b"one")
    assert rspamd_dkim_symbols(rspamd, tampered)[0].startswith("R_DKIM_REJECT")


# ---- keygen ----------------------------------------------------------------------------

@pytest.mark.skipif(NACL is not None, reason=str(NACL))
def test_keygen_writes_a_private_key_and_returns_the_record(tmp_path):
    key = generate_key("Example.ORG", "s2025", str(tmp_path / "s2025.key"))
    assert os.stat(key.key_file).st_mode & 0o777 == 0o600
    assert key.dns_name == "s2025._domainkey.example.org"
    assert key.txt.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    assert key.zone_line.startswith('s2025._domainkey.example.org. IN TXT ( "v=DKIM1;')
    assert all(len(chunk) <= 255 for chunk in key.zone_line.split('"')[1::2])
    ed = generate_key("example.org", "ed", str(tmp_path / "ed.key"), "ed25519-sha256")
    assert ed.txt.startswith("v=DKIM1; k=ed25519; p=") and len(ed.txt) == 66
    with pytest.raises(FileExistsError):
        generate_key("example.org", "s2025", key.key_file)
    with pytest.raises(ValueError):
        generate_key("example.org", "bad selector", str(tmp_path / "x.key"))
    assert sorted(os.listdir(str(tmp_path))) == ["ed.key", "s2025.key"]


# ---- bad input --------------------------------------------------------------------------

def sign_then(keys, edit):
    """A message signed with rsa2048, its DKIM-Signature edited by edit(bytes)."""
    message = signed(signer(keys, "rsa"))
    head, _, rest = message.partition(b"\r\nFrom:")
    return edit(head) + b"\r\nFrom:" + rest


@pytest.mark.parametrize("edit, result, reason", [
    (lambda h: h.replace(b"s=rsa2048", b"s=nosuchkey"), "permerror", "no key published"),
    (lambda h: h.replace(b"s=rsa2048", b"s=revoked"), "permerror", "revoked"),
    (lambda h: h.replace(b"s=rsa2048", b"s=garbage"), "permerror", "unusable key"),
    (lambda h: h.replace(b"s=rsa2048", b"s=badalg"), "permerror", "unusable key"),
    (lambda h: h.replace(b"s=rsa2048", b"s=short"), "policy", "too short"),
    (lambda h: h.replace(b"s=rsa2048", b"s=other"), "fail", "did not verify"),
    (lambda h: h.replace(b"v=1;", b"v=9;"), "permerror", "malformed signature"),
    (lambda h: h.replace(b"d=elemta.test;", b""), "permerror", "malformed signature"),
    (lambda h: h.replace(b"a=rsa-sha256", b"a=rsa-md5"), "permerror", "malformed"),
    (lambda h: h.replace(b"bh=", b"bh=AAAA"), "fail", "body hash"),
    (lambda h: b"DKIM-Signature: v=1; ;;; ==== \xff\xfe garbage", "permerror", "malformed"),
])
def test_bad_signatures_and_keys(keys, resolver, edit, result, reason):
    results = verify_message(sign_then(keys, edit), resolver)
    assert len(results) == 1
    assert results[0].result == result
    assert reason in results[0].reason


def silent_udp_server():
    """A UDP socket that receives queries and never answers: a dead nameserver."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_rsa_sha1_is_refused_by_policy(keys, resolver):
    import dkim as dkimpy
    with open(keys["rsa"].key_file, "rb") as f:
        header = dkimpy.sign(MESSAGE, b"rsa2048", b"elemta.test", f.read(),
                             signature_algorithm=b"rsa-sha1")
    results = verify_message(header + MESSAGE, resolver)
    assert [(r.result, r.reason) for r in results] == [
        ("policy", "rsa-sha1 signatures are not accepted (RFC 8301)")]


def test_dns_timeout_is_temperror(keys):
    with silent_udp_server() as dead:
        slow = Resolver(nameservers=["127.0.0.1"], port=dead.getsockname()[1], timeout=0.2,
                        attempts=1)
        started = time.monotonic()
        results = verify_message(signed(signer(keys, "rsa")), slow)
    assert [r.result for r in results] == ["temperror"]
    assert "timed out" in results[0].reason
    assert time.monotonic() - started < 2


def test_enormous_headers_do_not_hang(keys, resolver):
    many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 60) for i in range(20000))
    message = signed(signer(keys, "rsa"), many + MESSAGE)
    long_line = b"X-Long: " + b"y" * 2000000 + b"\r\n"
    started = time.monotonic()
    # 20,000 header fields are over the default max_headers: not checked, and said so...
    assert [(r.result, r.reason) for r in verify_message(message, resolver)] == [
        ("neutral", "not checked: 20008 header fields, more than max_headers (1000)")]
    # ...and with the limit raised, checked without hanging.
    assert [r.result for r in verify_message(message, resolver, max_headers=30000)] == \
        ["pass"]
    assert [r.result for r in verify_message(long_line + message, resolver,
                                             max_headers=30000)] == ["pass"]
    many_signatures = b"".join(
        b"DKIM-Signature: v=1; a=rsa-sha256; d=elemta.test; s=nosuchkey%d; h=from; "
        b"bh=AAAA; b=AAAA\r\n" % i for i in range(50))
    results = verify_message(many_signatures + message, resolver)
    assert len(results) == 51
    assert results[-1].result == "neutral"
    assert time.monotonic() - started < 20


def test_broken_mime_and_missing_body_separator(keys, resolver):
    broken = (b"From: alice@elemta.test\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=\"never-closed\r\n\r\n"
              b"--never-closed\r\nContent-Type: text/plain\r\n\r\nhalf a part")
    assert [r.result for r in verify_message(signed(signer(keys, "rsa"), broken),
                                             resolver)] == ["pass"]
    unparsable = verify_message(b"no headers at all, just text", resolver)
    assert [(r.result, r.reason[:23]) for r in unparsable] == [
        ("permerror", "message does not parse:")]
    assert verify_message(b"", resolver) == []
    results = verify_message(b"DKIM-Signature: v=1; a=rsa-sha256\r\n", resolver)
    assert results[0].result == "permerror"


# ---- the plugin -----------------------------------------------------------------------

def plugin_manager(settings):
    return PluginManager.from_mapping({"dkim": settings, "authres": {"enabled": False}}).start(strict=True)


@pytest.mark.skipif(NACL is not None, reason=str(NACL))
def test_plugin_signs_our_users_mail_and_verifies_inbound(keys, resolver, caplog):
    manager = plugin_manager({"sign": True, "keys": [
        {"domain": "elemta.test", "selector": "rsa2048", "key_file": keys["rsa"].key_file},
        {"domain": "elemta.test", "selector": "ed1", "key_file": keys["ed"].key_file,
         "algorithm": "ed25519-sha256"}]})
    outgoing = Context(client_address="192.0.2.10", auth_user="alice", resolver=resolver,
                       hostname="mx.elemta.test", sender="alice@elemta.test",
                       message=Message(MESSAGE.replace(b"alice@", b"alice@sub.")))
    assert manager.run("data", outgoing).headers == []      # signing is at storage
    outcome = manager.run("storage", outgoing)
    assert [name for name, _ in outcome.headers] == ["DKIM-Signature", "DKIM-Signature"]
    message = apply_header_edits(outgoing.message.raw, outcome.headers)
    inbound = Context(client_address="192.0.2.99", resolver=resolver, hostname="mx.test",
                      message=Message(message))
    assert manager.run("data", inbound).headers == []
    assert manager.run("storage", inbound).headers == []    # not our users' mail: unsigned
    assert [(r.method, r.result, r.prop("header.d"), r.prop("header.a"))
            for r in inbound.auth_results] == [
        ("dkim", "pass", "elemta.test", "rsa-sha256"),
        ("dkim", "pass", "elemta.test", "ed25519-sha256")]
    unsigned = Context(client_address="192.0.2.99", resolver=resolver, message=Message(MESSAGE))
    manager.run("data", unsigned)
    assert [(r.method, r.result) for r in unsigned.auth_results] == [("dkim", "none")]
    manager.close()


def test_plugin_logs_problems_in_one_line(keys, resolver, caplog):
    manager = plugin_manager({})
    message = sign_then(keys, lambda h: h.replace(b"s=rsa2048", b"s=revoked"))
    ctx = Context(client_address="192.0.2.99", resolver=resolver, queue_id="4XyZ",
                  message=Message(message))
    caplog.set_level("INFO", logger="elemta")
    outcome = manager.run("data", ctx)
    assert outcome.reply is None
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("elemta")]
    assert lines == ["4XyZ: DKIM permerror for d=elemta.test s=revoked from [192.0.2.99]: "
                     "key at revoked._domainkey.elemta.test is revoked"]
    assert "Traceback" not in caplog.text
    manager.close()


@pytest.mark.parametrize("settings, message", [
    ({"sign": True}, "plugins.dkim.key_file: sign is true but no key is configured"),
    ({"sign": True, "domain": "a.test", "selector": "s"},
     "plugins.dkim.key_file: required for a signing key"),
    ({"keys": [{"domain": "a.test", "selector": "s", "key_file": "/k"},
               {"domain": "a.test", "selector": "s", "key_file": "/k", "algorithm": "rsa"}]},
     "plugins.dkim.keys[1].algorithm: must be one of rsa-sha256, ed25519-sha256, not "
     "'rsa'"),
    ({"verify": "yes"}, "plugins.dkim.verify: expected a boolean (true or false), not a "
                        "string ('yes')"),
    ({"keys": [{"domain": "a.test"}]}, "plugins.dkim.keys[0].selector: required for a "
                                       "signing key"),
    ({"selectr": "x"}, "plugins.dkim.selectr: unknown key; did you mean "
                       "plugins.dkim.selector?"),
])
def test_settings_errors_name_the_key(settings, message):
    with pytest.raises(PluginConfigError) as error:
        plugin_manager(settings)
    assert str(error.value).startswith(message)


@pytest.mark.skipif(NACL is not None, reason=str(NACL))
def test_unusable_key_files_are_refused_at_start(tmp_path, keys):
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    for key_file, algorithm, words in [
            (str(tmp_path / "missing.key"), "rsa-sha256", "cannot read"),
            (str(garbage), "rsa-sha256", "is not an RSA private key"),
            (str(garbage), "ed25519-sha256", "is not an Ed25519 private key"),
            (keys["rsa"].key_file, "ed25519-sha256", "is not an Ed25519 private key"),
            (os.path.join(keys["dir"], "short.key"), "rsa-sha256", "512 bits is too short")]:
        with pytest.raises(PluginConfigError) as error:
            plugin_manager({"sign": True, "domain": "a.test", "selector": "s",
                            "key_file": key_file, "algorithm": algorithm})
        assert str(error.value).startswith("plugins.dkim.key_file: ")
        assert words in str(error.value)


@pytest.mark.skipif(NACL is not None, reason=str(NACL))
def test_openssl_ed25519_pem_keys_sign(tmp_path, resolver, keys):
    pem = str(tmp_path / "ed.pem")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", pem], check=True)
    result = Signer([SigningKey("elemta.test", "ed1", pem, "ed25519-sha256")]).sign(
        MESSAGE, "elemta.test")
    # Signed with a different key than the one published at ed1: a clean "fail".
    checked = verify_message(apply_header_edits(MESSAGE, result), resolver)
    assert [r.result for r in checked] == ["fail"]
    assert isinstance(checked[0], DKIMResult)
