"""The Queue facade owns the queue's formats: nobody outside elemta.queue builds a Queue by
hand from the configuration, touches its LMDB index or names the index's files.

The structural checks read the package's source (AST, not text), so a new caller that
reaches past the facade fails here rather than breaking when the index changes.
"""

import ast
import dataclasses
import os
import time

from elemta.config import default_config
from elemta.queue.ids import new_queue_id
from elemta.queue.listing import Selection
from elemta.queue.model import INCOMING, Envelope, Recipient
from elemta.queue.queue import Queue

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "elemta")
QUEUE_PACKAGE = os.path.join(PACKAGE, "queue")


def _modules_outside_the_queue_package():
    for root, _, files in os.walk(PACKAGE):
        if root == QUEUE_PACKAGE or root.startswith(QUEUE_PACKAGE + os.sep):
            continue
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, os.path.dirname(PACKAGE)), ast.parse(f.read())


def _queue_class_names(tree):
    """Names a module binds to elemta.queue.queue.Queue."""
    return {alias.asname or alias.name for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "elemta.queue.queue"
            for alias in node.names if alias.name == "Queue"}


def _trespasses(path, tree):
    """Where a module outside elemta.queue reaches past the facade."""
    found = []
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    queue_names = _queue_class_names(tree)
    for node in ast.walk(tree):
        where = "%s:%d" % (path, getattr(node, "lineno", 0))
        if isinstance(node, ast.Attribute) and node.attr == "index" and id(node) not in called:
            found.append(where + ": uses .index (the Queue's LMDB index)")
        elif isinstance(node, ast.ImportFrom) and node.module == "elemta.queue.index":
            found.append(where + ": imports elemta.queue.index")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value == "index.lmdb" or node.value.endswith(".mdb")):
            found.append(where + ": names the index's file %r" % node.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in queue_names):
            found.append(where + ": builds Queue(...) (use Queue.from_config)")
    return found


def test_nothing_outside_the_queue_package_reaches_past_the_facade():
    found = [line for path, tree in _modules_outside_the_queue_package()
             for line in _trespasses(path, tree)]
    assert found == []


def test_the_structural_check_sees_each_kind_of_trespass():
    source = ("from elemta.queue.queue import Queue as Q\n"
              "from elemta.queue.index import QueueIndex\n"
              "q = Q('spool', map_size=1)\n"
              "q.index.count_by_state()\n"
              "path = 'data.mdb'\n"
              "where = 'abc'.index('b')\n"
              "ok = Q.from_config(config.queue)\n")
    found = _trespasses("x.py", ast.parse(source))
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "builds Queue(...) (use Queue.from_config)",
        "imports elemta.queue.index",
        "names the index's file 'data.mdb'",
        "uses .index (the Queue's LMDB index)",
    ]


def test_from_config_takes_the_section_and_overrides(tmp_path):
    section = dataclasses.replace(default_config().queue, spool_dir=str(tmp_path / "a"),
                                  sync_method="fsync", index_map_size=64 << 20)
    with Queue.from_config(section) as queue:
        assert (queue.spool_dir, queue.sync_method) == (str(tmp_path / "a"), "fsync")
        assert queue.index.env.info()["map_size"] == 64 << 20
    with Queue.from_config(section, spool_dir=str(tmp_path / "b"),
                           sync_method="syncfs") as queue:
        assert (queue.spool_dir, queue.sync_method) == (str(tmp_path / "b"), "syncfs")


def test_the_facade_answers_what_callers_asked_the_index(tmp_path):
    spool = str(tmp_path / "spool")
    os.makedirs(spool)
    assert not Queue.has_index(spool)
    with Queue(spool, map_size=64 << 20) as queue:
        assert Queue.has_index(spool)
        assert queue.count_by_state() == {}
        assert queue.next_due_time() is None
        arrival = time.time() - 60
        queue_id = queue.add(Envelope(new_queue_id(), "a@example.org",
                                      [Recipient("b@example.net")], arrival),
                             [b"Subject: x\r\n\r\nbody\r\n"])
        assert queue.count_by_state() == {INCOMING: 1}
        assert abs(queue.next_due_time() - arrival) < 0.01
        everything = Selection(now=time.time())
        assert [r.queue_id for r in queue.records_matching(everything)] == [queue_id]
        assert list(queue.ids_matching(everything)) == [queue_id]
        assert queue.summarise(everything).by_state[INCOMING].messages == 1

