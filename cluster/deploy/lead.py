"""Which `pdserve launch` leads a cluster's actors, pure: the last one to change the config wins.

Each launch has an id and the digest of what it wants (its slots). The leader keeps a record in
Redis (`Keys.launcher`: owner, digest, heartbeat time) and refreshes it every pass. A new launch
takes the lead when there is no live leader (none, or its record is older than the TTL: its
driver died), when it wants something else (a changed config), or when it is itself a lasting
launch (a resubmitted job); a `--once` launch of the leader's own config reconciles without taking
over. A leader that finds another owner in the record has been superseded: it stops reconciling
and leaves the actors to the new leader (it stops nothing on exit).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchRecord:
    owner: str
    digest: str
    ts: float

    @classmethod
    def from_hash(cls, h: Mapping[str, str]) -> "LaunchRecord | None":
        """The record of a Redis hash (decoded); None for an empty or unreadable one."""
        try:
            return cls(h["owner"], h["digest"], float(h["ts"])) if h else None
        except (KeyError, ValueError):
            return None

    def to_hash(self) -> dict[str, str]:
        return {"owner": self.owner, "digest": self.digest, "ts": repr(self.ts)}


def takes_lead(record: LaunchRecord | None, me: str, digest: str, once: bool, now: float, ttl_s: float) -> bool:
    """Whether launch `me` (wanting `digest`) becomes the leader (see the module docstring)."""
    if record is None or record.owner in ("", me) or now - record.ts > ttl_s:
        return True
    return record.digest != digest or not once


def superseded(record: LaunchRecord | None, me: str) -> bool:
    """A leader whose record names another owner (or was removed by `--down`) has been replaced."""
    return record is None or record.owner != me
