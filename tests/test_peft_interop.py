"""PEFT interop both ways: our adapter -> PEFT folder that peft loads, peft's folder -> our adapter,
the round trip, and the PEFT options we refuse. Logit differences are printed (run with -s to see them)."""
import argparse
import json
import shutil
import subprocess
import sys

import peft
import pytest
import torch
import transformers

from model.checkpoint import REPO_ROOT, hf_config_dict, load_state_dict_strict, save_model
from model.model_lora import (CONFIG_KEY, AdapterBank, LoRAError, apply_lora, find_adapter, load_lora,
                              read_lora_file, save_lora, set_adapter)
from model.model_minimind import MiniMindForCausalLM
from model.peft_io import save_peft_folder
from scripts.convert_model import main as convert
from tests.conftest import tiny_config
from tests.test_lora import base_model, logits, randomize_B

SCRIPT = REPO_ROOT / "scripts" / "convert_model.py"
COMPARED = ("rank", "alpha", "use_rslora", "target_modules")


def max_diff(ours, theirs, what: str) -> float:
    """Max |logit difference|, printed so that the numbers can be reported."""
    diff = (ours - theirs).abs().max().item()
    print(f"\nmax |logit difference| {what}: {diff:.3g}")
    return diff


def config_of(path) -> dict:
    return json.loads(read_lora_file(path)[CONFIG_KEY])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Our base checkpoint and its --to_hf export."""
    folder = tmp_path_factory.mktemp("base")
    weight = save_model(base_model(), folder / "full_sft_64.pth")
    convert(["--to_hf", str(folder / "hf"), "--weight", str(weight)])
    return weight, folder / "hf"


@pytest.fixture(scope="module")
def peft_folder(base, tmp_path_factory):
    """A PEFT folder of a square-target adapter, to copy and spoil."""
    model = base_model()
    apply_lora(model, rank=4, alpha=8)
    randomize_B(model)
    path = save_lora(model, tmp_path_factory.mktemp("lora") / "lora_sq_64.pth")
    return save_peft_folder(read_lora_file(path), tmp_path_factory.mktemp("peft") / "sq", base_model(), "hf", "x")


@pytest.mark.parametrize("case, lora_kw", [
    ("square", dict(rank=4, alpha=8)),
    ("all-linear", dict(rank=4, alpha=8, target_modules="all-linear")),
    ("rsLoRA", dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    ("r=6", dict(rank=6, alpha=12, target_modules=["k_proj", "up_proj", "down_proj"])),
])
def test_ours_to_peft_loads_in_peft_with_equal_logits(tmp_path, base, case, lora_kw):
    weight, hf_dir = base
    ours = base_model()
    apply_lora(ours, **lora_kw)
    randomize_B(ours)
    lora = save_lora(ours, tmp_path / "lora_x_64.pth")
    out = tmp_path / "peft_x"
    convert(["--to_peft", str(out), "--weight", str(weight), "--lora", str(lora),
             "--base_model_name_or_path", str(hf_dir)])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == \
           ("LORA", "CAUSAL_LM", lora_kw["rank"], lora_kw["alpha"], lora_kw.get("use_rslora", False))
    assert config["base_model_name_or_path"] == str(hf_dir) and config["bias"] == "none"
    assert config["target_modules"] == config_of(lora)["target_modules"]  # kinds: every layer is covered

    theirs = peft.PeftModel.from_pretrained(transformers.Qwen3ForCausalLM.from_pretrained(hf_dir), out).eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {k.removesuffix(".lora.A.weight") for k in read_lora_file(lora) if k.endswith(".A.weight")}
    assert max_diff(logits(ours), logits(theirs), f"ours -> PEFT ({case})") <= 1e-4
    with theirs.disable_adapter():
        assert not torch.allclose(logits(ours), logits(theirs), atol=1e-3)  # the adapter is really on


def peft_made_adapter(folder, seed=0, **lora_config):
    """A PEFT folder saved by peft itself on a random Qwen3 (B randomised), its base state and its model."""
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in hf_config_dict(tiny_config()).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    hf = transformers.Qwen3ForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(10)  # HF's std 0.02 init gives near-constant logits; larger layers give varied ones
    base_state = {k: v.clone() for k, v in hf.state_dict().items()}
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**lora_config))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    theirs.save_pretrained(folder)
    return base_state, theirs.eval()


@pytest.mark.parametrize("suffix, lora_config", [
    (".safetensors", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1)),
    (".pth", dict(r=6, lora_alpha=12, target_modules="all-linear", use_rslora=True)),
])
def test_peft_to_ours_gives_peft_logits(tmp_path, suffix, lora_config):
    base_state, theirs = peft_made_adapter(tmp_path / "peft", **lora_config)
    out = tmp_path / f"lora_p_64{suffix}"
    convert(["--from_peft", str(tmp_path / "peft"), "--out", str(out)])
    config = config_of(out)
    assert (config["rank"], config["alpha"], config["use_rslora"]) == \
           (lora_config["r"], lora_config["lora_alpha"], lora_config.get("use_rslora", False))
    assert config["base"]["hidden_size"] == 64 and config["base"]["layer_shapes"]["q_proj"] == [64, 64]

    ours = MiniMindForCausalLM(tiny_config()).eval()
    load_state_dict_strict(ours, base_state, "Qwen3 state dict")  # our keys are Qwen3's
    load_lora(ours, out, "file")
    load_lora(ours, tmp_path / "peft", "folder")  # load_lora reads a PEFT folder directly
    ours.eval()  # load_lora adds its dropout modules in training mode, even to an eval model
    expected = logits(theirs)
    for name in ("file", "folder"):
        set_adapter(ours, name)
        assert max_diff(logits(ours), expected, f"PEFT -> ours ({name}, {lora_config['target_modules']})") <= 1e-4
    set_adapter(ours, None)
    assert not torch.allclose(logits(ours), expected, atol=1e-3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_ours_peft_ours_is_bit_exact(tmp_path, base, suffix):
    weight, _ = base
    ours = base_model()
    apply_lora(ours, rank=4, alpha=8, target_modules="all-linear", use_rslora=True, dropout=0.05)
    randomize_B(ours)
    first = save_lora(ours, tmp_path / f"lora_a_64{suffix}")
    convert(["--to_peft", str(tmp_path / "peft"), "--weight", str(weight), "--lora", str(first)])
    convert(["--from_peft", str(tmp_path / "peft"), "--out", str(tmp_path / f"back{suffix}")])
    before, after = read_lora_file(first), read_lora_file(tmp_path / f"back{suffix}")
    assert set(before) == set(after)
    for key in before:
        if key != CONFIG_KEY:
            assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    a, b = json.loads(before[CONFIG_KEY]), json.loads(after[CONFIG_KEY])
    assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED} and a["dropout"] == b["dropout"]
    again = base_model()
    load_lora(again, tmp_path / f"back{suffix}")
    again.eval(), ours.eval()  # dropout 0.05: LoRA modules are added in training mode
    assert max_diff(logits(again), logits(ours), f"round trip ours -> PEFT -> ours ({suffix})") == 0


def test_minimind_file_without_config_round_trips_and_keeps_fp16(tmp_path, base):
    """MiniMind's fp16 file, no config (scale 1), on one layer only: target_modules names the modules."""
    weight, _ = base
    g = torch.Generator().manual_seed(0)
    state = {"model.layers.0.self_attn.q_proj.lora.A.weight": torch.randn(8, 64, generator=g).half(),
             "model.layers.0.self_attn.q_proj.lora.B.weight": torch.randn(64, 8, generator=g).half()}
    torch.save(state, tmp_path / "lora_mm_64.pth")
    convert(["--to_peft", str(tmp_path / "peft"), "--weight", str(weight), "--lora", str(tmp_path / "lora_mm_64.pth")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 8, ["model.layers.0.self_attn.q_proj"])
    back = read_lora_file(tmp_path / "peft")
    assert all(torch.equal(back[k], v) and back[k].dtype == torch.float16 for k, v in state.items())


def test_find_adapter_eval_and_server_take_a_peft_folder(tmp_path, peft_folder):
    import eval_llm
    assert find_adapter(str(peft_folder), 64) == peft_folder
    model = base_model()
    assert eval_llm.load_adapter(model, str(peft_folder), argparse.Namespace(save_dir=tmp_path)) == "sq"
    pairs, scale = AdapterBank(base_model(), slots=2).check(peft_folder)
    assert len(pairs) == 4 and scale == 2.0


def spoiled(tmp_path, peft_folder, **config_changes):
    folder = tmp_path / "spoiled"
    shutil.copytree(peft_folder, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "the config says use_dora but the file holds no lora.magnitude vectors"),
    (dict(use_qalora=True), "use_qalora=true is not supported (QALoRA)"),
    (dict(bias="lora_only"), 'bias="lora_only" is not supported; only bias "none"'),
    (dict(modules_to_save=["lm_head"]), 'modules_to_save=["lm_head"] is not supported'),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=true is not supported"),
    (dict(target_modules=["q_proj", "lm_head"]), "target module 'lm_head' is not supported"),
    (dict(target_modules=["model.embed_tokens"]), "target module 'model.embed_tokens' is not supported"),
    (dict(target_modules="q_proj|embed_tokens"), "target module 'embed_tokens' is not supported"),
    (dict(target_modules=r"model\.layers\.0\..*_proj"), "target_modules regex 'model\\\\.layers"),
    (dict(rank_pattern={"q_proj": 8}), 'rank_pattern={"q_proj": 8} is not supported'),
    (dict(alpha_pattern={"q_proj": 32}), 'alpha_pattern={"q_proj": 32} is not supported'),
    (dict(peft_type="IA3"), "peft_type 'IA3' is not supported; only LORA"),
    (dict(lora_bias=True), "lora_bias=true is not supported"),
    (dict(init_lora_weights="pissa_niter_4"), 'init_lora_weights="pissa_niter_4" is not supported'),
    (dict(r=8), "self_attn.o_proj has rank 4 but r is 8"),
])
def test_unsupported_peft_options_are_refused_by_name(tmp_path, peft_folder, changes, message):
    with pytest.raises(LoRAError) as error:
        read_lora_file(spoiled(tmp_path, peft_folder, **changes))
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q_proj|o_proj)$", ["model.layers.0.self_attn.q_proj"]])
def test_readable_target_modules_are_accepted(tmp_path, peft_folder, targets):
    state = read_lora_file(spoiled(tmp_path, peft_folder, target_modules=targets))
    assert json.loads(state[CONFIG_KEY])["target_modules"] == ["q_proj", "o_proj"]  # the weights decide


def test_broken_folders_are_refused(tmp_path, peft_folder):
    from safetensors.torch import load_file, save_file
    folder = spoiled(tmp_path, peft_folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    for extra, message in [("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "unexpected key"),
                           ("base_model.model.lm_head.lora_A.weight", "LoRA on lm_head is not supported")]:
        save_file({**tensors, extra: torch.zeros(4, 64)}, weights)
        with pytest.raises(LoRAError, match=message):
            read_lora_file(folder)

    weights.write_bytes(b"not safetensors")
    with pytest.raises(LoRAError, match="adapter_model.safetensors: not a readable safetensors file"):
        read_lora_file(folder)
    weights.unlink()
    with pytest.raises(LoRAError, match="no adapter_model.safetensors \\(nor adapter_model.bin\\)"):
        read_lora_file(folder)
    torch.save(tensors, folder / "adapter_model.bin")  # PEFT's older format: read with weights_only=True
    assert torch.equal(read_lora_file(folder)["model.layers.0.self_attn.q_proj.lora.A.weight"],
                       tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    torch.save({**tensors, "evil": argparse.Namespace()}, folder / "adapter_model.bin")
    with pytest.raises(LoRAError, match="refused to load"):
        read_lora_file(folder)

    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAError, match="adapter_config.json: not a readable JSON file"):
        read_lora_file(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(LoRAError, match="not a PEFT adapter folder \\(no adapter_config.json\\)"):
        read_lora_file(folder)


def test_cli_error_is_one_line_exit_2_and_writes_nothing(tmp_path, peft_folder):
    folder = spoiled(tmp_path, peft_folder, use_qalora=True)
    out = tmp_path / "lora_d_64.pth"
    result = subprocess.run([sys.executable, str(SCRIPT), "--from_peft", str(folder), "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {folder}: use_qalora=true is not supported (QALoRA); only LoRA and " \
                                    f"DoRA adapters convert"
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_cli_errors_in_process(tmp_path, base, capsys):
    weight, _ = base
    other = base_model(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    apply_lora(other)
    wide = save_lora(other, tmp_path / "lora_wide_96.pth")
    cases = [(["--to_peft", str(tmp_path / "peft"), "--weight", str(weight), "--lora", str(wide)],
              "q_proj is (64, 64) (out, in) in the model but (96, 96)"),
             (["--to_peft", str(tmp_path / "peft"), "--weight", str(weight)], "--to_peft needs --lora"),
             (["--from_peft", str(tmp_path)], "--from_peft needs --out"),
             (["--from_peft", str(wide), "--out", str(tmp_path / "x.pth")], "not a folder"),
             (["--from_peft", str(tmp_path), "--out", str(tmp_path / "x.pth")], "no adapter_config.json"),
             (["--to_hf", "a", "--from_peft", "b"], "not allowed with argument")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            convert(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert message in err, err
    assert not (tmp_path / "peft").exists() and not (tmp_path / "x.pth").exists()
