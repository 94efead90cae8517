"""Native CPU kernels for the decode step, built on first use with torch's extension tooling.

`cpu_ops()` returns the compiled module, or None where it cannot be used (no compiler, a CPU
without AVX2/FMA, not x86-64, or `PDSERVE_CPU_KERNELS=0`); callers then take the plain torch
path, which computes the same thing more slowly. The build (~5 min on 2 cores) is cached under
`$PDSERVE_KERNEL_CACHE` (default `~/.cache/pdserve/kernels`) and redone when the source changes;
`python -m engine.kernels` builds it ahead of time (the Makefile does, at install). A new build
removes all but the three most recently used ones.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("gemv.cpp", "gemv_int4.cpp", "gemv_int8.cpp", "gemm_amx.cpp", "attention.cpp", "attention_prefill.cpp", "elementwise.cpp", "layer.cpp", "logits.cpp", "bindings.cpp")
_NAME = "pdserve_cpu_kernels"
_BUILT_MARKER = "BUILT"  # written after a successful build; its folder is then only loaded
_KEEP_BUILDS = 3  # finished builds kept in the cache (the one in use counts); older ones go
_STALE_UNFINISHED_S = 24 * 3600.0  # a folder without the marker this old is a build that died


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("PDSERVE_KERNEL_CACHE") or Path.home() / ".cache" / "pdserve" / "kernels")


def _unusable_reason() -> str | None:
    if os.environ.get("PDSERVE_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by PDSERVE_CPU_KERNELS"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no kernels for {platform.machine()}"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2/FMA (torch reports {cap})"
    return None


def build() -> ModuleType:
    """Compile (or load the cached build of) the kernels; raises on failure."""
    from torch.utils import cpp_extension

    # Keyed by the sources (header included) and torch: any change builds afresh, in its own folder.
    digest = hashlib.sha256(torch.__version__.encode())
    for f in sorted(_CSRC.iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    build_dir = kernel_cache_dir() / digest.hexdigest()[:16]
    build_dir.mkdir(parents=True, exist_ok=True)
    built, library = build_dir / _BUILT_MARKER, build_dir / f"{_NAME}.so"
    if built.is_file() and library.is_file():
        # A finished build of these sources: load it as it is. Handing it to cpp_extension
        # again would rewrite build.ninja, and the compile command it writes depends on the
        # calling process's environment (seen: Ray job processes), so two kinds of process
        # sharing the cache rebuilt everything (~2 min) each time the other kind had built.
        with contextlib.suppress(OSError):
            built.touch()  # recently used: pruning keeps it
        return _import_library(library)
    module = cpp_extension.load(
        name=_NAME,
        sources=[str(_CSRC / f) for f in _SOURCES],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fno-math-errno", "-fopenmp"],
        # at::parallel_for is inline OpenMP: without -fopenmp it runs serially. The soname
        # libgomp.so.1 resolves to the copy torch already loaded, so both share one pool.
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )
    built.write_text(f"{torch.__version__}\n")
    prune_builds(kernel_cache_dir(), keep=_KEEP_BUILDS, current=build_dir)
    return module


def prune_builds(cache: Path, keep: int, current: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove all but the `keep` most recently used finished builds (each source change leaves a
    ~5 MB folder behind), never `current`, and unfinished folders only once they are a day old
    (another process may be building there now). Returns what it removed; errors are ignored, as
    a process still holding an old library keeps its mapping after the unlink."""
    import shutil
    import time

    now = time.time() if now is None else now
    finished: list[tuple[float, Path]] = []
    removed: list[Path] = []
    for folder in cache.iterdir() if cache.is_dir() else ():
        if not folder.is_dir() or folder == current:
            continue
        marker = folder / _BUILT_MARKER
        try:
            if marker.is_file():
                finished.append((marker.stat().st_mtime, folder))
            elif now - folder.stat().st_mtime > _STALE_UNFINISHED_S:
                removed.append(folder)
        except OSError:
            continue
    finished.sort(reverse=True)
    removed += [folder for _, folder in finished[max(0, keep - (current is not None)):]]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    if removed:
        logger.info("removed %d old kernel build(s) from %s", len(removed), cache)
    return removed


def _import_library(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_disabled = False


def cpu_ops() -> ModuleType | None:
    """The kernel module, or None when it cannot be used here (or is switched off)."""
    return None if _disabled else _load()


@contextlib.contextmanager
def kernels_disabled() -> Iterator[None]:
    """Run the plain torch path inside the block (for comparisons in tests and benchmarks)."""
    global _disabled
    old, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = old


@functools.cache
def _load() -> ModuleType | None:
    """Build or load once; None (with one log line saying why) when the kernels cannot be used."""
    reason = _unusable_reason()
    if reason is None:
        try:
            mod = build()
            logger.info("CPU kernels loaded (%s)", mod.isa())
            return mod
        except Exception as exc:  # a missing compiler or ninja, a failed build
            reason = f"build failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); is g++ installed?"
    logger.warning("pdserve CPU kernels not used: %s; falling back to plain torch ops (slower decode)", reason)
    return None
