"""--fsdp 1 (FSDP2) with 2 gloo processes: the losses, weights and files of one process with the same global batch,
and a sharded resume that survives a kill during its save."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model, safe_torch_load
from trainer import distributed, train_lora, train_pretrain
from trainer.trainer_utils import Runtime, TrainError, _check_resume_fits, run_main

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "dataset" / "demo"
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads", "2",
        "--max_seq_len", "64", "--log_interval", "1", "--batch_size", "2", "--seed", "3"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
KILL_BEFORE_PUBLISH = """
import os, signal, sys
sys.path.insert(0, {root!r})
from model.checkpoint import safe_torch_load
from trainer import distributed, trainer_utils, train_lora
publish = distributed.publish
def die_before_publish(folder, tmp, old):
    if safe_torch_load(tmp / distributed.META_FILE)["step"] == {kill_step}:
        os.kill(os.getpid(), signal.SIGKILL)  # every shard of the new state written, not yet renamed into place
    publish(folder, tmp, old)
distributed.publish = die_before_publish
sys.exit(trainer_utils.run_main(train_lora.main, sys.argv[1:]))
"""


def launch(argv, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def head(src: Path, dst: Path, n: int) -> Path:
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return dst


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def assert_close(a: dict, b: dict, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            rel = ((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)).item()
            assert rel < tol, (k, rel)
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 2 accumulation steps, FSDP2 and DDP over 2 processes (pretraining), then LoRA on the
    one-process result: one process, and FSDP2."""
    tmp = tmp_path_factory.mktemp("fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): 2 cores are shared
    try:
        yield from _runs(tmp)
    finally:
        torch.set_num_threads(threads)


def _runs(tmp):
    pre = head(DEMO / "pretrain.jsonl", tmp / "pretrain.jsonl", 64)
    lora = head(DEMO / "lora_identity.jsonl", tmp / "lora_identity.jsonl", 32)
    pre_args = TINY + ["--data_path", str(pre), "--max_steps", "6", "--save_interval", "3"]
    one = run_main(train_pretrain.main, pre_args + ["--save_dir", str(tmp / "one"), "--accumulation_steps", "2"])
    assert one == 0
    two = launch(TWO + ["trainer/train_pretrain.py", "--save_dir", str(tmp / "two"), "--fsdp", "1"] + pre_args)
    assert two.returncode == 0, two.stderr[-3000:]
    ddp = launch(TWO + ["trainer/train_pretrain.py", "--save_dir", str(tmp / "ddp")] + pre_args)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    base = str(tmp / "one" / "pretrain_64.pth")
    lora_args = TINY + ["--data_path", str(lora), "--from_weight", base, "--max_steps", "4", "--replay_data", "none",
                        "--lora_rank", "4", "--loraplus_lr_ratio", "4",  # LoRA+'s groups shard too
                        "--lora_targets", "q_proj,v_proj,down_proj"]
    assert run_main(train_lora.main, lora_args + ["--save_dir", str(tmp / "one"), "--accumulation_steps", "2"]) == 0
    two_lora = launch(TWO + ["trainer/train_lora.py", "--save_dir", str(tmp / "two"), "--fsdp", "1"] + lora_args)
    assert two_lora.returncode == 0, two_lora.stderr[-3000:]
    yield {"tmp": tmp, "lora_args": lora_args, "log": two.stdout + two_lora.stdout}


@pytest.mark.slow
def test_fsdp_pretraining_matches_one_process_and_ddp(runs):
    one, two, ddp = runs["tmp"] / "one", runs["tmp"] / "two", runs["tmp"] / "ddp"
    assert "(batch 2 x 1 accumulation x 2 processes)" in runs["log"]
    a, b = safe_torch_load(one / "pretrain_64.pth"), safe_torch_load(two / "pretrain_64.pth")
    assert_close(a, b)
    assert_close(safe_torch_load(ddp / "pretrain_64.pth"), b)  # the file DDP writes, to 1e-5
    sidecars = [json.loads((d / "pretrain_64.json").read_text()) for d in (one, two, ddp)]
    assert sidecars[0] == sidecars[1] == sidecars[2]
    la = losses(safe_torch_load(one / "checkpoints" / "pretrain_64_resume.pth")["history"])
    lb = losses(distributed.read_meta(two / "checkpoints" / "pretrain_64_resume_fsdp", "")["history"])
    assert len(la) == len(lb) == 6 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)
    # The file loads as eval_llm loads it, and predicts as the one-process model does.
    ma, mb = load_model(one / "pretrain_64.pth"), load_model(two / "pretrain_64.pth")
    x = torch.randint(0, ma.config.vocab_size, (1, 16))
    assert torch.allclose(ma(x).logits, mb(x).logits, atol=1e-5)


@pytest.mark.slow
def test_fsdp_lora_matches_one_process_and_trains_only_the_adapter(runs):
    one, two = runs["tmp"] / "one", runs["tmp"] / "two"
    a = safe_torch_load(one / "lora" / "lora_identity_64.pth")
    b = safe_torch_load(two / "lora" / "lora_identity_64.pth")
    assert json.loads(a.pop("__lora_config__")) == json.loads(b.pop("__lora_config__"))
    assert len(a) == 2 * 2 * 3 and any(v.abs().sum() > 0 for k, v in b.items() if ".B." in k)
    assert_close(a, b)
    # The resume state holds the adapter and its AdamW moments only: the frozen base stays in its own file.
    meta = distributed.read_meta(two / "checkpoints" / "lora_identity_64_resume_fsdp", "")
    assert meta["step"] == 4
    from torch.distributed.checkpoint import FileSystemReader
    saved = FileSystemReader(str(two / "checkpoints" / "lora_identity_64_resume_fsdp")).read_metadata()
    model_keys = {k for k in saved.state_dict_metadata if k.startswith("model.")}
    assert model_keys and all(".lora." in k for k in model_keys), sorted(model_keys)[:3]


@pytest.mark.slow
def test_fsdp_lora_resume_after_kill_during_save_matches_uninterrupted_run(runs):
    """With dropout, which draws from the global RNG: only a resume that restores it (and the data position, the
    adapter and its AdamW moments) ends on the same adapter."""
    tmp = runs["tmp"]
    common = runs["lora_args"][:-2] + ["--lora_targets", "q_proj,v_proj", "--lora_dropout", "0.1", "--fsdp", "1",
                                       "--save_dir", str(tmp / "b"), "--save_interval", "2"]
    straight = launch(TWO + ["trainer/train_lora.py", "--lora_name", "straight"] + common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    script = tmp / "crash.py"
    script.write_text(KILL_BEFORE_PUBLISH.format(root=str(ROOT), kill_step=4))
    crashed = launch(TWO + [str(script), "--lora_name", "resumed"] + common)
    assert crashed.returncode != 0
    folder = tmp / "b" / "checkpoints" / "resumed_64_resume_fsdp"
    assert distributed.read_meta(folder, "")["step"] == 2  # the step-4 state never replaced it
    assert distributed.read_meta(folder.with_name(folder.name + ".tmp"), "")["step"] == 4
    resumed = launch(TWO + ["trainer/train_lora.py", "--lora_name", "resumed", "--from_resume", "1"] + common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {folder} at step 2" in resumed.stdout
    a, b = (safe_torch_load(tmp / "b" / "lora" / f"{n}_64.pth") for n in ("straight", "resumed"))
    configs = [{**json.loads(x.pop("__lora_config__")), "adapter_name": None} for x in (a, b)]
    assert configs[0] == configs[1]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = distributed.read_meta(tmp / "b" / "checkpoints" / "straight_64_resume_fsdp", "")
    mb = distributed.read_meta(folder, "")
    assert (losses(mb["history"]), mb["tokens_seen"]) == (losses(ma["history"]), ma["tokens_seen"])
    assert len(losses(ma["history"])) == 4 and not folder.with_name(folder.name + ".tmp").exists()

    # Another world size is refused in one line naming both sizes.
    rt = Runtime(rank=0, local_rank=0, world_size=4, device=torch.device("cpu"), autocast=None, scaler=None, fsdp=True)
    args = argparse.Namespace(batch_size=2, accumulation_steps=1, pack=0, max_seq_len=64)
    with pytest.raises(TrainError, match="saved by 2 processes, this run has 4; resume with 2 processes in all"):
        _check_resume_fits(distributed.read_meta(folder, ""), folder, rt, args, keys=("step",))


def test_fsdp_without_torchrun_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    code = run_main(train_pretrain.main, TINY + ["--save_dir", str(tmp_path), "--fsdp", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--fsdp 1 shards over the processes of a torchrun launch" in err and err.count("\n") == 1
