import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import safe_torch_load
from model.model_minimind import MiniMindForCausalLM
from trainer import train_full_sft, train_lora, train_pretrain, trainer_utils
from trainer.trainer_utils import run_main

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "dataset" / "demo"
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
        "--num_key_value_heads", "2", "--max_seq_len", "64", "--batch_size", "4", "--log_interval", "2"]


def head(src: Path, dst: Path, n: int) -> Path:
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return dst


@pytest.fixture
def data(tmp_path):
    return {"pretrain": head(DEMO / "pretrain.jsonl", tmp_path / "pretrain.jsonl", 96),
            "sft": head(DEMO / "sft.jsonl", tmp_path / "sft.jsonl", 96),
            "lora": head(DEMO / "lora_identity.jsonl", tmp_path / "lora_identity.jsonl", 64)}


def run(main, argv, capsys):
    code = run_main(main, argv)
    out = capsys.readouterr()
    return code, out.out + out.err, out.err


def test_pretrain_then_full_sft(tmp_path, data, capsys):
    out = tmp_path / "out"
    code, log, err = run(train_pretrain.main, TINY + ["--save_dir", str(out), "--data_path", str(data["pretrain"]),
                                                 "--max_steps", "6", "--eval_data_path", str(data["pretrain"]),
                                                 "--eval_batches", "2"], capsys)
    assert code == 0, log
    assert "pretrain: 6 steps" in log and "eval loss" in log
    assert json.loads((out / "pretrain_64.json").read_text())["num_hidden_layers"] == 2
    assert (out / "pretrain_64_loss.png").stat().st_size > 1000
    pre = safe_torch_load(out / "pretrain_64.pth")
    code, log, err = run(train_full_sft.main, TINY + ["--save_dir", str(out), "--data_path", str(data["sft"]),
                                                 "--max_steps", "4"], capsys)
    assert code == 0, log
    sft = safe_torch_load(out / "full_sft_64.pth")
    assert set(sft) == set(pre)
    assert not torch.equal(sft["model.layers.0.mlp.up_proj.weight"], pre["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.isfinite(v).all() for v in sft.values())


def test_intermediate_size_flag(tmp_path, data, capsys):
    """--intermediate_size sets the MLP width of a fresh model; later stages read it from the sidecar config."""
    out = tmp_path / "out"
    code, log, err = run(train_pretrain.main, TINY + ["--save_dir", str(out), "--data_path", str(data["pretrain"]),
                                                 "--max_steps", "2", "--intermediate_size", "96"], capsys)
    assert code == 0, log
    assert json.loads((out / "pretrain_64.json").read_text())["intermediate_size"] == 96
    assert safe_torch_load(out / "pretrain_64.pth")["model.layers.0.mlp.up_proj.weight"].shape == (96, 64)
    code, log, err = run(train_full_sft.main, TINY + ["--save_dir", str(out), "--data_path", str(data["sft"]),
                                                 "--max_steps", "2"], capsys)
    assert code == 0, log
    assert safe_torch_load(out / "full_sft_64.pth")["model.layers.1.mlp.down_proj.weight"].shape == (64, 96)
    code, log, err = run(train_pretrain.main, TINY + ["--save_dir", str(out), "--data_path", str(data["pretrain"]),
                                                 "--intermediate_size", "0"], capsys)
    assert code == 2 and "--intermediate_size 0: the MLP width must be at least 1" in log and "Traceback" not in log


def test_pack_flag(tmp_path, data, capsys):
    """--pack 1 trains on full rows of packed text; the default pads one text per row; SFT has no such flag."""
    code, log, err = run(train_pretrain.main, TINY + ["--save_dir", str(tmp_path), "--data_path", str(data["pretrain"]),
                                                 "--pack", "1", "--max_steps", "3"], capsys)
    assert code == 0, log
    ckpt = safe_torch_load(tmp_path / "checkpoints" / "pretrain_64_resume.pth")
    assert "packed into 187 rows of 64 tokens" in log and ckpt["step"] == 3
    assert ckpt["tokens_seen"] == 3 * 4 * 64  # no pads: every row is 64 real tokens
    code, log, err = run(train_pretrain.main, TINY + ["--save_dir", str(tmp_path / "p0"), "--data_path",
                                                 str(data["pretrain"]), "--max_steps", "3"], capsys)
    assert code == 0, log
    ckpt = safe_torch_load(tmp_path / "p0" / "checkpoints" / "pretrain_64_resume.pth")
    assert "packed" not in log and "samples" in log and 0 < ckpt["tokens_seen"] < 3 * 4 * 64  # short texts padded
    with pytest.raises(SystemExit):
        train_full_sft.main(TINY + ["--save_dir", str(tmp_path), "--data_path", str(data["sft"]), "--pack", "1"])
    assert "unrecognized arguments: --pack 1" in capsys.readouterr().err


def test_loss_decreases_on_repeated_data(tmp_path, data, capsys):
    code, log, err = run(train_pretrain.main, TINY + ["--save_dir", str(tmp_path), "--data_path", str(data["pretrain"]),
                                                 "--epochs", "6", "--learning_rate", "3e-3"], capsys)
    assert code == 0, log
    history = safe_torch_load(tmp_path / "checkpoints" / "pretrain_64_resume.pth")["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] - 1.5, losses


@pytest.mark.parametrize("argv, message", [
    (["--data_path", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
    (["--batch_size", "1000"], "fewer than one global batch (--batch_size 1000 x 1 processes); lower --batch_size"),
])
def test_bad_input_is_one_line(tmp_path, data, capsys, argv, message):
    argv = TINY + ["--save_dir", str(tmp_path), "--data_path", str(data["pretrain"])] + argv
    code, log, err = run(train_pretrain.main, argv, capsys)
    assert code == 2 and message in log
    assert "Traceback" not in log and err.count("\n") == 1


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, log, err = run(train_pretrain.main, TINY + ["--save_dir", str(tmp_path), "--data_path", str(empty)], capsys)
    assert code == 2 and str(empty) in err and err.count("\n") == 1


def test_missing_from_weight_names_file_and_command(tmp_path, data, capsys):
    code, log, err = run(train_full_sft.main, TINY + ["--save_dir", str(tmp_path), "--data_path", str(data["sft"])],
                    capsys)
    assert code == 2
    assert f"{tmp_path / 'pretrain_64.pth'} does not exist; make it first with `python trainer/train_pretrain.py`" \
        in log


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, capsys, monkeypatch):
    calls = {"n": 0}
    forward = MiniMindForCausalLM.forward

    def poisoned(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] > 5 and out.loss is not None:  # from step 6 on
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MiniMindForCausalLM, "forward", poisoned)
    argv = TINY + ["--save_dir", str(tmp_path), "--data_path", str(data["pretrain"]), "--max_steps", "12",
                   "--save_interval", "4", "--log_interval", "3"]
    code, log, err = run(train_pretrain.main, argv, capsys)
    assert code == 2 and "step 6: loss is nan; stopped without saving" in log
    assert f"Last good checkpoint: {tmp_path / 'pretrain_64.pth'}" in log
    resume = safe_torch_load(tmp_path / "checkpoints" / "pretrain_64_resume.pth")
    assert resume["step"] == 4
    assert all(torch.isfinite(v).all() for v in safe_torch_load(tmp_path / "pretrain_64.pth").values())


KILL_AFTER_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from trainer import trainer_utils, train_pretrain
save = trainer_utils.atomic_torch_save
def save_then_die(obj, path):
    save(obj, path)
    if isinstance(obj, dict) and obj.get("step") == {kill_step}:
        os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no final save
trainer_utils.atomic_torch_save = save_then_die
sys.exit(trainer_utils.run_main(train_pretrain.main, sys.argv[1:]))
"""


def python(args, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT, **kw)


def loss_curve(history):
    """The history without its wall-clock throughput, the one entry that may differ between two equal runs."""
    return [{k: v for k, v in h.items() if k != "tokens_per_sec"} for h in history]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, data, optimizer):
    common = TINY + ["--data_path", str(data["pretrain"]), "--epochs", "2", "--max_steps", "40",
                     "--save_interval", "8", "--optimizer", optimizer]  # the kill at step 16 is inside epoch 2
    full = python(["trainer/train_pretrain.py", "--save_dir", str(tmp_path / "a")] + common)
    assert full.returncode == 0, full.stderr
    script = tmp_path / "crash.py"
    script.write_text(KILL_AFTER_SAVE.format(root=str(ROOT), kill_step=16))
    crashed = python([str(script), "--save_dir", str(tmp_path / "b")] + common)
    assert crashed.returncode == -9
    assert safe_torch_load(tmp_path / "b" / "checkpoints" / "pretrain_64_resume.pth")["step"] == 16
    packed = python(["trainer/train_pretrain.py", "--save_dir", str(tmp_path / "b"), "--from_resume", "1",
                     "--pack", "1"] + common)
    assert packed.returncode == 2 and "saved with --pack 0 --max_seq_len 64; resume with the same values" in \
        packed.stderr, packed.stderr
    other = {"adamw": "muon", "muon": "adamw"}[optimizer]
    switched = python(["trainer/train_pretrain.py", "--save_dir", str(tmp_path / "b"), "--from_resume", "1"] + common
                      + ["--optimizer", other])
    assert switched.returncode == 2 and f"saved with --optimizer {optimizer}; resume with it" in switched.stderr, \
        switched.stderr
    resumed = python(["trainer/train_pretrain.py", "--save_dir", str(tmp_path / "b"), "--from_resume", "1"] + common)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = safe_torch_load(tmp_path / "a" / "pretrain_64.pth"), safe_torch_load(tmp_path / "b" / "pretrain_64.pth")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (safe_torch_load(tmp_path / d / "checkpoints" / "pretrain_64_resume.pth") for d in "ab")
    assert rb["tokens_seen"] == ra["tokens_seen"] > 0
    assert [h["step"] for h in ra["history"]] == list(range(2, 41, 2))
    assert loss_curve(rb["history"]) == loss_curve(ra["history"])


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, data):
    """2 gloo processes x batch 2 against 1 process x batch 2 x 2 accumulation steps: the same global batches."""
    common = TINY + ["--data_path", str(data["pretrain"]), "--batch_size", "2", "--max_steps", "6",
                     "--seed", "3"]
    one = python(["trainer/train_pretrain.py", "--save_dir", str(tmp_path / "one"), "--accumulation_steps", "2"]
                 + common)
    assert one.returncode == 0, one.stderr
    two = python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "trainer/train_pretrain.py", "--save_dir", str(tmp_path / "two")] + common, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout
    assert "pretrain: 6 steps" in one.stdout and "pretrain: 6 steps" in two.stdout
    a, b = safe_torch_load(tmp_path / "one" / "pretrain_64.pth"), safe_torch_load(tmp_path / "two" / "pretrain_64.pth")
    assert a.keys() == b.keys()
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm()).item()
        assert rel < 1e-5, (k, rel)


@pytest.mark.slow
def test_wandb_offline_logs_the_series(tmp_path, data):
    res = python(["trainer/train_pretrain.py", "--save_dir", str(tmp_path), "--data_path", str(data["pretrain"]),
                  "--max_steps", "4", "--use_wandb"] + TINY,
                 env_extra={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"},
                 timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.fixture
def sft_base(tmp_path, data, capsys):
    """A tiny out/full_sft_64.pth (from scratch: LoRA tests need a base, not a good one)."""
    out = tmp_path / "out"
    code, log, _ = run(train_full_sft.main, TINY + ["--save_dir", str(out), "--data_path", str(data["sft"]),
                                                "--from_weight", "none", "--max_steps", "2"], capsys)
    assert code == 0, log
    return out


def test_lora_trains_only_the_adapter(sft_base, data, capsys):
    base = safe_torch_load(sft_base / "full_sft_64.pth")
    code, log, _ = run(train_lora.main, TINY + ["--save_dir", str(sft_base), "--data_path", str(data["lora"]),
                                            "--max_steps", "6", "--lora_rank", "4", "--lora_targets", "square"],
                      capsys)
    assert code == 0, log
    assert "parameters train" in log and "lora_identity: 6 steps" in log
    adapter_file = sft_base / "lora" / "lora_identity_64.pth"
    adapter = safe_torch_load(adapter_file)
    weights = {k: v for k, v in adapter.items() if k != "__lora_config__"}
    # MiniMind's key format, rank 4 on q_proj and o_proj (the square projections) of both layers.
    assert sorted(weights) == sorted(f"model.layers.{i}.self_attn.{m}.lora.{ab}.weight"
                                     for i in range(2) for m in ("q_proj", "o_proj") for ab in "AB")
    assert weights["model.layers.0.self_attn.q_proj.lora.A.weight"].shape == (4, 64)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if ".B." in k)  # B left zero: nothing was learned
    assert adapter_file.stat().st_size < (sft_base / "full_sft_64.pth").stat().st_size / 20
    assert all(torch.equal(v, safe_torch_load(sft_base / "full_sft_64.pth")[k]) for k, v in base.items())


class Crash(Exception):
    pass


def test_lora_resume_with_dropout_matches_uninterrupted_run(sft_base, data, capsys, monkeypatch):
    """Dropout draws from the global RNG, so only a resume that restores it (and draws nothing else) ends equal."""
    common = TINY + ["--save_dir", str(sft_base), "--data_path", str(data["lora"]), "--max_steps", "8",
                     "--save_interval", "4", "--seed", "5", "--lora_dropout", "0.1",
                     "--eval_data_path", str(data["lora"]), "--eval_interval", "4", "--eval_batches", "1"]
    straight = train_lora.main(common + ["--lora_name", "straight"])
    from trainer import trainer_utils
    save = trainer_utils.atomic_torch_save

    def save_then_crash(obj, path):
        save(obj, path)
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise Crash  # dies right after the step-4 resume checkpoint

    monkeypatch.setattr(trainer_utils, "atomic_torch_save", save_then_crash)
    with pytest.raises(Crash):
        train_lora.main(common + ["--lora_name", "resumed"])
    monkeypatch.setattr(trainer_utils, "atomic_torch_save", save)
    resumed = train_lora.main(common + ["--lora_name", "resumed", "--from_resume", "1"])
    assert "resumed from" in capsys.readouterr().out
    a = safe_torch_load(sft_base / "lora" / "straight_64.pth")
    b = safe_torch_load(sft_base / "lora" / "resumed_64.pth")
    assert a.keys() == b.keys()
    for k in a:
        if k != "__lora_config__":
            assert torch.equal(a[k], b[k]), k
    # The loss curve the plot is drawn from, and the token count: the run's whole record, not only its end.
    # A run this short logs every step (so its curve has points), then the evals at 4 and 8 and the final one.
    assert [h["step"] for h in straight.history] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 8]
    assert loss_curve(resumed.history) == loss_curve(straight.history)
    assert resumed.tokens_seen == straight.tokens_seen > 0
    ra, rb = (safe_torch_load(sft_base / "checkpoints" / f"{n}_64_resume.pth") for n in ("straight", "resumed"))
    assert (loss_curve(rb["history"]), rb["tokens_seen"]) == (loss_curve(ra["history"]), ra["tokens_seen"])


def test_unknown_lora_target_is_one_line(sft_base, data, capsys):
    code, log, err = run(train_lora.main, TINY + ["--save_dir", str(sft_base), "--data_path", str(data["lora"]),
                                              "--lora_targets", "q_proj,qkv"], capsys)
    assert code == 2 and "qkv" in err and "q_proj" in err and err.count("\n") == 1, err


def test_lora_without_base_names_the_command(tmp_path, data, capsys):
    code, log, err = run(train_lora.main, TINY + ["--save_dir", str(tmp_path), "--data_path", str(data["lora"])],
                         capsys)
    assert code == 2 and "full_sft_64.pth does not exist" in err and "python trainer/train_full_sft.py" in err


def test_weight_decay_is_adamw_decoupled_decay(sft_base, data, capsys):
    """One step with --weight_decay 0.5 against one without: the weights differ by lr * wd * w0 (AdamW's decoupled
    decay, by hand), every other part of the update being the same."""
    start = safe_torch_load(sft_base / "full_sft_64.pth")
    after = {}
    for wd in ("0", "0.5"):
        out = sft_base.parent / f"wd{wd}"
        code, log, _ = run(train_full_sft.main, TINY + ["--save_dir", str(out), "--data_path", str(data["sft"]),
                                                    "--from_weight", str(sft_base / "full_sft_64.pth"),
                                                    "--max_steps", "1", "--learning_rate", "1e-2",
                                                    "--weight_decay", wd], capsys)
        assert code == 0, log
        after[wd] = safe_torch_load(out / "full_sft_64.pth")
    key = "model.layers.0.mlp.up_proj.weight"
    want = -1e-2 * 0.5 * start[key]  # step 0 of a 1-step run: warmup gives the full learning rate
    assert (after["0.5"][key] - after["0"][key] - want).abs().max() < 1e-6
    assert want.abs().max() > 1e-4


def test_muon_orthogonalises_the_matrices_and_leaves_embeddings_to_adamw(sft_base, data, capsys):
    """One step from the same weights: a hidden matrix moves by lr * 0.2 * sqrt(max(rows, cols)) times a matrix
    whose singular values Newton-Schulz has pushed towards 1 (Muon, adjusted to AdamW's RMS); the embedding moves by
    lr * sign(grad) (AdamW's first step)."""
    start = safe_torch_load(sft_base / "full_sft_64.pth")
    out = sft_base.parent / "muon"
    code, log, _ = run(train_full_sft.main, TINY + ["--save_dir", str(out), "--data_path", str(data["sft"]),
                                                "--from_weight", str(sft_base / "full_sft_64.pth"), "--max_steps", "1",
                                                "--learning_rate", "1e-3", "--optimizer", "muon", "--grad_clip", "0"],
                       capsys)
    assert code == 0, log
    after = safe_torch_load(out / "full_sft_64.pth")
    key = "model.layers.0.mlp.up_proj.weight"
    delta = after[key] - start[key]
    s = torch.linalg.svdvals(delta / (1e-3 * 0.2 * max(delta.shape) ** 0.5))
    assert 0.5 < s.min() and s.max() < 1.5, s
    emb = after["model.embed_tokens.weight"] - start["model.embed_tokens.weight"]
    # lr * g / (|g| + eps): exactly lr but where a gradient entry is as small as AdamW's eps (1e-8).
    assert ((emb.abs() - 1e-3).abs() < 1e-5).float().mean() > 0.95


def test_muon_on_cpu_orthogonalises_in_float32_as_torch_does_in_bfloat16():
    """Our float32 Newton-Schulz against torch's own (bfloat16) on wide and tall matrices, then one step of the trainers'
    Muon against torch.optim.Muon's own: equal to bfloat16's precision, not bit-equal; torch's function is back after."""
    import torch.optim._muon as muon_module
    torch_ns = muon_module._zeropower_via_newtonschulz
    g = torch.Generator().manual_seed(0)
    for shape in [(48, 176), (176, 48)]:
        grad = torch.randn(shape, generator=g)
        ours = trainer_utils.newton_schulz_float32(grad, (3.4445, -4.775, 2.0315), 5, 1e-7)
        theirs = torch_ns(grad, (3.4445, -4.775, 2.0315), 5, 1e-7).float()
        assert ours.dtype == torch.float32 and ours.shape == grad.shape
        assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max(), shape
    w, grad = torch.randn(48, 176, generator=g), torch.randn(48, 176, generator=g)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    trainer_utils.MuonAndAdamW(torch.optim.Muon([ours], lr=1e-2, adjust_lr_fn="match_rms_adamw"), None,
                               float32=True).step()
    torch.optim.Muon([theirs], lr=1e-2, adjust_lr_fn="match_rms_adamw").step()
    mine, want = (ours - w).detach(), (theirs - w).detach()
    assert (mine - want).abs().max() < 0.05 * want.abs().max()
    assert not torch.equal(mine, want)  # float32 did run: bfloat16 rounds otherwise
    assert muon_module._zeropower_via_newtonschulz is torch_ns


def test_wsd_schedule_holds_then_falls_linearly(tmp_path, data, capsys):
    """--lr_schedule wsd over 10 steps (warmup 1): the peak for 8 steps, then 55% and 10% of it, by hand."""
    out = tmp_path / "wsd"
    code, log, _ = run(train_pretrain.main, TINY + ["--save_dir", str(out), "--data_path", str(data["pretrain"]),
                                                "--max_steps", "10", "--log_interval", "1", "--learning_rate", "1e-3",
                                                "--lr_schedule", "wsd"], capsys)
    assert code == 0, log
    history = safe_torch_load(out / "checkpoints" / "pretrain_64_resume.pth")["history"]
    lrs = [h["lr"] for h in history if "lr" in h]
    assert lrs == pytest.approx([1e-3] * 8 + [0.55e-3, 0.1e-3], rel=1e-9)
