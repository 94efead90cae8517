"""The 3D rotary positions of a prompt with images (transformers' `get_rope_index` for images, the
rule ERNIE-4.5-VL and Qwen2-VL / Qwen2.5-VL share).

Text tokens count up on all three axes. An image's tokens (one per merge x merge group of patches,
row-major) sit at (start, start + row, start + column), and the text after it resumes at
start + max(rows, columns). Decode continues at index + delta, delta = max position + 1 - length.
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.multimodal.items import MRopePositions, MultiModalItem


def image_mrope_positions(num_prompt_tokens: int, items: Sequence[MultiModalItem],
                          spatial_merge: int) -> MRopePositions:
    """[3, num_prompt_tokens] positions (temporal, height, width) and the decode delta."""
    pos = torch.empty(3, num_prompt_tokens, dtype=torch.long)
    cur = last = 0
    m = spatial_merge
    for item in sorted(items, key=lambda i: i.offset):
        if item.offset < last or item.end > num_prompt_tokens:
            raise ValueError(f"image span [{item.offset}, {item.end}) overlaps another or runs past the prompt")
        n = item.offset - last
        pos[:, last : item.offset] = torch.arange(n) + cur
        cur += n
        t, h, w = item.grid_thw
        gh, gw = h // m, w // m
        # An image is one temporal step (Qwen's two frames per patch are folded into the patch).
        if t != 1 or item.length != gh * gw:
            raise ValueError(f"image item of {item.length} tokens does not match its grid {item.grid_thw}")
        pos[0, item.offset : item.end] = cur
        pos[1, item.offset : item.end] = torch.arange(gh).repeat_interleave(gw) + cur
        pos[2, item.offset : item.end] = torch.arange(gw).repeat(gh) + cur
        cur += max(gh, gw)
        last = item.end
    pos[:, last:] = torch.arange(num_prompt_tokens - last) + cur
    return MRopePositions(pos, int(pos.max()) + 1 - num_prompt_tokens)
