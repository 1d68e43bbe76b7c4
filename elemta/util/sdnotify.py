"""systemd's sd_notify protocol: tell the service manager READY=1, RELOADING=1, STOPPING=1.

Used by the master (Type=notify in etc/elemta.service). The protocol is one datagram of
"KEY=value" lines to the socket named by $NOTIFY_SOCKET ('@' means the abstract
namespace); without that variable (not under systemd) it does nothing.
"""

import os
import socket


def notify(*states):
    """Send the states; returns True if systemd was told. Never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode("ascii"), address)
    except OSError:
        return False
    return True
