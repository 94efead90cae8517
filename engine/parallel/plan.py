"""A forward's inputs (token ids, positions, attention metadata) as plain JSON-able data.

Rank 0 sends one of these to the other ranks before every forward, so they run exactly the
batch rank 0's scheduler chose (plain ints: nothing is pickled).
"""
from __future__ import annotations

from typing import Any

import torch

from engine.layers.attention import AttentionMetadata, PrefillSegment


def _list(t: torch.Tensor | None) -> Any:
    return None if t is None else t.tolist()


def encode(ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> dict[str, Any]:
    return {
        "ids": ids.tolist(),
        "pos": positions.tolist(),
        "slot_blocks": meta.slot_blocks.tolist(),
        "slot_offsets": meta.slot_offsets.tolist(),
        "decode_rows": _list(meta.decode_rows),
        "decode_table": _list(meta.decode_block_table),
        "decode_lens": _list(meta.decode_lens),
        "prefills": [[p.start, p.end, p.context_len, p.block_table.tolist()] for p in meta.prefills],
    }


def decode(plan: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    def t(x: Any) -> torch.Tensor | None:
        return None if x is None else torch.tensor(x, dtype=torch.long, device=device)

    pos = t(plan["pos"])
    meta = AttentionMetadata(
        slot_blocks=t(plan["slot_blocks"]),
        slot_offsets=t(plan["slot_offsets"]),
        decode_rows=t(plan["decode_rows"]),
        decode_block_table=t(plan["decode_table"]),
        prefills=tuple(PrefillSegment(a, b, c, t(tbl)) for a, b, c, tbl in plan["prefills"]),
        positions=pos,
        decode_lens=t(plan["decode_lens"]),
    )
    return t(plan["ids"]), pos, meta
