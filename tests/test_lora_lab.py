"""The LoRA lab: its generated tasks, its numbers (by hand), and every experiment end to end with --quick."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from dataset import make_lab_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import lora_lab  # noqa: E402
VERDICTS = ("confirmed", "refuted", "not shown at this scale")


def test_lab_data_is_new_to_the_base_nested_and_byte_identical(tmp_path):
    first = make_lab_data.write_lab_data(tmp_path / "a", fact_counts=(20, 60))
    second = make_lab_data.write_lab_data(tmp_path / "b", fact_counts=(20, 60))
    for task, paths in first.items():
        for p, q in zip(paths, second[task]):
            assert p.read_bytes() == q.read_bytes(), p
    people = make_lab_data.people(60)
    assert people[:20] == make_lab_data.people(20)  # facts_20's people are the first 20 of facts_60's
    seen = make_lab_data.base_trigrams()
    assert not any(name in seen for name, _ in people)
    train = [json.loads(line) for line in first["facts_60"][0].read_text().splitlines()]
    heldout = [json.loads(line) for line in first["facts_60"][1].read_text().splitlines()]
    asked = {r["conversations"][0]["content"] for r in train}
    assert len(train) == 60 * make_lab_data.TRAIN_PER_FACT
    for row in heldout:  # asked in a phrasing no training row uses, expecting the city
        assert row["conversations"][0]["content"] not in asked
        name = next(n for n, _ in people if n in row["conversations"][0]["content"])
        assert row["expect"] == [dict(people)[name]]


def test_placement_ranks_match_the_parameter_budgets():
    """The demo shape by hand: per layer and rank, q and o 256+256, k and v 256+128 (GQA), MLP 3 x (256+832);
    all-linear r4 is 4 x 5,056 = 20,224 parameters a layer, q at r8 is 4,096."""
    from types import SimpleNamespace
    demo = SimpleNamespace(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                           intermediate_size=832)
    matched, hu = lora_lab.placement_ranks(demo)
    assert {n: r for n, (_, r) in matched.items()} == {"q,v": 23, "q,k,v,o": 11, "MLP": 6, "all-linear": 4}
    assert {n: r for n, (_, r) in hu.items()} == {"q": 8, "k": 11, "v": 11, "o": 8, "q,v": 5, "q,k,v,o": 2}
    assert matched["MLP"][0] == ["gate_proj", "up_proj", "down_proj"] and hu["v"][0] == ["v_proj"]


def test_best_lr_is_the_parabolas_vertex_in_log_lr():
    vertex = math.log10(2e-3)
    points = {lr: (math.log10(lr) - vertex) ** 2 + 1.0 for lr in lora_lab.LR_GRID}
    grid_best, best = lora_lab.best_lr(points)
    assert grid_best == 3.16e-3 and best == pytest.approx(2e-3, rel=1e-9)
    edge = {lr: -math.log10(lr) for lr in lora_lab.LR_GRID}  # the minimum at the grid's edge stays there
    assert lora_lab.best_lr(edge) == (3.16e-2, 3.16e-2)


def test_update_ranks_count_the_energy_by_hand():
    torch.manual_seed(0)
    before = {"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32)}
    u, _ = torch.linalg.qr(torch.randn(32, 32))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    # Singular values 10, 6, 5, 1: energies 100, 36, 25, 1 of 162; 90% needs three (161/162 > 0.9 > 136/162).
    delta = u[:, :4] @ torch.diag(torch.tensor([10.0, 6.0, 5.0, 1.0])) @ v[:, :4].T
    after = {k: w + delta for k, w in before.items()}
    assert lora_lab.update_ranks(before, after) == {"q_proj": (3, 32)}


def test_int4_puts_every_weight_on_its_blocks_15_levels():
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=128))
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    lora_lab.lab_quantize(model, "int4")
    w = model.model.layers[0].mlp.up_proj.weight.detach()
    blocks, absmax = w.reshape(-1, 64), w0.reshape(-1, 64).abs().amax(1, keepdim=True)
    levels = blocks / absmax * 7
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 7 + 1e-4
    assert (w - w0).abs().max() <= (absmax / 14).max() + 1e-6  # rounding moves a weight at most half a level


def test_every_experiment_runs_quick_and_resumes(tmp_path, capsys):
    out = tmp_path / "lab"
    assert lora_lab.main(["all", "--quick", "--seeds", "1", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    doc = (out / "docs" / "LORA_LAB.md").read_text()
    for name, title in lora_lab.TITLES.items():
        assert f"## {title}" in doc, name
        assert f"`python scripts/lora_lab.py {name} --quick`" in doc
        assert (out / "docs" / "lab" / f"{name}.png").stat().st_size > 5000, name
    summary = doc.split("\n## ")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    drawn = [json.loads((out / "docs" / "lab" / f"{n}.json").read_text()) for n in lora_lab.TITLES]
    assert len(rows) == sum(len(d["verdicts"]) for d in drawn)
    # the whole lab's time counts a run shared by experiments once: every stored run's own seconds, summed
    stored = [json.loads(p.read_text()) for p in (out / "runs").iterdir()]
    assert re.search(rf"trained {len(stored)} runs, {sum(r['seconds'] for r in stored) / 60:.0f} min summed", doc)
    for row in rows:
        assert re.search(r"\*\*(" + "|".join(VERDICTS) + r")\*\*", row), row
    for note in ("(000)", "(001)", "(002)"):  # the seed notes' four claims each get a verdict
        assert any(f"seed notes {note}" in row for row in rows), note
    assert sum("seed notes" in row for row in rows) >= 4
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) > 50 and "to train" in log
    # A second `all` only redraws; a lost result is trained again, and only it.
    (out / "runs" / runs[0]).unlink()
    assert lora_lab.main(["all", "--quick", "--seeds", "1", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("to train") == 1 and "1 to train" in log
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs


def test_a_diverged_run_is_a_result_not_a_crash(tmp_path, capsys):
    """A learning rate that makes the loss NaN ends the run with an infinite held-out loss, which best_lr skips."""
    run = lora_lab.Run("facts_12", method="full", lr=1e8, steps=4)
    result = lora_lab.work(run, tmp_path / "lab", lora_lab.QUICK)
    assert "loss is nan" in result["diverged"]
    assert result["heldout"]["loss"] == math.inf and result["train"]["loss"] == math.inf
