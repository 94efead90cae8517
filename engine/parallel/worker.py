"""`python -m engine.parallel.worker '<json>'`: one non-zero rank of an expert-parallel group.

The JSON names the model and cache settings (the same as rank 0's), the rank, the group size,
the store's and rank 0's command ports and the collective timeout. Commands then arrive on the
command connection, one JSON line each. `serve_rank` is the same loop for a Ray actor rank.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import torch


def serve_rank(cfg: dict[str, Any]) -> int:
    """Join the group and follow rank 0 until it says stop or goes away."""
    torch.set_num_threads(1)
    from engine.parallel.group import join_group
    from engine.parallel.runner import run_follower
    from engine.parallel.settings import config_from_json

    comm, store, read_command = join_group(cfg)
    run_follower(config_from_json(cfg), comm, int(cfg.get("num_redundant_experts", 0)), read_command,
                 cfg.get("dispatch", "replicated"))
    del store
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s ep-worker %(levelname)s %(message)s")
    return serve_rank(json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
