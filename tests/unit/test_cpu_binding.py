"""Core planning for workers on one host (pure), and pinning a real process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.config import ClusterConfig
from cluster.cpu_binding import parse_core_list, plan_cpu_sets


def test_auto_gives_each_worker_its_own_cores_in_start_order():
    assert plan_cpu_sets("auto", [1, 1], [0, 1]) == [(0,), (1,)]
    assert plan_cpu_sets("auto", [2, 1, 1], [4, 5, 6, 7]) == [(4, 5), (6,), (7,)]
    assert plan_cpu_sets("auto", [1], [0, 1]) == [(0,)]


def test_auto_does_not_stack_workers_when_cores_run_out():
    assert plan_cpu_sets("auto", [2, 1], [0, 1]) == [None, None]


def test_none_and_explicit_sets():
    assert plan_cpu_sets("none", [1, 1], [0, 1]) == [None, None]
    assert plan_cpu_sets("1|0", [1, 1], [0, 1]) == [(1,), (0,)]
    assert plan_cpu_sets("0-1|2,3", [2, 1], [0, 1, 2, 3]) == [(0, 1), (2, 3)]


@pytest.mark.parametrize("mode,match", [
    ("0|1", "2 core sets for 3 workers"),
    ("0|1|7", r"cores \[7\] are not available"),
    ("0|1|2-2", r"cores \[2\] are not available"),
])
def test_explicit_sets_that_cannot_work_are_refused(mode, match):
    with pytest.raises(ValueError, match=match):
        plan_cpu_sets(mode, [1, 1, 1], [0, 1])


def test_a_set_smaller_than_its_worker_is_refused():
    with pytest.raises(ValueError, match="smaller than the 2 CPUs"):
        plan_cpu_sets("0|1", [2, 1], [0, 1])


@pytest.mark.parametrize("bad", ["", "a", "1-0", "0,,1", "0,0", "-1"])
def test_bad_core_lists(bad):
    with pytest.raises(ValueError):
        parse_core_list(bad)


def test_config_validates_the_setting():
    assert ClusterConfig(cpu_bind="0|1").cpu_bind == "0|1"
    with pytest.raises(ValueError, match="bad core range"):
        ClusterConfig(cpu_bind="fast")


def test_pin_process_pins_threads_started_before_and_after():
    cores = sorted(os.sched_getaffinity(0))[:1]
    code = (
        "import os, threading, time\n"
        "from cluster.cpu_binding import pin_process\n"
        "ev = threading.Event(); seen = {}\n"
        "def before(): ev.wait(); seen['before'] = sorted(os.sched_getaffinity(0))\n"
        "t = threading.Thread(target=before); t.start()\n"
        f"pin_process({tuple(cores)!r})\n"
        "ev.set(); t.join()\n"
        "after = threading.Thread(target=lambda: seen.__setitem__('after', sorted(os.sched_getaffinity(0))))\n"
        "after.start(); after.join()\n"
        "import json; print(json.dumps([seen['before'], seen['after'], sorted(os.sched_getaffinity(0))]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert json.loads(out.stdout) == [cores, cores, cores]
