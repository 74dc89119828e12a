import json

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from model.checkpoint import hf_config_dict, safe_torch_load
from model.model_lora import (CONFIG_KEY, PROJECTIONS, LoRA, LoRADropout, LoRAError, LoRALinear, active_adapter,
                              adapter_stats, apply_lora, disable_adapters, list_adapters, load_lora,
                              load_lora_state_dict, lora_layers, lora_parameters, lora_state_dict, merge_lora,
                              save_lora, set_adapter, trainable_summary, unload_lora, unmerge_lora)
from model.model_minimind import MiniMindForCausalLM
from tests.conftest import tiny_config

TOKENS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))


def base_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**kw)).eval()


def randomize_B(model, adapter_name=None, seed=1):
    """B starts at 0; give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            for name, lora in m.lora.items():
                if adapter_name in (None, name):
                    lora.B.weight.copy_(torch.randn(lora.B.weight.shape, generator=g) * 0.05)


def lora_model(seed=0, **lora_kw):
    model = base_model(seed)
    apply_lora(model, **lora_kw)
    randomize_B(model)
    return model


def logits(model, x=TOKENS):
    with torch.no_grad():
        return model(x).logits


def test_default_targets_are_square_layers_and_shapes():
    model = base_model()
    stats = apply_lora(model, rank=4)
    names = [n for n, _ in lora_layers(model)]
    # hidden 64, 4 heads, 2 KV heads: k_proj and v_proj are 64 -> 32, so only q_proj and o_proj are square
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    lora = model.model.layers[0].self_attn.q_proj.lora["default"]
    assert lora.A.weight.shape == (4, 64) and lora.B.weight.shape == (64, 4)
    assert stats["target_modules"] == ["q_proj", "o_proj"] and stats["num_modules"] == 4
    assert stats["trainable_params"] == stats["adapter_params"] == 4 * 4 * (64 + 64)
    assert stats["total_params"] == base_model().num_parameters() + stats["adapter_params"]
    assert "on q_proj,o_proj (4 modules); trainable 2,048 of" in trainable_summary(model)


def test_base_keys_unchanged_and_base_part_loads_into_plain_model():
    model = lora_model()
    plain = base_model(seed=5)
    state = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    with disable_adapters(model):
        assert torch.equal(logits(plain), logits(model))


def test_only_A_and_B_train_and_W0_gets_no_gradient():
    model = base_model()
    apply_lora(model, rank=4, target_modules="all-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora.default.A.weight", ".lora.default.B.weight")) for n in trainable)
    params = lora_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    q = model.model.layers[0].self_attn.q_proj
    lora = q.lora["default"]
    opt = torch.optim.Adam(params, lr=1e-2)  # no weight decay: A moves only through its gradient
    A0, B0 = lora.A.weight.detach().clone(), lora.B.weight.detach().clone()

    model(TOKENS, labels=TOKENS).loss.backward()
    assert q.weight.grad is None and model.model.embed_tokens.weight.grad is None
    assert torch.count_nonzero(lora.A.weight.grad) == 0  # dL/dA = B^T (...) and B = 0
    assert torch.count_nonzero(lora.B.weight.grad) > 0   # dL/dB = (...) (Ax)^T and A != 0
    opt.step()
    opt.zero_grad()
    assert not torch.equal(lora.B.weight, B0) and torch.equal(lora.A.weight, A0)

    model(TOKENS, labels=TOKENS).loss.backward()  # now B != 0, so A gets a gradient too
    opt.step()
    assert not torch.equal(lora.A.weight, A0)


def test_A_and_B_both_zero_never_move():
    model = base_model()
    apply_lora(model, rank=4)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.zero_()
    opt = torch.optim.Adam(lora_parameters(model), lr=1e-2)
    for _ in range(3):
        model(TOKENS, labels=TOKENS).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.count_nonzero(p) == 0 for p in lora_parameters(model))


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_start_equals_base_model_exactly(targets):
    model = base_model()
    base = logits(model)
    apply_lora(model, target_modules=targets, dropout=0.1)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("rank,alpha,rslora,scale", [(4, 16, False, 4.0), (16, 16, False, 1.0),
                                                     (16, 16, True, 4.0)])
def test_scale_alpha_over_r_and_rslora(rank, alpha, rslora, scale):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24))
    layer.lora["x"] = lora = LoRA(32, 24, rank, alpha, use_rslora=rslora)
    layer.active_adapter = "x"
    nn.init.normal_(lora.B.weight)
    x = torch.randn(5, 32)
    branch = layer(x) - F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(branch, scale * (x @ lora.A.weight.T @ lora.B.weight.T), atol=1e-5, rtol=1e-5)
    assert lora.scale == pytest.approx(scale)


def test_lora_branch_costs_r_times_d_plus_k_not_d_times_k():
    from torch.utils.flop_counter import FlopCounterMode
    d, k, r, n = 256, 192, 4, 8
    lora = LoRA(k, d, r, alpha=8)
    with FlopCounterMode(display=False) as counter:
        lora(torch.randn(n, k))
    assert counter.get_total_flops() == 2 * n * r * (d + k)  # building B @ A alone would be 2*d*r*k


def test_dropout_only_on_the_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64))
    layer.lora["x"] = lora = LoRA(64, 64, 8, 16, dropout=0.5)
    layer.active_adapter = "x"
    layer.train()
    x = torch.randn(4, 64)
    base = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), base)  # B = 0: dropout on the base path would show here
    nn.init.normal_(lora.B.weight)
    first, second = layer(x) - base, layer(x) - base
    assert not torch.allclose(first, second)  # the branch is randomised
    layer.eval()
    torch.testing.assert_close(layer(x), base + 2 * (x @ lora.A.weight.T @ lora.B.weight.T), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lora_dropout_keeps_1_minus_p_scaled_up_and_independently(p):
    drop = LoRADropout(p)
    torch.manual_seed(3)
    x = torch.ones(2_000_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=2e-3)
    assert y.unique().tolist() == [0.0, pytest.approx(1 / (1 - p), rel=1e-4)]
    assert y.mean().item() == pytest.approx(1.0, abs=5e-3)  # inverted dropout: the expectation is unchanged
    # Neighbours come from the same 64-bit draw: their masks must still be independent.
    assert (kept[:-1] & kept[1:]).float().mean().item() == pytest.approx((1 - p) ** 2, abs=2e-3)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes where kept, scaled the same way
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # seeded like the rest of training
    drop.eval()
    assert drop(x) is x
    with pytest.raises(LoRAError, match=r"LoRA dropout must be in \[0, 1\), got 1.0"):
        LoRADropout(1.0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_then_load_into_fresh_model_gives_same_logits(tmp_path, suffix):
    model = lora_model(rank=4, alpha=8, target_modules="q_proj,v_proj", use_rslora=True)
    path = tmp_path / f"lora_identity_64{suffix}"
    save_lora(model, path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    fresh = base_model()
    assert load_lora(fresh, path) == "lora_identity"  # the `_{hidden}` suffix is dropped
    assert torch.equal(logits(fresh), logits(model))
    assert not any(p.requires_grad for p in lora_parameters(fresh))  # loaded for inference
    state = lora_state_dict(fresh)
    config = json.loads(state.pop(CONFIG_KEY))
    assert set(state) == {f"model.layers.{i}.self_attn.{p}_proj.lora.{m}.weight"
                          for i in range(2) for p in "qv" for m in "AB"}
    assert (config["rank"], config["alpha"], config["use_rslora"]) == (4, 8, True)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["dtype"] == "float32"
    assert config["base"]["hidden_size"] == 64 and config["base"]["layer_shapes"]["v_proj"] == [32, 64]


def test_pth_file_is_what_minimind_loader_reads(tmp_path):
    model = lora_model()
    save_lora(model, tmp_path / "a.pth")
    state = torch.load(tmp_path / "a.pth", weights_only=True)
    assert isinstance(state[CONFIG_KEY], str)
    name = "model.layers.1.self_attn.o_proj"  # MiniMind's load_lora filters by f"{name}.lora." in key
    picked = {k.replace(f"{name}.lora.", ""): v for k, v in state.items() if f"{name}.lora." in k}
    assert set(picked) == {"A.weight", "B.weight"}


def test_minimind_file_without_config_loads_with_scale_1(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(2):
        for p in ("q_proj", "o_proj"):
            state[f"model.layers.{i}.self_attn.{p}.lora.A.weight"] = (torch.randn(4, 64, generator=g) * 0.1).half()
            state[f"model.layers.{i}.self_attn.{p}.lora.B.weight"] = (torch.randn(64, 4, generator=g) * 0.1).half()
    torch.save(state, tmp_path / "lora_medical_64.pth")
    model = base_model()
    assert load_lora(model, tmp_path / "lora_medical_64.pth") == "lora_medical"
    q = model.model.layers[1].self_attn.q_proj
    assert q.lora["lora_medical"].rank == 4 and q.lora["lora_medical"].scale == 1.0
    assert q.lora["lora_medical"].A.weight.dtype == torch.float32
    x = torch.randn(3, 64)
    A, B = (state[f"model.layers.1.self_attn.q_proj.lora.{m}.weight"].float() for m in "AB")
    torch.testing.assert_close(q(x), x @ q.weight.T + (x @ A.T) @ B.T, atol=1e-6, rtol=1e-6)


def test_adapter_for_another_base_names_module_and_both_shapes(tmp_path):
    save_lora(lora_model(), tmp_path / "a.pth")
    wider = base_model(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(LoRAError, match=r"model.layers.0.self_attn.q_proj is \(96, 96\) \(out, in\) in the "
                                        r"model but \(64, 64\) in the adapter"):
        load_lora(wider, tmp_path / "a.pth")
    assert not lora_layers(wider)  # nothing half-loaded

    deeper = base_model(num_hidden_layers=3)
    apply_lora(deeper)
    save_lora(deeper, tmp_path / "deep.pth")
    with pytest.raises(LoRAError, match="model.layers.2.self_attn.q_proj is not a linear layer of this model"):
        load_lora(base_model(), tmp_path / "deep.pth")

    with pytest.raises(LoRAError, match="adapter's base has vocab_size=512, this model has vocab_size=640"):
        load_lora(base_model(vocab_size=640), tmp_path / "a.pth")


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = lora_state_dict(lora_model())
    state["evil"] = Payload()
    torch.save(state, tmp_path / "evil.pth")
    with pytest.raises(LoRAError, match="refused to load"):
        load_lora(base_model(), tmp_path / "evil.pth")
    assert not marker.exists()


def test_wrapper_prefixes_are_stripped(tmp_path):
    class FakeDDP(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = lora_model()
    for wrapped in (FakeDDP(model), torch.compile(model)):  # compile is lazy: no compilation happens here
        save_lora(wrapped, tmp_path / "a.pth")
        keys = [k for k in safe_torch_load(tmp_path / "a.pth") if k != CONFIG_KEY]
        assert keys and all(k.startswith("model.layers.") for k in keys)
    # a MiniMind file saved under DDP carries `module.` prefixes; it still loads
    ddp_state = {"module." + k: v for k, v in lora_state_dict(model).items() if k != CONFIG_KEY}
    fresh = base_model()
    load_lora_state_dict(fresh, ddp_state, "ddp")
    assert [n for n, _ in lora_layers(fresh)] == [n for n, _ in lora_layers(model)]


def test_real_ddp_trains_only_lora_and_saves_clean_keys(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = base_model()
        apply_lora(model, rank=4)
        ddp = DistributedDataParallel(model)  # frozen W0 is fine: DDP only syncs what requires grad
        ddp(TOKENS, labels=TOKENS).loss.backward()
        assert all(torch.count_nonzero(m.lora["default"].B.weight.grad) > 0 for _, m in lora_layers(ddp))
        save_lora(ddp, tmp_path / "a.pth")
    finally:
        dist.destroy_process_group()
    assert all(k.startswith("model.layers.") for k in safe_torch_load(tmp_path / "a.pth") if k != CONFIG_KEY)


@pytest.mark.slow  # one inductor compile: ~5 s warm, ~20 s with a cold cache
def test_compiled_lora_model_matches_eager():
    model = lora_model(rank=4)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break (e.g. a patched forward) fails
    torch.testing.assert_close(logits(compiled), logits(model), atol=1e-5, rtol=0)


def test_merge_unmerge_round_trip():
    model = lora_model(target_modules="all-linear")
    q = model.model.layers[0].self_attn.q_proj
    W0 = q.weight.detach().clone()
    unmerged = logits(model)
    calls = []
    q.lora["default"].A.register_forward_hook(lambda *a: calls.append(1))

    assert merge_lora(model) == "default"
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    assert not calls  # merged: the branch is skipped, forward costs what the base costs
    torch.testing.assert_close(q.weight, W0 + q.lora["default"].delta_weight())
    with pytest.raises(LoRAError, match="merged into the base weights; call unmerge_lora"):
        merge_lora(model)
    apply_lora(base_model())  # an unrelated model is unaffected
    with pytest.raises(LoRAError, match="before switching adapters"):
        set_adapter(model, None)
    with pytest.raises(LoRAError, match="before disabling adapters"):
        with disable_adapters(model):
            pass

    assert unmerge_lora(model) == "default"
    torch.testing.assert_close(q.weight, W0, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    assert calls


def test_unload_after_merge_gives_a_plain_model():
    model = lora_model()
    expected = logits(model)
    merge_lora(model)
    plain = unload_lora(model)
    assert not lora_layers(plain) and type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(plain.state_dict()) == set(base_model().state_dict())
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


def test_switching_among_three_adapters(tmp_path):
    targets = {"a": None, "b": "q_proj,v_proj", "c": "all-linear"}
    model = base_model()
    base = logits(model)
    for seed, (name, t) in enumerate(targets.items()):
        apply_lora(model, rank=4, target_modules=t, adapter_name=name)
        randomize_B(model, name, seed=seed + 10)
        save_lora(model, tmp_path / f"{name}.pth", name)
    assert list_adapters(model) == ["a", "b", "c"] and active_adapter(model) == "c"
    assert {id(p) for p in lora_parameters(model, "c")} == {id(p) for p in model.parameters() if p.requires_grad}

    W = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    outputs = {}
    for name in targets:
        set_adapter(model, name)
        outputs[name] = logits(model)
        alone = base_model()
        load_lora(alone, tmp_path / f"{name}.pth")
        assert torch.equal(outputs[name], logits(alone)), name
        assert not torch.allclose(outputs[name], base, atol=1e-4)
    assert not torch.allclose(outputs["a"], outputs["b"]) and not torch.allclose(outputs["b"], outputs["c"])
    set_adapter(model, None)
    assert torch.equal(logits(model), base)
    set_adapter(model, "b")
    with disable_adapters(model):
        assert torch.equal(logits(model), base)
    assert active_adapter(model) == "b" and torch.equal(logits(model), outputs["b"])
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, W)  # switching never touches W0
    with pytest.raises(LoRAError, match="no adapter named 'd'"):
        set_adapter(model, "d")
    with pytest.raises(LoRAError, match="adapter 'a' already exists"):
        apply_lora(model, adapter_name="a")


def test_all_linear_covers_seven_projections_never_embeddings_or_lm_head():
    model = base_model()
    apply_lora(model, target_modules="all-linear")
    kinds = [n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)]
    assert sorted(set(kinds)) == sorted(PROJECTIONS) and len(kinds) == 7 * 2
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert adapter_stats(model)["target_modules"] == list(PROJECTIONS)


def test_target_lists_and_unknown_target_error():
    model = base_model()
    apply_lora(model, target_modules=" k_proj, gate_proj")
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)} == {"k_proj", "gate_proj"}
    with pytest.raises(ValueError, match=r"^unknown LoRA target 'lm_head'; valid: q_proj, k_proj, v_proj, o_proj, "
                                         r"gate_proj, up_proj, down_proj, all-linear"):
        apply_lora(base_model(), target_modules=["q_proj", "lm_head"])


def test_resume_loads_into_the_trainable_adapter():
    trained = lora_model(rank=4, alpha=32)
    resumed = base_model()
    apply_lora(resumed, rank=4, alpha=8)
    load_lora_state_dict(resumed, lora_state_dict(trained), "default")
    assert all(p.requires_grad for p in lora_parameters(resumed))  # still training
    assert resumed.model.layers[0].self_attn.q_proj.lora["default"].alpha == 32  # the file's alpha wins
    assert torch.equal(logits(resumed), logits(trained))
    with pytest.raises(LoRAError, match="has rank 4 in the file but 8 in adapter 'default'"):
        other = base_model()
        apply_lora(other, rank=8)
        load_lora_state_dict(other, lora_state_dict(trained), "default")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_match_peft_on_hugging_face_qwen3(use_rslora):
    ours = lora_model(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora)
    config = ours.config
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in hf_config_dict(config).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    base_state = {k: v for k, v in ours.state_dict().items() if ".lora." not in k}
    missing, unexpected = hf.load_state_dict(base_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, use_rslora=use_rslora)).eval()
    with torch.no_grad():
        for name, m in lora_layers(ours):
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(m.lora["default"].A.weight)
            target.lora_B["default"].weight.copy_(m.lora["default"].B.weight)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    with theirs.disable_adapter():
        assert not torch.allclose(logits(ours), logits(theirs), atol=1e-4)


def test_add_to_equals_y_plus_branch():
    torch.manual_seed(0)
    lora = LoRA(16, 24, rank=4, alpha=8)
    torch.nn.init.normal_(lora.B.weight)
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 24)
    torch.testing.assert_close(lora.add_to(y, x), y + lora(x), atol=1e-5, rtol=0)
    assert lora.add_to(y, x).shape == (2, 5, 24)


def test_an_adapter_with_dropout_loaded_into_an_eval_model_is_deterministic(tmp_path):
    # A new module starts in training mode; loaded into an eval model its dropout must not fire.
    model = base_model()
    apply_lora(model, rank=4, dropout=0.5, target_modules="all-linear")
    randomize_B(model)
    save_lora(model, tmp_path / "a.pth")
    served = base_model().eval()
    load_lora(served, tmp_path / "a.pth")
    first = logits(served)
    assert torch.equal(first, logits(served))
    assert torch.allclose(first, logits(model.eval()), atol=1e-5)
    fresh = base_model().eval()
    apply_lora(fresh, rank=4, dropout=0.5)
    assert all(not m.training for _, layer in lora_layers(fresh) for m in layer.lora.modules())
