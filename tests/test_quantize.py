"""QLoRA's quantised base (model/quantize.py) against bitsandbytes, and transformers + bitsandbytes + PEFT."""
import contextlib
import io
import json
from pathlib import Path

import bitsandbytes.functional as bnbf
import peft
import pytest
import torch
import transformers

import eval_llm
from model.checkpoint import load_model, save_model
from model.engine import Engine, Request
from model.model_lora import (CONFIG_KEY, AdapterBank, LoRAError, apply_lora, load_lora, lora_parameters, merge_lora,
                              read_lora_file, save_lora, set_adapter)
from model.quantize import (QuantizedWeight, QuantizeError, dequantize_base, dynamic_map, quantization_of,
                            quantize_base, quantized_bytes)
from model.tokenizer import Tokenizer
from scripts.convert_model import main as convert
from scripts.lora_stats import main as lora_stats
from tests.conftest import random_adapter, solo_reply, varied_model
from tests.test_engine import run as run_together
from tests.test_lora import TOKENS, base_model, logits, randomize_B
from tests.test_trainer import TINY, head
from trainer import train_lora
from trainer.trainer_utils import run_main

DEMO = Path(__file__).resolve().parent.parent / "dataset" / "demo"


def max_diff(ours, theirs, what: str) -> float:
    diff = (ours - theirs).abs().max().item()
    print(f"\nmax |difference| {what}: {diff:.3g}")
    return diff


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))


# (2432, 768): the 768x8 model's gate_proj; (96, 320) leaves 224 absmax values in its last 256-block
@pytest.mark.parametrize("shape", [(32, 64), (96, 320), (2432, 768)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_weight_equals_bitsandbytes(shape, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 0.05  # rows of different scales spread the absmax values
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    theirs = bnbf.dequantize_4bit(packed, state)
    q = QuantizedWeight(w, "nf4", double_quant)
    assert torch.equal(q.codes.view(-1), packed.view(-1))  # same codes, same nibble order
    assert max_diff(q.dequantize(), theirs, f"NF4 {shape} double_quant={double_quant} vs bitsandbytes") <= 1e-6


def test_int8_weight_equals_bitsandbytes_rowwise():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * torch.rand(96, 1)
    codes, row_absmax, _ = bnbf.int8_vectorwise_quant(w.clone())
    q = QuantizedWeight(w, "int8")
    assert torch.equal(q.codes, codes) and torch.equal(q.scale, row_absmax)
    assert max_diff(q.dequantize(), bnbf.int8_vectorwise_dequant(codes, row_absmax), "int8 vs bitsandbytes") <= 1e-6


def test_bytes_and_bits_per_weight_by_hand():
    model = base_model()
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules() if n.endswith("_proj")]
    numel = sum(d * k for d, k in shapes)
    q = quantize_base(model, "nf4")
    # a half-byte code per weight, an 8-bit absmax per 64, a float32 scale per 256 absmax, a float32 mean per layer
    nf4 = numel // 2 + numel // 64 + sum(4 * -(-(d * k // 64) // 256) + 4 for d, k in shapes)
    assert (q["layers"], q["bytes"], q["fp32_bytes"]) == (14, nf4, 4 * numel)
    assert 4.12 < q["bits_per_weight"] < 4.14
    assert sum(quantized_bytes(d, k, "nf4") for d, k in shapes) == nf4  # lora_stats' count from shapes alone
    assert quantize_base(base_model(), "nf4", double_quant=False)["bits_per_weight"] == 4 + 32 / 64
    int8 = numel + 4 * sum(d for d, _ in shapes)  # a code per weight, a float32 absmax per row
    assert quantize_base(base_model(), "int8")["bytes"] == int8 == sum(quantized_bytes(d, k, "int8") for d, k in shapes)


def test_lora_stats_shows_the_quantised_base_of_minimind3():
    # 8 layers of q,o 768x768, k,v 384x768, gate,up 2432x768, down 768x2432: 58,982,400 weights, 225.0 MiB in fp32;
    # NF4: 29,491,200 + 921,600 absmax bytes + 8 * (4 * (36+18+18+36+3*114) + 7 * 4) = 30,427,424 bytes
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lora_stats(["--preset", "minimind3", "--quantize_base", "nf4"])
    assert out.getvalue().splitlines()[-1].startswith(
        f"--quantize_base nf4 (blocks of 64, double-quantised absmax): the projections take 29.0 MiB instead of "
        f"225.0 MiB in float32 ({30427424 / (4 * 58982400):.3f}x, {8 * 30427424 / 58982400:.3f} bits per weight)")


def test_only_projections_are_quantised_and_no_gradient_reaches_them():
    model = base_model()
    quantize_base(model, "nf4")
    kinds = {n.rsplit(".", 2)[-2] for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    names = {n for n, _ in model.named_parameters()}
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert not any(n.endswith("_proj.weight") for n in names)  # buffers, not Parameters
    apply_lora(model, rank=4, target_modules="all-linear")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(model)}


@pytest.mark.parametrize("variant, flag", [({"use_dora": True}, "--use_dora"),
                                           ({"init_lora_weights": "pissa"}, "--init_lora_weights")])
def test_dora_and_pissa_on_a_quantised_base_are_refused_in_one_line(variant, flag):
    model = base_model()
    quantize_base(model, "nf4")
    with pytest.raises(LoRAError, match=f"on a quantised base is not supported .*; drop --quantize_base or {flag}$"):
        apply_lora(model, rank=4, target_modules="all-linear", **variant)
    apply_lora(model, rank=4, target_modules="all-linear")  # nothing was left half-built: plain LoRA still goes on


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qbase")
    weight = save_model(base_model(), folder / "full_sft_64.pth")
    convert(["--to_hf", str(folder / "hf"), "--weight", str(weight)])
    return weight, folder / "hf"


def test_nf4_lora_model_gives_transformers_4bit_with_peft_logits(tmp_path, exported):
    weight, hf_dir = exported
    ours = base_model()
    quantize_base(ours, "nf4")
    apply_lora(ours, rank=4, alpha=8, target_modules="all-linear")
    randomize_B(ours)
    lora = save_lora(ours, tmp_path / "lora_q_64.pth")
    assert json.loads(read_lora_file(lora)[CONFIG_KEY])["base"]["quantization"] == \
           {"kind": "nf4", "blocksize": 64, "double_quant": True}
    convert(["--to_peft", str(tmp_path / "peft"), "--weight", str(weight), "--lora", str(lora),
             "--base_model_name_or_path", str(hf_dir)])
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(hf_dir, quantization_config=config, device_map="cpu",
                                                       dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    assert max_diff(logits(ours), logits(theirs), "our NF4 + LoRA vs transformers 4-bit + PEFT") <= 1e-4
    with theirs.disable_adapter():
        assert not torch.allclose(logits(ours), logits(theirs), atol=1e-3)  # the adapter is really on
    float_base = base_model()
    load_lora(float_base, lora)
    assert not torch.allclose(logits(ours), logits(float_base), atol=1e-3)  # and the base is really 4-bit


def _float_lora(quantised):
    """The same model with float weights equal to the dequantised ones (a deep copy; the original stays 4-bit)."""
    import copy
    model = copy.deepcopy(quantised)
    dequantize_base(model)
    return model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_gradients_equal_the_dequantised_float_models_and_reach_only_a_and_b(kind):
    model = base_model()
    quantize_base(model, kind)
    apply_lora(model, rank=4, target_modules="all-linear")
    randomize_B(model)
    model.train()
    reference = _float_lora(model)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    for m in (model, reference):
        m(TOKENS, labels=TOKENS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in model.named_parameters() if ".lora." in n}
    ref = dict(reference.named_parameters())
    worst = max((g - ref[n].grad).abs().max() for n, g in grads.items())
    assert max_diff(worst, torch.zeros(()), f"{kind} base: A and B gradients vs the dequantised float model") <= 1e-6
    torch.optim.AdamW(lora_parameters(model), lr=1e-2).step()
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers())


def test_merge_needs_dequantising_and_then_equals_the_unmerged_model():
    model = base_model()
    quantize_base(model, "nf4")
    apply_lora(model, rank=4, target_modules="all-linear")
    randomize_B(model)
    unmerged = logits(model)
    with pytest.raises(LoRAError, match="cannot merge into a quantised base; call .*dequantize_base"):
        merge_lora(model)
    assert dequantize_base(model) == 14 and quantization_of(model) is None
    merge_lora(model)
    assert max_diff(logits(model), unmerged, "merged on the dequantised base vs unmerged NF4") <= 1e-5


def test_bad_input_is_one_line():
    with pytest.raises(QuantizeError, match=r"^unknown quantisation 'nf8'; choose nf4 .* or int8 .*, or none$"):
        quantize_base(base_model(), "nf8")
    model = base_model(intermediate_size=160)  # down_proj's input is not a multiple of 64
    with pytest.raises(QuantizeError, match=r"^model\.layers\.0\.mlp\.down_proj: input size 160 is not a multiple "
                                            r"of the NF4 block size 64 .*; use --quantize_base int8 or none$"):
        quantize_base(model, "nf4")
    assert quantization_of(model) is None  # nothing changed
    assert quantize_base(model, "int8")["layers"] == 14  # int8 has no blocks


def test_bank_rows_on_a_quantised_base_equal_each_adapter_loaded_the_usual_way(tmp_path):
    # the server's per-row adapters (AdapterBank) over an NF4 base, against load_lora on the same NF4 base
    files = {}
    for name, kw in (("a", {}), ("b", dict(rank=8, target_modules="all-linear"))):
        model = varied_model(0)
        quantize_base(model, "nf4")
        random_adapter(model, name, tmp_path / f"{name}.pth", **kw)
        files[name] = tmp_path / f"{name}.pth"
    ref = varied_model(0)
    quantize_base(ref, "nf4")
    for name, path in files.items():
        load_lora(ref, path, name)
    x = torch.randint(0, 3000, (3, 6))
    want = []
    for row, name in enumerate(["a", None, "b"]):
        set_adapter(ref, name)
        want.append(logits(ref, x[row:row + 1])[0])
    model = varied_model(0)
    quantize_base(model, "nf4")
    bank = AdapterBank(model, slots=2, max_rank=8)
    bank.load(1, files["a"])
    bank.load(2, files["b"])
    bank.select([1, 0, 2])
    got = logits(model, x)
    assert max(max_diff(got[r], want[r], f"bank row {r} on NF4") for r in range(3)) <= 1e-4
    assert not torch.allclose(want[0], want[1], atol=1e-2)


def test_a_dora_file_on_a_quantised_base_is_refused_by_the_bank_and_by_load_lora(tmp_path):
    model = varied_model(0)
    apply_lora(model, rank=4, target_modules="all-linear", use_dora=True, adapter_name="d")
    save_lora(model, tmp_path / "d.pth", "d")
    served = varied_model(0)
    quantize_base(served, "nf4")
    bank = AdapterBank(served, slots=1, max_rank=8)
    with pytest.raises(LoRAError, match=r"d\.pth: a DoRA adapter on a quantised base is not supported .*; serve it "
                                        r"without --quantize_base$"):
        bank.load(1, tmp_path / "d.pth")
    with pytest.raises(LoRAError, match="DoRA on a quantised base is not supported"):
        load_lora(served, tmp_path / "d.pth", "d")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base in out/ and an adapter train_lora.py trained on its NF4 form for 2 steps."""
    out = tmp_path_factory.mktemp("qlora") / "out"
    save_model(varied_model(0), out / "full_sft_64.pth")
    data = head(DEMO / "lora_identity.jsonl", out.parent / "persona.jsonl", 8)
    code = run_main(train_lora.main, TINY + ["--save_dir", str(out), "--data_path", str(data), "--replay_data", "none",
                                             "--max_steps", "2", "--lora_rank", "4", "--quantize_base", "nf4"])
    assert code == 0
    return out


def test_train_lora_quantize_base_trains_and_records_it(trained, capsys):
    config = json.loads(read_lora_file(trained / "lora" / "persona_64.pth")[CONFIG_KEY])
    assert config["base"]["quantization"] == {"kind": "nf4", "blocksize": 64, "double_quant": True}
    assert "probe" in config["base"] and "model.embed_tokens.weight" in config["base"]["probe"]
    code = run_main(train_lora.main, TINY + ["--save_dir", str(trained), "--data_path",
                                             str(DEMO / "lora_identity.jsonl"), "--quantize_base", "nf4",
                                             "--use_compile", "1"])
    assert code == 2
    assert capsys.readouterr().err == "error: --use_compile 1 with --quantize_base is not supported; drop one of them\n"


def _reply(model, tok, prompt="hello"):
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)])
    new = model.generate(ids, 8, temperature=0, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    return tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new, skip_special_tokens=True)


def test_eval_llm_quantize_base_and_merge_say_what_they_do(trained, capsys):
    tok = Tokenizer()
    ref = load_model(trained / "full_sft_64.pth").eval()
    quantize_base(ref, "nf4")
    load_lora(ref, trained / "lora" / "persona_64.pth")
    want = _reply(ref, tok)
    args = ["--save_dir", str(trained), "--hidden_size", "64", "--temperature", "0", "--max_new_tokens", "8",
            "--lora_weight", "persona", "--quantize_base", "nf4", "--prompt", "hello"]
    for extra in ([], ["--merge"]):
        assert eval_llm.main(args + extra) == 0
        out = capsys.readouterr()
        assert out.out == f"> hello\n[persona] {want}\n"
        assert "base projections in nf4 (double-quantised absmax): 14 layers" in out.err
        merged = "--merge on a nf4 base: its projections are dequantised to full precision and the adapter merged"
        assert (merged in out.err) == bool(extra)
    assert eval_llm.main(args + ["--compile"]) == 2
    assert capsys.readouterr().err.endswith("error: --compile with --quantize_base is not supported (the compiled "
                                            "step is built for float weights); drop one of them\n")


def test_convert_merge_onto_the_quantised_base_is_full_precision_and_says_so(trained, tmp_path, capsys):
    lora = trained / "lora" / "persona_64.pth"
    convert(["--merge", "--weight", str(trained / "full_sft_64.pth"), "--lora", str(lora), "--out",
             str(tmp_path / "merged_64.pth"), "--quantize_base", "nf4"])
    assert capsys.readouterr().out == (
        f"merged {lora} into {trained / 'full_sft_64.pth'} -> {tmp_path / 'merged_64.pth'} (on the nf4-dequantised "
        f"base the adapter was trained on; written in full precision, float32, not nf4)\n")
    merged = load_model(tmp_path / "merged_64.pth").eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    ref = load_model(trained / "full_sft_64.pth").eval()
    quantize_base(ref, "nf4")
    load_lora(ref, lora)
    x = torch.randint(0, 3000, (1, 12))
    assert max_diff(logits(merged, x), logits(ref, x), "merged checkpoint vs NF4 base + adapter") <= 1e-5


def test_engine_serves_per_row_adapters_on_a_quantised_base(tmp_path):
    def nf4_model():
        model = varied_model(0)
        quantize_base(model, "nf4")
        return model

    tok = Tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    random_adapter(nf4_model(), "a", tmp_path / "a.pth", target_modules="all-linear")
    want = {name: solo_reply(nf4_model(), tok, prompt, 6, path) for name, path in (("a", tmp_path / "a.pth"),
                                                                                    (None, None))}
    assert want["a"] != want[None]
    engine = Engine(nf4_model(), tok, max_batch=2, max_seq_len=64, max_loras=1).start()
    try:
        engine.register("a", tmp_path / "a.pth")
        events = run_together(engine, Request(prompt, "a", max_tokens=6), Request(prompt, None, max_tokens=6))
        assert {"a": events[0][-1]["text"], None: events[1][-1]["text"]} == want
    finally:
        engine.stop()


def test_convert_notes_a_qlora_adapter_merged_onto_the_float_base(trained, tmp_path, capsys):
    lora = trained / "lora" / "persona_64.pth"
    convert(["--merge", "--weight", str(trained / "full_sft_64.pth"), "--lora", str(lora), "--out",
             str(tmp_path / "merged_64.pth")])
    assert capsys.readouterr().err == (f"note: {lora} was trained on a nf4 base; it is merged onto the float base as "
                                       f"given (--quantize_base nf4: onto the dequantised weights it was trained on)\n")


def test_server_says_what_it_does_not_support_on_a_quantised_base(trained, capsys):
    from scripts import serve_openai_api
    code = serve_openai_api.main(["--save_dir", str(trained), "--hidden_size", "64", "--quantize_base", "nf4",
                                  "--compile"])
    assert code == 2
    assert capsys.readouterr().err.endswith("error: --compile with --quantize_base is not supported (the compiled "
                                            "step is built for float weights); drop one of them\n")
