"""The content scanner fed bytes, as the protocol core is tested: whatever chunks the
content arrives in, the same logical lines come out, classed as Postfix's cleanup
classes them, and the bytes written back are the bytes that came in.

See also: elemta.content.scanner, tests/test_content_checks.py (through a real server).
"""

import random

from elemta.content.scanner import (BODY, HEADER, HEADER_TAIL, MAX_HEADER, MAX_LINE,
                                    MIME_HEADER, NESTED_HEADER, OTHER, ContentScanner,
                                    HopCounter)

MESSAGE = (b"Received: from a\r\n\tby b\r\nReceived: from c\r\nSubject: one\r\n two\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary=\"b1\"\r\n"
           b"\r\npreamble\r\n"
           b"--b1\r\nContent-Type: text/plain\r\nX-Part: yes\r\n\r\nhello\r\n"
           b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n"
           b"--b2\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n"
           b"--b1\r\n"                       # an outer boundary closes the inner level
           b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\nReceived: x\r\n\r\n"
           b"inner body\r\n--b1--\r\nepilogue\r\n")

EXPECTED = [
    (HEADER, "Received: from a\tby b"), (HEADER, "Received: from c"),
    (HEADER, "Subject: one two"), (MIME_HEADER, "MIME-Version: 1.0"),
    (MIME_HEADER, 'Content-Type: multipart/mixed; boundary="b1"'), (BODY, "preamble"),
    (MIME_HEADER, "Content-Type: text/plain"), (MIME_HEADER, "X-Part: yes"),
    (BODY, "hello"), (MIME_HEADER, "Content-Type: multipart/alternative; boundary=b2"),
    (MIME_HEADER, "Content-Type: text/html"), (BODY, "<p>hi</p>"),
    (MIME_HEADER, "Content-Type: message/rfc822"), (NESTED_HEADER, "Subject: inner"),
    (NESTED_HEADER, "Received: x"), (BODY, "inner body"), (BODY, "epilogue")]


def scan(data, cuts, **options):
    scanner = ContentScanner(**options)
    pieces, last = [], 0
    for cut in sorted(cuts) + [len(data)]:
        pieces += scanner.feed(data[last:cut])
        last = cut
    return scanner, pieces + scanner.close()


def test_the_same_lines_whatever_the_chunks():
    rng = random.Random(15)
    for attempt in range(200):
        cuts = [rng.randrange(len(MESSAGE)) for _ in range(rng.randrange(0, 40))]
        scanner, pieces = scan(MESSAGE, cuts)
        assert b"".join(p.raw for p in pieces) == MESSAGE
        assert [(p.kind, p.key) for p in pieces if p.kind != OTHER] == EXPECTED, cuts
        assert scanner.received == 2          # the attached message's is not a hop


def test_body_lines_past_the_limit_of_each_part_are_not_checked():
    body = b"".join(b"line %03d\r\n" % n for n in range(100))       # 10 bytes each
    _, pieces = scan(b"Subject: x\r\n\r\n" + body, [], body_limit=95)
    assert [p.key for p in pieces if p.kind == BODY] == ["line %03d" % n for n in range(10)]


def test_long_lines_are_cut_and_huge_headers_bounded():
    long_body = b"x" * (3 * MAX_LINE + 5) + b"\r\n"
    _, pieces = scan(b"Subject: x\r\n\r\n" + long_body, [100, 5000, 9000])
    assert all(len(p.key) <= MAX_LINE for p in pieces if p.kind == BODY)
    assert b"".join(p.raw for p in pieces).endswith(long_body)
    huge = b"X-Big: start\r\n" + b"\tmore folded text here\r\n" * (MAX_HEADER // 20) + \
        b"Subject: after\r\n\r\nbody\r\n"
    _, pieces = scan(huge, [])
    keys = [p.key for p in pieces if p.kind == HEADER]
    assert len(keys) == 2 and keys[1] == "Subject: after"
    assert len(keys[0]) <= MAX_HEADER
    kinds = [p.kind for p in pieces]
    assert kinds.index(HEADER_TAIL) == 1 and kinds.count(HEADER) == 2
    assert b"".join(p.raw for p in pieces) == huge


def test_headers_only_passes_the_body_untouched():
    _, pieces = scan(MESSAGE, [30, 200], headers_only=True)
    assert [p.kind for p in pieces if p.kind != OTHER] == [HEADER] * 3 + [MIME_HEADER] * 2
    assert b"".join(p.raw for p in pieces) == MESSAGE


def test_the_hop_counter_counts_as_the_scanner_does():
    rng = random.Random(7)
    message = (b"Received: a\r\n b\r\nreceived : c\r\nX-Received: no\r\n"
               b"Subject: Received: no\r\n\r\nReceived: body, not a hop\r\n")
    for attempt in range(200):
        cuts = sorted(rng.randrange(len(message)) for _ in range(rng.randrange(0, 20)))
        counter, last = HopCounter(), 0
        for cut in cuts + [len(message)]:
            counter.feed(message[last:cut])
            last = cut
        assert counter.received == 2, cuts
        assert counter.last == "received : c"
    assert scan(message, [])[0].received == 2


def test_past_the_limit_boundaries_are_still_found_whatever_the_chunks():
    """Past body_limit the scanner skips to the next possible boundary with one search:
    the MIME structure (and so every part's headers) comes out the same."""
    filler = b"".join(b"filler %d\r\n" % n for n in range(50))
    message = MESSAGE.replace(b"hello\r\n", b"hello\r\n" + filler + b"-- signature\r\n--x\r\n")
    headers = [item for item in EXPECTED if item[0] != BODY]
    rng = random.Random(3)
    for attempt in range(200):
        cuts = [rng.randrange(len(message)) for _ in range(rng.randrange(0, 30))]
        _, pieces = scan(message, cuts, body_limit=1)
        assert b"".join(p.raw for p in pieces) == message
        assert [(p.kind, p.key) for p in pieces if p.kind not in (OTHER, BODY)] == headers
        assert [p.key for p in pieces if p.kind == BODY] == [
            "preamble", "hello", "<p>hi</p>", "inner body", "epilogue"], cuts


def test_a_long_first_body_line_cut_across_chunks_keeps_its_place():
    """headers_only: the header section ends at a long line that is no header, cut
    short at a chunk's end; what follows passes unscanned, in order."""
    message = b"Subject: x\r\n" + b"y" * (MAX_LINE + 100) + b"\r\nmore\r\n"
    for cut in (MAX_LINE + 20, MAX_LINE + 50, len(message) - 3):
        _, pieces = scan(message, [cut], headers_only=True)
        assert b"".join(p.raw for p in pieces) == message, cut
