"""``alignfuse bench bridge`` on a tiny Llama: every variant runs and ours equals the plain step's loss."""
from __future__ import annotations

from experiments.cli import main


def test_bench_bridge_tiny(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "bridge", "--llm", "tiny", "--repeats", "1", "--grid", "16", "--tokens", "4",
                 "--vision-dim", "32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plain (transformers, ChatML prompt)" in text and "OK" in text
    import json

    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and rows[0]["speedup_vs_plain"] == 1.0
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-3 and rows[1]["grad_rel_diff"] < 1e-4
    low = {r["variant"]: r for r in rows}["ours + bf16 linears"]
    assert 0 < abs(low["loss"] - rows[0]["loss"]) < 2e-2 and 0 < low["grad_rel_diff"] < 0.2  # rounds, stays close
    assert all((r["grad_rel_diff"] is None) == ("short prompt" in r["variant"]) for r in rows)
