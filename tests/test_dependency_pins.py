"""setup.cfg's install_requires, constraints/minimum.txt and constraints/tested.txt stay
in step: the lower bounds are the versions `make test-minimum` proves, and the versions
the packages ship (tested.txt, what `make test` runs with) are inside setup.cfg's ranges.
See the header comments of the two constraints files."""

import configparser
import os

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_requires():
    """{canonical name: Requirement} of setup.cfg's install_requires."""
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    lines = config["options"]["install_requires"].strip().splitlines()
    return dict((canonicalize_name(r.name), r) for r in map(Requirement, lines))


def pins(name):
    """{canonical name: Version} of constraints/NAME, every line `name==version`."""
    found = {}
    with open(os.path.join(REPO, "constraints", name)) as lines:
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            specifiers = list(requirement.specifier)
            assert len(specifiers) == 1 and specifiers[0].operator == "==", line
            found[canonicalize_name(requirement.name)] = Version(specifiers[0].version)
    return found


def lower_bound(requirement):
    bounds = [s.version for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, "%s needs one >= bound" % requirement
    return Version(bounds[0])


def test_the_lower_bounds_are_the_minimum_pins():
    bounds = dict((name, lower_bound(r)) for name, r in install_requires().items())
    assert pins("minimum.txt") == bounds


@pytest.mark.parametrize("name", sorted(install_requires()))
def test_the_shipped_version_is_inside_the_range(name):
    requirement = install_requires()[name]
    tested = pins("tested.txt")
    assert name in tested, "%s is not pinned in constraints/tested.txt" % name
    assert requirement.specifier.contains(tested[name], prereleases=True), (
        "constraints/tested.txt has %s==%s, outside setup.cfg's %s"
        % (name, tested[name], requirement.specifier))


def test_tested_pins_name_no_test_tool():
    """tested.txt is what the packages bundle: runtime dependencies only."""
    assert not set(pins("tested.txt")) & {"pytest", "hypothesis", "schemathesis",
                                          "pytest-timeout"}
