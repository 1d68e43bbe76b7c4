"""The maildrop file format (elemta.queue.maildrop), without a daemon: what sendmail's
writer puts down, pickup's reader takes back as the same queue Envelope, and files written
before the envelope moved into elemta.queue.maildrop are still read as they were.
See also tests/test_sendmail.py and tests/security/test_maildrop_files.py (with a daemon).
"""

import os

import pytest

from elemta.queue import maildrop
from elemta.queue.model import Recipient

CONTENT = b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n"
# Two files as sendmail wrote them before this module built the envelope: -bm (no orcpt)
# and -bs (orcpt null or set).
OLD_BM_ENVELOPE = (b'{"sender":"cron@example.org","recipients":[{"address":"root@example.test",'
                   b'"notify":["FAILURE","DELAY"]}],"ret":"HDRS","envid":"batch-7",'
                   b'"body":"8BITMIME","smtputf8":false}')
OLD_BS_ENVELOPE = (b'{"sender":"","recipients":[{"address":"a@example.test","notify":null,'
                   b'"orcpt":null},{"address":"b@example.test","notify":["NEVER"],'
                   b'"orcpt":"rfc822;b@example.test"}],"ret":null,"envid":null,'
                   b'"body":"7BIT","smtputf8":false}')


@pytest.fixture
def spool(tmp_path):
    path = str(tmp_path / "spool")
    maildrop.prepare(path)
    return path


def plant(spool, name, envelope_line, content=CONTENT):
    path = os.path.join(maildrop.maildrop_dir(spool), name)
    with open(path, "wb") as f:
        f.write(maildrop.MAGIC + content + maildrop.ENVELOPE_TAG + envelope_line + b"\n"
                + maildrop.FOOTER_FORMAT % (len(content), len(envelope_line)))
    return path


def read(path, max_recipients=10):
    submission = maildrop.read_submission(path)
    try:
        envelope = submission.queue_envelope("QID", 1234.5, max_recipients)
        return submission, envelope, b"".join(submission.iter_content())
    finally:
        submission.close()


def envelope_line(path):
    with open(path, "rb") as f:
        data = f.read()
    start = data.rindex(maildrop.ENVELOPE_TAG) + len(maildrop.ENVELOPE_TAG)
    return data[start:data.index(b"\n", start)]


def test_what_the_writer_puts_down_the_reader_takes_back(spool):
    writer = maildrop.MaildropWriter(spool)
    writer.write(CONTENT)
    name = writer.finish("cron@example.org",
                         [Recipient("root@example.test", ("SUCCESS", "FAILURE")),
                          Recipient("j\u00f6se@example.test", None, "rfc822;x@example.test")],
                         "FULL", "id-1")
    submission, envelope, content = read(os.path.join(maildrop.maildrop_dir(spool), name))
    assert content == CONTENT and submission.uid == os.getuid()
    assert (envelope.queue_id, envelope.arrival, envelope.sender) == (
        "QID", 1234.5, "cron@example.org")
    assert [(r.address, r.notify, r.orcpt) for r in envelope.recipients] == [
        ("root@example.test", ("SUCCESS", "FAILURE"), None),
        ("j\u00f6se@example.test", None, "rfc822;x@example.test")]
    # 8-bit content makes it 8BITMIME whatever was declared; a non-ASCII address SMTPUTF8.
    assert (envelope.ret, envelope.envid, envelope.body, envelope.smtputf8) == (
        "FULL", "id-1", "8BITMIME", True)
    assert (envelope.protocol, envelope.client_address, envelope.extra) == (
        maildrop.PROTOCOL, "", {"uid": os.getuid()})


def test_the_declared_body_counts_and_7bit_stays_7bit(spool):
    for declared, expected in ((None, "7BIT"), ("7BIT", "7BIT"), ("8BITMIME", "8BITMIME"),
                               ("BINARYMIME", "8BITMIME")):
        writer = maildrop.MaildropWriter(spool)
        writer.write(b"Subject: plain\r\n\r\nascii\r\n")
        name = writer.finish("a@example.org", [Recipient("b@example.test")], body=declared)
        _, envelope, _ = read(os.path.join(maildrop.maildrop_dir(spool), name))
        assert (declared, envelope.body, envelope.smtputf8) == (declared, expected, False)


def test_the_writer_writes_the_envelope_line_sendmail_always_wrote(spool):
    writer = maildrop.MaildropWriter(spool)
    writer.write(CONTENT)
    name = writer.finish("cron@example.org",
                         [Recipient("root@example.test", ("FAILURE", "DELAY"))],
                         "HDRS", "batch-7", "7BIT")
    assert envelope_line(os.path.join(maildrop.maildrop_dir(spool), name)) == OLD_BM_ENVELOPE


@pytest.mark.parametrize("line", [OLD_BM_ENVELOPE, OLD_BS_ENVELOPE])
def test_a_file_left_by_the_old_sendmail_is_still_read(spool, line):
    _, envelope, content = read(plant(spool, "00000000000001-1-old", line))
    assert content == CONTENT
    if line == OLD_BM_ENVELOPE:
        assert (envelope.sender, envelope.ret, envelope.envid, envelope.body) == (
            "cron@example.org", "HDRS", "batch-7", "8BITMIME")
        assert [(r.address, r.notify, r.orcpt) for r in envelope.recipients] == [
            ("root@example.test", ("FAILURE", "DELAY"), None)]
    else:
        assert (envelope.sender, envelope.ret, envelope.envid, envelope.body) == (
            "", None, None, "7BIT")
        assert [(r.address, r.notify, r.orcpt) for r in envelope.recipients] == [
            ("a@example.test", None, None),
            ("b@example.test", ("NEVER",), "rfc822;b@example.test")]


def test_a_bad_envelope_names_the_file_its_writer_and_the_field(spool):
    path = plant(spool, "00000000000002-1-bad",
                 b'{"sender":"a@example.org","recipients":[{"address":"b@example.test"}],'
                 b'"ret":"ALL"}')
    with pytest.raises(maildrop.BadSubmission) as caught:
        read(path)
    assert str(caught.value) == "%s (uid %d): bad envelope: ret must be null, FULL or " \
                                "HDRS, not 'ALL'" % (path, os.getuid())


def test_more_recipients_than_the_limit_is_a_bad_envelope(spool):
    path = plant(spool, "00000000000003-1-many", OLD_BS_ENVELOPE)
    with pytest.raises(maildrop.BadSubmission, match="2 recipients, more than "
                                                     r"limits.recipients \(1\)"):
        read(path, max_recipients=1)
