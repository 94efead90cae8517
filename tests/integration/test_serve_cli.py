"""`pdserve serve` as a user runs it: one command serves the default model (1 prefill + 1 decode,
embedded Redis, local Ray); Ctrl-C stops everything and leaves no process behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _check_workers_have_their_own_cores(pids: set[int]) -> None:
    """--cpu-bind auto (the default): the prefill and the decode worker each run on a core of
    their own when this process may use two or more; otherwise neither is pinned."""
    from cluster.cpu_binding import parse_core_list

    def cmdline(p: int) -> str:
        try:
            return Path(f"/proc/{p}/cmdline").read_text()
        except OSError:
            return ""

    workers = [p for p in pids if "WorkerActor" in cmdline(p)]
    assert len(workers) == 2, [cmdline(p)[:80] for p in pids]
    allowed = []
    for p in workers:
        line = next(ln for ln in Path(f"/proc/{p}/status").read_text().splitlines() if ln.startswith("Cpus_allowed_list"))
        allowed.append(list(parse_core_list(line.split(":", 1)[1].strip())))
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        assert sorted(allowed) == [[cores[0]], [cores[1]]], allowed
    else:
        assert allowed == [cores, cores], allowed


def test_serve_answers_then_ctrl_c_leaves_nothing_behind():
    exe = Path(sys.executable).with_name("pdserve")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), "serve", "--port", "0", "--num-kv-blocks", "256", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"at (http://\S+/v1)", line)
            if m and not url:
                url.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(300) and url, "".join(lines[-30:])
        client = openai.OpenAI(base_url=url[0], api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=16).choices[0].message.content
        assert "Paris" in answer
        started = _descendants(proc.pid)
        assert started, "serve should have started Ray, Redis and worker processes"
        _check_workers_have_their_own_cores(started)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in started):
        time.sleep(0.5)
    left = [p for p in started if _alive(p)]
    assert not left, [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:120] for p in left]
