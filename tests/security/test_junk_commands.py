"""Attack class: holding a session open for ever with commands that cost nothing.

NOOP, RSET, VRFY, HELP, HELO and EHLO move no transaction on and make no error, so a
client could send them without end (15,000 NOOPs were answered). As Postfix's
smtpd_junk_command_limit, smtpd.junk_command_limit (default 100) bounds them per
session; an accepted message starts the count afresh. The one over the limit is
answered 421 4.7.0 and the connection closed.
"""

import socket

from tests.protocol_driver import Driver

OVER = b"421 4.7.0 mx.test Error: too many junk commands\r\n"


def read_all(sock):
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_the_101st_junk_command_closes_the_session(elemta_server):
    server = elemta_server()
    junk = [b"NOOP", b"RSET", b"VRFY postmaster", b"HELP", b"EHLO c.test", b"HELO c.test"]
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(10)
        s.sendall(b"".join(junk[n % len(junk)] + b"\r\n" for n in range(99)))
        s.sendall(b"NOOP\r\nNOOP\r\nNOOP\r\n")      # the 100th, then over the limit
        answer = read_all(s)          # the server closes: recv returns b""
    lines = answer.split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    assert answer.endswith(b"250 2.0.0 Ok\r\n" + OVER), answer[-300:]
    # 100 answered (EHLO's reply has several lines), then the 421 and nothing more.
    finals = [line for line in lines[1:] if line[3:4] == b" "]
    assert len(finals) == 101 and finals[-1] == OVER.strip()
    assert "too many junk commands after NOOP from unknown[127.0.0.1]" in server.log()


def test_the_limit_is_configurable(elemta_server):
    server = elemta_server(smtpd={"hostname": "mx.test", "workers": 1,
                                  "junk_command_limit": 3})
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(10)
        s.sendall(b"EHLO c.test\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
        answer = read_all(s)
    assert answer.endswith(b"250 2.0.0 Ok\r\n" + OVER), answer


def junk(driver, count):
    return [driver.replies(b"NOOP\r\n")[-1] for _ in range(count)]


def message(driver, body=b"Subject: x\r\n\r\nhi\r\n.\r\n"):
    driver.replies(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    return driver.replies(body)[-1]


def test_an_accepted_message_starts_the_count_afresh_a_refused_one_does_not():
    driver = Driver(junk_command_limit=3)
    driver.replies(b"EHLO c.test\r\n")              # 1
    assert junk(driver, 2) == ["250 2.0.0 Ok"] * 2    # 2, 3
    assert message(driver).startswith("250 2.0.0 Ok: queued")
    assert junk(driver, 3) == ["250 2.0.0 Ok"] * 3    # afresh: 1, 2, 3
    # A refused message (bare LF in the content) does not reset it, as in Postfix.
    assert message(driver, b"bare\nLF\r\n.\r\n").startswith("550 5.5.2")
    assert driver.replies(b"RSET\r\n") == [OVER.decode().strip()]
    assert driver.closed


def test_commands_that_move_a_transaction_on_are_not_junk():
    driver = Driver(junk_command_limit=2)
    driver.replies(b"EHLO c.test\r\n")
    for _ in range(5):
        assert message(driver).startswith("250 2.0.0 Ok: queued")
    assert not driver.closed
