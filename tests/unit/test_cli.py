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
