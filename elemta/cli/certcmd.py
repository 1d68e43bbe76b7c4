"""`elemtactl cert status` and `elemtactl cert renew`: the certificates the smtpd serves
and the ACME client keeps.

Used by elemtactl. status lists every certificate the configuration names, the ACME
ones (acme.certificates, source acme) and tls.cert_file (source file), with its names,
issuer, serial, expiry and, for ACME ones, when the client renews it; what lies under
acme.state_directory is read as master.user (it is that user's), never through a link.
renew sends SIGUSR2 to the running master's acme process, which then orders every
certificate at once, due or not (the log says how it went).
Exit status: 0, 1 (renew: no master or no acme process runs), 66 (status: a
certificate that is not there or cannot be read; the others are still listed).
See also: elemta.certs.store, elemta.acme.worker, man/elemtactl.8.
"""

import json
import os
import signal
import time

from elemta.cli import control
from elemta.cli.config_finder import find_config
from elemta.cli.failure import EX_NOT_RUNNING


def certificates(config):
    """[(source, name, cert file, CertificateInfo or the reason it is missing)]."""
    from elemta.certs.store import CertificateInfo, Store, read_file
    from elemta.master import resolve_user
    from elemta.util.eugid import acting_as
    found = []
    store = Store(config.acme.state_directory)
    uid, gid = resolve_user(config.master)
    for certificate in config.acme.certificates:
        path = store.live_files(certificate.name)[0]
        with acting_as(uid, gid):
            found.append(("acme", certificate.name, path, _read(path, read_file,
                                                                CertificateInfo)))
    if config.tls.cert_file and not config.tls.acme:
        path = config.tls.cert_file
        found.append(("file", "tls.cert_file", path, _read(path, read_file,
                                                           CertificateInfo)))
    return found


def _read(path, read_file, info_class):
    try:
        data = read_file(path)
    except OSError as exc:
        return "cannot read it: %s" % (exc.strerror or exc)
    if data is None:
        return "not obtained yet" if path.endswith("fullchain.pem") else "missing"
    try:
        return info_class.from_pem(data)
    except ValueError as exc:
        return "not a PEM certificate: %s" % exc


def _when(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def cmd_status(args):
    """status: each certificate with its names, issuer, expiry and source."""
    config = find_config(getattr(args, "config", None))
    listed = certificates(config)
    served = config.tls_files[0]
    missing = 0
    if args.json:
        for source, name, path, info in listed:
            entry = {"source": source, "name": name, "file": path,
                     "served": path == served}
            if isinstance(info, str):
                entry["error"] = info
                missing += 1
            else:
                entry.update(names=info.names, issuer=info.issuer, serial=info.serial,
                             not_before=info.not_before, expires=info.not_after)
                if source == "acme":
                    entry["renews"] = info.renewal_time(config.acme.renew_at)
            print(json.dumps(entry, sort_keys=True))
        return os.EX_NOINPUT if missing else 0
    if not listed:
        print("no certificate configured (tls.cert_file, tls.acme, acme.certificates)")
        return 0
    for source, name, path, info in listed:
        print("%s (source %s%s)" % (name, source, ", served" if path == served else ""))
        print("  file:    %s" % path)
        if isinstance(info, str):
            print("  error:   %s" % info)
            missing += 1
            continue
        print("  names:   %s" % ", ".join(info.names))
        print("  issuer:  %s" % info.issuer)
        print("  serial:  %s" % info.serial)
        print("  expires: %s%s" % (_when(info.not_after),
                                   " (EXPIRED)" if info.not_after < time.time() else ""))
        if source == "acme":
            print("  renews:  %s" % _when(info.renewal_time(config.acme.renew_at)))
    return os.EX_NOINPUT if missing else 0


def cmd_renew(args):
    """renew: the acme process orders every certificate now (SIGUSR2)."""
    config = find_config(getattr(args, "config", None))
    spool_dir = os.path.abspath(getattr(args, "spool_dir", None) or config.queue.spool_dir)
    try:
        master = control.master_pid(spool_dir)
    except control.NotRunning as exc:
        print("elemtactl: cert renew: %s" % exc)
        return EX_NOT_RUNNING
    from elemta.util.procs import children
    acme = [pid for pid, title in children(master).items() if title == "elemta: acme"]
    if not acme:
        print("elemtactl: cert renew: master pid %d runs no acme process (acme.enabled, "
              "acme.certificates)" % master)
        return EX_NOT_RUNNING
    for pid in acme:
        os.kill(pid, signal.SIGUSR2)
    print("elemtactl: cert renew: asked the acme process (pid %s) to renew every "
          "certificate now; the log tells the outcome"
          % ", ".join(str(pid) for pid in acme))
    return 0
