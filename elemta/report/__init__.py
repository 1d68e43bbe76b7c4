"""Traffic reports from Elemta's log, for `elemtactl report` (issue 17 req 5).

parse reads log lines, text (Postfix's layout) or JSON, into LogEvents; summary adds
them up the way pflogsumm does. No process owns this package; only the CLI uses it.
"""
