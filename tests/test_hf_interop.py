"""Interop with transformers: Hugging Face folders import with transformers' logits, and our generate() takes
transformers' arguments and gives its greedy tokens."""
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, load_model, safe_torch_load, save_model
from model.hf_io import convert_hf_folder, read_hf_folder
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from scripts.convert_model import export_hf
from scripts.convert_model import main as convert
from tests.conftest import varied_model

VOCAB = 256


def hf_qwen3(tie=True, seed=0, **kw):
    """A tiny Qwen3ForCausalLM with GQA (4 heads, 2 KV heads) and non-trivial norm weights."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**{**dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 5e5},
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0), **kw})
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # a misplaced norm cannot hide behind weights of 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def max_logit_diff(ours, theirs) -> float:
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(x).logits - theirs(x).logits).abs().max().item()


@pytest.mark.parametrize("case, tie, shard", [("plain", True, None), ("sharded", True, "20KB"),
                                              ("untied", False, None), ("untied sharded", False, "20KB")])
def test_hugging_face_folder_imports_with_transformers_logits(tmp_path, case, tie, shard):
    theirs = hf_qwen3(tie=tie)
    theirs.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert ("model.safetensors.index.json" in files) == bool(shard)

    convert_hf_folder(tmp_path / "hf", tmp_path / "m.pth")
    ours = load_model(tmp_path / "m.pth").eval()
    c = ours.config
    assert (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings, c.num_key_value_heads) == (5e5, 1e-5, tie, 2)
    assert ("lm_head.weight" in safe_torch_load(tmp_path / "m.pth")) and not list(tmp_path.glob("*.tmp"))
    diff = max_logit_diff(ours, theirs)
    print(f"HF folder import, {case}: max |logit difference| {diff:.2e}")
    assert diff <= 1e-5


def test_convert_model_from_hf_cli(tmp_path, capsys):
    theirs = hf_qwen3(tie=False)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    convert(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "full_sft_64.pth")])
    assert "converted" in capsys.readouterr().out
    assert max_logit_diff(load_model(tmp_path / "full_sft_64.pth").eval(), theirs) <= 1e-5
    (tmp_path / "hf" / "config.json").write_text("{broken")
    with pytest.raises(SystemExit) as e:
        convert(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "again.pth")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "config.json" in err and err.count("\n") == 1
    assert not (tmp_path / "again.pth").exists()


# Every value the export writes, each unlike MiniMindConfig's default, so a default written in its place
# shows (head_dim is not hidden/heads, one KV head, an untied head).
ODD = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
           head_dim=24, intermediate_size=96, max_position_embeddings=300, rms_norm_eps=3e-5, rope_theta=12345.0,
           tie_word_embeddings=False, bos_token_id=5, eos_token_id=6, pad_token_id=7)


def test_export_keeps_the_models_config_and_imports_it_back(tmp_path):
    torch.manual_seed(0)
    ours = MiniMindForCausalLM(MiniMindConfig(**ODD)).eval()
    with torch.no_grad():  # norm weights of 1 would hide a norm in the wrong place
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_model(ours, tmp_path / "odd_64.pth")
    convert(["--to_hf", str(tmp_path / "hf"), "--weight", str(tmp_path / "odd_64.pth")])

    theirs = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    c = theirs.config
    read = {k: getattr(c, k) for k in ODD if k != "rope_theta"}
    assert {**read, "rope_theta": c.rope_parameters["rope_theta"]} == ODD
    assert theirs.lm_head.weight.data_ptr() != theirs.model.embed_tokens.weight.data_ptr()
    diff = max_logit_diff(ours, theirs)
    print(f"HF export of a non-default config: max |logit difference| {diff:.2e}")
    assert diff <= 1e-5

    convert(["--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back_64.pth")])
    back = load_model(tmp_path / "back_64.pth").eval()
    assert back.config.to_dict() == ours.config.to_dict()
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ours(x).logits)


def test_minimind_transformers_folder_imports(tmp_path):
    """MiniMind's own format: model_type minimind, its config keys, both names of the tied tensor written."""
    theirs = hf_qwen3(tie=True, seed=1)
    folder = tmp_path / "minimind"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "intermediate_size": None, "rope_theta": 5e5, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
        "flash_attn": True, "dropout": 0.0, "hidden_act": "silu", "use_moe": False, "inference_rope_scaling": False,
        "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}))
    save_file({k: v.clone().contiguous() for k, v in theirs.state_dict().items()}, folder / "model.safetensors")

    state, config = read_hf_folder(folder)
    assert config.intermediate_size == 160 and "lm_head.weight" not in state  # read off the weights; tied
    convert_hf_folder(folder, tmp_path / "m.pth")
    diff = max_logit_diff(load_model(tmp_path / "m.pth").eval(), theirs)
    print(f"HF folder import, MiniMind format: max |logit difference| {diff:.2e}")
    assert diff <= 1e-5


def test_pytorch_model_bin_is_read_without_unpickling(tmp_path):
    theirs = hf_qwen3()
    theirs.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(dict(theirs.state_dict()), tmp_path / "hf" / "pytorch_model.bin")
    convert_hf_folder(tmp_path / "hf", tmp_path / "m.pth")
    assert max_logit_diff(load_model(tmp_path / "m.pth").eval(), theirs) <= 1e-5

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": Payload()}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_hf_folder(tmp_path / "hf")
    assert not marker.exists()


def test_bf16_folder_converts_to_a_bf16_checkpoint(tmp_path):
    hf_qwen3().to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    convert_hf_folder(tmp_path / "hf", tmp_path / "m.pth")
    assert {v.dtype for v in safe_torch_load(tmp_path / "m.pth").values()} == {torch.bfloat16}


def edit_config(**changes):
    def edit(folder):
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def truncate(name):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return edit


def drop_tensor(folder):
    from safetensors.torch import load_file
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")


BROKEN_FOLDERS = {
    "no config": (lambda f: (f / "config.json").unlink(), r"config.json: no such file"),
    "broken json": (lambda f: (f / "config.json").write_text("{\"hidden_size\": 64,"), r"config.json: not valid JSON"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), r"hf: no model.safetensors"),
    "truncated": (truncate("model.safetensors"), r"model.safetensors: not a readable safetensors file"),
    "corrupt": (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 8 + b"garbage" * 20),
                r"model.safetensors: not a readable safetensors file"),
    "missing tensor": (drop_tensor, r"model.safetensors: missing tensor model.layers.1.mlp.up_proj.weight"),
    "shape": (edit_config(intermediate_size=128), r"model.safetensors: model.layers.0.mlp.gate_proj.weight has shape "
                                                  r"\(160, 64\) but config.json implies \(128, 64\)"),
    "moe": (edit_config(model_type="minimind", use_moe=True), r"config.json: use_moe = true: a mixture of experts"),
    "qwen3 moe": (edit_config(model_type="qwen3_moe"), r"config.json: model_type 'qwen3_moe' is not supported"),
    "attention bias": (edit_config(attention_bias=True), r"config.json: attention_bias = true"),
    "activation": (edit_config(hidden_act="gelu"), r"config.json: hidden_act = \"gelu\": an activation other"),
    "sliding window": (edit_config(use_sliding_window=True, sliding_window=64, max_window_layers=1,
                                   layer_types=["full_attention", "sliding_attention"]),
                       r"config.json: layer_types = .*sliding-window attention"),
    "rope scaling": (edit_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
                     r"config.json: rope_parameters = .*rope scaling"),
    "minimind yarn": (edit_config(model_type="minimind", rope_scaling={"type": "yarn", "factor": 16}),
                      r"config.json: rope_scaling = .*rope scaling"),
}


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_broken_or_foreign_folders_fail_with_one_line(tmp_path, case):
    hf_qwen3().save_pretrained(tmp_path / "hf")
    edit, message = BROKEN_FOLDERS[case]
    edit(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=message) as error:
        convert_hf_folder(tmp_path / "hf", tmp_path / "m.pth")
    assert len(str(error.value).splitlines()) == 1 and str(tmp_path / "hf") in str(error.value)
    assert not (tmp_path / "m.pth").exists()


def test_missing_shard_is_named(tmp_path):
    hf_qwen3().save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: no such file, but model.safetensors.index.json lists it"):
        read_hf_folder(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text("{\"metadata\": {}}")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a valid shard index \(KeyError"):
        read_hf_folder(tmp_path / "hf")


# generate(): our tokens against transformers' on the --to_hf export of the same weights.

@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    ours = varied_model(0)
    folder = tmp_path_factory.mktemp("hf")
    export_hf(ours, folder, torch.float32)
    return ours, transformers.Qwen3ForCausalLM.from_pretrained(folder).eval()


def left_padded(lengths, seed=0):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    g = torch.Generator().manual_seed(seed)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 3000, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def theirs_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, **kw)


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_batch_of_one_equals_transformers(twins, repetition_penalty):
    ours, hf = twins
    ids, mask = left_padded([6])
    free = ours.generate(ids, 40, eos_token_id=-1, repetition_penalty=repetition_penalty)
    eos = int(free[0, 6 + 12])  # stops after 13 new tokens (unless that token came earlier)
    kw = dict(max_new_tokens=40, eos_token_id=eos, pad_token_id=0, repetition_penalty=repetition_penalty)
    mine = ours.generate(ids, **kw)  # no mask: the plain causal path
    assert mine.shape[1] < 6 + 40 and mine[0, -1] == eos
    assert len(set(mine[0, 6:].tolist())) > 5  # varied text, not one repeated token
    assert torch.equal(mine, theirs_generate(hf, ids, mask, **kw))


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_left_padded_batch_equals_transformers(twins, repetition_penalty):
    ours, hf = twins
    ids, mask = left_padded([3, 7, 11])
    free = ours.generate(ids, 30, attention_mask=mask, eos_token_id=-1, repetition_penalty=repetition_penalty)[:, 11:]
    # One eos that ends row 1 early while rows 0 and 2 run to max_new_tokens; then a list that ends every row.
    others = free[0].tolist() + free[2].tolist()
    eos = next(int(t) for t in free[1, 3:] if int(t) not in others)  # a token only row 1 writes
    kw = dict(max_new_tokens=30, eos_token_id=eos, pad_token_id=0, repetition_penalty=repetition_penalty)
    mine = ours.generate(ids, attention_mask=mask, **kw)
    first = free[1].tolist().index(eos)
    assert mine.shape == (3, 41) and (mine[1, 11 + first + 1:] == 0).all()  # padded with pad after its eos
    assert torch.equal(mine, theirs_generate(hf, ids, mask, **kw))

    eos_list = [int(free[0, 4]), int(free[1, 8]), int(free[2, 10])]
    kw["eos_token_id"] = eos_list
    mine = ours.generate(ids, attention_mask=mask, **kw)
    assert mine.shape[1] <= 11 + 11  # every row stopped, so generation stopped early
    assert torch.equal(mine, theirs_generate(hf, ids, mask, **kw))


def test_left_padded_rows_start_at_position_zero(twins):
    """As transformers does: the first real token of a left-padded row is at RoPE position 0."""
    ours, hf = twins
    ids, mask = left_padded([3, 5])
    seen = []
    hook = ours.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["position_ids"].tolist()),
                                          with_kwargs=True)
    try:
        ours.generate(ids, 2, attention_mask=mask, eos_token_id=-1)
    finally:
        hook.remove()
    assert seen == [[[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]], [[3], [5]]]
    positions = torch.tensor(seen[0])
    with torch.no_grad():  # the prefill transformers' generate runs: same positions, same logits
        diff = (ours(ids, attention_mask=mask, position_ids=positions).logits
                - hf(ids, attention_mask=mask, position_ids=positions).logits)[mask.bool()].abs().max().item()
    print(f"left-padded prefill: max |logit difference| {diff:.2e}")
    assert diff <= 1e-5
    x = ids[1:]  # no position_ids: 0.. as before, bit for bit
    assert torch.equal(ours(x).logits, ours(x, position_ids=torch.arange(5)[None]).logits)


def test_finished_rows_keep_eos_without_pad_token_id(twins):
    ours, _ = twins
    ids, mask = left_padded([3, 7])
    free = ours.generate(ids, 10, attention_mask=mask, eos_token_id=-1)[:, 7:]
    eos = int(free[0, 2])
    assert eos not in free[1].tolist()
    out = ours.generate(ids, 10, attention_mask=mask, eos_token_id=eos)
    assert out.shape == (2, 17) and (out[0, 7 + free[0].tolist().index(eos):] == eos).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy(twins):
    ours, _ = twins
    ids, mask = left_padded([4, 9])
    greedy = ours.generate(ids, 20, attention_mask=mask, eos_token_id=-1)
    assert torch.equal(ours.generate(ids, 20, attention_mask=mask, eos_token_id=-1, temperature=1.5), greedy)
    torch.manual_seed(0)
    assert torch.equal(ours.generate(ids, 20, attention_mask=mask, eos_token_id=-1, do_sample=True, top_k=1,
                                     temperature=0.7), greedy)
    samples = []
    for _ in range(2):
        torch.manual_seed(1)
        samples.append(ours.generate(ids, 20, attention_mask=mask, eos_token_id=-1, do_sample=True, temperature=3.0,
                                     top_p=0.95))
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], greedy)


def test_hugging_face_keywords(twins):
    ours, _ = twins
    ids, _ = left_padded([5])
    greedy = ours.generate(ids, 8, eos_token_id=-1)
    assert torch.equal(ours.generate(inputs=ids, max_length=13, eos_token_id=-1, use_cache=False, num_beams=1,
                                     return_dict_in_generate=False), greedy)

    class Streamer:  # transformers' protocol: put(prompt), put(tokens) each step, end()
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    streamer = Streamer()
    ours.generate(ids, 8, eos_token_id=-1, streamer=streamer)
    assert streamer.puts == [ids.tolist()] + [[t] for t in greedy[0, 5:].tolist()] and streamer.ended == 1
    with pytest.raises(TypeError, match="unexpected keyword argument 'min_new_tokens'"):
        ours.generate(ids, 8, min_new_tokens=4)
    with pytest.raises(ValueError, match="supports only num_beams=1, got 4"):
        ours.generate(ids, 8, num_beams=4)
