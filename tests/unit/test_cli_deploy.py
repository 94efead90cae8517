"""`pdserve router` / `pdserve launch` argument handling (cluster/cli_deploy.py)."""
from __future__ import annotations

import pytest

from cluster.cli import build_parser, main
from cluster.cli_deploy import router_config


def _router(argv: list[str], monkeypatch, env: dict[str, str] | None = None):
    for name in ("PDSERVE_REDIS_URL", "PDSERVE_API_KEY", "PDSERVE_ADMIN_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return router_config(build_parser().parse_args(["router", *argv]))


def test_router_flags_over_config_over_defaults(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("cluster: prod\nredis_url: redis://file:6379/0\nport: 9000\n"
                    "engine: {max_model_len: 1024, block_size: 32}\nplanner: {interval_s: 2, lease_ttl_s: 9}\n")
    c = _router(["--config", str(path), "--port", "9100", "--planner"], monkeypatch)
    assert (c.cluster, c.redis_url, c.port, c.engine.max_model_len, c.engine.block_size) == \
        ("prod", "redis://file:6379/0", 9100, 1024, 32)
    assert c.planner.enabled and c.planner.interval_s == 2
    c = _router(["--config", str(path)], monkeypatch, {"PDSERVE_REDIS_URL": "redis://:pw@env:6379/0",
                                                        "PDSERVE_API_KEY": "a, b", "PDSERVE_ADMIN_API_KEY": "z"})
    assert c.redis_url == "redis://:pw@env:6379/0" and c.api_keys == ("a", "b") and c.admin_api_keys == ("z",)
    assert _router(["--redis-url", "redis://flag:1/0"], monkeypatch,
                   {"PDSERVE_REDIS_URL": "redis://env:1/0"}).redis_url == "redis://flag:1/0"


def test_router_without_redis_is_an_error(monkeypatch, capsys):
    monkeypatch.delenv("PDSERVE_REDIS_URL", raising=False)
    assert main(["router", "--port", "0"]) == 2
    assert "--redis-url is required" in capsys.readouterr().err


def test_launch_needs_a_config_and_a_redis(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PDSERVE_REDIS_URL", raising=False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch"])
    path = tmp_path / "c.yaml"
    path.write_text("prefill: 1\ndecode: 0\n")
    assert main(["launch", "--config", str(path)]) == 2
    assert "need --mixed N" in capsys.readouterr().err
    path.write_text("prefill: 1\ndecode: 1\n")
    assert main(["launch", "--config", str(path)]) == 2
    assert "redis_url is required" in capsys.readouterr().err
