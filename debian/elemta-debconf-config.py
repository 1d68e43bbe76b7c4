#!/usr/bin/python3
"""Write the settings debconf owns into /etc/elemta/elemta.yaml, keeping everything else.

Run by the elemta package's postinst (installed as /usr/lib/elemta/debconf-config, with the
private venv's python, so elemta and the pinned ruamel.yaml are importable). The round trip
is elemta.config.editor's, the one `elemtactl config set` edits with: it keeps the admin's
comments, order, indentation and every other setting, and replaces the file atomically
(fsync'd, mode and owner kept); only these change:

  listeners             the port-25 "smtp" listeners: loopback (127.0.0.1, ::1) for
                        "local" and "satellite", every address (0.0.0.0, ::) for "internet";
                        (the IPv6 one only if the host has IPv6); other listeners (587, 465, ...) are left alone
  delivery.relayhost    the relay host for "satellite"; removed for the other types
  delivery.default_transport
                        "error" for "local" (remote mail bounces at once, as Debian's
                        Postfix sets default_transport = error); removed for the others
  smtpd.hostname        --fqdn (postinst passes `hostname --fqdn`), only while it is
                        empty and only a name with a dot: Debian's Postfix postinst sets
                        myhostname so once; later the value is the admin's

The mail name is not written here: postinst writes it to /etc/mailname, which Elemta
reads as its origin (smtpd.mailname_file, smtpd.origin empty), as Debian's Postfix keeps
myorigin = /etc/mailname apart from myhostname.

A missing configuration is started from /usr/share/elemta/elemta.yaml.example.
"""
import argparse
import io
import os
import sys

from ruamel.yaml.comments import CommentedMap

from elemta.config.editor import edit_lock, replace_file, round_trip_yaml

TEMPLATE = "/usr/share/elemta/elemta.yaml.example"
ADDRESSES = {"local": ("127.0.0.1", "::1"), "satellite": ("127.0.0.1", "::1"),
             "internet": ("0.0.0.0", "::")}


def have_ipv6():
    """An IPv6 address to bind (a host or container without IPv6 cannot bind ::1)."""
    try:
        with open("/proc/net/if_inet6") as stream:
            return bool(stream.read().strip())
    except OSError:
        return False


def apply(doc, mailtype, relayhost, ipv6=True, fqdn=""):
    smtpd = doc.setdefault("smtpd", CommentedMap())
    if not smtpd.get("hostname") and "." in fqdn.strip(".") and \
            not fqdn.startswith("localhost"):
        smtpd["hostname"] = fqdn.strip().rstrip(".")
    listeners = doc.get("listeners")
    if listeners is None:
        doc["listeners"] = listeners = []
    keep = [entry for entry in listeners
            if not (entry.get("port") == 25 and entry.get("mode", "smtp") == "smtp")]
    at = next((i for i, entry in enumerate(listeners) if entry not in keep), 0)
    ours = []
    for address in ADDRESSES[mailtype]:
        if ":" in address and not ipv6:
            continue
        entry = CommentedMap([("address", address), ("port", 25), ("mode", "smtp")])
        entry.fa.set_flow_style()
        ours.append(entry)
    del listeners[:]
    for entry in keep[:at] + ours + keep[at:]:
        listeners.append(entry)
    delivery = doc.setdefault("delivery", CommentedMap())
    if mailtype == "satellite" and relayhost:
        delivery["relayhost"] = relayhost
    elif "relayhost" in delivery:
        del delivery["relayhost"]
    if mailtype == "local":
        if delivery.get("default_transport") != "error":
            delivery["default_transport"] = "error"
            # Says why remote mail bounces, where the admin will look.
            delivery.yaml_add_eol_comment("debconf: Local only (remote mail bounces)",
                                          "default_transport")
    elif "default_transport" in delivery:
        del delivery["default_transport"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="/etc/elemta/elemta.yaml")
    parser.add_argument("--type", required=True, choices=sorted(ADDRESSES))
    parser.add_argument("--relayhost", default="")
    parser.add_argument("--fqdn", default="", help="this host's fully qualified name")
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(args.config) or ".", exist_ok=True)
    with edit_lock(args.config):        # not at once with an `elemtactl config set`
        source = args.config if os.path.exists(args.config) else TEMPLATE
        with open(source, encoding="utf-8") as stream:
            text = stream.read()
        yaml = round_trip_yaml(text)    # comments, order and indentation survive
        doc = yaml.load(text)
        apply(doc, args.type, args.relayhost, have_ipv6(), args.fqdn)
        out = io.StringIO()
        yaml.dump(doc, out)
        replace_file(args.config, out.getvalue(), new_mode=0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main())
