"""Certificates Elemta keeps for itself: the ACME state directory's layout
(elemta.certs.store). Shared by the master (which prepares the directory), the acme and
acme-http children, the smtpd (which serves what lies there) and elemtactl cert."""
