"""The HTTP-01 responder (elemta.acme.http01) on its own: a real gevent WSGI server on a
loopback socket, in a thread with its own hub, asked over plain sockets. It answers a
pending challenge's key authorization, 404 to anything else, and serves a bounded number
of connections at once: idle ones beyond the cap wait in the listen queue.
See also: tests/test_acme.py (HTTP-01 end to end against pebble).
"""

import socket
import threading

import gevent
import pytest

from elemta.acme.http01 import MAX_CONNECTIONS, challenge_server
from elemta.certs.store import Store
from tests.harness import wait_for

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


@pytest.fixture
def responder(tmp_path):
    """(address, store) of a responder capped at 2 connections, running in a thread."""
    (tmp_path / "challenges").mkdir()
    store = Store(str(tmp_path))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    ready, stop = threading.Event(), threading.Event()

    def run():
        from gevent import socket as gsocket
        server = challenge_server(gsocket.socket(fileno=listener.detach()), store,
                                  max_connections=2)
        server.start()
        ready.set()
        while not stop.is_set():
            gevent.sleep(0.05)
        server.stop(timeout=1)

    thread = threading.Thread(target=run, daemon=True)
    address = listener.getsockname()
    thread.start()
    assert ready.wait(30)
    yield address, store
    stop.set()
    thread.join(30)


def get(address, path, timeout=30.0):
    """Connect and send GET path; the socket, its answer still to read."""
    client = socket.create_connection(address, timeout=timeout)
    client.sendall(b"GET %s HTTP/1.1\r\nHost: mail.acme.test\r\nConnection: close\r\n\r\n"
                   % path.encode())
    return client


def answer(client):
    data = b""
    while True:
        chunk = client.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_the_pending_challenge_is_answered_and_anything_else_is_404(responder):
    address, store = responder
    store.put_challenge(TOKEN, TOKEN + ".thumbprint")
    found = answer(get(address, "/.well-known/acme-challenge/" + TOKEN))
    assert found.startswith(b"HTTP/1.1 200 ") and found.endswith(
        b"\r\n\r\n" + (TOKEN + ".thumbprint").encode())
    for path in ("/.well-known/acme-challenge/" + "x" * 20, "/.well-known/acme-challenge/"
                 "../../account/x", "/"):
        assert answer(get(address, path)).startswith(b"HTTP/1.1 404 "), path


def test_connections_beyond_the_cap_wait_until_one_ends(responder):
    """Two idle connections fill a cap of 2: a third request is answered only once one
    of them goes (the real cap, MAX_CONNECTIONS, is acme-tls's too)."""
    assert MAX_CONNECTIONS == 256
    address, _ = responder
    idle = [socket.create_connection(address, timeout=30) for _ in range(2)]
    waiting = get(address, "/", timeout=1.0)
    with pytest.raises(socket.timeout):
        waiting.recv(1)                  # nobody serves it while the cap is full
    idle.pop().close()
    waiting.settimeout(30)
    assert wait_for(lambda: answer(waiting), timeout=30).startswith(b"HTTP/1.1 404 ")
    for client in idle + [waiting]:
        client.close()
