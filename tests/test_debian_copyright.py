"""debian/copyright names the licence of every Python project the .deb bundles.

The package ships a private virtualenv holding exactly the projects pinned in
constraints/tested.txt (debian/rules), so each needs a Files paragraph of its own, as
lintian and Debian policy 12.5 expect (machine-readable format, DEP-5). This test keeps
the two in step: a pin added by `make constraints` without a paragraph fails here, and
so does a paragraph left behind for a project no longer bundled. It also checks what
lintian checks of the format: each licence short name has its text in a standalone
License paragraph, and no such paragraph is unused.
"""

import os
import re

from tests.harness import REPO

COPYRIGHT = os.path.join(REPO, "debian", "copyright")
CONSTRAINTS = os.path.join(REPO, "constraints", "tested.txt")
BUNDLED = re.compile(r"^PyPI project (\S+), bundled in the virtualenv")


def paragraphs(path):
    """The file's paragraphs as {field name: value} (continuation lines joined by \\n)."""
    with open(path, encoding="utf-8") as stream:
        blocks = stream.read().split("\n\n")
    found = []
    for block in blocks:
        fields, name = {}, None
        for line in block.strip("\n").split("\n"):
            if line.startswith((" ", "\t")):
                assert name, "%s: a continuation line before any field: %r" % (path, line)
                fields[name] += "\n" + line.strip()
            else:
                name, colon, value = line.partition(":")
                assert colon, "%s: not a field: %r" % (path, line)
                assert name not in fields, ("%s: %s twice in one paragraph (a blank line "
                                            "missing?): %r" % (path, name, block[:200]))
                fields[name] = value.strip()
        found.append(fields)
    return found


def normal(project):
    """PEP 503's normal form of a project name (PyNaCl, pynacl, py_nacl are one)."""
    return re.sub(r"[-_.]+", "-", project).lower()


def pinned_projects():
    with open(CONSTRAINTS) as stream:
        return {normal(line.split("==")[0]) for line in stream
                if "==" in line and not line.lstrip().startswith("#")}


def short_names(expression):
    """'Apache-2.0 or BSD-3-Clause' -> {'Apache-2.0', 'BSD-3-Clause'}."""
    return set(re.split(r"\s+(?:and|or)\s+", expression.strip()))


def test_every_bundled_project_has_a_files_paragraph_and_no_other():
    files = [p for p in paragraphs(COPYRIGHT) if "Files" in p]
    bundled = {}
    for paragraph in files:
        match = BUNDLED.match(paragraph.get("Comment", ""))
        if match:
            bundled[normal(match.group(1))] = paragraph
    pinned = pinned_projects()
    missing, stale = sorted(pinned - set(bundled)), sorted(set(bundled) - pinned)
    assert not missing, ("constraints/tested.txt pins projects debian/copyright does not "
                         "cover: %s (add a Files paragraph: its licence is in the wheel's "
                         "METADATA and LICENSE files)" % ", ".join(missing))
    assert not stale, ("debian/copyright covers projects no longer bundled: %s"
                       % ", ".join(stale))
    for project, paragraph in bundled.items():
        assert paragraph.get("Copyright") and paragraph.get("License"), project
        assert all(pattern.startswith("*/site-packages/")
                   for pattern in paragraph["Files"].split()), project


def test_our_own_files_paragraph_comes_first_with_its_licence():
    files = [p for p in paragraphs(COPYRIGHT) if "Files" in p]
    assert files[0]["Files"] == "*", "DEP-5: the Files: * paragraph must come first"
    assert files[0].get("Copyright") and files[0].get("License"), files[0]


def test_every_licence_named_has_its_text_and_every_text_is_named():
    all_paragraphs = paragraphs(COPYRIGHT)
    assert all_paragraphs[0]["Format"].startswith(
        "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0")
    used = set()
    for paragraph in all_paragraphs:
        if "Files" in paragraph:
            used |= short_names(paragraph["License"].split("\n")[0])
    texts = {p["License"].split("\n")[0]: p["License"] for p in all_paragraphs
             if "License" in p and "Files" not in p and "Format" not in p}
    assert used - set(texts) == set(), "licences without a License paragraph"
    assert set(texts) - used == set(), "License paragraphs no Files paragraph uses"
    for name, text in texts.items():
        assert len(text.split("\n")) > 1, "%s: the paragraph holds no text" % name
