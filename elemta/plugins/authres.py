"""Authentication-Results (RFC 8601): formatting our header and removing forged ones.

Owned by the smtpd worker: the `authres` built-in runs last at the data stage. It gathers
what the spf, dkim, arc and dmarc plugins recorded in ctx.auth_results, adds one header

    Authentication-Results: mx.example.org;
    	spf=pass smtp.mailfrom=example.net;
    	dkim=pass header.d=example.net header.i=@example.net header.s=sel header.a=rsa-sha256
    	  header.b=KmKRKlwk;
    	dmarc=pass header.from=example.net

and asks for every inbound Authentication-Results that claims our authserv-id to be
removed (RFC 8601 section 5: a receiver must not trust results it did not write).

See also: elemta.plugins.api.MethodResult, RFC 8601 section 2.2 (the grammar followed here).
"""

import re
from typing import List, Optional, Sequence, Tuple

from elemta.plugins.api import MethodResult, Plugin, Result
from elemta.plugins.settings import AuthResSettings

HEADER = "Authentication-Results"
# RFC 2045 token: any US-ASCII CHAR except SPACE, CTLs and tspecials.
_TOKEN = re.compile(r'^[!#$%&\'*+\-.0-9A-Z^_`a-z{|}~]+$')
# pvalue may also be [[local-part] "@"] domain-name (RFC 8601 2.2): a dot-atom local part.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ADDRESS = re.compile(r"^(%s+(\.%s+)*)?@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
                      % (_ATEXT, _ATEXT))
_PROPERTY = re.compile(r"^[A-Za-z][A-Za-z0-9-]*\.[A-Za-z][A-Za-z0-9.-]*$")
_KEYWORD = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")
# Fold before a line would pass this (RFC 5322 2.1.1 recommends 78).
LINE_LENGTH = 78


def format_value(value):
    """A value as RFC 8601 allows it: a token or address as is, else a quoted-string."""
    value = _printable(value)
    if value and (_TOKEN.match(value) or _ADDRESS.match(value)):
        return value
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def _printable(text):
    return re.sub(r"[^\x20-\x7e]", "?", text)


def format_resinfo(result):
    # type: (MethodResult) -> List[str]
    """One resinfo as words (method=result, reason=..., ptype.property=value)."""
    if not _KEYWORD.match(result.method) or not _KEYWORD.match(result.result):
        raise ValueError("bad method or result: %r=%r" % (result.method, result.result))
    words = ["%s=%s" % (result.method.lower(), result.result.lower())]
    if result.reason:
        words.append("reason=%s" % format_value(result.reason))
    for name, value in result.properties:
        if not _PROPERTY.match(name):
            raise ValueError("bad property name %r" % (name,))
        words.append("%s=%s" % (name, format_value(value)))
    return words


def format_header_value(authserv_id, results):
    # type: (str, Sequence[MethodResult]) -> str
    """The header field body (after "Authentication-Results:"), folded with CRLF TAB,
    one resinfo per line; "authserv-id; none" when there is no result (RFC 8601 2.2)."""
    lines = [" %s;" % format_value(authserv_id)]
    if not results:
        lines[0] += " none"
        return lines[0]
    for i, result in enumerate(results):
        line = "\t"
        for word in format_resinfo(result):
            if line.strip() and len(line) + 1 + len(word) > LINE_LENGTH:
                lines.append(line)
                line = "\t  "
            line += ("" if not line.strip() else " ") + word
        if i < len(results) - 1:
            line += ";"
        lines.append(line)
    return "\r\n".join(lines)


def authserv_id_of(value):
    # type: (str) -> Optional[str]
    """The authserv-id an Authentication-Results value claims, or None if unparsable."""
    text = re.sub(r"\r?\n[ \t]", " ", value)
    pos = _skip_cfws(text, 0)
    if pos >= len(text):
        return None
    if text[pos] == '"':
        out, pos = [], pos + 1
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\":
                pos += 1
            out.append(text[pos:pos + 1])
            pos += 1
        return "".join(out)
    match = re.match(r"[^\s;()\"]+", text[pos:])
    return match.group(0) if match else None


def _skip_cfws(text, pos):
    depth = 0
    while pos < len(text):
        ch = text[pos]
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch == "\\" and depth:
            pos += 1
        elif not depth and ch not in " \t":
            return pos
        pos += 1
    return pos


def forged_headers(headers, authserv_ids):
    # type: (Sequence[Tuple[str, str]], Sequence[str]) -> List[Tuple[str, str]]
    """The (name, value) Authentication-Results fields that claim one of our ids."""
    ours = {i.lower().rstrip(".") for i in authserv_ids}
    found = []
    for name, value in headers:
        if name.lower() == HEADER.lower():
            claimed = authserv_id_of(value)
            if claimed is not None and claimed.lower().rstrip(".") in ours:
                found.append((name, value))
    return found


class AuthResultsPlugin(Plugin):
    """Writes Authentication-Results from ctx.auth_results; removes forged ones."""
    name = "authres"
    Settings = AuthResSettings
    order = 90

    def init(self, settings):
        self.settings = settings or AuthResSettings()

    def on_data(self, ctx):
        if ctx.handover:
            # The drained node's results, under the authserv-id all nodes share: they
            # are the record of its checks (nothing was checked here), so they stay.
            return None
        authserv_id = self.settings.authserv_id or ctx.hostname
        remove = ()
        if self.settings.remove_forged and ctx.message is not None:
            remove = forged_headers(ctx.message.headers,
                                    (authserv_id,) + self.settings.also_remove)
        if not ctx.auth_results and ctx.authenticated_or_local:
            # Our own users' mail: nothing was checked, so nothing to say (but forgeries
            # still go).
            return Result.proceed(remove=remove)
        ordered = sorted(ctx.auth_results, key=lambda r: _METHOD_ORDER.get(r.method, 9))
        header = (HEADER, format_header_value(authserv_id, ordered))
        return Result.proceed(headers=[header], remove=remove)


_METHOD_ORDER = {"iprev": 0, "auth": 1, "spf": 2, "dkim": 3, "arc": 4, "dmarc": 5}
