"""The owner of a worker's role, epoch and admission phase: a pure state machine, no I/O.

    ready --begin--> fenced --> draining | migrating --> switching --> ready (new role, epoch + 1)
      fenced / draining / migrating / switching --rollback--> rolling_back --> ready (old role) | failed
      any --fail--> failed;  any --stop--> stopping

While a switch runs, the worker admits only the request kinds that both the old and the new role
serve (a mixed worker turning decode keeps taking Decode calls), at the epoch it had; everything
else is refused with a reason the router acts on (re-route, no client-visible error). Callers pass
`now` so that runs can be replayed in tests; the runtime performs the I/O each phase implies.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

Role = Literal["prefill", "decode", "mixed"]
Kind = Literal["prefill", "decode", "generate"]
Phase = Literal["ready", "fenced", "draining", "migrating", "switching", "rolling_back", "failed", "stopping"]

ROLES: tuple[Role, ...] = ("prefill", "decode", "mixed")
KINDS_OF: dict[str, frozenset[str]] = {
    "prefill": frozenset({"prefill"}),
    "decode": frozenset({"decode"}),
    "mixed": frozenset({"prefill", "decode", "generate"}),
}
SWITCHING_PHASES: frozenset[str] = frozenset({"fenced", "draining", "migrating", "switching", "rolling_back"})
_NEXT: dict[str, frozenset[str]] = {
    "ready": frozenset({"fenced"}),
    "fenced": frozenset({"draining", "migrating", "switching"}),
    "draining": frozenset({"migrating", "switching"}),
    "migrating": frozenset({"switching"}),
    "switching": frozenset({"ready"}),
    "rolling_back": frozenset({"ready", "failed"}),
}
HISTORY = 32
# Upper bounds (seconds) of the phase-duration histogram buckets; the last bucket is +Inf.
PHASE_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                    60.0, 120.0, 300.0)


@dataclass(frozen=True)
class PhaseEvent:
    """One phase the worker entered: when, in which role and epoch, and why (for rollbacks)."""

    phase: Phase
    ts: float
    role: Role
    epoch: int
    target_role: Role | None = None
    note: str = ""


class PhaseDurations:
    """Cumulative histograms of how long each switch phase lasted (fence -> ready as `total`),
    kept since the worker started: the history holds only the recent phases."""

    def __init__(self, buckets: tuple[float, ...] = PHASE_BUCKETS) -> None:
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}  # phase -> observations per bucket (not cumulative), +Inf last
        self.sums: dict[str, float] = {}

    def observe(self, phase: str, seconds: float) -> None:
        counts = self.counts.setdefault(phase, [0] * (len(self.buckets) + 1))
        counts[next((i for i, b in enumerate(self.buckets) if seconds <= b), len(self.buckets))] += 1
        self.sums[phase] = self.sums.get(phase, 0.0) + seconds

    def count(self, phase: str) -> int:
        return sum(self.counts.get(phase, ()))


@dataclass(frozen=True)
class Refusal:
    """Why a request is not admitted. `retry_elsewhere`: the router re-routes it silently."""

    code: Literal["unavailable", "failed_precondition"]
    message: str


class SwitchRefused(Exception):
    """A SetRole that cannot start: `code` is `stale_epoch`, `busy`, `invalid` or `unavailable`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RoleMachine:
    """Role, epoch and phase of one worker. The runtime asks; nobody else writes these."""

    def __init__(self, worker_id: str, role: Role, now: float, epoch: int = 1) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.worker_id = worker_id
        self._role: Role = role
        self._epoch = epoch
        self._phase: Phase = "ready"
        self._target: Role | None = None
        self._reason = ""
        self.switches_total = 0
        self.switch_counts: dict[tuple[Role, Role], int] = {}  # completed switches by (from, to)
        self.rollbacks_total = 0
        self.history: deque[PhaseEvent] = deque(maxlen=HISTORY)
        self.durations = PhaseDurations()
        self._switch_began: float | None = None
        self._record(now)

    # ----- reads -----
    @property
    def role(self) -> Role:
        return self._role

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def target_role(self) -> Role | None:
        return self._target

    @property
    def reason(self) -> str:
        """Why the worker failed, or why its last switch rolled back ('' if neither)."""
        return self._reason

    @property
    def phase_since(self) -> float:
        return self.history[-1].ts

    @property
    def switching(self) -> bool:
        return self._phase in SWITCHING_PHASES

    @property
    def ready(self) -> bool:
        """Routable: serving its role with no switch, failure or shutdown under way."""
        return self._phase == "ready"

    def admitted_kinds(self) -> frozenset[str]:
        if self._phase == "ready":
            return KINDS_OF[self._role]
        if self.switching and self._target is not None:
            return KINDS_OF[self._role] & KINDS_OF[self._target]
        return frozenset()

    def lost_kinds(self) -> frozenset[str]:
        """Kinds the old role serves and the target does not: the work a switch must drain."""
        if self._target is None:
            return frozenset()
        return KINDS_OF[self._role] - KINDS_OF[self._target]

    def admit(self, kind: Kind, epoch: int) -> Refusal | None:
        """None when a request of `kind` seen at `epoch` (0 = unchecked) may start now."""
        who = f"worker {self.worker_id}"
        if self._phase == "failed":
            return Refusal("unavailable", f"{who} is out of service: {self._reason}")
        if self._phase == "stopping":
            return Refusal("unavailable", f"{who} is shutting down")
        if epoch and epoch != self._epoch:
            return Refusal("failed_precondition", f"{who} is at epoch {self._epoch}, the request saw {epoch}")
        if kind not in self.admitted_kinds():
            if self.switching:
                return Refusal("failed_precondition",
                               f"{who} is switching from {self._role} to {self._target} ({self._phase}); "
                               f"it takes no new {kind} requests")
            needs = " or ".join(r for r in ROLES if kind in KINDS_OF[r])
            return Refusal("failed_precondition", f"{who} has role {self._role}; {kind} needs {needs}")
        return None

    # ----- the switch -----
    def begin(self, target: str, expected_epoch: int, now: float) -> bool:
        """Start a switch to `target` (fenced). False for a switch to the current role: a no-op.

        `expected_epoch` 0 skips the check. Raises SwitchRefused when the switch cannot start.
        """
        if target not in ROLES:
            raise SwitchRefused("invalid", f"role must be one of {', '.join(ROLES)}, got {target!r}")
        if self._phase in ("failed", "stopping"):
            raise SwitchRefused("unavailable", f"worker {self.worker_id} is {self._phase}: {self._reason or 'no switch'}")
        if self.switching:
            raise SwitchRefused("busy", f"worker {self.worker_id} is already switching from {self._role} to "
                                        f"{self._target} ({self._phase})")
        if expected_epoch and expected_epoch != self._epoch:
            raise SwitchRefused("stale_epoch", f"worker {self.worker_id} is at epoch {self._epoch}, the switch "
                                               f"expected {expected_epoch}")
        if target == self._role:
            return False
        self._target = target  # type: ignore[assignment]
        self._reason = ""
        self._enter("fenced", now)
        return True

    def enter(self, phase: Phase, now: float) -> None:
        """Move along the switch (draining, migrating, switching); ValueError off the map."""
        if phase == "ready" or phase not in _NEXT.get(self._phase, frozenset()):
            raise ValueError(f"no transition from {self._phase} to {phase}")
        self._enter(phase, now)

    def complete(self, now: float) -> int:
        """The flip: the target becomes the role, the epoch moves on; returns the new epoch."""
        if self._phase != "switching" or self._target is None:
            raise ValueError(f"cannot complete a switch from phase {self._phase}")
        pair = (self._role, self._target)
        self._role, self._target = self._target, None
        self._epoch += 1
        self.switches_total += 1
        self.switch_counts[pair] = self.switch_counts.get(pair, 0) + 1
        self._enter("ready", now)
        return self._epoch

    def rollback(self, reason: str, now: float) -> None:
        """A switch step failed: back out (the runtime undoes what it did, then calls `rolled_back`)."""
        if not self.switching or self._phase == "rolling_back":
            raise ValueError(f"nothing to roll back in phase {self._phase}")
        self._reason = reason
        self.rollbacks_total += 1
        self._enter("rolling_back", now, note=reason)

    def rolled_back(self, ok: bool, now: float, note: str = "") -> None:
        """Back in the old role (`ok`) or out of service; the epoch is unchanged either way."""
        if self._phase != "rolling_back":
            raise ValueError(f"not rolling back (phase {self._phase})")
        if note:
            self._reason = f"{self._reason}; {note}"
        self._target = None
        self._enter("ready" if ok else "failed", now, note=self._reason)

    # ----- ends -----
    def fail(self, reason: str, now: float) -> None:
        if self._phase in ("failed", "stopping"):
            return
        self._reason = reason
        self._target = None
        self._enter("failed", now, note=reason)

    def stop(self, now: float) -> None:
        if self._phase != "stopping":
            self._target = None
            self._enter("stopping", now)

    # ----- internals -----
    def _enter(self, phase: Phase, now: float, note: str = "") -> None:
        if self._phase in SWITCHING_PHASES:  # the switch phase that ends now
            self.durations.observe(self._phase, max(0.0, now - self.phase_since))
        if phase == "fenced":
            self._switch_began = now
        elif phase not in SWITCHING_PHASES and self._switch_began is not None:
            # fence -> ready: `total` for a completed switch, `total_rolled_back` for an undone one
            # (back in the old role, or failed); a switch cut short by a stop is not timed.
            kind = {"switching": "total", "rolling_back": "total_rolled_back"}.get(self._phase)
            if kind is not None:
                self.durations.observe(kind, max(0.0, now - self._switch_began))
            self._switch_began = None
        self._phase = phase
        self._record(now, note)

    def _record(self, now: float, note: str = "") -> None:
        self.history.append(PhaseEvent(self._phase, now, self._role, self._epoch, self._target, note))
