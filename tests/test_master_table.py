"""The master's bookkeeping, driven by its service table, in-process: which children it
forks, in which slots, how it backs off a failing kind, what a reload changes. The
system calls (fork, wait, kill) and the clock are the only fakes: a child here is a pid
the test makes up and ends by hand, so every test takes milliseconds. What the forked
children then do is tested with real processes in tests/test_master.py,
tests/test_child_lifecycle.py and tests/test_workers.py.

See also: elemta/services.py (the table), elemta/master.py.
"""

import dataclasses
import logging
import signal

import pytest

from elemta.config import default_config
from elemta.master import CRASH_WINDOW, STEADY, Master
from elemta.services import SERVICES, Service
from elemta.util.child import EX_CANTBOOT
from elemta.util.scoreboard import RUNNING


def exited(code):
    """A wait status for exit(code)."""
    return code << 8


class Socket:
    """A listening socket as far as the master goes: it only ever closes it."""

    closed = False

    def close(self):
        self.closed = True


class FakeMaster(Master):
    """A Master whose children are made-up pids; the test ends them (end()) and moves
    the clock (now)."""

    def __init__(self, config, services=SERVICES, reload_config=None):
        super().__init__(config, [], reload_config or (lambda: config), self.bind_fake,
                         run_child=None, services=services)
        self.now = 1000.0
        self.pids = iter(range(10000, 20000))
        self.ended = []              # (pid, wait status) the next reap collects
        self.sent = []               # (pid, signal) the master sent
        self.bound = []

    def bind_fake(self, listener):
        self.bound.append(listener)
        return Socket()

    def fork(self):
        return next(self.pids)

    def wait_any(self):
        if self.ended:
            return self.ended.pop(0)
        if not self.children:
            raise ChildProcessError
        return 0, 0

    def _kill(self, pid, signum):
        self.sent.append((pid, signum))

    def clock(self):
        return self.now

    # ---- for the tests ------------------------------------------------------------------

    def of_kind(self, kind, generation=None):
        return {pid: c for pid, c in self.children.items() if c.kind == kind
                and (generation is None or c.generation == generation)}

    def counts(self):
        found = {}
        for child in self.children.values():
            found[child.kind] = found.get(child.kind, 0) + 1
        return found

    def end(self, pid, status=exited(1)):
        self.ended.append((pid, status))
        self.reap_children()

    def serve(self, pids=None):
        """The children (all by default) say they serve, as GeventChild.start_life does."""
        for pid in self.children if pids is None else pids:
            self.scoreboard.set_state(self.children[pid].slot, RUNNING)


def configured(**sections):
    """The default config with some sections' fields replaced: smtpd={"workers": 2}."""
    config = default_config()
    changes = {name: dataclasses.replace(getattr(config, name), **fields)
               for name, fields in sections.items()}
    return dataclasses.replace(config, **changes)


def one_kind(kind="worker", count=1, listens=False):
    return Service(kind, count=lambda config: count, slots=lambda config: 2 * count,
                   main="nowhere:main", listens=listens)


# ---- the table decides what runs ---------------------------------------------------------

def test_only_the_local_agent_keeps_root_and_only_smtpd_keeps_the_listeners():
    """The security columns of the table, pinned: a change here is a change to the
    privilege model (design.md) and must be made on purpose."""
    assert {s.kind for s in SERVICES if s.privileged} == {"local"}
    assert {s.kind for s in SERVICES if s.listens} == {"smtpd"}
    assert {s.kind for s in SERVICES if s.holds_leases} == {"delivery", "local"}


def test_the_table_forks_each_kind_its_count_in_slots_of_its_own():
    master = FakeMaster(configured(smtpd={"workers": 2}, delivery={"workers": 3},
                                   api={"enabled": True}))
    master.spawn_children()
    assert master.counts() == {"smtpd": 2, "api": 1, "delivery": 3, "pickup": 1,
                               "local": 1, "showq": 1}
    slots = [c.slot for c in master.children.values()]
    assert len(set(slots)) == len(slots)
    for child in master.children.values():
        assert child.slot in master.slots[child.kind]
    master.spawn_children()          # nothing is missing: nothing more
    assert len(master.children) == 9


def test_no_delivery_workers_means_no_local_agent_and_no_api_when_disabled():
    master = FakeMaster(configured(smtpd={"workers": 1}, delivery={"workers": 0},
                                   api={"enabled": False}))
    master.spawn_children()
    assert master.counts() == {"smtpd": 1, "pickup": 1, "showq": 1}


def test_the_listening_kind_gets_the_shared_table_and_each_freed_slot_is_cleared():
    master = FakeMaster(configured(smtpd={"workers": 1}))
    counts = master.shared["smtpd"]
    assert set(master.shared) == {"smtpd"}
    assert counts.rows == master.scoreboard.slots
    master.spawn_children()
    (pid, child), = master.of_kind("smtpd").items()
    counts.use_row(child.slot)
    counts.add("192.0.2.1", 1)
    assert counts.count("192.0.2.1") == 1
    master.end(pid, signal.SIGKILL)              # its sessions died with it
    assert counts.count("192.0.2.1") == 0


# ---- a failing kind backs off, the others carry on --------------------------------------

def test_a_kind_that_crashes_at_once_backs_off_doubling_while_the_others_run():
    master = FakeMaster(default_config(), services=[one_kind("crashy"), one_kind("calm")])
    master.spawn_children()
    calm, = master.of_kind("calm")
    for delay in (2.0, 4.0, 8.0, 10.0, 10.0):
        crashy, = master.of_kind("crashy")
        master.end(crashy, exited(1))
        master.spawn_children()
        assert not master.of_kind("crashy")
        master.now += delay - 0.1
        master.spawn_children()
        assert not master.of_kind("crashy"), delay
        master.now += 0.2
        master.spawn_children()
        assert len(master.of_kind("crashy")) == 1, delay
    assert list(master.of_kind("calm")) == [calm]


def test_a_crash_after_the_crash_window_is_replaced_at_once():
    master = FakeMaster(default_config(), services=[one_kind()])
    master.spawn_children()
    pid, = master.children
    master.now += CRASH_WINDOW + 1
    master.end(pid, signal.SIGKILL)
    master.spawn_children()
    assert len(master.children) == 1 and pid not in master.children


def test_a_kind_that_served_steadily_starts_from_the_first_delay_again():
    master = FakeMaster(default_config(), services=[one_kind()])
    master.spawn_children()
    for _ in range(3):                          # 2, 4, 8 s
        pid, = master.children
        master.end(pid)
        master.now += 9
        master.spawn_children()
    master.serve()
    master.now += STEADY + 1
    master.forget_failures()
    pid, = master.children
    master.end(pid)
    master.now += 2.1
    master.spawn_children()
    assert len(master.children) == 1


def test_a_child_that_cannot_start_names_its_cause_once_per_round(caplog):
    master = FakeMaster(default_config(), services=[one_kind(count=2)])
    master.spawn_children()
    with caplog.at_level(logging.DEBUG, logger="elemta.master"):
        for pid, child in list(master.children.items()):
            master.scoreboard.set_cause(child.slot, "cannot listen on 127.0.0.1 port 25")
            master.end(pid, exited(EX_CANTBOOT))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["worker child cannot start: cannot listen on 127.0.0.1 port 25; "
                      "trying again in 2 s"]
    master.now += 1
    master.spawn_children()
    assert not master.children
    master.now += 1.1
    master.spawn_children()
    assert len(master.children) == 2


# ---- slots ------------------------------------------------------------------------------

def test_a_freed_slot_is_told_and_taken_again():
    master = FakeMaster(default_config(), services=[one_kind(count=2)])
    freed = []
    master.slot_freed.append(freed.append)
    master.spawn_children()
    slots = {pid: c.slot for pid, c in master.children.items()}
    victim = min(slots)
    master.now += CRASH_WINDOW + 1
    master.end(victim, signal.SIGKILL)
    assert freed == [slots[victim]]
    master.spawn_children()
    assert sorted(c.slot for c in master.children.values()) == sorted(slots.values())


def test_a_retiring_child_is_replaced_before_it_leaves_and_leaves_without_back_off():
    master = FakeMaster(default_config(), services=[one_kind()])
    master.spawn_children()
    old, = master.children
    master.serve()
    master.scoreboard.retire(master.children[old].slot)
    master.spawn_children()
    assert len(master.children) == 2             # the replacement serves meanwhile
    master.end(old, exited(0))
    master.spawn_children()
    assert len(master.children) == 1 and old not in master.children
    assert not master._failures


def test_a_kind_without_free_slots_waits_for_a_restart(caplog):
    tight = Service("tight", count=lambda config: config.smtpd.workers,
                    slots=lambda config: 2, main="nowhere:main")
    config = configured(smtpd={"workers": 1})
    bigger = configured(smtpd={"workers": 3})
    master = FakeMaster(config, services=[tight], reload_config=lambda: bigger)
    master.spawn_children()
    master.reload()
    assert len(master.children) == 2             # one old, one new: no third slot
    assert "no free tight slot; raise it by restarting elemta" in caplog.text


# ---- reload -----------------------------------------------------------------------------

def test_reload_applies_new_counts_and_stops_the_old_ones_once_the_new_listeners_serve():
    old_config = configured(smtpd={"workers": 1}, delivery={"workers": 1},
                            api={"enabled": True})
    new_config = configured(smtpd={"workers": 2}, delivery={"workers": 0},
                            api={"enabled": False})
    master = FakeMaster(old_config, reload_config=lambda: new_config)
    master.spawn_children()
    master.serve()
    old = set(master.children)
    master.reload()
    assert master.bound == list(new_config.listeners)
    new = set(master.children) - old
    assert {master.children[pid].kind for pid in new} == {"smtpd", "pickup", "showq"}
    assert len(master.of_kind("smtpd", generation=1)) == 2
    master.stop_old_generation()
    assert master.sent == []                     # the new smtpd children do not serve yet
    master.serve(new)
    master.stop_old_generation()
    assert sorted(master.sent) == sorted((pid, signal.SIGTERM) for pid in old)
    for pid in old:
        master.end(pid, exited(0))
    master.spawn_children()
    assert master.counts() == {"smtpd": 2, "pickup": 1, "showq": 1}


def test_a_refused_reload_keeps_the_running_children():
    from elemta.config import ConfigError

    def broken():
        raise ConfigError.about_file("elemta.yaml", "smtpd.workers: not a number", line=3)

    master = FakeMaster(configured(smtpd={"workers": 1}), reload_config=broken)
    master.spawn_children()
    running = dict(master.children)
    master.reload()
    master.spawn_children()
    assert master.children == running and master.generation == 0


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.kind)
def test_every_entry_point_of_the_table_exists(service):
    assert callable(service.entry_point())


# ---- a stop sent to the whole process group ----------------------------------------------

def test_children_ended_by_a_group_stop_are_stopping_not_crashed(caplog):
    """Issue 21 req 4: Ctrl-C or `kill -- -PGID` reaches the children too, and they may
    be reaped before the master's loop has handled its own copy of the signal (it is
    queued, not handled yet). They are then stopping: no warning, no replacement."""
    master = FakeMaster(configured(delivery={"workers": 1}))
    master.spawn_children()
    master.serve()
    before = set(master.children)
    master._on_signal(signal.SIGTERM, None)      # queued by the handler, not yet handled
    with caplog.at_level(logging.INFO, logger="elemta.master"):
        for pid in list(before):
            master.end(pid, exited(0))
        master.spawn_children()
    assert master.children == {}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "starting another" not in caplog.text
    assert master.handle_term() == 0            # the loop then handles it: a stop


def test_nothing_is_forked_once_a_stop_has_begun():
    master = FakeMaster(configured(delivery={"workers": 1}))
    master.spawn_children()
    master.serve()
    master.ended = [(pid, exited(0)) for pid in master.children]   # they obey at once
    assert master.stop(signal.SIGTERM) == 0
    master.spawn_children()
    assert master.children == {}


def test_a_second_ctrl_c_while_stopping_makes_it_a_fast_stop():
    """The first Ctrl-C is the orderly stop (SIGTERM, stop_grace); one more while the
    children finish their sessions cuts them (SIGQUIT), as an impatient admin expects."""
    class Obedient(FakeMaster):
        def _kill(self, pid, signum):
            super()._kill(pid, signum)
            if signum == signal.SIGQUIT:
                self.ended.append((pid, exited(0)))
    master = Obedient(configured(delivery={"workers": 1}))
    master.spawn_children()
    master.serve()
    pids = set(master.children)
    master._on_signal(signal.SIGINT, None)          # the second Ctrl-C, not yet handled
    assert master.stop(signal.SIGTERM) == 0
    assert {(pid, signal.SIGTERM) for pid in pids} <= set(master.sent)
    assert {(pid, signal.SIGQUIT) for pid in pids} <= set(master.sent)
    assert master.children == {}
