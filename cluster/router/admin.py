"""The admin API on the router: list workers, read one, switch a worker's role.

    GET  /admin/workers                 -> {"object": "list", "data": [worker, ...]}
    GET  /admin/workers/{id}            -> worker
    POST /admin/workers/{id}/role       -> 202 (switch started) or 200 (already that role), worker
    GET  /admin/planner                 -> the planner's state (when it runs in this router)

A worker object comes from the registry (address, load) and, when the worker answers, from its
own Health (role, epoch, phase, history): the worker is the only owner of its role and epoch. A
switch is asked of the worker (SetRole) and runs there; poll the worker until `phase` is `ready`
again with the new role and a higher epoch, or `failed` (with the reason). The admin key is
checked in the middleware (user keys do not open these paths; with no admin key they are off).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import grpc
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from cluster.errors import ConflictError, InvalidRequestError, NoWorkerError, NotFoundError, PdserveError, WorkerError
from cluster.router.pool import WorkerConn, WorkerPool
from pdserve.v1 import worker_pb2

logger = logging.getLogger(__name__)

ROLE_NAME = {worker_pb2.ROLE_PREFILL: "prefill", worker_pb2.ROLE_DECODE: "decode", worker_pb2.ROLE_MIXED: "mixed"}
ROLE_PB = {v: k for k, v in ROLE_NAME.items()}
HEALTH_TIMEOUT_S = 2.0


class SetRoleBody(BaseModel):
    """POST /admin/workers/{id}/role."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["prefill", "decode", "mixed"]
    expected_epoch: int | None = Field(None, ge=1, description="refuse (409) unless the worker is at this epoch")
    drain_timeout_s: float | None = Field(None, gt=0, description="None = the worker's default")
    migrate: bool = Field(False, description="hand running decode sequences to other workers instead of "
                                             "waiting for them (they continue there with their KV, pulled "
                                             "over the transport, or recomputed if that fails: counted)")


def _error_for(exc: grpc.aio.AioRpcError, worker_id: str) -> PdserveError:
    code, detail = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED):
        return ConflictError(detail, code="stale_epoch" if code == grpc.StatusCode.FAILED_PRECONDITION
                             else "switch_in_progress")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(detail)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return NoWorkerError(f"worker {worker_id} is unavailable: {detail}", code="worker_unavailable")
    return WorkerError(f"worker {worker_id}: {code.name}: {detail}")


def worker_object(conn: WorkerConn, health: worker_pb2.HealthResponse | None) -> dict[str, Any]:
    info, load = conn.info, conn.info.load
    used = 1.0 - load.num_free_blocks / load.num_blocks if load.num_blocks else 0.0
    obj: dict[str, Any] = {
        "id": info.worker_id, "object": "worker", "address": info.address,
        "role": info.role, "epoch": info.epoch, "phase": info.phase, "ready": info.ready,
        "expert_parallel_size": info.expert_parallel_size, "model": info.model,
        "load": {"running": load.num_running, "waiting": load.num_waiting,
                 "queued_prefill_tokens": load.queued_prefill_tokens, "kv_usage": round(used, 4)},
        "heartbeat_ts": info.heartbeat_ts, "reachable": health is not None,
    }
    if health is not None:  # the worker's own word wins over a heartbeat that may be a second old
        obj.update(role=ROLE_NAME.get(health.role, info.role), epoch=health.epoch, phase=health.phase or info.phase,
                   ready=health.ready, phase_since=health.phase_since_unix,
                   target_role=ROLE_NAME.get(health.target_role), reason=health.reason, message=health.message,
                   role_switches_total=health.role_switches_total,
                   role_rollbacks_total=health.role_rollbacks_total,
                   history=[{"phase": e.phase, "ts": e.ts_unix, "role": ROLE_NAME.get(e.role), "epoch": e.epoch,
                             "target_role": ROLE_NAME.get(e.target_role), "note": e.note} for e in health.history])
    return obj


class ClusterAdmin:
    """Admin verbs over the router's worker pool (registry view + the workers' own RPCs)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def _health(self, conn: WorkerConn) -> worker_pb2.HealthResponse | None:
        try:
            return await conn.stub.Health(worker_pb2.HealthRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            logger.info("health of %s: %s", conn.info.worker_id, exc.code().name)
            return None

    async def _conn(self, worker_id: str) -> WorkerConn:
        await self.pool.refresh(force=True)
        conn = self.pool.conns.get(worker_id)
        if conn is None:
            raise NotFoundError(f"no worker {worker_id!r} in this cluster", code="worker_not_found")
        return conn

    async def workers(self) -> list[dict[str, Any]]:
        await self.pool.refresh(force=True)
        conns = sorted(self.pool.conns.values(), key=lambda c: c.info.worker_id)
        healths = await asyncio.gather(*(self._health(c) for c in conns))
        return [worker_object(c, h) for c, h in zip(conns, healths)]

    async def worker(self, worker_id: str) -> dict[str, Any]:
        conn = await self._conn(worker_id)
        return worker_object(conn, await self._health(conn))

    async def set_role(self, worker_id: str, body: SetRoleBody) -> tuple[bool, dict[str, Any]]:
        """(switch started, the worker as it is now)."""
        conn = await self._conn(worker_id)
        req = worker_pb2.SetRoleRequest(role=ROLE_PB[body.role], expected_epoch=body.expected_epoch or 0,
                                        drain_timeout_s=body.drain_timeout_s or 0.0, migrate=body.migrate)
        try:
            resp = await conn.stub.SetRole(req, timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            raise _error_for(exc, worker_id) from exc
        logger.info("admin: worker %s role -> %s: %s", worker_id, body.role, resp.message)
        return resp.changed, worker_object(conn, await self._health(conn))


def add_admin_routes(app: FastAPI, admin: ClusterAdmin) -> None:
    @app.get("/admin/workers")
    async def list_workers() -> dict[str, Any]:
        return {"object": "list", "data": await admin.workers()}

    @app.get("/admin/workers/{worker_id}")
    async def get_worker(worker_id: str) -> dict[str, Any]:
        return await admin.worker(worker_id)

    @app.post("/admin/workers/{worker_id}/role")
    async def set_role(worker_id: str, body: SetRoleBody) -> JSONResponse:
        started, obj = await admin.set_role(worker_id, body)
        return JSONResponse(obj, status_code=202 if started else 200)


def add_planner_route(app: FastAPI, planner: Any) -> None:
    """GET /admin/planner: leader or not, the last observation, recent decisions (PlannerRunner.status)."""

    @app.get("/admin/planner")
    async def planner_status() -> dict[str, Any]:
        return planner.status()
