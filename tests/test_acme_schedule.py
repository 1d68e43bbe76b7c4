"""When the ACME client orders a certificate (elemta.acme.schedule): at first, when its
names change, at two thirds of its lifetime, and after a failure only once its backoff,
doubling up to its bound, has run out."""

import os

from elemta.acme.schedule import Backoff, renewal_reason
from elemta.certs.expiry import ExpiryWarnings
from elemta.certs.store import CertificateInfo
from elemta.config.schema import ACMECertificate, ACMESettings

DAY = 86400.0
WANTED = ACMECertificate(name="mail", domains=("mail.example.org", "smtp.example.org"))


def issued(names=("smtp.example.org", "mail.example.org"), days=90):
    return CertificateInfo(list(names), "CN=CA", "1", 1000 * DAY, (1000 + days) * DAY)


def test_a_missing_certificate_is_ordered():
    assert renewal_reason(WANTED, None, 2 / 3, 0) == "none obtained yet"


def test_a_90_day_certificate_is_renewed_on_day_60_by_default():
    renew_at = ACMESettings().renew_at
    assert renewal_reason(WANTED, issued(), renew_at, (1000 + 59.9) * DAY) is None
    assert renewal_reason(WANTED, issued(), renew_at, (1000 + 60) * DAY) == \
        "67% of its lifetime has passed"


def test_changed_names_are_ordered_at_once():
    reason = renewal_reason(WANTED, issued(names=("mail.example.org",)), 2 / 3, 1000 * DAY)
    assert reason == "its names changed (has mail.example.org)"


def test_failures_back_off_doubling_up_to_the_bound_and_a_success_resets():
    backoff = Backoff(300, 1000)
    assert backoff.ready("mail", 0)
    assert backoff.failed("mail", 0) == (1, 300)
    assert not backoff.ready("mail", 299) and backoff.ready("mail", 300)
    assert backoff.failed("mail", 300) == (2, 600)
    assert backoff.failed("mail", 900) == (3, 1000)
    assert backoff.next_try() == 1900
    assert backoff.ready("other", 0)
    backoff.succeeded("mail")
    assert backoff.ready("mail", 901) and backoff.next_try() is None


def test_expiry_is_warned_of_once_at_14_days_and_once_at_3_days():
    warnings, expiry = ExpiryWarnings(), 100 * DAY
    looks = [expiry - days * DAY for days in (20, 14.5, 14, 13, 5, 3.5, 3, 2, 0.5, -1)]
    assert [warnings.due("mail", expiry, now) for now in looks] == \
        [None, None, 14 * DAY, None, None, None, 3 * DAY, None, None, None]


def test_a_renewed_certificate_is_warned_of_again_when_its_own_time_comes():
    warnings = ExpiryWarnings()
    assert warnings.due("mail", 100 * DAY, 98 * DAY) == 3 * DAY
    # Renewed: 90 days ahead, nothing to say, until the new one nears its expiry.
    assert warnings.due("mail", 188 * DAY, 98 * DAY) is None
    assert warnings.due("mail", 188 * DAY, 175 * DAY) == 14 * DAY
    # Another certificate keeps its own count.
    assert warnings.due("other", 100 * DAY, 98 * DAY) == 3 * DAY


def test_one_of_several_processes_warns_once_per_threshold_and_certificate(tmp_path):
    """WarningMarks (the smtpd workers' share of the warnings): whoever claims a
    (file, notAfter, threshold) first warns; a second worker, or the first again, does
    not; a renewed certificate (another notAfter) starts over and its old marks go."""
    from elemta.certs.expiry import WarningMarks, crossed
    directory = str(tmp_path / "run")           # made when first needed
    first, second = WarningMarks(directory), WarningMarks(directory)
    expiry = 100 * DAY
    assert crossed(expiry, 80 * DAY) is None
    assert crossed(expiry, 90 * DAY) == 14 * DAY and crossed(expiry, 98 * DAY) == 3 * DAY
    assert first.claim("/etc/ssl/mail.pem", expiry, 14 * DAY)
    assert not second.claim("/etc/ssl/mail.pem", expiry, 14 * DAY)
    assert not first.claim("/etc/ssl/mail.pem", expiry, 14 * DAY)
    assert second.claim("/etc/ssl/mail.pem", expiry, 3 * DAY)
    assert second.claim("/etc/ssl/other.pem", expiry, 3 * DAY)   # another file
    renewed = 190 * DAY
    assert first.claim("/etc/ssl/mail.pem", renewed, 14 * DAY)
    assert len(os.listdir(directory)) == 2      # mail.pem's renewed mark, other.pem's
