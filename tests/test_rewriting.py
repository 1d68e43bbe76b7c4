"""Address rewriting before queueing (rewrite.*: canonical maps, masquerading), over real
sockets and through sendmail and pickup; the queue records and spool files say what was
queued.

One server for the module: canonical_maps and recipient_canonical_maps inline,
sender_canonical_maps in lmdb (so a test can take it away: 451 4.3.0), a virtual alias
of a canonical result (canonical first, then virtual, as Postfix's cleanup), masquerading
of example.test's subdomains but keep.example.test, root excepted, and DKIM signing for
example.test (the signature must cover the rewritten headers of sendmail's mail).
See also: elemta.addressing.rewrite, elemta.addressing.headers.
"""

import os
import smtplib
import subprocess
import sys

import dkim
import pytest

from elemta.maps.lmdbtable import compile_source
from elemta.plugins.dkim import generate_key
from tests.harness import REPO, wait_for


@pytest.fixture(scope="module")
def sender_table(tmp_path_factory):
    source = tmp_path_factory.mktemp("tables") / "sender_canonical"
    source.write_text("alice@example.test alice.smith@example.test\n")
    compile_source(str(source))
    return str(source)


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory):
    return generate_key("example.test", "s1",
                        str(tmp_path_factory.mktemp("dkim") / "s1.key"), bits=1024)


@pytest.fixture(scope="module")
def server(elemta_module_server, sender_table, dkim_key):
    return elemta_module_server(
        rewrite={"canonical_maps": {"old@example.test": "new@example.test",
                                    "@legacy.test": "@example.test",
                                    "bad@example.test": "two@x.test, three@x.test"},
                 "sender_canonical_maps": "lmdb:" + sender_table,
                 "recipient_canonical_maps": {"bob@example.test": "robert@example.test"},
                 "masquerade_domains": ["!keep.example.test", "example.test"],
                 "masquerade_exceptions": ["root"]},
        virtual={"alias_maps": {"robert@example.test": "rob@elsewhere.test"}},
        plugins={"dkim": {"enabled": True, "sign": True, "domain": "example.test",
                          "selector": "s1", "key_file": dkim_key.key_file}})


def smtp_send(server, sender, recipients, message=b"Subject: hi\r\n\r\nbody\r\n",
              client="127.0.0.1"):
    """Send over SMTP from client (in mynetworks); the queued (envelope, content)."""
    before = set(server.queued_ids())
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(client, 0)) as smtp:
        smtp.sendmail(sender, recipients, message)
    [qid] = set(server.queued_ids()) - before
    return server.message(qid)


def sendmail(server, args, content):
    before = set(server.queued_ids())
    done = subprocess.run(
        [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path, "-i"] + args,
        input=content, capture_output=True, env=dict(os.environ, PYTHONPATH=REPO),
        timeout=30)
    assert done.returncode == 0, done.stderr
    [qid] = wait_for(lambda: list(set(server.queued_ids()) - before))
    return server.message(qid)


def headers_of(content):
    return content.split(b"\r\n\r\n", 1)[0].decode()


@pytest.mark.parametrize("sender, queued", [
    ("alice@example.test", "alice.smith@example.test"),      # sender_canonical_maps
    ("old@example.test", "new@example.test"),                # canonical_maps
    ("someone+tag@legacy.test", "someone+tag@example.test"),   # @domain keeps the local part
    ("carl@host.example.test", "carl@example.test"),         # masqueraded
    ("root@host.example.test", "root@host.example.test"),    # masquerade_exceptions
    ("x@keep.example.test", "x@keep.example.test"),          # !keep.example.test
    ("x@a.keep.example.test", "x@a.keep.example.test"),
    ("carl@example.test", "carl@example.test"),              # the domain itself
    ("carl@elsewhere.test", "carl@elsewhere.test"),
    ("", ""),                                                # the null sender
])
def test_the_envelope_sender_is_rewritten(server, sender, queued):
    envelope, content = smtp_send(server, sender, ["u@example.test"])
    assert envelope.sender == queued


def test_recipients_are_rewritten_then_expanded_and_keep_their_orcpt(server):
    envelope, _ = smtp_send(server, "a@elsewhere.test", [
        "bob@example.test", "old@example.test", "who+x@legacy.test",
        "u@host.example.test", "plain@example.test"])
    assert [(r.address, r.orcpt) for r in envelope.recipients] == [
        ("rob@elsewhere.test", "rfc822;bob@example.test"),    # recipient canonical, virtual
        ("new@example.test", "rfc822;old@example.test"),
        ("who+x@example.test", "rfc822;who+x@legacy.test"),
        ("u@host.example.test", None),           # envelope_recipient is not masqueraded
        ("plain@example.test", None)]


def test_headers_are_rewritten_for_a_client_on_this_host_only(server, dkim_key):
    message = (b"From: Alice <alice@example.test>\r\nTo: bob@example.test,\r\n"
               b" u@host.example.test\r\nSubject: alice@example.test\r\n\r\nhi\r\n")
    # Another host (127.0.0.2 connecting to 127.0.0.1): its headers are its own.
    _, content = smtp_send(server, "alice@example.test", ["u@example.test"], message,
                           client="127.0.0.2")
    assert "From: Alice <alice@example.test>\r\nTo: bob@example.test,\r\n" \
           " u@host.example.test\r\n" in headers_of(content)
    # This host (the address it connected to): rewritten, before DKIM signs.
    _, content = smtp_send(server, "alice@example.test", ["u@example.test"], message)
    headers = headers_of(content)
    assert "From: Alice <alice.smith@example.test>\r\nTo: robert@example.test,\r\n" \
           " u@example.test\r\nSubject: alice@example.test" in headers
    assert content.endswith(b"\r\n\r\nhi\r\n")
    assert dkim.verify(content, dnsfunc=lambda name, timeout=5: dkim_key.txt.encode())


def test_a_bad_canonical_entry_is_a_temporary_failure(server):
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        code, text = smtp.docmd("MAIL FROM:<bad@example.test>")
    assert (code, text.decode()) == (
        451, "4.3.0 <bad@example.test>: Temporary lookup failure: bad canonical map entry")
    assert "gives 2 addresses for <bad@example.test>, not one" in server.log()


def test_a_table_that_cannot_answer_is_a_temporary_failure(server, sender_table):
    os.rename(sender_table + ".lmdb", sender_table + ".away")
    try:
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.ehlo()
            code, text = smtp.docmd("MAIL FROM:<alice@example.test>")
    finally:
        os.rename(sender_table + ".away", sender_table + ".lmdb")
    assert (code, text.decode()) == (
        451, "4.3.0 <alice@example.test>: Temporary lookup failure")


def test_sendmail_mail_has_envelope_and_headers_rewritten_before_dkim_signs(server,
                                                                            dkim_key):
    envelope, content = sendmail(
        server, ["-f", "alice@example.test", "bob@example.test", "carl@host.example.test"],
        b"From: Alice <alice@example.test>\n"
        b"Sender: root@host.example.test\n"
        b"Reply-To: carl@host.example.test, \"x\" <x@keep.example.test>\n"
        b"To: bob@example.test,\n old@example.test\n"
        b"Subject: from alice@example.test to bob@example.test\n\nalice@example.test\n")
    assert envelope.sender == "alice.smith@example.test"
    assert [r.address for r in envelope.recipients] == ["rob@elsewhere.test",
                                                        "carl@host.example.test"]
    headers = headers_of(content)
    assert "From: Alice <alice.smith@example.test>\r\n" in headers
    assert "Sender: root@host.example.test\r\n" in headers               # an exception
    assert 'Reply-To: carl@example.test, "x" <x@keep.example.test>\r\n' in headers
    # Recipient headers: canonical maps, masquerading (header_recipient); no aliases.
    assert "To: robert@example.test,\r\n new@example.test\r\n" in headers
    assert "Subject: from alice@example.test to bob@example.test\r\n" in headers
    assert content.endswith(b"\r\n\r\nalice@example.test\r\n")
    # Signed after the rewriting: the signature holds over what was queued.
    assert "DKIM-Signature:" in headers
    assert dkim.verify(content, dnsfunc=lambda name, timeout=5: dkim_key.txt.encode())


def test_bare_names_in_sendmail_headers_get_the_mail_name(elemta_server, tmp_path):
    mailname = tmp_path / "mailname"
    mailname.write_text("mail.example.test\n")
    server = elemta_server(smtpd={"mailname_file": str(mailname)})
    envelope, content = sendmail(
        server, ["-f", "root", "admin"],
        b"From: root (Cron Daemon)\nTo: Cron root <admin>, undisclosed-recipients:;\n"
        b"Cc: ops@example.test\nSubject: root\n\nok\n")
    assert envelope.sender == "root@mail.example.test"
    headers = headers_of(content)
    assert "From: root@mail.example.test (Cron Daemon)\r\n" in headers
    assert ("To: Cron root <admin@mail.example.test>, undisclosed-recipients:;\r\n"
            in headers)
    assert "Cc: ops@example.test\r\nSubject: root\r\n" in headers


def test_bad_rewrite_options_name_file_line_and_key(tmp_path):
    from elemta.config import ConfigError, load_config
    path = tmp_path / "elemta.yaml"
    path.write_text('rewrite:\n  masquerade_domains: ["!ok.example", "bad domain"]\n'
                    '  masquerade_classes: [envelope_sender, nope]\n'
                    'smtpd:\n  reject_sender_login_mismatch: sometimes\n')
    with pytest.raises(ConfigError) as error:
        load_config(str(path), check_files=False)
    assert str(error.value).splitlines() == [
        "%s:2: rewrite.masquerade_domains[1]: 'bad domain' is not a domain name" % path,
        "%s:3: rewrite.masquerade_classes[1]: 'nope' is not one of envelope_sender, "
        "envelope_recipient, header_sender, header_recipient" % path,
        "%s:5: smtpd.reject_sender_login_mismatch: must be one of authenticated, all, "
        "none, not 'sometimes'" % path]


def test_headers_are_rewritten_when_no_plugin_keeps_the_content(elemta_server):
    server = elemta_server(rewrite={"canonical_maps": {"@old.test": "@new.test"}})
    envelope, content = smtp_send(server, "a@old.test", ["b@old.test"],
                                  b"From: a@old.test\r\nTo: <b@old.test>\r\n\r\nbody\r\n")
    assert (envelope.sender, envelope.recipients[0].address) == ("a@new.test", "b@new.test")
    assert content.endswith(b"\r\nFrom: a@new.test\r\nTo: <b@new.test>\r\n\r\nbody\r\n")


def test_sendmail_bv_shows_the_canonical_address(server):
    done = subprocess.run(
        [sys.executable, "-m", "elemta.cli.sendmail", "-C", server.config_path, "-bv",
         "bob@example.test", "root@example.test"], capture_output=True,
        env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == [
        "bob@example.test... canonical address robert@example.test",
        "robert@example.test... deliverable: virtual alias of rob@elsewhere.test",
        "root@example.test... deliverable: local user root"]


def test_quoted_local_parts_with_an_extension_are_found_and_keep_it(elemta_server):
    """recipient_delimiter +: a quoted local part is cut at the extension in what it says
    ("a b+x" is "a b" and x), the entry found without it gets it back, and only then is
    the result checked and queued. Canonical maps once gave a bogus 451 for "old+x"
    (sliced with the quotes still on) and never found "a b+x"; virtual aliases refused
    "sales+a b" as unknown, and checked a target before its extension went on, so a
    result too long to be an address was queued."""
    server = elemta_server(
        local={"recipient_delimiter": "+"},
        rewrite={"canonical_maps": {"old@example.test": "new@example.test",
                                    '"a b"@example.test': "spaced@example.test"}},
        virtual={"alias_domains": ["alias.test"],
                 "alias_maps": {"sales@alias.test": "team@elsewhere.test",
                                "long@alias.test": "l" * 50 + "@elsewhere.test"}})
    envelope, _ = smtp_send(server, '"old+x"@example.test', [
        '"old+x"@example.test', '"old+a b"@example.test', '"a b+x"@example.test',
        '"sales+a b"@alias.test', "sales+x@alias.test"])
    assert envelope.sender == "new+x@example.test"
    assert [(r.address, r.orcpt) for r in envelope.recipients] == [
        ("new+x@example.test", 'rfc822;"old+x"@example.test'),
        ('"new+a b"@example.test', 'rfc822;"old+a b"@example.test'),
        ("spaced+x@example.test", 'rfc822;"a b+x"@example.test'),
        ('"team+a b"@elsewhere.test', 'rfc822;"sales+a b"@alias.test'),
        ("team+x@elsewhere.test", "rfc822;sales+x@alias.test")]
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        smtp.mail("someone@elsewhere.test")
        code, text = smtp.docmd("RCPT TO:<long+%s@alias.test>" % ("x" * 20))
    # l...l+x...x@elsewhere.test: a local part of 71 characters is not an address, and
    # never will be: refused for good (the client's extension made it so), not 451.
    assert (code, text.decode()) == (550, "5.1.3 <long+%s@alias.test>: Recipient address "
                                          "rejected: virtual alias address too long "
                                          "(local part longer than 64 octets)" % ("x" * 20))
    assert "(as '%s+%s@elsewhere.test') for <long+%s@alias.test>: local part longer " \
           "than 64 octets" % ("l" * 50, "x" * 20, "x" * 20) in server.log()


def test_a_canonical_address_too_long_for_any_next_hop_is_refused_for_good(elemta_server):
    """"@short.test @<a long domain>" keeps the client's local part: a long one makes an
    address over 254 octets, which every next hop refuses. It was 451 4.3.0 (a table to
    fix, retried for days); the client's address makes it so: 550, with the reason
    logged."""
    domain = ".".join(["d" * 50] * 4) + ".test"
    server = elemta_server(rewrite={"canonical_maps": {"@short.test": "@" + domain}})
    local = "u" * 60
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        assert smtp.docmd("MAIL FROM:<%s@short.test>" % local) == (
            550, b"5.1.7 <%s@short.test>: Sender address rejected: canonical address too "
                 b"long" % local.encode())
        assert smtp.docmd("MAIL FROM:<u@short.test>")[0] == 250
        assert smtp.docmd("RCPT TO:<%s@short.test>" % local) == (
            550, b"5.1.3 <%s@short.test>: Recipient address rejected: canonical address "
                 b"too long" % local.encode())
        assert smtp.docmd("RCPT TO:<u@short.test>")[0] == 250
    assert "inline:{ { @short.test = @%s } } gives '%s@%s' for <%s@short.test>: address " \
           "longer than 254 octets" % (domain, local, domain, local) in server.log()
