"""RFC 3461 DSN parameters (ENVID, NOTIFY, ORCPT): decoded and checked, no I/O.

One set of rules for every way these parameters enter Elemta: the protocol core applies
them to MAIL ENVID= and RCPT NOTIFY= ORCPT= (elemta.smtp.protocol answers 501 5.5.4 with
the reason), pickup to the same fields of a maildrop envelope (elemta.queue.maildrop).
Functions raise DsnError, whose str() is the reason, naming the parameter.

Why so strict: xtext can spell any octet, "+0D+0A" included, and the decoded values end
up in X-Original-To, in a bounce's delivery-status part and in a command's environment
(ORIGINAL_RECIPIENT). A decoded value therefore never holds a control character (C0,
DEL, C1, U+2028/U+2029), whatever the encoding allowed. Writers still pass what they
write through elemta.util.text.printable, for values that came some other way (a queue
file written by an older version).

Stored forms (elemta.queue.model): ENVID decoded; ORCPT "addr-type;address", the type
lower-cased and the address decoded; NOTIFY a tuple of upper-case words.
See also: RFC 3461 4 (xtext, ENVID, ORCPT, NOTIFY), RFC 6533 3 (the utf-8 address type),
elemta.delivery.wire (encoding them again for the next hop).
"""

import re

# RFC 3461 4.4: an ENVID is at most 100 characters.
MAX_ENVID = 100
# RFC 3461 4.2: the whole ORCPT parameter may be up to 500 characters.
MAX_ORCPT = 500
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
NEVER = "NEVER"

# RFC 3461 4: xchar is "!" to "~" but "+" and "="; hexchar is "+" and two upper-case
# hex digits.
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+$")
_HEXCHAR = re.compile(rb"\+([0-9A-F]{2})")
# RFC 6533 3: in a utf-8 address, "\x{HEX}" stands for one character.
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
# RFC 3461 4.2: addr-type is an atom (registered types: rfc822, utf-8, x400, ...).
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
# C0, DEL, C1 and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class DsnError(ValueError):
    """A DSN parameter that is malformed or unsafe; str() is the reason."""


def has_control(text):
    """True when text holds a character no header, mailbox or environment may get."""
    return _CONTROL.search(text) is not None


def decode_xtext(value, name):
    """RFC 3461 xtext to text: "+HH" are octets, read together as UTF-8."""
    if not value or not _XTEXT.match(value):
        raise DsnError("%s is not valid xtext" % name)
    data = _HEXCHAR.sub(lambda m: bytes((int(m.group(1), 16),)), value.encode("ascii"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DsnError("%s is not valid UTF-8 once decoded" % name) from None


# ---- ENVID -----------------------------------------------------------------------------

def parse_envid(value):
    """MAIL ... ENVID=xtext: the decoded envelope id."""
    return check_envid(decode_xtext(value or "", "ENVID"))


def check_envid(envid):
    """A decoded envelope id, as stored: printable US-ASCII (RFC 3461 4.4), at most
    MAX_ENVID characters. Returns it."""
    if not isinstance(envid, str) or not envid:
        raise DsnError("ENVID must be a non-empty string")
    if has_control(envid):
        raise DsnError("ENVID contains a control character")
    if not envid.isascii():
        raise DsnError("ENVID contains a non-ASCII character")
    if len(envid) > MAX_ENVID:
        raise DsnError("ENVID longer than %d characters" % MAX_ENVID)
    return envid


# ---- NOTIFY ----------------------------------------------------------------------------

def parse_notify(value):
    """RCPT ... NOTIFY=NEVER or a list of SUCCESS, FAILURE, DELAY: a tuple of words."""
    return check_notify((value or "").upper().split(","))


def check_notify(words):
    """NOTIFY words (a list or tuple of strings): NEVER alone, or SUCCESS, FAILURE and
    DELAY each at most once. Returns them as a tuple."""
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise DsnError("NOTIFY must be a list of words")
    words = tuple(words)
    if words == (NEVER,):
        return words
    if words and all(w in NOTIFY_WORDS for w in words) and len(set(words)) == len(words):
        return words
    raise DsnError("NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")


# ---- ORCPT -----------------------------------------------------------------------------

def parse_orcpt(value, utf8=False):
    """RCPT ... ORCPT=addr-type;xtext: "addr-type;address", decoded. For the utf-8 type
    (RFC 6533) the address is utf-8-addr-xtext ("\\x{HEX}" escapes), or with SMTPUTF8
    utf-8-addr-unitext (raw UTF-8 too)."""
    value = value or ""
    if len(value) > MAX_ORCPT:
        raise DsnError("ORCPT longer than %d characters" % MAX_ORCPT)
    addr_type, semi, coded = value.partition(";")
    if not semi or not _ADDR_TYPE.match(addr_type) or not coded:
        raise DsnError("ORCPT must be addr-type;address")
    addr_type = addr_type.lower()
    if addr_type == "utf-8":
        address = _decode_utf8_address(coded, utf8)
    else:
        address = decode_xtext(coded, "ORCPT")
    return check_orcpt("%s;%s" % (addr_type, address))


def _decode_utf8_address(coded, utf8):
    if not coded.isascii() and not utf8:
        raise DsnError("ORCPT has non-ASCII characters without SMTPUTF8")

    def embedded(match):
        code = int(match.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise DsnError("ORCPT has an invalid \\x{} escape")
        return chr(code)
    return _EMBEDDED.sub(embedded, coded)


def check_orcpt(orcpt):
    """A stored ORCPT, "addr-type;address": an atom type, a non-empty address with no
    control character, at most MAX_ORCPT characters. Returns it."""
    if not isinstance(orcpt, str):
        raise DsnError("ORCPT must be a string")
    addr_type, semi, address = orcpt.partition(";")
    if not semi or not _ADDR_TYPE.match(addr_type) or not address:
        raise DsnError("ORCPT must be addr-type;address")
    if has_control(address):
        raise DsnError("ORCPT contains a control character")
    if len(orcpt) > MAX_ORCPT:
        raise DsnError("ORCPT longer than %d characters" % MAX_ORCPT)
    return orcpt
