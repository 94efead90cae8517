"""pdserve CLI: help and argument errors (generate is tested with the engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("generate", "convert", "bench-engine"):
        assert command in out


def test_invalid_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["generate", "--dtype", "float16"])
    assert info.value.code == 2


def test_convert_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.gguf"
    assert main(["convert", "--gguf", str(missing)]) != 0
    err = capsys.readouterr().err
    assert "GGUF file not found" in err and "missing.gguf" in err


def test_generate_rejects_expert_parallelism_on_a_dense_model(capsys):
    from cluster.cli import main

    assert main(["generate", "--expert-parallel-size", "2", "--max-tokens", "1"]) == 2
    assert "mixture-of-experts" in capsys.readouterr().err


def test_multimodal_flags_reach_the_config(tmp_path, capsys):
    from cluster.cli import _serve_config, build_parser

    args = build_parser().parse_args([
        "serve", "--limit-mm-per-prompt", '{"image": 4, "video": 3}', "--mm-processor-kwargs", '{"max_pixels": 50176}',
        "--allowed-media-domains", "images.example.com,cdn.example.com", "--allowed-local-media-path", str(tmp_path),
        "--no-enable-mm", "--reasoning-parser", "ernie-45-vl"])
    cfg = _serve_config(args)
    assert cfg.multimodal.limit_mm_per_prompt == {"image": 4, "video": 3} and cfg.multimodal.enable_mm is False
    assert cfg.multimodal.allowed_media_domains == ("images.example.com", "cdn.example.com")
    assert cfg.multimodal.allowed_local_media_path == str(tmp_path)
    assert cfg.engine.mm_processor_kwargs == {"max_pixels": 50176} and cfg.reasoning_parser == "ernie-45-vl"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--limit-mm-per-prompt", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        _serve_config(build_parser().parse_args(["serve", "--mm-processor-kwargs", '{"max_pixels": -1}']))
