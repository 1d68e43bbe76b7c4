"""The REST API against slow, malformed and careless clients (issue 10 requirement 6).

Owned by the test suite. Everything goes over real sockets to the api child of a real
server (tests/conftest.py): a slow-loris must not hold connections for ever, a request
whose framing two parsers could read differently is refused, the token is not left
readable by others without a warning, and the route list in elemta.api.app's docstring
says what the routes do.
See also: elemta.api.handler, elemta.api.auth, tests/test_api_rest.py.
"""

import json
import os
import re
import select
import socket
import time

import pytest

import elemta.api.app
from tests.harness import ElemtaServer, wait_for
from tests.test_api_rest import AUTH, TOKEN, call, server_api_port, wait_for_api

PARTIAL_CLIENTS = 200
READ_TIMEOUT = 1.0


def connect(server):
    return socket.create_connection(("127.0.0.1", server_api_port(server)), timeout=30)


def answer_of(sock, within):
    """Everything the server sends until it closes the connection, or None if it has not
    closed it within `within` seconds."""
    deadline = time.monotonic() + within
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return None


def raw_request(server, data):
    """(status, JSON body) of the answer to raw request bytes; the server closes after."""
    with connect(server) as sock:
        sock.sendall(data)
        answer = answer_of(sock, 15)
    assert answer is not None, "the api kept the connection open"
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else body


@pytest.fixture
def api(elemta_server):
    server = elemta_server(api={"token": TOKEN, "read_timeout": READ_TIMEOUT})
    wait_for_api(server)
    return server


# ---------------------------------------------------------------- slow clients

def test_stalled_partial_requests_are_cut_and_do_not_pin_the_api(api):
    stalled = []
    try:
        for number in range(PARTIAL_CLIENTS):
            sock = connect(api)
            # Half a request line, or a request line and half the headers; then nothing.
            sock.sendall(b"GET /api/v1/hea" if number % 2 else
                         b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            stalled.append(sock)
        # Served meanwhile.
        assert call(api, "GET", "/api/v1/queue", AUTH)[0] == 200
        answers = [answer_of(sock, 20) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    assert all(a is not None for a in answers), "%d of %d partial requests still held" % (
        sum(a is None for a in answers), len(answers))
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), set(answers)
    assert b"no complete request within 1s (api.read_timeout)" in answers[0]
    assert "no complete request within 1s (api.read_timeout) (408)" in api.log()
    assert call(api, "GET", "/api/v1/health")[0] == 200


def test_trickling_a_byte_at_a_time_does_not_extend_the_deadline(api):
    with connect(api) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        started = time.monotonic()
        answer = None
        # 30 s of trickling, a byte every 0.2 s: each read is quick, the whole is not.
        while answer is None and time.monotonic() - started < 30:
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
                break
            ready, _, _ = select.select([sock], [], [], 0.2)
            if ready:
                answer = answer_of(sock, 5)
    assert answer is not None, "the api kept reading a trickle for 30 s"
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b""


def test_an_idle_keep_alive_connection_is_closed(api):
    with connect(api) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = answer_of(sock, 20)
    assert answer is not None, "an idle keep-alive connection stayed open"
    assert answer.startswith(b"HTTP/1.1 200 ")


# ---------------------------------------------------------------- framing

FLUSH = b"POST /api/v1/queue/flush HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " \
        + TOKEN.encode() + b"\r\n"


@pytest.mark.parametrize("headers, reason", [
    (b"Content-Length: 0\r\nContent-Length: 5\r\n", "conflicting Content-Length headers: 0, 5"),
    (b"Content-Length: 0, 5\r\n", "conflicting Content-Length headers: 0, 5"),
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
     "Content-Length and Transfer-Encoding together"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
     "Content-Length and Transfer-Encoding together"),
    (b"Content-Length: +5\r\n", "Content-Length is not a number: '+5'"),
    (b"Content-Length: 5_0\r\n", "Content-Length is not a number: '5_0'"),
    (b"Transfer-Encoding: gzip, chunked\r\n", "unsupported Transfer-Encoding: gzip, chunked"),
])
def test_ambiguous_framing_is_refused(api, headers, reason):
    status, body = raw_request(api, FLUSH + headers + b"\r\nhello")
    assert (status, body) == (400, {"error": body["error"]})
    assert reason in body["error"]
    assert "refused a request from 127.0.0.1: %s" % reason in api.log()


def test_honest_framing_still_works(api):
    # The same value twice is one length (RFC 9110 8.6); a chunked body is read whole.
    status, body = raw_request(api, FLUSH + b"Content-Length: 2\r\nContent-Length: 2\r\n"
                               b"Connection: close\r\n\r\n{}")
    assert status == 200, body
    status, body = raw_request(api, FLUSH + b"Transfer-Encoding: chunked\r\n"
                               b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert status == 200, body
    status, body = raw_request(api, FLUSH + b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                               % 70000 + b"x" * 70000)
    assert status == 413 and "request body larger than" in body["error"]


# ---------------------------------------------------------------- the token's file modes

def start_with_modes(tmp_path, api_section, config_mode):
    server = ElemtaServer(tmp_path / "server", {"api": api_section})
    os.chmod(server.config_path, config_mode)
    server.start()
    wait_for(lambda: "api listening" in server.log())
    return server


def test_a_token_others_can_read_is_warned_about(tmp_path):
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(str(token_file), 0o640)
    server = start_with_modes(tmp_path, {"token": TOKEN, "token_file": str(token_file)},
                              0o644)
    try:
        log = server.log()
    finally:
        assert server.stop() == []
    assert "api: api.token_file %s is readable by its group (mode 0640): whoever can read " \
           "it can read and delete queued mail; chmod 600 %s" % (token_file, token_file) in log
    assert "api: api.token is written in %s, which every local user can read (mode 0644): " \
           "move the token to an api.token_file of mode 0600, or chmod o-r %s" % (
               server.config_path, server.config_path) in log


def test_a_token_kept_private_gets_no_warning(tmp_path):
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(str(token_file), 0o600)
    server = start_with_modes(tmp_path, {"token_file": str(token_file)}, 0o644)
    try:
        assert call(server, "GET", "/api/v1/queue", AUTH)[0] == 200
        log = server.log()
    finally:
        assert server.stop() == []
    assert "api.token" not in log, log


# ---------------------------------------------------------------- the docstring

def test_the_route_list_in_the_docstring_says_which_routes_need_the_token(api):
    routes = re.findall(r"^\s+GET\s+(/\S+)\s+(.*)$", elemta.api.app.__doc__, re.M)
    literal = [(path, "(no token)" in text) for path, text in routes if "{" not in path]
    assert ("/api/v1/openapi.json", False) in literal
    for path, public in literal:
        status = call(api, "GET", path)[0]
        assert status == (200 if public else 401), (path, status)
        assert call(api, "GET", path, AUTH)[0] == 200, path
