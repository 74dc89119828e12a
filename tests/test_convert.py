import subprocess
import sys

import pytest
import torch
import transformers

from model.checkpoint import REPO_ROOT, load_model, safe_torch_load, save_model
from model.model_lora import LoRAError, apply_lora, find_adapter, save_lora
from scripts.convert_model import main as convert
from tests.test_lora import base_model, logits, randomize_B

SCRIPT = REPO_ROOT / "scripts" / "convert_model.py"


@pytest.fixture
def base_and_adapter(tmp_path):
    """out/full_sft_64.pth (+ .json) and out/lora/lora_identity_64.pth, and the LoRA model that made them."""
    model = base_model()
    save_model(model, tmp_path / "full_sft_64.pth")
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear")
    randomize_B(model)
    save_lora(model, tmp_path / "lora" / "lora_identity_64.pth")
    return tmp_path / "full_sft_64.pth", tmp_path / "lora" / "lora_identity_64.pth", model


def test_merge_gives_the_lora_models_logits(tmp_path, base_and_adapter):
    weight, lora, lora_model = base_and_adapter
    out = tmp_path / "full_sft_identity_64.pth"
    convert(["--merge", "--weight", str(weight), "--lora", str(lora), "--out", str(out)])
    assert out.with_suffix(".json").is_file() and not list(tmp_path.glob("*.tmp"))
    assert set(safe_torch_load(out)) == set(base_model().state_dict())  # a plain checkpoint, no adapter keys
    merged = load_model(out).eval()
    torch.testing.assert_close(logits(merged), logits(lora_model), atol=1e-5, rtol=0)


def test_merge_keeps_the_base_files_dtype(tmp_path, base_and_adapter):
    weight, lora, _ = base_and_adapter
    half = tmp_path / "half_64.pth"  # MiniMind saves fp16 weights
    torch.save({k: v.half() for k, v in safe_torch_load(weight).items()}, half)
    weight.with_suffix(".json").rename(half.with_suffix(".json"))
    convert(["--merge", "--weight", str(half), "--lora", str(lora), "--out", str(tmp_path / "m.pth")])
    assert {v.dtype for v in safe_torch_load(tmp_path / "m.pth").values()} == {torch.float16}


def test_hugging_face_export_loads_with_equal_logits(tmp_path, base_and_adapter):
    weight, lora, lora_model = base_and_adapter
    out = tmp_path / "hf"
    convert(["--to_hf", str(out), "--weight", str(weight), "--lora", str(lora)])
    assert {"model.safetensors", "config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file() == (REPO_ROOT / "model" / name).is_file()
    hf = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # re-tied, not random
    torch.testing.assert_close(logits(hf), logits(lora_model), atol=1e-4, rtol=0)


def test_errors_are_one_line_with_exit_code_2(tmp_path, base_and_adapter, capsys):
    weight, _, _ = base_and_adapter
    missing = tmp_path / "nope.pth"
    result = subprocess.run([sys.executable, str(SCRIPT), "--to_hf", str(tmp_path / "hf"), "--weight", str(missing)],
                            cwd=tmp_path, capture_output=True, text=True)  # runs from any directory
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {missing}: no such file"

    other = base_model(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    apply_lora(other)
    save_lora(other, tmp_path / "lora_wide_96.pth")
    with pytest.raises(SystemExit) as exit_info:
        convert(["--merge", "--weight", str(weight), "--lora", str(tmp_path / "lora_wide_96.pth"),
                 "--out", str(tmp_path / "m.pth")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q_proj is (64, 64) (out, in) in the model but (96, 96)" in err
    assert not (tmp_path / "m.pth").exists()


def test_adapter_found_by_name_in_out_lora(tmp_path, base_and_adapter):
    _, lora, _ = base_and_adapter
    assert find_adapter("lora_identity", 64, out_dir=tmp_path) == lora
    with pytest.raises(LoRAError, match="no such adapter file"):
        find_adapter("lora_medical", 64, out_dir=tmp_path)



def test_lora_stats_for_minimind3():
    from model.model_minimind import MiniMindConfig
    from scripts.lora_stats import lora_table, report
    table = lora_table(MiniMindConfig(), rank=8)
    rows = {r["kind"]: r for r in table["rows"]}
    assert list(rows) == ["q_proj", "o_proj"]  # GQA: k/v are 768 -> 384, not square
    assert (rows["q_proj"]["full"], rows["q_proj"]["lora"], rows["q_proj"]["break_even"]) == (768 * 768, 8 * 1536, 384)
    layer = 2 * 768 * 768 + 2 * 768 * 384 + 3 * 768 * 2432 + 2 * 768 + 2 * 96
    assert table["model"] == 6400 * 768 + 8 * layer + 768 and table["lora"] == 8 * 2 * 8 * 1536
    assert "warning" not in report(MiniMindConfig(), 8)
    assert "warning: r=300 reaches the break-even rank 256.0 of k_proj" in report(MiniMindConfig(), 300, "all-linear")
