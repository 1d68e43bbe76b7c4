"""Repeated benchmark runs, summarised: the median of each figure with its min and max.

    by_target = group(results)                  # {name: [Result, ...]} in first-seen order
    Spread.of([812.0, 790.5, 845.1])            # Spread(median=812.0, low=790.5, high=845.1)
    str(Spread.of([...]))                       # "812 (790-845)"

See also: tests/bench/bench_accept.py, tests/bench/bench_relay.py.
"""

import os
import statistics
import tempfile
from typing import Dict, Iterable, List, NamedTuple, Optional, TypeVar

T = TypeVar("T")


def run_count():
    # type: () -> int
    """How many times each target runs: BENCH_RUNS, 3 unless set."""
    return max(1, int(os.environ.get("BENCH_RUNS", "3")))


class Spread(NamedTuple):
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values):
        # type: (Iterable[float]) -> Spread
        values = list(values)
        return cls(statistics.median(values), min(values), max(values))

    def format(self, digits=0):
        return "%.*f (%.*f-%.*f)" % (digits, self.median, digits, self.low, digits, self.high)

    def __str__(self):
        return self.format()


def group(results):
    # type: (Iterable[T]) -> Dict[str, List[T]]
    """Results by their target's name (result.name), in the order targets first ran."""
    grouped = {}  # type: Dict[str, List[T]]
    for result in results:
        grouped.setdefault(result.name, []).append(result)  # type: ignore[attr-defined]
    return grouped


def first_missing(*paths):
    # type: (str) -> Optional[str]
    """"<path> is missing" for the first of these programs that is not there, else None:
    a benchmark's reason it cannot run."""
    return next((path + " is missing" for path in paths if not os.path.exists(path)), None)


def shared_scratch(prefix):
    # type: (str) -> str
    """A fresh temp dir that other users can traverse: the postfix user must reach a
    private Postfix's queues below it, and smtp-sink (run as nobody) its output."""
    scratch = tempfile.mkdtemp(prefix=prefix)
    os.chmod(scratch, 0o755)
    return scratch


def load_average():
    # type: () -> str
    """The machine's load now, to print beside the figures."""
    return "load average %.2f, %.2f, %.2f" % os.getloadavg()


def ratio(mine, theirs):
    # type: (float, float) -> str
    return "%.2f" % (mine / theirs) if theirs > 0 else "n/a"


def shortfalls(results):
    # type: (Iterable[T]) -> List[T]
    """The results whose target took fewer messages than were sent (result.accepted and
    result.sent), each printed: a benchmark that lost mail has no figures worth reading."""
    short = [r for r in results if r.accepted != r.sent]  # type: ignore[attr-defined]
    for result in short:
        print("%s accepted %d of %d" % (result.name, result.accepted,  # type: ignore
                                        result.sent))
    return short
