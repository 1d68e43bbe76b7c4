"""When the ACME client orders a certificate (elemta.acme.schedule): at first, when its
names change, at two thirds of its lifetime, and after a failure only once its backoff,
doubling up to its bound, has run out."""

from elemta.acme.schedule import Backoff, renewal_reason
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
