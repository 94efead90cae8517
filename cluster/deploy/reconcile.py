"""Reconcile, pure: the named actors observed in the cluster's Ray namespace + the desired slots
-> which actors to keep, which to stop and which slots to start. No I/O; the launcher acts.

Every actor `pdserve launch` places is named `<slot>@<digest>`: the slot says what it is
(`prefill-0`, `decode-1`, `router-0`), the digest is a hash of everything that starts it (worker
spec, Ray options). A second launch of the same config therefore finds every slot filled with
the same digest and does nothing; a changed worker count adds or stops slots; a changed spec
(model, engine args, placement) replaces the slot's actor. Names that do not parse are not ours
and are left alone. Replacements stop the old actor before starting the new one (the new one
may need the old one's resources).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SEP = "@"


def digest(payload: Any) -> str:
    """Short stable hash of a JSON-able payload (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Slot:
    """One actor the config wants: its slot name and the digest of what starts it."""

    name: str
    digest: str

    def __post_init__(self) -> None:
        if not self.name or SEP in self.name or SEP in self.digest or not self.digest:
            raise ValueError(f"bad slot {self.name!r}/{self.digest!r}: non-empty, without {SEP!r}")

    @property
    def actor_name(self) -> str:
        return f"{self.name}{SEP}{self.digest}"


def parse_actor_name(name: str) -> Slot | None:
    """The slot an actor name carries, or None for names `pdserve launch` did not give."""
    slot, sep, dig = name.rpartition(SEP)
    if not sep or not slot or not dig:
        return None
    try:
        return Slot(slot, dig)
    except ValueError:
        return None


@dataclass(frozen=True)
class Plan:
    keep: tuple[str, ...]  # actor names that already match a desired slot
    stop: tuple[str, ...]  # actor names of surplus slots, changed specs and duplicates
    create: tuple[Slot, ...]  # slots with no matching actor, in the config's order
    foreign: tuple[str, ...] = ()  # names in the namespace that are not ours (left alone)

    @property
    def changes(self) -> bool:
        return bool(self.stop or self.create)

    def summary(self) -> str:
        return f"kept {len(self.keep)}, stopping {len(self.stop)}, starting {len(self.create)}"


def plan(observed: Iterable[str], desired: Sequence[Slot]) -> Plan:
    """What to do so that exactly one actor runs per desired slot, with the desired digest."""
    want = {s.name: s for s in desired}
    if len(want) != len(desired):
        raise ValueError("desired slots must have distinct names")
    keep: dict[str, str] = {}  # slot name -> the actor kept for it
    stop: list[str] = []
    foreign: list[str] = []
    for name in sorted(set(observed)):
        slot = parse_actor_name(name)
        if slot is None:
            foreign.append(name)
        elif slot.name in want and want[slot.name].digest == slot.digest and slot.name not in keep:
            keep[slot.name] = name
        else:
            stop.append(name)
    create = tuple(s for s in desired if s.name not in keep)
    return Plan(keep=tuple(keep[s.name] for s in desired if s.name in keep), stop=tuple(stop), create=create,
                foreign=tuple(foreign))
