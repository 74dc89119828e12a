"""scripts/demo_targets.py: the demo's targets read from hand-made eval rows, a hit and a miss at each edge."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import demo_targets  # noqa: E402


def rows(over=None):
    """Eval rows that meet every target (eval_general moved by exactly 3.0 points: at the edge, held)."""
    r = {("pretrain_256", "eval_capitals", "none"): (0.9, None),
         ("full_sft_256", "eval_general", "none"): (0.88, None),
         ("full_sft_256", "eval_general", "lora_identity"): (0.91, None),
         ("full_sft_256", "eval_general", "lora_medical"): (0.85, None),
         ("full_sft_256", "outside_general", "none"): (0.7, None),
         ("full_sft_256", "eval_identity", "lora_identity"): (0.95, None),
         ("full_sft_256", "eval_identity", "none"): (0.05, None),
         ("full_sft_256", "outside_identity", "lora_identity"): (0.86, None),
         ("full_sft_256", "eval_medical", "lora_medical"): (1.0, 1.0),
         ("full_sft_256", "eval_medical", "none"): (0.0, 1.0),
         ("full_sft_256", "eval_medical", "lora_identity"): (0.0, 0.9),
         ("full_sft_256", "outside_medical", "lora_medical"): (0.75, None)}
    r.update(over or {})
    return [{"weight": w, "file": f"dataset/demo/{f}.jsonl", "setting": s, "n": 100, "match_rate": m,
             "mention_rate": n, "ppl": 1.0} for (w, f, s), (m, n) in r.items()]


def run(tmp_path, capsys, *tables):
    paths = []
    for i, t in enumerate(tables):
        paths.append(tmp_path / f"eval_{i}.json")
        paths[-1].write_text(json.dumps(t))
    code = demo_targets.main([str(p) for p in paths])
    return code, capsys.readouterr()


def test_every_target_at_its_edge_holds(tmp_path, capsys):
    code, out = run(tmp_path, capsys, rows())
    assert code == 0 and "targets: 12 of 12 held" in out.out
    assert "eval_general moved by lora_medical (within 3 points)           -3.0\n" in out.out
    assert "identity without it (<= 5%)" in out.out and "MISS" not in out.out


def test_a_miss_is_named_per_run(tmp_path, capsys):
    worse = rows({("full_sft_256", "eval_general", "lora_medical"): (0.845, None),
                  ("full_sft_256", "eval_identity", "none"): (0.0625, None),
                  ("full_sft_256", "eval_medical", "lora_identity"): (0.0, 0.8958)})
    code, out = run(tmp_path, capsys, rows(), worse)
    assert code == 1 and "targets: 21 of 24 held; 3 missed" in out.out
    lines = {line.split("  ")[0]: line for line in out.out.splitlines()}
    assert lines["eval_general moved by lora_medical (within 3 points)"].split()[-3:] == ["-3.0", "-3.5", "MISS"]
    assert lines["identity without it (<= 5%)"].split()[-3:] == ["5.0", "6.2", "MISS"]
    assert lines["symptom named under lora_identity (>= 90%)"].split()[-3:] == ["90.0", "89.6", "MISS"]


def test_a_missing_row_is_one_line(tmp_path, capsys):
    partial = [r for r in rows() if r["weight"] != "pretrain_256"]
    code, out = run(tmp_path, capsys, partial)
    assert code == 2 and out.err.strip().endswith("no match rate for pretrain_* on eval_capitals under none; run "
                                                  "the demo's eval (scripts/demo.sh, stage eval) to write every row")
    assert len(out.err.strip().splitlines()) == 1
