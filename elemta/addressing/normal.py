"""Addresses in one spelling: the normal form every entry point compares and looks up.

Used by the whole addressing layer (elemta.addressing.resolve, .recipients) and, through
it, by the smtpd's relay and RCPT checks, the router, pickup, sendmail (-bv too) and the
local agent. Postfix's rules, as its trivial-rewrite and resolve_local apply them:

    domain        lower case, the root's final dot dropped, IDN U-labels as A-labels
                  (bücher.example and xn--bcher-kva.example are one domain)
    literal       [192.0.2.1] as written; [IPv6:...] with the address in its compressed
                  form ([IPv6:0::1] is [IPv6:::1]), the tag spelled IPv6 (RFC 5321 4.1.3)
    local part    a quoted local part that needs no quotes is the same mailbox as the
                  unquoted one ("root"@example.org is root@example.org, RFC 5321 4.1.2);
                  its case is kept (only local user names are matched without case)

The queue keeps each address as its sender wrote it, but for a virtual mailbox or relay
recipient, queued in the normal form its table was asked with
(elemta.addressing.resolve.queued_address); these forms are for deciding.
The extension rule is here too (split_extension, with_extension): each character of
local.recipient_delimiter is a delimiter, and a quoted local part is cut in what it says;
every lookup, local delivery and the propagation of extensions use it.
See also: elemta.smtp.address (the syntax check that comes first).
"""

import encodings.idna  # noqa: F401  (loaded now: forked workers may not read the library)
import ipaddress
import string


def normal_domain(domain):
    """A domain in one spelling: lower case, no final dot, IDN U-labels as A-labels; an
    address literal in its normal form (normal_literal). A leading dot (a table key
    for every subdomain) is kept. Every table keyed by domain uses this, for its keys
    and its lookups alike."""
    if domain.startswith("["):
        return normal_literal(domain)
    if domain.startswith(".") and domain != ".":
        # A table key for every subdomain (".example.org"): the rest is a domain.
        return "." + normal_domain(domain[1:])
    domain = domain.lower().rstrip(".")
    if domain.isascii():
        # IDNA leaves an ASCII domain as it is (or refuses it, which returns it as it
        # is too): skip the codec, pure Python and run for every address.
        return domain
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain
    # IDNA turns the ideographic full stops (U+3002, U+FF0E, U+FF61) into ".": a final
    # one is a final dot too.
    return domain.rstrip(".")


def unicode_domain(domain):
    """A domain in normal form with its A-labels as U-labels: xn--bcher-kva.example ->
    bücher.example (a leading dot kept); the domain itself when it has no A-label, or
    one that does not decode. For tables that hold domains as UTF-8 text (SQL rows)."""
    if "xn--" not in domain or domain.startswith("["):
        return domain
    dot = "." if domain.startswith(".") else ""
    try:
        return dot + domain[len(dot):].encode("ascii").decode("idna")
    except (UnicodeError, ValueError):
        return domain


def normal_literal(literal):
    """[192.0.2.1] -> itself, [ipv6:0::1] -> [IPv6:::1]; anything else lower-cased."""
    inside = literal[1:-1] if literal.endswith("]") else literal[1:]
    try:
        if inside[:5].lower() == "ipv6:":
            return "[IPv6:%s]" % ipaddress.IPv6Address(inside[5:]).compressed
        return "[%s]" % ipaddress.IPv4Address(inside)
    except ValueError:
        return literal.lower()


def split_address(address):
    """(local part, domain) of an address; the domain is "" for a bare name."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


# RFC 5322 atext; UTF-8 beyond ASCII is atext too under SMTPUTF8 (RFC 6531).
ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")


def is_dot_atom(text):
    """True when text can be written as a local part without quotes (RFC 5321 Dot-string)."""
    return all(atom and all(ch in ATEXT or ord(ch) > 127 for ch in atom)
               for atom in text.split("."))


def _unquoted(local):
    """The content of a quoted local part, backslash pairs undone; None if it is not one
    whole quoted string."""
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return None
    out, escaped = [], False
    for ch in local[1:-1]:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return None
        else:
            out.append(ch)
    return None if escaped else "".join(out)


# Sender-specified routing in a local part: user%elsewhere@domain, elsewhere!user@domain
# and "user@elsewhere"@domain (Postfix's allow_untrusted_routing).
ROUTING_CHARACTERS = "@%!"


def has_sender_routing(address):
    """True when the address's local part routes on to another place, in any spelling
    (quoted or not): a next hop that honours the percent hack or bang paths would relay
    it further."""
    local = split_address(address)[0]
    content = _unquoted(local)
    return any(ch in ROUTING_CHARACTERS for ch in (local if content is None else content))


def normal_local_part(local):
    """local without quotes it does not need: '"root"' -> 'root', '"a.b"' -> 'a.b';
    '"a b"' and '"a..b"' stay as written (only the quoted form says them)."""
    content = _unquoted(local)
    return content if content is not None and is_dot_atom(content) else local


def quote_local(content):
    """A local part's content spelled as a local part: itself when it is a dot-atom, else
    quoted with \\ before each " and \\ (RFC 5321 4.1.2 Quoted-string)."""
    if is_dot_atom(content):
        return content
    return '"%s"' % content.replace("\\", "\\\\").replace('"', '\\"')


def local_content(local):
    """What a local part says: the content of a quoted one, quoted pairs undone; an
    unquoted one as it is."""
    content = _unquoted(local)
    return local if content is None else content


# Local parts never split at a delimiter, as Postfix's split_addr() keeps them whole:
# the roles every domain has, and, when "-" is a delimiter, mailing-list owner-NAME and
# NAME-request addresses.
UNSPLIT = frozenset(("postmaster", "mailer-daemon"))


def split_extension(local, delimiters):
    """(user, delimiter, extension) of a local part whose extension starts at the first
    of the characters in delimiters (Postfix's recipient_delimiter: each character is one,
    "+-" splits both user+ext and user-ext); (local, None, None) when it has none.

    Works on what the local part says, quoted or not: '"a b+x"' is ('"a b"', '+', 'x'),
    the user spelled as a local part again (quote_local), the extension as said. Not
    split: a delimiter in first place (the user would be empty), postmaster and
    MAILER-DAEMON, and with "-" owner-NAME and NAME-request. The one rule for every place
    an extension matters: table lookups (elemta.maps.search), local recipients and
    delivery (.forward-ext, $EXTENSION), extensions put back onto canonical and virtual
    alias results."""
    if not delimiters:
        return local, None, None
    content = local_content(local)
    folded = content.lower()
    if folded in UNSPLIT:
        return local, None, None
    if "-" in delimiters and (folded.startswith("owner-") or
                              (len(folded) > 8 and folded.endswith("-request"))):
        return local, None, None
    cut = min((content.find(d) for d in delimiters if d in content), default=-1)
    if cut <= 0:
        return local, None, None
    return quote_local(content[:cut]), content[cut], content[cut + 1:]


def with_extension(address, delimiter, extension):
    """address (or a bare name) with delimiter and extension put on what its local part
    says, spelled as a local part again: bob@x -> bob+ext@x, "a b"@x -> "a b+ext"@x,
    and bob@x with the extension "c d" -> "bob+c d"@x (whether the result is a valid
    address is for the caller to check)."""
    local, at, domain = address.rpartition("@")
    if not at:
        local = address
    return quote_local(local_content(local) + delimiter + extension) + at + domain


def normal_address(address):
    """The address with its local part in normal form (see normal_local_part); the
    domain as written."""
    local, at, domain = address.rpartition("@")
    if not at:
        return normal_local_part(address)
    return normal_local_part(local) + at + domain


# RFC 5321 4.5.3.1: a local part of at most 64 octets, a path of at most 256 with its
# angle brackets (so 254 for the address).
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254


def too_long(address):
    """Why address is too long to be a recipient anywhere (its local part over 64 octets,
    the whole over 254), or None. What a table's result must also pass: such an address
    is refused by every next hop, so accepting it would only bounce later."""
    local = split_address(address)[0]
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        return "local part longer than %d octets" % MAX_LOCAL_PART
    if len(address.encode("utf-8")) > MAX_ADDRESS:
        return "address longer than %d octets" % MAX_ADDRESS
    return None


def canonical(address):
    """The one spelling of a whole address: local part and domain in normal form.
    '"root"@Bücher.Example.' -> 'root@xn--bcher-kva.example'; a bare name stays bare."""
    local, domain = split_address(address)
    if not domain:
        return normal_local_part(local)
    return "%s@%s" % (normal_local_part(local), normal_domain(domain))
