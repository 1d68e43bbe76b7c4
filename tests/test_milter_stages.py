"""The milter client's less travelled branches, as an SMTP client and the admin see them:
refusals at HELO, header, end of header and body; the content timeout; per-milter
timeouts; the default actions reject and quarantine; a hung milter and a 30 MB
replacement body holding up only their own session; a replacement body larger than
limits.message_size. Against the scripted milter (tests/peers/milter.py); the same
actions against real libmilter are in tests/test_milter_libmilter.py.

Elemta runs one smtpd worker (the harness's default), so "the other session is served"
means the same event loop served it while the first session waited on its milter; the
milter itself says when it is mid-answer (peers.milter.pause), so nothing here guesses
at timing.
"""

import os
import re
import smtplib
import threading
import time

import pytest

from tests.harness import free_port, wait_for
from tests.peers.milter import ScriptedMilter, pause, reply
from tests.test_milter import BrokenMilter, milter_server, queue_id_of, send

TEMPFAIL_DEFAULT = (451, "4.3.0 Temporary local problem, please try again later")
BIG = 40 << 20          # limits.message_size: room for the 30 MB message


@pytest.fixture
def port():
    return free_port()


def sent_after(milter, command):
    """The commands the milter got after the last `command` of its last session."""
    sequence = milter.sequence()
    return sequence[sequence.rindex(command) + 1:]


# ---- refusals at every stage ------------------------------------------------------------

def test_a_reply_code_at_helo_is_the_reply_to_helo(elemta_server, port):
    script = {b"H": [reply(b"y", b"550 5.7.1 Not with that name\x00")]}
    with ScriptedMilter(port, script) as milter:
        server = milter_server(elemta_server, milter)
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as smtp:
            code, text = smtp.ehlo("bad.client.test")
    assert (code, text.decode()) == (550, "5.7.1 Not with that name")
    assert ("NOQUEUE: reject: HELO from unknown[127.0.0.1]: 550 5.7.1 Not with that "
            "name; proto=SMTP helo=<bad.client.test> (milter m0)") in server.log()
    assert "milter m0: HELO from unknown[127.0.0.1]: reject: 550 5.7.1" in server.log()


@pytest.mark.parametrize("command, script, expected, stage", [
    # The third header field (our Received, From, To): a reply code of its own.
    (b"L", [reply(b"c"), reply(b"c"), reply(b"y", b"554 5.7.1 Bad To field\x00")],
     (554, "5.7.1 Bad To field"), "HEADER"),
    (b"N", [reply(b"t")], (451, "4.7.1 Service unavailable - try again later"), "EOH"),
    (b"B", [reply(b"r")], (550, "5.7.1 Command rejected"), "BODY"),
])
def test_a_refusal_in_the_content_ends_the_message_there(elemta_server, port, command,
                                                         script, expected, stage):
    with ScriptedMilter(port, {command: script}) as milter:
        server = milter_server(elemta_server, milter)
        replies = send(server)
        assert wait_for(lambda: milter.sequence().endswith(b"Q"))
    assert replies[-1] == expected
    assert server.queued_ids() == []
    # Nothing more of the message went to the milter: it decided.
    assert milter.sequence().count(command) == len(script)
    assert re.sub(b"[AQ]", b"", sent_after(milter, command)) == b"", milter.sequence()
    assert re.search(r"[0-9A-Z]+: milter m0: %s from unknown\[127\.0\.0\.1\]: (reject|"
                     r"tempfail)" % stage, server.log())


# ---- timeouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("default_action", ["tempfail", "accept"])
def test_content_timeout_expiring_at_end_of_message_applies_the_default(
        elemta_server, port, default_action):
    # Sleeps past content_timeout without PROGRESS; command_timeout (30 s) would wait.
    with ScriptedMilter(port, {b"E": [[3, (b"c", b"")]]}) as milter:
        server = milter_server(elemta_server, milter, content_timeout=1,
                               default_action=default_action)
        replies = send(server)
    if default_action == "tempfail":
        assert replies[-1] == TEMPFAIL_DEFAULT
        assert server.queued_ids() == []
    else:
        assert server.queued_ids() == [queue_id_of(replies)]
    assert re.search(r"[0-9A-Z]+: milter m0 \(%s\) failed at eom: timed out after 1s "
                     r"waiting for a reply; default_action %s"
                     % (re.escape(milter.address), default_action), server.log())


def test_a_per_milter_command_timeout_overrides_the_milter_table(elemta_server, port):
    # The table's 1 s would time MAIL out; this milter's own 30 s lets it answer.
    with ScriptedMilter(port, {b"M": [[2, (b"c", b"")]]}) as milter:
        server = milter_server(elemta_server, {"socket": milter.address,
                                               "command_timeout": 30}, command_timeout=1)
        queue_id_of(send(server))
    assert "failed at" not in server.log()


def test_a_per_milter_content_timeout_overrides_the_milter_table(elemta_server, port):
    # The table's 300 s would wait; this milter's own 1 s does not.
    with ScriptedMilter(port, {b"E": [[3, (b"c", b"")]]}) as milter:
        server = milter_server(elemta_server, {"socket": milter.address,
                                               "content_timeout": 1}, content_timeout=300)
        assert send(server)[-1] == TEMPFAIL_DEFAULT
    assert "failed at eom: timed out after 1s waiting for a reply" in server.log()


def test_a_per_milter_connect_timeout_overrides_the_milter_table(elemta_server):
    with BrokenMilter() as milter:          # takes the connection, never negotiates
        server = milter_server(elemta_server, {"socket": milter.address,
                                               "connect_timeout": 1}, connect_timeout=300)
        assert send(server) == [TEMPFAIL_DEFAULT]
    assert "failed at connect: timed out after 1s waiting for option negotiation" in \
        server.log()


# ---- default actions reject and quarantine ----------------------------------------------

def test_default_action_reject_refuses_with_550(elemta_server, port):
    server = milter_server(elemta_server, {"socket": "inet:127.0.0.1:%d" % port,
                                           "name": "gone", "default_action": "reject"})
    assert send(server) == [(550, "5.7.1 Service unavailable")]
    assert server.queued_ids() == []
    log = server.log()
    assert "failed at connect: cannot connect" in log
    assert "default_action reject: 550 5.7.1" in log
    assert "milter gone: MAIL from unknown[127.0.0.1]: unavailable: 550 5.7.1 Service " \
        "unavailable (default_action reject)" in log


def test_default_action_quarantine_holds_what_a_down_milter_did_not_see(elemta_server,
                                                                        port):
    server = milter_server(elemta_server, {"socket": "inet:127.0.0.1:%d" % port,
                                           "name": "gone", "default_action": "quarantine"})
    queue_id = queue_id_of(send(server))
    with server.queue() as queue:
        assert queue.get(queue_id).state == "hold"
    assert "%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: milter gone unavailable " \
        "(milter gone)" % queue_id in server.log()


def test_default_action_quarantine_holds_a_message_whose_scan_timed_out(elemta_server,
                                                                        port):
    with ScriptedMilter(port, {b"E": [[3, (b"c", b"")]]}) as milter:
        server = milter_server(elemta_server, milter, content_timeout=1,
                               default_action="quarantine")
        queue_id = queue_id_of(send(server))
    with server.queue() as queue:
        assert queue.get(queue_id).state == "hold"
    assert "failed at eom: timed out after 1s" in server.log()
    assert "%s: hold: END-OF-MESSAGE from unknown[127.0.0.1]: milter m0 unavailable" % (
        queue_id) in server.log()


# ---- one session waits, the others do not -----------------------------------------------

def transaction(port, raw, replies):
    """One whole session (greeting, EHLO, NOOP, MAIL, RCPT, DATA), its replies added to
    `replies` as they come, so the caller sees how far it got."""
    with smtplib.SMTP(timeout=600) as smtp:
        replies.append(smtp.connect("127.0.0.1", port)[0])
        smtp.ehlo("client.test")
        replies.append(smtp.noop()[0])
        assert smtp.mail("a@sender.test")[0] == 250
        assert smtp.rcpt("b@example.test")[0] == 250
        try:
            code, text = smtp.data(raw)
        except smtplib.SMTPDataError as error:
            code, text = error.smtp_code, error.smtp_error
        replies.append((code, text.decode()))


def in_background(port, raw):
    replies = []
    thread = threading.Thread(target=transaction, args=(port, raw, replies), daemon=True)
    thread.start()
    return thread, replies


def test_a_hung_milter_delays_only_its_own_session(elemta_server, port):
    hang = pause()
    # The first message's end of message hangs; every later one is answered at once.
    with ScriptedMilter(port, {b"E": [[hang, (b"c", b"")], reply(b"c")]}) as milter:
        server = milter_server(elemta_server, milter)
        first, first_replies = in_background(server.port, b"Subject: one\r\n\r\nx\r\n")
        try:
            assert hang.reached.wait(120), "the first message never reached the milter"
            other = []
            transaction(server.port, b"Subject: two\r\n\r\ny\r\n", other)
            assert other[:2] == [220, 250] and other[2][0] == 250, other
            assert first.is_alive() and len(first_replies) == 2   # still at DATA
        finally:
            hang.release()
            first.join(120)
    assert first_replies[2][0] == 250, first_replies


# A storage-stage plugin that tells the test when a large message reaches it, and holds
# the whole process (a blocking FIFO handshake, not a gevent wait) until the test has
# taken note: so every NOOP reply the test saw before that note left Elemta before the
# plugin was called, that is before the end of Elemta's end-of-message work on the body.
MARKER_PLUGIN = """
import os
from dataclasses import dataclass
from elemta.plugins.api import Plugin


@dataclass(frozen=True)
class Settings:
    reached: str = ""
    resume: str = ""


class EndOfMessageMarker(Plugin):
    name = "eom_marker"
    Settings = Settings

    def init(self, settings):
        self.settings = settings

    def on_storage(self, ctx):
        if ctx.message is not None and len(ctx.message.raw) > 1 << 20:
            fd = os.open(self.settings.reached, os.O_WRONLY)
            os.write(fd, b"1")
            os.close(fd)
            fd = os.open(self.settings.resume, os.O_RDONLY)
            os.read(fd, 1)
            os.close(fd)
"""


def install_marker(workdir):
    """The marker plugin where the server started in workdir finds it: its working
    directory is on its sys.path (python -m), the entry point in a .dist-info there."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "elemta_eom_marker.py"), "w") as f:
        f.write(MARKER_PLUGIN)
    info = os.path.join(workdir, "elemta_eom_marker-1.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: elemta-eom-marker\nVersion: 1.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write("[elemta.plugins]\neom_marker = elemta_eom_marker:EndOfMessageMarker\n")
    fifos = {}
    for name in ("reached", "resume"):
        fifos[name] = os.path.join(workdir, name + ".fifo")
        os.mkfifo(fifos[name], 0o666)
    return fifos


def test_a_30_mb_replacement_body_holds_up_only_its_own_session(elemta_server, port,
                                                                tmp_path):
    """The replacement comes in 64 KB packets, some lines ending in bare LF, one CRLF
    split across two packets, the last line in a bare CR; Elemta makes every line end
    CRLF as the packets come. Half way the milter stops: the same worker serves
    another session meanwhile. And once the milter has sent its final reply, Elemta's
    own work on the 30 MB (taking the new body in, putting the message together) leaves
    the worker's event loop free: another session's NOOPs are answered all through the
    stretch between that reply and the moment the message reaches the storage-stage
    plugins (the marker). Checked by mutation: a 2 s blocking step put back before,
    in or after that work (the body read, a whole-body pass, after the join) fails it."""
    half = (b"z" * 998 + b"\n") * 15000
    packets = [half[i:i + 65535] for i in range(0, len(half), 65535)]
    packets += [b"split here\r", b"\nafter the split\r\n"]
    rest = (b"w" * 998 + b"\r\n") * 15000 + b"last line\r"
    # ("replied" | "noop" | "marker", time.monotonic()), in the order they happen
    events = []
    stall = pause()
    answer = [(b"b", chunk) for chunk in packets] + [stall]
    answer += [(b"b", rest[i:i + 65535]) for i in range(0, len(rest), 65535)]
    answer += [(b"c", b""), lambda: events.append(("replied", time.monotonic()))]
    expected = ((b"z" * 998 + b"\r\n") * 15000 + b"split here\r\nafter the split\r\n"
                + (b"w" * 998 + b"\r\n") * 15000 + b"last line\r\n")
    message = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * (30 * 1000)
    fifos = install_marker(str(tmp_path / "server0"))
    marker = threading.Thread(target=take_note, args=(fifos, events), daemon=True)
    marker.start()
    with ScriptedMilter(port, {b"E": [answer, reply(b"c")]}) as milter:
        server = elemta_server(milters=[{"socket": milter.address, "name": "m0"}],
                               limits={"message_size": BIG},
                               smtpd={"junk_command_limit": 10 ** 9},
                               plugins={"eom_marker": {"enabled": True, **fifos}})
        big, big_replies = in_background(server.port, message)
        noops = NoopSession(server.port, events)
        try:
            assert stall.reached.wait(300), "the milter never began the new body"
            other = []
            transaction(server.port, b"Subject: small\r\n\r\nsmall\r\n", other)
            assert other[:2] == [220, 250] and other[2][0] == 250, other
            assert big.is_alive() and len(big_replies) == 2       # still at DATA
            noops.start()
        finally:
            stall.release()
            big.join(600)
            noops.stop()
            marker.join(60)
    code, text = big_replies[2]
    assert code == 250, big_replies
    assert noops.error is None, noops.error
    assert [name for name, _ in events if name != "noop"] == ["replied", "marker"]
    names = [name for name, _ in events]
    window = events[names.index("replied"):names.index("marker") + 1]
    # One NOOP reply may already have been on its way when the milter replied; more
    # than that were answered while Elemta worked on the message.
    assert [name for name, _ in window].count("noop") >= 3, len(window)
    # And they kept coming: a step that held the loop, followed by one that let it go
    # (a thread), would still let NOOPs through, so no silence may fill most of the
    # window. A relative measure, not a speed limit: a blocked loop makes one silence
    # the whole window, however fast the machine.
    times = [when for _, when in window]
    silence = max(later - earlier for earlier, later in zip(times, times[1:]))
    whole = times[-1] - times[0]
    assert silence < max(whole / 2, 0.5), "the loop stood still %.3f s of %.3f s" % (
        silence, whole)
    queue_id = text.rsplit(" ", 1)[1]
    body = server.message(queue_id)[1].split(b"\r\n\r\n", 1)[1]
    assert body == expected
    assert "%s: milter m0: EOM from unknown[127.0.0.1]: continue; replace body" % (
        queue_id) in server.log()


def take_note(fifos, events):
    """The test's side of the marker's handshake: note "marker", then let it go on."""
    with open(fifos["reached"], "rb") as reached:
        reached.read(1)
    events.append(("marker", time.monotonic()))
    with open(fifos["resume"], "wb") as resume:
        resume.write(b"1")


class NoopSession:
    """A session on the same worker sending NOOP after NOOP, each reply noted "noop"."""

    def __init__(self, port, events):
        self.smtp = smtplib.SMTP("127.0.0.1", port, timeout=600)
        self.smtp.ehlo("noop.test")
        self.events, self.error = events, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                code, text = self.smtp.noop()
                if code != 250:
                    raise AssertionError("NOOP: %d %s" % (code, text))
                self.events.append(("noop", time.monotonic()))
        except Exception as error:          # the test asserts on it
            self.error = error

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(120)
        self.smtp.close()


def test_a_replacement_body_larger_than_message_size_tempfails_logged(elemta_server,
                                                                      port):
    big = [(b"b", b"x" * 60000 + b"\n") for _ in range(4)] + [(b"c", b"")]
    with ScriptedMilter(port, {b"E": [big]}) as milter:
        server = elemta_server(milters=[{"socket": milter.address, "name": "m0"}],
                               limits={"message_size": 200000})
        replies = send(server)
    assert replies[-1] == (451, "4.3.4 Error: message too large after content filtering")
    assert server.queued_ids() == []
    assert re.search(r"[0-9A-Z]+: milter m0: EOM from unknown\[127\.0\.0\.1\]: tempfail: "
                     r"451 4\.3\.4 Error: message too large after content filtering \(its "
                     r"replacement body of 240008 bytes exceeds limits\.message_size, "
                     r"200000\)", server.log())


# ---- metrics ----------------------------------------------------------------------------

def test_a_quarantine_at_end_of_message_is_one_verdict(elemta_server, tmp_path,
                                                       monkeypatch, port):
    from tests.test_metrics import labelled, settled, start_server
    with ScriptedMilter(port, {b"E": [[(b"q", b"looks odd\x00"), (b"c", b"")]]}) \
            as milter:
        server, api_port = start_server(elemta_server, tmp_path, monkeypatch,
                                        milters=[{"socket": milter.address,
                                                  "name": "scripted"}])
        queue_id_of(send(server))

    def counted(samples):
        verdicts = labelled(samples, "elemta_milter_verdicts_total")
        eom = {labels: n for labels, n in verdicts.items() if "eom" in labels and n}
        assert eom == {("quarantine", "scripted", "eom"): 1}, verdicts
    settled(api_port, counted)
