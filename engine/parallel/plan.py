"""A forward's inputs (token ids, positions, attention metadata) as plain JSON-able data.

Rank 0 sends one of these to the other ranks before every forward, so they run exactly the
batch rank 0's scheduler chose (plain ints: nothing is pickled). A vision model's step adds its
multimodal inputs: the rows, 3D positions and vision-expert rows as ints here, and the image
embeddings (rank 0 runs the encoder) broadcast as a tensor right after the command.
"""
from __future__ import annotations

from typing import Any

import torch

from engine.layers.attention import AttentionMetadata, PrefillSegment
from engine.multimodal.items import StepMultiModal


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


def encode_multimodal(mm: StepMultiModal) -> dict[str, Any]:
    """The ints of a step's multimodal inputs; the embeddings' shape and dtype (they follow as a
    broadcast)."""
    e = mm.embeds
    return {
        "embed_rows": _list(mm.embed_rows),
        "embeds": None if e is None else [list(e.shape), str(e.dtype).removeprefix("torch.")],
        "rope": _list(mm.rope_positions),
        "vision_rows": _list(mm.vision_rows),
    }


def decode_multimodal(data: dict[str, Any], device: torch.device,
                      receive: Any) -> StepMultiModal:
    """The StepMultiModal of `encode_multimodal`'s data; `receive(empty)` fills the embeddings."""
    def t(x: Any, dtype: torch.dtype = torch.long) -> torch.Tensor | None:
        return None if x is None else torch.tensor(x, dtype=dtype, device=device)

    embeds = None
    if data["embeds"] is not None:
        shape, dtype = data["embeds"]
        embeds = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        receive(embeds)
    return StepMultiModal(embed_rows=t(data["embed_rows"]), embeds=embeds, rope_positions=t(data["rope"]),
                          vision_rows=t(data["vision_rows"], torch.bool))
