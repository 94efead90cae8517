"""The Redis key schema of a pdserve cluster: every key any component reads or writes is built here."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

PREFIX = "pdserve"
# Colons separate key parts, so a cluster name with one could alias another cluster's keys
# ("a:worker" + "workers" == "a" + "worker:workers").
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def key_digest(secret: str) -> str:
    """Short stable digest of a secret (an API key): sha256, first 16 hex. Safe for keys and logs."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Keys:
    """Keys of one cluster; different cluster names never share a key."""

    cluster: str = "default"

    def __post_init__(self) -> None:
        if not _CLUSTER_NAME.match(self.cluster):
            raise ValueError(f"cluster name must match {_CLUSTER_NAME.pattern}, got {self.cluster!r}")

    @property
    def base(self) -> str:
        return f"{PREFIX}:{self.cluster}"

    def worker(self, worker_id: str) -> str:
        """Hash of one worker's registration and load; expires unless heartbeated."""
        return f"{self.base}:worker:{worker_id}"

    def workers(self) -> str:
        """Set of registered worker ids (may hold ids whose hash already expired)."""
        return f"{self.base}:workers"

    def prefix(self, block_hash: int) -> str:
        """Set of worker ids that cached the block with this chain hash."""
        return f"{self.base}:prefix:{int(block_hash)}"

    def ratelimit(self, key_digest: str, window: int) -> str:
        """Request counter of one API key (by digest, never in clear) in one fixed window."""
        return f"{self.base}:ratelimit:{key_digest}:{int(window)}"

    def planner(self) -> str:
        """Leader lease of the planner."""
        return f"{self.base}:planner"

    def launcher(self) -> str:
        """Hash of the `pdserve launch` that leads the cluster's actors: owner, config digest, ts."""
        return f"{self.base}:launcher"

    def events(self) -> str:
        """Stream of cluster events (role changes)."""
        return f"{self.base}:events"
