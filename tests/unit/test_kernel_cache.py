"""A finished kernel build is loaded as it is, never handed to the extension tooling again (which
would rewrite build.ninja with a command that depends on the calling process's environment and
rebuild for minutes); a folder without the BUILT marker is built; old builds are pruned."""
from __future__ import annotations

import os
import shutil

import pytest

import engine.kernels as kernels


def test_finished_build_is_loaded_without_the_build_tooling(tmp_path, monkeypatch):
    if kernels.cpu_ops() is None:
        pytest.skip("the CPU kernels are not usable on this host (the torch path is tested elsewhere)")
    real = kernels.kernel_cache_dir()
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE", str(tmp_path))
    calls = []
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw["build_directory"]) or kernels.cpu_ops())
    kernels.build()  # no marker in the new cache: goes to the tooling, then marks the folder built
    (folder,) = [p for p in tmp_path.iterdir()]
    assert calls == [str(folder)] and (folder / "BUILT").is_file()
    # Put the real library there: from now on it is imported directly.
    src = next(p for p in real.iterdir() if (p / "BUILT").is_file() and p.name == folder.name)
    shutil.copy(src / "pdserve_cpu_kernels.so", folder / "pdserve_cpu_kernels.so")
    module = kernels.build()
    assert calls == [str(folder)] and module.isa() == kernels.cpu_ops().isa()


def test_kernels_build_where_they_can():
    """Where nothing rules the kernels out (x86-64 with AVX2, a C++ compiler, not disabled), they
    must load: the fallback to torch is for machines that cannot build them, and it would
    otherwise hide a compile error in CI behind the kernel tests' skips."""
    from engine.kernels import _unusable_reason, cpu_ops

    if _unusable_reason() is not None or (shutil.which("c++") is None and shutil.which("g++") is None):
        pytest.skip(f"kernels ruled out here: {_unusable_reason() or 'no C++ compiler'}")
    assert cpu_ops() is not None, "the CPU kernels failed to build (see the pdserve CPU kernels log line)"


def test_old_builds_are_pruned_and_the_current_and_recent_ones_kept(tmp_path):
    now = 1_000_000.0

    def folder(name: str, age_s: float, finished: bool = True):
        path = tmp_path / name
        path.mkdir()
        (path / "pdserve_cpu_kernels.so").write_bytes(b"x")
        if finished:
            (path / kernels._BUILT_MARKER).write_text("2\n")
        stamp = path / kernels._BUILT_MARKER if finished else path
        os.utime(stamp, (now - age_s, now - age_s))
        return path

    current = folder("current", 5000)  # the one being loaded: kept however old its marker
    recent = [folder(f"recent{i}", 10 + i) for i in range(2)]
    old = [folder(f"old{i}", 3600 * (i + 1)) for i in range(3)]
    building = folder("building", 60, finished=False)  # another process's build in progress
    dead = folder("dead", 3 * 24 * 3600, finished=False)
    removed = kernels.prune_builds(tmp_path, keep=3, current=current, now=now)
    assert sorted(removed) == sorted(old + [dead])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [current, *recent, building])
    assert kernels.prune_builds(tmp_path, keep=3, current=current, now=now) == []
    assert kernels.prune_builds(tmp_path / "absent", keep=3) == []


@pytest.mark.parametrize("require,code", [(False, 0), (True, 1)])
def test_build_command_fails_only_when_asked_to_require_the_kernels(require, code):
    """`python -m engine.kernels` (the Makefile's step) tolerates a host where the kernels cannot
    be used; with --require (the Dockerfile's step) that is an error, so no image ships without
    them. The kernels are made unusable here with the switch a user has."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PDSERVE_CPU_KERNELS": "0"}
    cmd = [sys.executable, "-m", "engine.kernels"] + (["--require"] if require else [])
    run = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True)
    assert run.returncode == code, run.stderr
    assert "not available" in run.stdout and "disabled by PDSERVE_CPU_KERNELS" in run.stderr + run.stdout
