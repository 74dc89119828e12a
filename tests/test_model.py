import math

import pytest
import torch
import transformers

from model.checkpoint import (CheckpointError, hf_config_dict, load_model, safe_torch_load, save_model)
from model import model_minimind
from model.model_minimind import KVCache, MiniMindConfig, MiniMindForCausalLM
from tests.conftest import tiny_config


def test_minimind3_defaults():
    c = MiniMindConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (768, 8, 8, 4)
    assert c.head_dim == 96 and c.vocab_size == 6400 and c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6
    assert c.intermediate_size == math.ceil(768 * math.pi / 64) * 64 == 2432


def test_shapes_and_loss(tiny_model):
    x = torch.randint(0, 512, (3, 17))
    logits = tiny_model(x).logits
    assert logits.shape == (3, 17, 512)
    out = tiny_model(x, labels=x)
    assert out._logits is None  # the loss did not need them ...
    assert torch.equal(out.logits, logits)  # ... but reading them builds them
    assert out.loss.ndim == 0 and abs(out.loss.item() - math.log(512)) < 0.5  # near-uniform at init
    labels = x.clone()
    labels[:, :10] = -100
    manual = torch.nn.functional.cross_entropy(logits[:, 9:-1].reshape(-1, 512), x[:, 10:].reshape(-1))
    assert torch.allclose(tiny_model(x, labels=labels).loss, manual, atol=1e-6)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_lm_head_loss_matches_cross_entropy(monkeypatch, weight_grad):
    monkeypatch.setattr(model_minimind, "LOSS_CHUNK_ELEMENTS", 100 * 40)  # 40 rows a chunk: 8 chunks, last short
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(100, 32, dtype=torch.float64) * 0.5).requires_grad_(weight_grad)
    t = torch.randint(0, 100, (300,))
    ours = model_minimind.lm_head_loss(h, w, t)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w), t)
    inputs = (h, w) if weight_grad else (h,)
    for a, b in zip(torch.autograd.grad(ours * 3, inputs), torch.autograd.grad(ref * 3, inputs)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model_minimind.lm_head_loss(h, w, t), ref.detach(), atol=1e-12, rtol=0)
    empty = model_minimind.lm_head_loss(h[:0], w, t[:0])
    empty.backward()
    assert empty.item() == 0.0 and h.grad.abs().sum() == 0


def test_loss_gradients_match_full_logits_cross_entropy(tiny_model):
    x = torch.randint(0, 512, (2, 9))
    labels = x.clone()
    labels[0, :4] = -100
    tiny_model.zero_grad()
    tiny_model(x, labels=labels).loss.backward()
    ours = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    logits = tiny_model(x).logits
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 512), targets, ignore_index=-100).backward()
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_causality(tiny_model):
    x = torch.randint(0, 512, (1, 12))
    y = x.clone()
    y[0, 8] = (y[0, 8] + 1) % 512
    a, b = tiny_model(x).logits, tiny_model(y).logits
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


def test_tied_embeddings(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    untied = MiniMindForCausalLM(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_state_dict_keys_are_qwen3_names(tiny_model):
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        expected |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        expected |= {p + f"self_attn.{n}_norm.weight" for n in "qk"}
        expected |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    assert set(tiny_model.state_dict()) == expected


def test_kv_cache_greedy_equals_full_recompute(tiny_model):
    prompt = torch.randint(3, 512, (2, 7))
    cached = tiny_model.generate(prompt, max_new_tokens=80, temperature=0.0, eos_token_id=-1)  # crosses a cache regrow
    seq = prompt
    for _ in range(80):
        nxt = tiny_model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_chunked_prefill_matches_full_forward(tiny_model):
    x = torch.randint(0, 512, (1, 20))
    cache = KVCache(2)
    a = tiny_model(x[:, :12], past_key_values=cache, use_cache=True).logits
    b = tiny_model(x[:, 12:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([a, b], 1), tiny_model(x).logits, atol=1e-5)


def test_left_padding_gives_same_tokens_as_unpadded(tiny_model):
    short, long = torch.randint(3, 512, (1, 5)), torch.randint(3, 512, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    both = tiny_model.generate(batch, max_new_tokens=10, attention_mask=mask, eos_token_id=-1)
    alone = tiny_model.generate(short, max_new_tokens=10, eos_token_id=-1)
    assert torch.equal(both[0, 9:], alone[0, 5:])


def test_generate_stops_at_eos_and_sampling_is_seeded(tiny_model):
    x = torch.randint(3, 512, (1, 4))
    first = tiny_model.generate(x, max_new_tokens=1, temperature=0.0)[0, -1].item()
    out = tiny_model.generate(x, max_new_tokens=50, temperature=0.0, eos_token_id=first)
    assert out.shape[1] == 5 and out[0, -1].item() == first
    torch.manual_seed(1)
    s1 = tiny_model.generate(x, max_new_tokens=20, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, eos_token_id=-1)
    torch.manual_seed(1)
    s2 = tiny_model.generate(x, max_new_tokens=20, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, eos_token_id=-1)
    assert torch.equal(s1, s2)


def test_save_load_round_trip_with_config_sidecar(tmp_path):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)).eval()
    path = tmp_path / "pretrain_96.pth"
    save_model(model, path)
    assert (tmp_path / "pretrain_96.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = load_model(path).eval()  # no architecture flags needed
    x = torch.randint(0, 512, (1, 9))
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert isinstance(safe_torch_load(path), dict)


def test_wrong_architecture_names_key_and_shapes(tmp_path):
    save_model(MiniMindForCausalLM(tiny_config()), tmp_path / "a.pth")
    (tmp_path / "a.json").unlink()  # a foreign checkpoint: the architecture comes from flags
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight has shape \(512, 64\) in the file but "
                                              r"\(512, 128\) in the model"):
        load_model(tmp_path / "a.pth", vocab_size=512, hidden_size=128, num_hidden_layers=2)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": torch.zeros(2), "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_torch_load(tmp_path / "evil.pth")
    assert not marker.exists()


def test_qwen3_logits_match_hugging_face():
    torch.manual_seed(0)
    config = tiny_config(rope_theta=1e6)
    ours = MiniMindForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm cannot hide
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in hf_config_dict(config).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    theirs = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    x = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-4, rtol=0)


def test_saved_files_get_the_umask_mode_and_no_temp_files(tmp_path, tiny_model):
    import os
    old = os.umask(0o022)
    try:
        path = save_model(tiny_model, tmp_path / "m_64.pth")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone would leave 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_64.json", "m_64.pth"]


def test_rope_table_built_while_generating_serves_training_and_longer_inputs(tiny_model):
    with torch.inference_mode():
        tiny_model.generate(torch.randint(3, 512, (1, 5)), max_new_tokens=3, temperature=0.0)
    x = torch.randint(0, 512, (1, 300))  # longer than the first table: it grows
    tiny_model(x, labels=x).loss.backward()  # an inference-mode table would refuse to be saved for backward
    cos, sin = tiny_model._rope(290, 10, x.device, torch.float32)
    ref_cos, ref_sin = model_minimind.rope_cos_sin(torch.arange(290, 300), tiny_model.config.head_dim,
                                                   tiny_model.config.rope_theta, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
