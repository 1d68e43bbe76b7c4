"""Log targets: syslog with the mail facility (to a real datagram socket standing in for
/dev/log), a file reopened on request, and a clear refusal when no syslog daemon runs."""

import logging
import os
import socket

import pytest

from elemta.config.schema import LoggingSettings
from elemta.util import logs


@pytest.fixture
def restore_logging():
    root = logging.getLogger("elemta")
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_syslog_lines_use_the_mail_facility(tmp_path, monkeypatch, restore_logging):
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
        syslogd.bind(path)
        syslogd.settimeout(5)
        monkeypatch.setattr(logs, "SYSLOG_SOCKET", path)
        logs.setup(LoggingSettings(target="syslog"))
        logging.getLogger("elemta.smtpd").info("1K114F: from=<a@b.test>, size=10, nrcpt=1")
        line = syslogd.recv(1000)
    # <22> is facility mail (2) * 8 + severity info (6), as Postfix's lines are.
    assert line.startswith(b"<22>elemta.smtpd[%d]: INFO: 1K114F: from=<a@b.test>"
                           % os.getpid())


def test_no_syslog_daemon_is_a_clear_error(tmp_path, monkeypatch, restore_logging):
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "nothing"))
    with pytest.raises(OSError, match="no syslog daemon at .*nothing"):
        logs.setup(LoggingSettings(target="syslog"))


def test_file_target_reopens(tmp_path, restore_logging):
    path = tmp_path / "elemta.log"
    logs.setup(LoggingSettings(target=str(path)))
    log = logging.getLogger("elemta.master")
    log.info("before rotation")
    os.rename(path, tmp_path / "elemta.log.1")
    logs.reopen()
    log.info("after rotation")
    assert "before rotation" in (tmp_path / "elemta.log.1").read_text()
    assert "after rotation" in path.read_text()
