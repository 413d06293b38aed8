"""The compiled metric values (server._metric_values) against prometheus_client's own, in real processes.

Each test runs in a fresh interpreter: the library picks its value class at import, from
PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, mp_dir: Path | None) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if mp_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(mp_dir)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# Metrics moved from 4 threads at once, then a fork whose child moves them again: every
# change counted, the child's in its own file, gauges by their multiprocess mode.
WORKLOAD = """
import os, sys, threading
from server import _metric_values
kind = _metric_values.install().__name__
from prometheus_client import Counter, Gauge, Histogram, CollectorRegistry, generate_latest, values
c = Counter("t_calls", "c", ["k"])
h = Histogram("t_seconds", "h", buckets=(0.001, 0.007, 0.1))
g = Gauge("t_in_flight", "g", multiprocess_mode="livesum")
s = Gauge("t_set", "s", multiprocess_mode="max")

def work(i):
    for j in range(20000):
        c.labels("a").inc()
        c.labels("b").inc(0.5)
        h.observe((j % 3) * 0.005)
        g.inc()
        g.dec()
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
s.set(7.5)
g.set(3)
pid = os.fork()
if pid == 0:
    c.labels("a").inc(10)
    s.set(2.0)
    os._exit(0)
os.waitpid(pid, 0)
print(kind, c.labels("a")._value.get(), c.labels("b")._value.get(), h._sum.get())
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    from prometheus_client import multiprocess
    r = CollectorRegistry()
    multiprocess.MultiProcessCollector(r)
    print(generate_latest(r).decode())
else:
    print(generate_latest().decode())
"""


def _series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_multiprocess_values_count_every_change_from_threads_and_a_forked_child(tmp_path):
    text = _run(WORKLOAD, tmp_path)
    first, rest = text.split("\n", 1)
    assert first.split()[:3] == ["MmapedValue", "80000.0", "40000.0"]
    got = _series(rest)
    # The parent's 80 000 and the child's 10, each in its own process's file, summed.
    assert got['t_calls_total{k="a"}'] == 80010.0
    assert got['t_calls_total{k="b"}'] == 40000.0
    assert got["t_seconds_count"] == 80000.0
    assert got['t_seconds_bucket{le="0.001"}'] == 26668.0  # j % 3 == 0: 0 s
    assert got['t_seconds_bucket{le="0.007"}'] == 53336.0  # and 0.005 s
    assert got['t_seconds_bucket{le="0.1"}'] == 80000.0
    assert abs(got["t_seconds_sum"] - 4 * 0.005 * (6667 + 2 * 6666)) < 1e-6
    assert got["t_in_flight"] == 3.0
    assert got["t_set"] == 7.5  # max over the parent's 7.5 and the child's 2.0
    assert len(list(tmp_path.glob("counter_*.db"))) == 2  # the parent's and the child's


def test_one_process_values_match_the_librarys(tmp_path):
    text = _run(WORKLOAD, None)
    first, rest = text.split("\n", 1)
    assert first.split()[:3] == ["LocalValue", "80000.0", "40000.0"]
    got = _series(rest)
    assert got['t_calls_total{k="a"}'] == 80000.0  # the child's change stayed in the child
    assert got["t_seconds_count"] == 80000.0
    assert got["t_in_flight"] == 3.0 and got["t_set"] == 7.5


def test_a_multiprocess_value_sees_what_the_file_already_held(tmp_path):
    code = """
    import os
    from server import _metric_values
    _metric_values.install()
    from prometheus_client import Counter
    c = Counter("t_kept", "c")
    c.inc(4)
    print(os.getpid())
    """
    _run(code, tmp_path)
    # The library's own value class reads the same file back as written.
    check = """
    import glob, os
    from prometheus_client.mmap_dict import MmapedDict
    (path,) = glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "counter_*.db"))
    print([v for k, v, ts in MmapedDict(path).read_all_values()])
    """
    assert _run(check, tmp_path).strip() == "[4.0]"
