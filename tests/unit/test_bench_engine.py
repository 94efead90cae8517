"""`pdserve bench-engine` runs end to end on a tiny model and reports a consistent breakdown
(no timing is asserted: these machines are shared; only the report's shape and arithmetic)."""
from __future__ import annotations

import json

from engine.bench import main


def test_quick_run_writes_rows_and_a_breakdown(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--model", str(tiny_checkpoint("llama")), "--dtype", "float32", "--quick", "--skip-hf",
                 "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Decode step breakdown" in text and "| batch | step | GEMMs |" in text
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 4, 1]
    assert [b["batch"] for b in data["breakdown"]] == [1, 4]
    for b in data["breakdown"]:
        parts = [b["gemm_ms"], b["attention_ms"], b["sampling_ms"]]
        assert all(p > 0 for p in parts), b  # every category was really timed
        consistent = abs(sum(parts) + b["rest_ms"] - b["step_ms"]) < 1e-6
        assert consistent, b
