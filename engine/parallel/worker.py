"""`python -m engine.parallel.worker '<json>'`: one non-zero rank of an offline expert-parallel group.

The JSON names the model and cache settings (the same as rank 0's), the rank, the group size,
the store's port and the collective timeout. Commands then arrive on stdin, one JSON line each.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import torch


def _read_command() -> dict[str, Any] | None:
    line = sys.stdin.buffer.readline()
    return json.loads(line) if line else None  # EOF: rank 0 is gone


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s ep-worker %(levelname)s %(message)s")
    from engine.parallel.group import join_group
    from engine.parallel.runner import run_follower
    from engine.parallel.settings import config_from_json

    cfg = json.loads(argv[0])
    rank, size = int(cfg["rank"]), int(cfg["size"])
    comm, store = join_group(rank, size, int(cfg["port"]), float(cfg["timeout_s"]))
    run_follower(config_from_json(cfg), comm, int(cfg.get("num_redundant_experts", 0)), _read_command)
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
