"""The package's layout rules, checked on its source (no process is started).

- A class name is defined once in elemta/: two classes of one name meant different things
  and were mixed up by readers and by `from ... import` lines alike.
- The process packages (one per child kind) never import each other: what two processes
  share lives below them (elemta.queue, elemta.addressing, elemta.plugins, elemta.util ...),
  so a change inside one process cannot break another's start.
"""

import ast
import collections
import os

from tests.harness import REPO

PACKAGE = os.path.join(REPO, "elemta")
PROCESS_PACKAGES = ("smtpd", "delivery", "pickup", "local", "api", "showq")
ALLOWED_TWICE = set()        # names two classes may share, with the reason: none


def modules():
    """(dotted module name, parsed tree) of every module of the package."""
    for directory, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                if dotted.endswith(".__init__"):
                    dotted = dotted[:-len(".__init__")]
                with open(path, "rb") as f:
                    yield dotted, ast.parse(f.read(), path)


def imported_modules(dotted, tree, is_package):
    """Every module `tree` imports, anywhere in it (functions too), as dotted names."""
    package = dotted if is_package else dotted.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base
            for alias in node.names:           # from elemta import smtpd
                yield base + "." + alias.name


def process_package(dotted):
    parts = dotted.split(".")
    if len(parts) > 1 and parts[0] == "elemta" and parts[1] in PROCESS_PACKAGES:
        return parts[1]
    return None


def test_no_class_name_is_defined_twice():
    where = collections.defaultdict(list)
    for dotted, tree in modules():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                where[node.name].append(dotted)
    twice = {name: found for name, found in where.items()
             if len(found) > 1 and name not in ALLOWED_TWICE}
    assert not twice, "class names defined more than once: %s" % twice


def test_process_packages_do_not_import_each_other():
    crossings = []
    for dotted, tree in modules():
        own = process_package(dotted)
        if own is None:
            continue
        is_package = os.path.isdir(os.path.join(REPO, *dotted.split(".")))
        for target in imported_modules(dotted, tree, is_package):
            other = process_package(target)
            if other is not None and other != own:
                crossings.append("%s imports %s" % (dotted, target))
    assert not crossings, "process packages import each other: %s" % crossings


def test_the_layout_checks_see_the_package():
    """The two checks above pass vacuously if they read nothing: they read every process
    package and the classes the renames split apart."""
    names = {dotted for dotted, _ in modules()}
    for kind in PROCESS_PACKAGES:
        assert "elemta." + kind in names
    classes = {node.name for _, tree in modules() for node in tree.body
               if isinstance(node, ast.ClassDef)}
    assert {"Master", "MasterSettings", "Queue", "QueueSettings"} <= classes
