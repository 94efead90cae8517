"""The planner's core: an observation of the cluster in, role switches out. Pure: no I/O, no clock.

`PlannerCore.decide(obs)`, once per observation:
1. Any worker mid-switch (fenced ... rolling_back) -> no decision, and the hysteresis restarts:
   loads are in flux until the switch ends, and the next decision must see the new split.
2. Pressure per side, from the serving workers (phase ready, reachable):
   prefill: queued prefill tokens per prefill worker over `prefill_queue_tokens_high`, or TTFT
            p90 over its SLO while ITL has slack (p90 <= slack x its SLO, or no ITL SLO/data);
   decode:  sequences (running + waiting) per decode worker over `decode_seqs_high`, mean KV
            usage over `kv_usage_high`, or ITL p90 over its SLO while TTFT has slack.
   Only one side under pressure is acted on: when both are, moving a worker moves the pain.
3. Hysteresis: that side must have been the only one under pressure for `hysteresis`
   consecutive observations.
4. Budget, from the workers' observed switch history (manual switches count too): no switch
   began within `global_cooldown_s`, fewer than `max_switches_per_window` began in `window_s`.
5. The donor side must keep its minimum and must not be pushed over its own threshold: its
   projected load (the same total over one worker fewer) stays under margin x threshold.
6. The least-loaded donor not in its own `cooldown_s` is switched: a decode worker (fewest
   sequences, then KV usage) for prefill pressure, a prefill worker (fewest queued tokens, then
   sequences) for decode pressure. Mixed workers only with `switch_mixed`, never to mixed.

Mixed workers count on both sides (they serve both phases), for the minimums and the loads.
An expert-parallel group is one worker entry: it is switched, counted and cooled down as a unit.
Time is the observation's `now` and the workers' switch start times, in the same clock (unix
seconds: the workers stamp their phase history with their wall clock). The only state kept
between calls is the hysteresis streaks; the last decision is never remembered: whether it took
effect is read from the next observation (phase, epoch, history), so a refused or lost switch
is simply decided again once the pressure persists.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.worker.roles import SWITCHING_PHASES, Role

SIDES: tuple[str, ...] = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerObs:
    """One worker as observed: role, epoch and phase (its own Health), load (its heartbeat)."""

    id: str
    role: Role
    epoch: int
    phase: str = "ready"
    expert_parallel_size: int = 1
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    kv_usage: float = 0.0
    switch_starts: tuple[float, ...] = ()  # when its recent switches began (fenced), rolled back ones too
    ready: bool = True
    reachable: bool = True

    @property
    def last_switch(self) -> float | None:
        return max(self.switch_starts) if self.switch_starts else None

    @property
    def switching(self) -> bool:
        return self.phase in SWITCHING_PHASES

    @property
    def serving(self) -> bool:
        return self.phase == "ready" and self.ready and self.reachable

    @property
    def seqs(self) -> int:
        return self.running + self.waiting

    def serves(self, side: str) -> bool:
        return self.role == side or self.role == "mixed"


@dataclass(frozen=True)
class Observation:
    """The cluster at `now`: every registered worker and the router's latency percentiles (ms)."""

    now: float
    workers: tuple[WorkerObs, ...]
    ttft_p90_ms: float | None = None
    itl_p90_ms: float | None = None


def observation_from_dict(data: dict) -> Observation:
    """The inverse of dataclasses.asdict(observation): for traces recorded as JSON."""
    workers = tuple(WorkerObs(**{**w, "switch_starts": tuple(w.get("switch_starts", ()))}) for w in data["workers"])
    return Observation(now=data["now"], workers=workers, ttft_p90_ms=data.get("ttft_p90_ms"),
                       itl_p90_ms=data.get("itl_p90_ms"))


@dataclass(frozen=True)
class PlannerConfig:
    """Targets, thresholds and brakes of the planner (see the module docstring for their use)."""

    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    min_prefill: int = 1
    min_decode: int = 1
    hysteresis: int = 3
    cooldown_s: float = 60.0
    global_cooldown_s: float = 20.0
    max_switches_per_window: int = 4
    window_s: float = 600.0
    prefill_queue_tokens_high: float = 4096
    decode_seqs_high: float = 32
    kv_usage_high: float = 0.85
    slack: float = 0.8
    margin: float = 0.8
    switch_mixed: bool = False

    def __post_init__(self) -> None:
        for name in ("slo_ttft_ms", "slo_itl_ms"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 (or None), got {v}")
        if self.min_prefill < 0 or self.min_decode < 0:
            raise ValueError("min_prefill and min_decode must be >= 0")
        if self.hysteresis < 1 or self.max_switches_per_window < 1:
            raise ValueError("hysteresis and max_switches_per_window must be >= 1")
        if self.cooldown_s < 0 or self.global_cooldown_s < 0 or self.window_s <= 0:
            raise ValueError("cooldowns must be >= 0 and window_s > 0")
        if self.prefill_queue_tokens_high <= 0 or self.decode_seqs_high <= 0:
            raise ValueError("prefill_queue_tokens_high and decode_seqs_high must be > 0")
        for name in ("kv_usage_high", "slack", "margin"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Decision:
    """Switch `worker_id` from `from_role` to `to_role`, refused unless it is still at `expected_epoch`."""

    worker_id: str
    from_role: Role
    to_role: Role
    expected_epoch: int
    reason: str


@dataclass(frozen=True)
class Pressure:
    """Why each side is under pressure (empty: it is not)."""

    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()

    @property
    def side(self) -> str | None:
        """The one side to give a worker to, or None (neither, or both)."""
        if self.prefill and not self.decode:
            return "prefill"
        if self.decode and not self.prefill:
            return "decode"
        return None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _slack(p90: float | None, slo: float | None, slack: float) -> bool:
    return slo is None or p90 is None or p90 <= slack * slo


def pressure(obs: Observation, cfg: PlannerConfig) -> Pressure:
    """Step 2 of the module docstring, over the serving workers of `obs`."""
    serving = [w for w in obs.workers if w.serving]
    pre = [w for w in serving if w.serves("prefill")]
    dec = [w for w in serving if w.serves("decode")]
    p: list[str] = []
    d: list[str] = []
    queue = _mean([w.queued_prefill_tokens for w in pre])
    if pre and queue > cfg.prefill_queue_tokens_high:
        p.append(f"queued prefill tokens {queue:.0f}/worker > {cfg.prefill_queue_tokens_high:g}")
    ttft, itl = obs.ttft_p90_ms, obs.itl_p90_ms
    if cfg.slo_ttft_ms is not None and ttft is not None and ttft > cfg.slo_ttft_ms \
            and _slack(itl, cfg.slo_itl_ms, cfg.slack):
        p.append(f"TTFT p90 {ttft:.0f} ms > SLO {cfg.slo_ttft_ms:g} ms, ITL has slack")
    seqs = _mean([w.seqs for w in dec])
    if dec and seqs > cfg.decode_seqs_high:
        d.append(f"sequences {seqs:.1f}/decode worker > {cfg.decode_seqs_high:g}")
    kv = _mean([w.kv_usage for w in dec])
    if dec and kv > cfg.kv_usage_high:
        d.append(f"KV usage {kv:.2f} > {cfg.kv_usage_high:g}")
    if cfg.slo_itl_ms is not None and itl is not None and itl > cfg.slo_itl_ms \
            and _slack(ttft, cfg.slo_ttft_ms, cfg.slack):
        d.append(f"ITL p90 {itl:.0f} ms > SLO {cfg.slo_itl_ms:g} ms, TTFT has slack")
    return Pressure(tuple(p), tuple(d))


class PlannerCore:
    """`decide(obs) -> [Decision]` (at most one: one switch at a time). State: hysteresis streaks."""

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self._streak = {side: 0 for side in SIDES}
        self.note = ""  # why the last call decided nothing (diagnostics only; never read back)

    @property
    def streaks(self) -> dict[str, int]:
        return dict(self._streak)

    def reset(self) -> None:
        self._streak = {side: 0 for side in SIDES}

    def decide(self, obs: Observation) -> list[Decision]:
        cfg = self.config
        moving = [w.id for w in obs.workers if w.switching]
        if moving:
            self.reset()
            return self._none(f"worker(s) {', '.join(moving)} mid-switch")
        press = pressure(obs, cfg)
        side = press.side
        for s in SIDES:
            self._streak[s] = self._streak[s] + 1 if s == side else 0
        if side is None:
            both = press.prefill and press.decode
            return self._none("both sides under pressure" if both else "no pressure")
        if self._streak[side] < cfg.hysteresis:
            return self._none(f"{side} pressure {self._streak[side]}/{cfg.hysteresis}")
        blocked = self._budget(obs)
        if blocked:
            return self._none(blocked)
        donor_side = "decode" if side == "prefill" else "prefill"
        blocked = self._donor_blocked(obs, donor_side)
        if blocked:
            return self._none(blocked)
        donor = self._pick(obs, donor_side)
        if donor is None:
            return self._none(f"no {donor_side} worker may switch (cooldown or not eligible)")
        self.reset()
        self.note = ""
        why = "; ".join(press.prefill if side == "prefill" else press.decode)
        return [Decision(donor.id, donor.role, side, donor.epoch, f"{side} pressure: {why}")]  # type: ignore[arg-type]

    # ----- steps -----
    def _none(self, note: str) -> list[Decision]:
        self.note = note
        return []

    def _budget(self, obs: Observation) -> str:
        cfg = self.config
        starts = [t for w in obs.workers for t in w.switch_starts]
        if starts and obs.now - max(starts) < cfg.global_cooldown_s:
            return f"global cooldown: a switch began {obs.now - max(starts):.1f}s ago"
        recent = sum(1 for t in starts if obs.now - t < cfg.window_s)
        if recent >= cfg.max_switches_per_window:
            return f"{recent} switches in the last {cfg.window_s:g}s (cap {cfg.max_switches_per_window})"
        return ""

    def _donor_blocked(self, obs: Observation, donor_side: str) -> str:
        """The donor side keeps its minimum and stays under margin x its own threshold."""
        cfg = self.config
        donors = [w for w in obs.workers if w.serving and w.serves(donor_side)]
        left = len(donors) - 1
        minimum = cfg.min_decode if donor_side == "decode" else cfg.min_prefill
        if left < max(minimum, 1):  # a side with no worker left cannot take a projection either
            return f"{donor_side} at its minimum ({len(donors)} serving, min {minimum})"
        if donor_side == "decode":
            seqs = sum(w.seqs for w in donors) / left
            if seqs > cfg.margin * cfg.decode_seqs_high:
                return f"decode would be overloaded: {seqs:.1f} sequences/worker after the switch"
            kv = sum(w.kv_usage for w in donors) / left
            if kv > cfg.margin * cfg.kv_usage_high:
                return f"decode would be overloaded: KV usage {kv:.2f} after the switch"
        else:
            queue = sum(w.queued_prefill_tokens for w in donors) / left
            if queue > cfg.margin * cfg.prefill_queue_tokens_high:
                return f"prefill would be overloaded: {queue:.0f} queued tokens/worker after the switch"
        return ""

    def _pick(self, obs: Observation, donor_side: str) -> WorkerObs | None:
        cfg = self.config
        roles = {donor_side, "mixed"} if cfg.switch_mixed else {donor_side}
        eligible = [w for w in obs.workers if w.serving and w.role in roles
                    and (w.last_switch is None or obs.now - w.last_switch >= cfg.cooldown_s)]
        if not eligible:
            return None
        return min(eligible, key=_decode_donor if donor_side == "decode" else _prefill_donor)


# Pure-role workers before mixed ones; then the least to finish before the worker can leave; smaller
# expert-parallel groups (cheaper to move) and the id break ties, so replays are deterministic.
def _decode_donor(w: WorkerObs) -> tuple:
    return (w.role == "mixed", w.seqs, w.kv_usage, w.expert_parallel_size, w.id)


def _prefill_donor(w: WorkerObs) -> tuple:
    return (w.role == "mixed", w.queued_prefill_tokens, w.seqs, w.expert_parallel_size, w.id)
