"""ModelRunner: owns the model weights on the device, the KV cache tensors, and one forward step.

It turns a scheduler step into flat tensors (token ids, positions, KV slots, per-request block
tables), runs the model, and returns float32 logits only for the requests that sample. It also
copies whole blocks out of and into the KV cache by block id: the disaggregation seam.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from engine.config import EngineConfig
from engine.layers.attention import AttentionMetadata, PrefillSegment
from engine.layers.moe import expert_counts
from engine.loader import iter_weights
from engine.models.registry import build_model
from engine.multimodal.encoder_cache import EncoderCache
from engine.multimodal.items import MultiModalItem, StepMultiModal
from engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        device: str | torch.device = "cpu",
        shard: Callable[[torch.nn.Module], None] | None = None,
        keep_weight: Callable[[str], bool] | None = None,
    ) -> None:
        """`shard` rewrites the meta-device model before loading and `keep_weight` filters checkpoint
        names: both for expert parallelism, where a rank holds only its own experts."""
        self.config = config
        self.device = torch.device(device)
        mc = config.model
        self.block_size = config.cache.block_size
        t0 = time.monotonic()
        with torch.device("meta"):
            model = build_model(mc.architecture, mc.hf_config)
            if shard is not None:
                shard(model)
        model = model.to_empty(device=self.device)
        model.rope.reset()
        model.load_weights(iter_weights(mc.path, keep_weight), mc.dtype)
        model.rope.cos, model.rope.sin = model.rope.cos.to(self.device), model.rope.sin.to(self.device)
        if mc.quantization:
            from engine.layers.quantize_model import quantize_model

            quantize_model(model, mc.quantization)
        self.model = model.eval()
        if self.device.type == "cpu" and mc.dtype == torch.bfloat16:
            from engine.layers.linear import prepack

            packed = prepack(self.model)
            if packed:
                logger.info("decode GEMV layout: %.0f MiB of weights packed", packed / 2**20)
        logger.info("loaded %s (%s, %s) in %.1fs", mc.path, mc.architecture, mc.dtype_name, time.monotonic() - t0)

        self.encoder_cache = EncoderCache()
        self.kv_shape_per_block = (2, self.block_size, mc.num_kv_heads, mc.head_dim)
        bytes_per_block = mc.num_layers * 2 * self.block_size * mc.num_kv_heads * mc.head_dim * mc.dtype.itemsize
        self.num_blocks = config.cache.resolve_num_blocks(bytes_per_block)
        self.kv_caches = [
            torch.zeros(self.num_blocks, *self.kv_shape_per_block, dtype=mc.dtype, device=self.device)
            for _ in range(mc.num_layers)
        ]
        for layer, cache in zip(self.model.layers, self.kv_caches):
            layer.self_attn.kv_cache = cache
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                    self.num_blocks * bytes_per_block / 2**20)

    # ----- one step -----
    def _multimodal(self, out: SchedulerOutput, rows0: list[int], positions: list[int]) -> StepMultiModal | None:
        """The step's image embeddings, 3D rotary positions and vision-expert rows, or None when
        no scheduled request has images. Rewrites `positions` to each row's text-axis position."""
        if not any(s.request.mrope is not None for s in out.scheduled):
            return None
        model = self.model
        embed_rows: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        pos3: list[torch.Tensor] = []
        vision: list[torch.Tensor] = []
        vision_ids = torch.tensor(sorted(getattr(model, "vision_token_ids", ())), dtype=torch.long)
        for s, row0 in zip(out.scheduled, rows0):
            req = s.request
            start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            rp = req.rope_positions(start, end)
            pos3.append(torch.arange(start, end).expand(3, -1) if rp is None else rp)
            in_prompt = torch.arange(start, end) < req.num_prompt_tokens
            ids = torch.tensor(req.all_token_ids[start:end], dtype=torch.long)
            vision.append(in_prompt & torch.isin(ids, vision_ids) if req.mm_items else torch.zeros(end - start, dtype=torch.bool))
            for item in req.mm_items:
                lo, hi = max(start, item.offset), min(end, item.end)
                if lo >= hi:
                    continue
                emb = self._encoder_output(item)
                embeds.append(emb[lo - item.offset : hi - item.offset])
                embed_rows.append(torch.arange(row0 + lo - start, row0 + hi - start))
        p3 = torch.cat(pos3, dim=1)
        positions[:] = p3[0].tolist()
        dev = self.device
        vis = torch.cat(vision)
        return StepMultiModal(
            embed_rows=torch.cat(embed_rows).to(dev) if embeds else None,
            embeds=torch.cat(embeds) if embeds else None,
            rope_positions=None if bool((p3 == p3[0]).all()) else p3.to(dev),
            vision_rows=vis.to(dev) if bool(vis.any()) else None,
        )

    def _encoder_output(self, item: MultiModalItem) -> torch.Tensor:
        emb = self.encoder_cache.get(item.content_hash)
        if emb is None:
            if item.pixel_values is None:
                raise ValueError(f"image {item.content_hash:x} must be encoded here but its pixels were not sent")
            emb = self.model.encode_images([item.pixel_values], [item.grid_thw])[0]
            if emb.shape[0] != item.length:
                raise ValueError(f"the image encodes to {emb.shape[0]} tokens but its placeholder has {item.length}")
            self.encoder_cache.put(item.content_hash, emb)
        return emb

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int],
                                                      StepMultiModal | None]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSegment] = []
        sample_rows: list[int] = []
        rows0: list[int] = []
        for s in out.scheduled:
            req = s.request
            start_pos = req.num_computed_tokens
            end_pos = start_pos + s.num_new_tokens
            row0 = len(input_ids)
            rows0.append(row0)
            input_ids.extend(req.all_token_ids[start_pos:end_pos])
            pos = range(start_pos, end_pos)
            positions.extend(pos)
            blocks = req.block_ids
            slot_blocks.extend(blocks[p // bs] for p in pos)
            slot_offsets.extend(p % bs for p in pos)
            num_ctx_blocks = (end_pos + bs - 1) // bs
            if s.num_new_tokens == 1:
                decode_rows.append(row0)
                decode_tables.append(blocks[:num_ctx_blocks])
                decode_lens.append(end_pos)
            else:
                table = torch.tensor(blocks[:num_ctx_blocks], dtype=torch.long, device=self.device)
                prefills.append(PrefillSegment(row0, len(input_ids), end_pos, table))
            if s.samples:
                sample_rows.append(len(input_ids) - 1)

        mm = self._multimodal(out, rows0, positions)
        dev = self.device
        decode_rows_t = decode_table_t = decode_lens_t = None
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            decode_rows_t = torch.tensor(decode_rows, dtype=torch.long, device=dev)
            decode_table_t = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.long, device=dev)
            decode_lens_t = torch.tensor(decode_lens, dtype=torch.long, device=dev)
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=dev),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=dev),
            decode_rows=decode_rows_t,
            decode_block_table=decode_table_t,
            prefills=tuple(prefills),
            positions=pos_t,
            decode_lens=decode_lens_t,
        )
        return ids, pos_t, meta, sample_rows, mm

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling_requests, vocab] on the CPU."""
        ids, positions, meta, sample_rows, mm = self._prepare(out)
        hidden = self.model(ids, positions, meta) if mm is None else self.model(ids, positions, meta, mm)
        if not sample_rows:
            return torch.empty(0, self.config.model.vocab_size)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        return logits.cpu()

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        """Float32 logits at every position of `token_ids` (teacher forcing), as one prefill
        whose KV goes into `block_ids` (allocated by the caller)."""
        n, bs = len(token_ids), self.block_size
        pos = torch.arange(n, device=self.device)
        blocks = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            slot_blocks=blocks[pos // bs], slot_offsets=pos % bs, decode_rows=None, decode_block_table=None,
            decode_lens=None, prefills=(PrefillSegment(0, n, n, blocks),), positions=pos,
        )
        hidden = self.model(torch.tensor(token_ids, device=self.device), pos, meta)
        return self.model.compute_logits(hidden).float().cpu()

    def expert_counts(self, total: bool = False) -> list[torch.Tensor]:
        """Per MoE layer, tokens routed to each expert in the last step (or since load); [] if dense."""
        return expert_counts(self.model, total)

    # ----- KV export / import by block id -----
    def export_blocks(self, block_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy blocks into `out` [num_layers, n, 2, block_size, kv_heads, head_dim] (allocated if None)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        shape = (len(self.kv_caches), len(block_ids), *self.kv_shape_per_block)
        if out is None:
            out = torch.empty(shape, dtype=self.config.model.dtype, device=self.device)
        elif tuple(out.shape) != shape or out.dtype != self.config.model.dtype:
            raise ValueError(f"export buffer is {tuple(out.shape)} {out.dtype}, need {shape} {self.config.model.dtype}")
        for layer, cache in enumerate(self.kv_caches):
            torch.index_select(cache, 0, idx, out=out[layer])
        return out

    def sync_blocks(self, block_ids: list[int]) -> None:
        """KV was written into these blocks from outside a forward (an import, a NIXL read):
        nothing to do with one process; an expert-parallel group copies them to its other ranks."""

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Write `data` (as produced by export_blocks) into the given blocks of this cache."""
        shape = (len(self.kv_caches), len(block_ids), *self.kv_shape_per_block)
        if tuple(data.shape) != shape:
            raise ValueError(f"imported KV has shape {tuple(data.shape)}, expected {shape}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for layer, cache in enumerate(self.kv_caches):
            cache.index_copy_(0, idx, data[layer].to(device=self.device, dtype=cache.dtype))
