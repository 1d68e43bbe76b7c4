"""Security regression tests: one file per attack class (issue 10 requirement 7).

Every probe an attacker or careless client tried stays here, so a regression fails CI.
The fixtures (elemta_server, peers) come from tests/conftest.py.
"""
