"""ClamAV: stream each message to clamd and refuse or hold what it finds infected.

Owned by the processes that take mail in - the smtpd worker and pickup - as the `clamav`
built-in, data stage: the content as received, once per message however many recipients
it has (elemta.plugins.content). clamd's INSTREAM command over its unix or TCP socket:

    zINSTREAM\\0  then chunks, each a 4-byte big-endian length and that many bytes,
                 then a zero length; clamd answers one NUL-terminated line:
    "stream: OK"                               clean: no opinion
    "stream: Eicar-Test-Signature FOUND"       infected: 554 5.7.1 naming it, or hold
    "INSTREAM size limit exceeded. ERROR"      clamd's StreamMaxLength: a scanner failure

A message larger than max_size is not sent at all and passes, logged (clamav-milter's
MaxFileSize does the same), so clamd never sees a stream it would refuse when max_size is
within its StreamMaxLength. A clamd that cannot be reached, errs or overruns the plugin's
timeout raises ScannerError / lets the manager's Timeout through: 451 4.3.0, or with
fail_open no opinion, logged by the manager in one line.

One log line per verdict: "QUEUEID: clamav: clean (N bytes, 0.012s)", "QUEUEID: clamav:
infected NAME, rejected" / "..., held" (or "..., held (local submission: nobody to
reject it to)" for sendmail's mail, which pickup holds), "QUEUEID: clamav: not scanned: N bytes is more
than max_size M". Waiting and sending go through elemta.plugins.scanner (gevent sockets,
the message sent from memory in chunks, metrics).
See also: elemta.plugins.settings.ClamAVSettings, tests/test_clamav.py (a real clamd with
a private EICAR signature).
"""

import logging
import struct

from elemta.plugins import scanner
from elemta.plugins.api import Plugin, Result
from elemta.plugins.settings import ClamAVSettings

log = logging.getLogger("elemta.plugins.clamav")

_LENGTH = struct.Struct("!L")
_END = _LENGTH.pack(0)
# clamd's answer is one short line; anything longer is not clamd.
MAX_ANSWER = 4096


class ClamAVPlugin(Plugin):
    name = "clamav"
    Settings = ClamAVSettings
    order = 60              # after the authentication checks: their headers are not scanned
    default_timeout = 60.0  # a 25 MB message takes clamd seconds; clients wait 10 minutes
    scans_content = True    # release --rescan runs it again (elemta.plugins.rescan)

    def init(self, settings):
        self.settings = settings = settings or ClamAVSettings()
        self.address = scanner.parse_address(settings.address)

    def on_data(self, ctx):
        raw = ctx.message.raw
        where = ctx.queue_id or "NOQUEUE"
        with scanner.measured(self.name) as scan:
            if len(raw) > self.settings.max_size:
                scan.verdict("unscanned", "pass")
                log.info("%s: clamav: not scanned: %d bytes is more than max_size %d",
                         where, len(raw), self.settings.max_size)
                return None
            answer = self.instream(raw)
            if answer == "stream: OK":
                scan.verdict("clean", "pass")
                log.info("%s: clamav: clean (%d bytes, %.3fs)", where, len(raw),
                         scan.seconds)
                return None
            if answer.startswith("stream: ") and answer.endswith(" FOUND"):
                virus = scanner.printable(answer[len("stream: "):-len(" FOUND")])
                return self.infected(ctx, scan, virus)
            raise scanner.ScannerError("clamd at %s answered %r" % (
                scanner.describe(self.address), scanner.printable(answer, spaces=True)))

    def instream(self, raw):
        """clamd's answer to INSTREAM over raw, without its NUL."""
        sock = scanner.connect(self.address, "clamd")
        try:
            sock.sendall(b"zINSTREAM\0")
            try:
                scanner.send_chunks(sock, raw, _LENGTH.pack)
                sock.sendall(_END)
            except OSError as error:
                # clamd stops reading when the stream passes its StreamMaxLength and
                # closes after saying so: its answer says more than our broken pipe.
                answer = _answer(sock, tolerant=True)
                if answer:
                    return answer
                raise scanner.ScannerError("clamd at %s closed the connection: %s" % (
                    scanner.describe(self.address), error.strerror or error)) from None
            return _answer(sock)
        finally:
            sock.close()

    def infected(self, ctx, scan, virus):
        where = ctx.queue_id or "NOQUEUE"
        if self.settings.action == "quarantine":
            scan.verdict("infected", "hold")
            log.warning("%s: clamav: infected %s, held", where, virus)
            return Result.quarantine("virus found: %s" % virus)
        if ctx.local:
            # Pickup has nobody to refuse a sendmail message to: it holds what is
            # rejected (elemta.pickup.worker), so say what happens to it.
            scan.verdict("infected", "hold")
            log.warning("%s: clamav: infected %s, held (local submission: nobody to "
                        "reject it to)", where, virus)
        else:
            scan.verdict("infected", "reject")
            log.warning("%s: clamav: infected %s, rejected", where, virus)
        return Result.reject(554, "5.7.1", self.settings.reject_text % {"virus": virus})


def _answer(sock, tolerant=False):
    """clamd's one-line answer, NUL (or newline) stripped; with tolerant, "" when the
    connection fails before anything arrives."""
    try:
        data = scanner.read_bounded(sock, MAX_ANSWER, until=b"\0")
    except OSError:
        if tolerant:
            return ""
        raise
    return data.split(b"\0", 1)[0].strip().decode("utf-8", "replace")
