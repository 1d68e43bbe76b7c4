"""Real peers the tests talk to (Postfix, smtp-source), each run privately on loopback.

Owned by no Elemta process: only tests and benchmarks import this package.
See also: ../shared/peers.md, tests/peers/postfix.py.
"""
