"""An EngineConfig as JSON, so rank 0 can hand its exact settings to the other ranks via argv."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.loader import load_config


def config_to_json(config: EngineConfig) -> dict[str, Any]:
    mc = config.model
    return {
        "model": {"path": mc.path, "dtype": mc.dtype_name, "quantization": mc.quantization},
        "cache": asdict(config.cache),
        "scheduler": asdict(config.scheduler),
    }


def config_from_json(cfg: dict[str, Any]) -> EngineConfig:
    m = cfg["model"]
    mc = ModelConfig.from_hf_config(m["path"], load_config(m["path"]), m["dtype"], m["quantization"])
    return EngineConfig(model=mc, cache=CacheConfig(**cfg["cache"]), scheduler=SchedulerConfig(**cfg["scheduler"]))
