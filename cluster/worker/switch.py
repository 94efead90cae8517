"""RoleSwitcher: drives one worker's role switch through the phases of its RoleMachine.

fence (the registry says not ready; admission keeps only what both roles serve) -> drain the
requests of the kinds the new role drops, within a timeout -> write the new role at epoch + 1 to
the registry (the worker is the only writer of its own role) -> flip -> republish as ready. No
weight reload, no KV pool change: prefix-cached blocks and held leases survive. A failed step
rolls back: the worker re-registers with its old role and epoch and is ready again (or, if even
that fails, out of service), and the reason is kept for Health.

An expert-parallel group switches as a whole: its role lives on rank 0, the other ranks follow
rank 0's step plans whatever the role.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from cluster.worker.admission import Admission
from cluster.worker.roles import SwitchRefused

# Kinds whose requests stream tokens after admission: what a migrating switch hands away (a
# Prefill call ends at its first token, so it is simply waited for).
STREAMING_KINDS = frozenset({"decode", "generate"})

logger = logging.getLogger(__name__)

ROLLBACK_ATTEMPTS = 3


class RoleSwitcher:
    def __init__(self, admission: Admission, *, publish: Callable[[], Awaitable[None]],
                 write_role: Callable[[str, int], Awaitable[bool]], restore: Callable[[], Awaitable[None]],
                 hand_off: Callable[[str, str], Awaitable[bool]], default_drain_s: float) -> None:
        """`publish` heartbeats the current phase; `write_role(role, epoch)` records a flip in the
        registry (False when refused); `restore` re-registers the worker as it is now;
        `hand_off(request_id, reason)` ends a running request's stream here so that the router
        resumes it on another worker."""
        self.admission = admission
        self._publish = publish
        self._write_role = write_role
        self._restore = restore
        self._hand_off = hand_off
        self.default_drain_s = default_drain_s
        self.migrated_total = 0
        self._task: asyncio.Task | None = None

    @property
    def roles(self):
        return self.admission.roles

    async def request(self, target: str, expected_epoch: int, drain_timeout_s: float = 0.0,
                      migrate: bool = False, wait: bool = False) -> bool:
        """Start a switch (and with `wait`, see it end). False: `target` is the current role.

        Raises SwitchRefused when it cannot start (code stale_epoch, busy, invalid or unavailable).
        `migrate`: hand running decode/generate streams back to the router (which resumes them on
        other workers) instead of waiting for them."""
        m = self.roles
        if not m.begin(target, expected_epoch, time.time()):
            return False
        drain_s = drain_timeout_s if drain_timeout_s > 0 else self.default_drain_s
        logger.info("worker %s: switching %s -> %s (epoch %d, %s up to %.1fs)", m.worker_id, m.role, target,
                    m.epoch, "migrate, then drain" if migrate else "drain", drain_s)
        self._task = asyncio.create_task(self._run(drain_s, migrate))
        if wait:
            await asyncio.shield(self._task)
        return True

    async def wait(self) -> None:
        """Until the running switch (if any) has ended, either way."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self, drain_s: float, migrate: bool) -> None:
        m = self.roles
        old = m.role
        try:
            await self._publish()  # routers stop picking this worker before anything waits
            lost = m.lost_kinds()
            streams = self.admission.running(lost & STREAMING_KINDS) if migrate else []
            if streams:
                # The fence is published already (routers pick other workers): hand off at once, so
                # the migrating phase starts when the streams leave; then show the phase.
                m.enter("migrating", time.time())
                reason = f"worker {m.worker_id} is switching from {old} to {m.target_role}: the request moves"
                for rid in streams:
                    self.migrated_total += await self._hand_off(rid, reason)
                logger.info("worker %s: handed %d running request(s) to other workers", m.worker_id, len(streams))
                await self._publish()
            busy = self.admission.inflight(lost)
            if busy:
                if m.phase == "fenced":
                    m.enter("draining", time.time())
                    await self._publish()
                if not await self.admission.wait_idle(lost, drain_s):
                    left = self.admission.inflight(lost)
                    raise _StepFailed(f"drain timed out after {drain_s:g}s with {left} "
                                      f"{'/'.join(sorted(lost))} request(s) still running")
            m.enter("switching", time.time())
            target, epoch = m.target_role, m.epoch + 1
            assert target is not None
            if not await self._write_role(target, epoch):
                raise _StepFailed(f"the registry refused role {target} at epoch {epoch}")
            m.complete(time.time())
            logger.info("worker %s: now %s at epoch %d", m.worker_id, m.role, m.epoch)
        except asyncio.CancelledError:
            if m.switching:  # the worker is stopping: nothing to restore
                m.stop(time.time())
            raise
        except Exception as exc:  # noqa: BLE001 - every failed step rolls back, and says why
            reason = str(exc) if isinstance(exc, _StepFailed) else f"{type(exc).__name__}: {exc}"
            logger.warning("worker %s: switch %s -> %s failed (%s); rolling back", m.worker_id, old,
                           m.target_role, reason)
            m.rollback(reason, time.time())
            await self._roll_back()
        try:
            await self._publish()
        except Exception as exc:  # noqa: BLE001 - the next heartbeat publishes it
            logger.warning("worker %s: publishing phase %s: %s", m.worker_id, m.phase, exc)

    async def _roll_back(self) -> None:
        m = self.roles
        last: Exception | None = None
        for attempt in range(ROLLBACK_ATTEMPTS):
            try:
                await self._restore()
                m.rolled_back(True, time.time())
                return
            except Exception as exc:  # noqa: BLE001 - retried, then the worker goes out of service
                last = exc
                await asyncio.sleep(0.2 * (attempt + 1))
        m.rolled_back(False, time.time(), note=f"restoring the registry failed: {last}")


class _StepFailed(Exception):
    pass

