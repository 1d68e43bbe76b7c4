"""The verdict of a refusal whose code the admin chooses (Postfix's *_reject_code).

Owned by the restrictions: Postfix lets the admin turn a 450 into a 550 (and back) and
keeps the enhanced status code's class in step with it ("4.7.25" becomes "5.7.25"); so do
we, making a Result.reject for 5xx and a Result.tempfail for 4xx.
See also: elemta.plugins.api.Result.
"""

from elemta.plugins.api import Result


def refuse(code, detail, text):
    """A refusal with `code` and the enhanced status "<class>.<detail>", e.g.
    refuse(450, "7.25", "...") -> tempfail 450 4.7.25."""
    status = "%s.%s" % (str(code)[0], detail)
    if code >= 500:
        return Result.reject(code, status, text)
    return Result.tempfail(code, status, text)
