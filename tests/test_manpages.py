"""The manual pages in man/: each passes mandoc's lint, and elemta-sendmail(1) documents
every option letter elemta.cli.sendmail accepts.

Runs the real mandoc(1) (skipped where it is not installed) and the real option parser.
See also: man/, tests/test_sendmail.py (what the options do).
"""

import os
import re
import shutil
import string
import subprocess

import pytest

from elemta.cli import sendmail

MAN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "man")
PAGES = sorted(os.listdir(MAN_DIR))


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc is not installed")
@pytest.mark.parametrize("page", PAGES)
def test_page_passes_mandoc_lint(page):
    result = subprocess.run(["mandoc", "-T", "lint", "-W", "warning",
                             os.path.join(MAN_DIR, page)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert result.stdout.decode() == ""
    assert result.returncode == 0


def accepted_option_letters():
    """Every letter the parser takes as an option, asked of the parser itself: a letter
    it does not know is refused with "invalid option"; any other outcome (success, or a
    complaint about the argument) means it is an option."""
    letters = set()
    for letter in string.ascii_letters:
        try:
            sendmail.parse_args(["-" + letter, "value"])
        except sendmail.Failure as failure:
            if "invalid option" in str(failure):
                continue
        letters.add(letter)
    return letters


def test_parser_probe_tells_options_from_non_options():
    letters = accepted_option_letters()
    assert {"t", "i", "f", "b", "q", "o", "C"} <= letters
    assert "a" not in letters and "Z" not in letters


def test_sendmail_page_documents_every_accepted_option():
    with open(os.path.join(MAN_DIR, "elemta-sendmail.1")) as page:
        source = page.read()
    # Each .Fl word, e.g. "t" from ".Fl t", "bs" from ".Fl bs", "oi" from ".Fl oi".
    flags = set(re.findall(r"\bFl ([A-Za-z][A-Za-z0-9]*)", source))
    undocumented = sorted(letter for letter in accepted_option_letters()
                          if not any(flag.startswith(letter) for flag in flags))
    assert undocumented == []
    # And the modes it runs, each by name.
    assert {"bm", "bs", "bp", "bv", "q", "oi"} <= flags
