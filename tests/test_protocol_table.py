"""The SMTP core's transition table (elemta.smtp.protocol TRANSITIONS) is whole, has no
dead or unreachable state, and is the only place the state changes: random command
sequences, answered at random, never fall outside it. Also the REFUSED state (a client
refused in place of the greeting), which lives in the core."""

import inspect
import re
from collections import deque

from hypothesis import given, settings, strategies as st

from elemta.smtp import protocol
from elemta.smtp.events import CLOSED, NEED_DATA, DataStart
from elemta.smtp.protocol import (COMMAND_LINE, COMMAND_STATES, COMMANDS, DENIED, DONE,
                                  INIT, READERS, STATES, TRANSITIONS, ServerProtocol,
                                  Settings)
from elemta.smtp.replies import Reply
from tests.protocol_driver import Driver
from tests.test_protocol_fuzz import check_wire


def successors(state):
    return {after for after in TRANSITIONS[state].values() if isinstance(after, str)}


# ---- the table itself ------------------------------------------------------------------

def test_every_command_state_has_exactly_one_entry_per_command():
    for command in COMMANDS.values():
        assert tuple(command.after) == COMMAND_STATES, command.verb
    for state in STATES:
        verbs = set(TRANSITIONS[state]) & set(COMMANDS)
        if state in COMMAND_STATES:
            assert verbs == set(COMMANDS), state
            for verb in COMMANDS:
                after = TRANSITIONS[state][verb]
                assert after in STATES or after is DENIED or (
                    isinstance(after, Reply) and after.code >= 500), (state, verb, after)
        else:
            assert not verbs, "%s reads no commands but has entries %s" % (state, verbs)


def test_the_reader_follows_from_the_state():
    assert set(READERS) == set(STATES)
    for state in STATES:
        assert (READERS[state] == COMMAND_LINE) == (state in COMMAND_STATES), state


def test_every_target_is_a_state_and_every_state_is_reachable_and_can_end():
    for state in STATES:
        assert successors(state) <= set(STATES), state
    reached, todo = {INIT}, deque([INIT])
    while todo:
        for after in successors(todo.popleft()) - reached:
            reached.add(after)
            todo.append(after)
    assert reached == set(STATES)
    for state in STATES:       # no trap: from everywhere the session can end
        seen, todo = {state}, deque([state])
        while todo:
            for after in successors(todo.popleft()) - seen:
                seen.add(after)
                todo.append(after)
        assert DONE in seen, state


def test_only_the_table_moves_the_state():
    source = inspect.getsource(ServerProtocol)
    assigned_in = [name for name, method in inspect.getmembers(ServerProtocol)
                   if inspect.isfunction(method)
                   and re.search(r"self\._state\s*=(?!=)", inspect.getsource(method))]
    assert sorted(assigned_in) == ["__init__", "_go"]
    assert "self.state =" not in source
    assert "_reader " not in source and "_reader=" not in source      # no second state


def test_flags_are_known():
    known = {protocol.JUNK, protocol.RESETS, protocol.UTF8, protocol.NEEDS_AUTH,
             protocol.CHUNK_FOLLOWS}
    for command in COMMANDS.values():
        assert command.flags <= known, command.verb


# ---- the table is what the core does -------------------------------------------------------

# A way into each command state, and each command with arguments that succeed there.
REACH = {"init": b"", "ready": b"EHLO c.test\r\n",
         "mail": b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n",
         "rcpt": b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n",
         "chunking": b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
                     b"BDAT 5\r\nhello",
         "refused": b""}
GOOD_LINE = {"EHLO": b"EHLO c.test", "HELO": b"HELO c.test", "MAIL": b"MAIL FROM:<x@y.test>",
             "RCPT": b"RCPT TO:<e@f.test>", "DATA": b"DATA", "BDAT": b"BDAT 3", "RSET": b"RSET",
             "NOOP": b"NOOP", "HELP": b"HELP", "VRFY": b"VRFY x", "QUIT": b"QUIT",
             "STARTTLS": b"STARTTLS", "AUTH": b"AUTH PLAIN AHVzZXIAcA=="}


def pump(proto):
    """Run the core to NEED_DATA or CLOSED, accepting every decision; the replies."""
    replies = []
    while True:
        event = proto.next_event()
        if event is NEED_DATA or event is CLOSED:
            return replies
        if isinstance(event, Reply):
            replies.append(event)
        elif event.needs_decision:
            proto.accept()


def test_every_entry_is_what_the_core_does():
    """Each (command state, command): a command that succeeds lands in the table's state;
    a refused one gets the table's reply and stays (a refused BDAT reads its chunk)."""
    for state, prefix in REACH.items():
        for verb, line in GOOD_LINE.items():
            proto = ServerProtocol(Settings(hostname="mx.test", starttls_available=True,
                                            auth_available=True, auth_plaintext=True))
            if state == "refused":
                proto.start_refused(554, "5.7.1", "no", "unknown[192.0.2.1]")
            else:
                proto.start()
            proto.receive_data(prefix)
            pump(proto)
            assert proto.state == state
            proto.receive_data(line + b"\r\n")
            replies = pump(proto)
            after = TRANSITIONS[state][verb]
            where = (state, verb, replies)
            if isinstance(after, str):
                assert proto.state == after, where
                assert not any(r.code >= 400 for r in replies), where
            elif verb == "BDAT" and after is not DENIED:
                assert proto.state in ("skip", "skip-init") and not replies, where
                proto.receive_data(b"abc")
                assert pump(proto) == [after], where
                assert proto.state == ("init" if state == "init" else "ready"), where
            else:
                expected = proto._denial if after is DENIED else after
                assert replies == [expected] and proto.state == state, where


# ---- random sessions never leave the table -----------------------------------------------

ADDRESS = st.sampled_from(["a@b.test", "", "postmaster", "x@y", "bad@@", "ü@ü.test"])
# Lines of good sessions in five groups of one chance each, so random sequences get
# through every state; the rest (ODD) is what a confused or hostile client sends.
TXN = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
SESSION = st.sampled_from([
    b"EHLO c.test", TXN + b"DATA\r\nhello\r\n.", TXN + b"BDAT 5\r\nhello",
    b"BDAT 7 LAST\r\nhello\r\n", TXN + b"RCPT TO:<e@d.test>\r\nDATA"])
STEPS = st.sampled_from([
    b"MAIL FROM:<a@b.test>", b"RCPT TO:<c@d.test>", b"DATA", b"hello", b".", b"BDAT 0 LAST",
    b"BDAT 3\r\nabc"])
SIDE = st.sampled_from([b"RSET", b"STARTTLS", b"NOOP", b"HELO c.test", b"HELP", b"VRFY x"])
AUTHS = st.sampled_from([
    b"AUTH PLAIN AHVzZXIAcA==", b"AUTH LOGIN", b"dXNlcg==", b"cA==", b"AUTH PLAIN",
    b"AHVzZXIAcA==", b"*"])
ODD = st.one_of(
    st.sampled_from([
        b"QUIT", b"HELO c.test", b"EHLO", b"HELP", b"VRFY x", b"BDAT", b"BDAT x",
        b"AUTH CRAM-MD5", b"=", b"FOO", b"", b"\x00", b"\xff", b"x" * 1100,
        b"MAIL FROM:<a@b.test> SIZE=99999999", b"RCPT TO:<c@d.test> NOTIFY=NEVER",
        b"MAIL FROM:<a@b.test> BODY=8BITMIME SMTPUTF8", b"caf\xc3\xa9 \x00 bare\nlf"]),
    ADDRESS.map(lambda a: b"MAIL FROM:<%s>" % a.encode()),
    ADDRESS.map(lambda a: b"RCPT TO:<%s>" % a.encode()),
    st.tuples(st.integers(0, 60), st.booleans()).map(
        lambda t: b"BDAT %d%s\r\n%s" % (t[0], b" LAST" if t[1] else b"", b"x" * t[0])),
    st.binary(max_size=12),
)
LINES = st.one_of(SESSION, STEPS, SIDE, AUTHS, ODD)

# Listener profiles; hypothesis favours the first, the one that lets most through.
SETTINGS = st.sampled_from([
    dict(starttls_available=True, auth_available=True, auth_plaintext=True),
    dict(max_message_size=20, max_recipients=1, bare_line_endings="normalize"),
    dict(max_errors=2, junk_command_limit=1, starttls_available=True),
    dict(auth_required=True, auth_available=True, auth_plaintext=True),
    dict(auth_available=True, starttls_available=False),
])


def check_consistent(proto):
    """What the state says agrees with what the session holds."""
    state, txn = proto.state, proto.transaction
    assert state in STATES
    if state in ("mail", "rcpt", "chunking", "data", "chunk"):
        assert txn is not None, state
    if state in ("init", "ready", "refused", "auth", "tls", "done", "skip-init"):
        assert txn is None, state
    if state in ("rcpt", "chunking", "data", "chunk"):
        assert txn.recipients, state
    if state in ("chunking", "data", "chunk"):
        assert txn.data_started, state
    greeted = state not in ("init", "skip-init", "refused")
    if state != "done":
        assert (proto.helo_name is not None) == greeted, state


@settings(max_examples=1000, deadline=None)
@given(lines=st.lists(LINES, min_size=4, max_size=40),
       answers=st.lists(st.sampled_from([True, True, True, False]), max_size=40),
       options=SETTINGS, refused=st.sampled_from([None, (554, "5.7.1", "no")]),
       greet=st.sampled_from([True, False]), batched=st.booleans(), timeout=st.booleans())
def test_random_command_sequences_stay_in_the_table(lines, answers, options, refused,
                                                    greet, batched, timeout):
    """Whatever commands come, in one pipelined write or one by one, and whatever the
    driver decides, the core never raises, every reply is well formed, and the state
    always agrees with the transaction."""
    answers = iter(answers)
    d = Driver(users={"user": "p"}, refused=refused, hostname="mx.test",
               decide=lambda event: next(answers, True), **options)
    lines = [b"EHLO c.test"] + lines if greet else lines
    check_consistent(d.proto)
    if batched:
        d.send(b"".join(line + b"\r\n" for line in lines))
    else:
        for line in lines:
            d.send(line + b"\r\n")
            check_consistent(d.proto)
    check_consistent(d.proto)
    check_wire(d.wire)
    if timeout and not d.closed:         # the driver gives up, in whatever state
        d.proto.close_with(421, "4.4.2", "Error: timeout exceeded")
        d.send(b"")
        assert d.closed and d.wire.endswith(b"421 4.4.2 mx.test Error: timeout exceeded\r\n")
    elif d.proto.state in COMMAND_STATES:
        d.send(b"QUIT\r\n")
        assert d.closed and d.proto.state == DONE
        assert d.wire.endswith(b"\r\n221 2.0.0 Bye\r\n") or b"421 4.7.0" in d.wire


def test_a_missing_transition_is_a_loud_bug_not_a_silent_state():
    proto = ServerProtocol(Settings(hostname="mx.test"))
    try:
        proto.tls_started()          # no STARTTLS was given
    except RuntimeError as exc:
        assert "no transition from init on tls-done" in str(exc)
    else:
        raise AssertionError("tls_started() outside the handshake was accepted")
    assert proto.state == INIT


# ---- REFUSED: the refusal in place of the greeting -----------------------------------------

def test_a_refused_session_answers_everything_but_quit_with_the_denial():
    d = Driver(refused=(554, "5.7.1", "Client host rejected"))
    assert d.wire == b"554 5.7.1 mx.test Client host rejected\r\n"
    denial = "503 5.7.0 Error: access denied for unknown[192.0.2.1]"
    # Commands, junk, lines that are no command at all, a BDAT whose "chunk" is then
    # read as a line: each gets the denial, none is obeyed.
    assert d.replies(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\nRSET\r\nFOO\r\n"
                     b"\x00\r\n" + b"x" * 1200 + b"\r\nBDAT 3\r\nabc\r\n") == [denial] * 9
    assert d.proto.last_command == "CONNECT" and d.proto.helo_name is None
    assert d.replies(b"QUIT\r\n") == ["221 2.0.0 Bye"] and d.closed


def test_a_refused_session_closes_after_too_many_errors():
    d = Driver(refused=(554, "5.7.1", "no"), max_errors=4)
    out = d.replies(b"NOOP\r\n" * 10)
    # The 554 is the first error, as it was for Postfix.
    assert out == ["503 5.7.0 Error: access denied for unknown[192.0.2.1]"] * 3 + [
        "421 4.7.0 mx.test Error: too many errors"]
    assert d.closed


def test_a_temporary_refusal_closes_at_once():
    d = Driver(refused=(421, "4.7.1", "Try again later"))
    assert d.wire == b"421 4.7.1 mx.test Try again later\r\n" and d.closed
    assert d.send(b"EHLO c.test\r\n") == b""


def test_a_refused_data_or_chunk_moves_by_the_table():
    """DATA refused by the driver leaves the transaction and the command reader (what
    follows is commands); a first BDAT refused by the driver still reads its chunk."""
    d = Driver(decide=lambda event: not isinstance(event, DataStart))
    d.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert d.replies(b"DATA\r\n") == ["451 4.3.0 Error: queue file write error"]
    assert d.proto.state == "rcpt" and d.proto.reading == COMMAND_LINE
    assert d.replies(b"BDAT 6 LAST\r\nNOOP\r\nNOOP\r\n") == [
        "451 4.3.0 Error: queue file write error", "250 2.0.0 Ok"]
    assert d.proto.state == "ready" and not d.messages
